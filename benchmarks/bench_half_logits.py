#!/usr/bin/env python
"""Benchmark: peak memory of a bf16 training step with the logits handed to the loss in fp32
(megatron's ``Float16Module`` default, ``fp32_output=True``) and in bf16 (this project's
``HalfPrecisionOutput``), side by side in one run.

One process (gloo, world of one), a bf16 GPT with a large vocabulary so that the logits
dominate: the loss path is the output layer, the logits (bf16; plus an fp32 copy and its fp32
gradient when upcast), the log-prob op and its backward. Per variant and round: the peak extra
memory of one full training step (forward, backward, optimizer) over what is held before it,
and its wall time; rounds alternate the variants. CPU: peak RSS (``VmHWM`` reset through
``/proc/self/clear_refs``); CUDA: ``max_memory_allocated``.

Run by hand, e.g.::

    python benchmarks/bench_half_logits.py                    # CPU, ~1 minute
    python benchmarks/bench_half_logits.py --vocab 152064 --seq 4096 --hidden 1024   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_logprobs import MemProbe  # noqa: E402


def _batch(args, dev) -> dict:
    """One micro-batch of random tokens: [micro_batch, seq] on ``dev``."""
    gen = torch.Generator().manual_seed(0)
    b, s = args.micro_batch, args.seq
    micro = {"tokens": torch.randint(0, args.vocab, (b, s), generator=gen),
             "labels": torch.randint(0, args.vocab, (b, s), generator=gen),
             "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous()}
    return {k: v.to(dev) for k, v in micro.items()}


def _measure(args, tm, forward_step, micro, dev) -> dict:
    """Peak extra memory and step time (CUDA events on a GPU) of each variant, per round."""
    from megatron.core.transformer.module import Float16Module

    from psft_megatron.model.builder import HalfPrecisionOutput
    from psft_megatron.training.step import train_step
    from psft_megatron.training.throughput import start_timer

    variants = {
        "fp32 logits (Float16Module default)": lambda self, *a, fp32_output=True, **k: Float16Module.forward(
            self, *a, fp32_output=fp32_output, **k),
        "bf16 logits (HalfPrecisionOutput)": HalfPrecisionOutput.forward,
    }
    results = {name: {"peak_extra_mib": [], "time_s": []} for name in variants}
    probe = MemProbe(dev)
    for _ in range(args.rounds):
        for name, forward in variants.items():
            HalfPrecisionOutput.forward = forward
            probe.start()
            timer = start_timer()
            train_step(forward_step(name), [iter([micro])], tm.chunks, tm.optimizer, None,
                       num_microbatches=1, seq_length=args.seq, micro_batch_size=args.micro_batch)
            results[name]["time_s"].append(timer.stop().seconds())
            results[name]["peak_extra_mib"].append(probe.peak_extra())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from megatron.core.optimizer import OptimizerConfig

    from psft_megatron.losses import LossConfig, PSFTLoss
    from psft_megatron.model import ModelConfig
    from psft_megatron.distributed.runtime import ParallelConfig, device, initialize
    from psft_megatron.training.forward import make_train_forward_step
    from psft_megatron.training.setup import setup_model_and_optimizer

    initialize(ParallelConfig())
    dev = device()
    model_cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                            num_query_groups=4, ffn_hidden_size=2 * args.hidden, vocab_size=args.vocab,
                            max_position_embeddings=args.seq, params_dtype="bfloat16")
    tm = setup_model_and_optimizer(model_cfg, ParallelConfig(), OptimizerConfig(optimizer="adam", lr=1e-5))
    loss = PSFTLoss(LossConfig(kind="sft"))
    seen = {}

    def forward_step(variant):
        inner = make_train_forward_step(loss)

        def step(data_iterator, model):
            output, loss_func = inner(data_iterator, model)
            seen[variant] = str(output.dtype)
            return output, loss_func

        return step

    micro = _batch(args, dev)
    results = _measure(args, tm, forward_step, micro, dev)
    b, s = args.micro_batch, args.seq
    logits_mib = b * s * args.vocab * 2 / 2**20
    lines = [f"# bench_half_logits, {datetime.date.today()}, {platform.node()}, {platform.processor() or platform.machine()}, "
             f"{dev}, torch {torch.__version__}",
             f"bf16 GPT: {args.layers} layer(s), hidden {args.hidden}, vocab {args.vocab}, {b} x {s} tokens; "
             f"bf16 logits = {logits_mib:.0f} MiB", "",
             "| logits reaching the loss | dtype seen by the loss | peak extra MiB (min over rounds) | step s (min) |",
             "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {seen[name]} | {min(r['peak_extra_mib']):.0f} | {min(r['time_s']):.2f} |")
    first, second = (min(r["peak_extra_mib"]) for r in results.values())
    lines.append(f"\nbf16 / fp32 peak extra memory: {second / first:.2f} ({first - second:.0f} MiB less)")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "dtypes": seen}, f, indent=1)


if __name__ == "__main__":
    main()
