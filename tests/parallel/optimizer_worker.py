"""The trainer's optimizer step against megatron's own ``ChainedOptimizer.step()``.

    torchrun --nproc_per_node 1 tests/parallel/optimizer_worker.py --out /tmp/o.json

Two tiny models, each with its own megatron optimizer (one shared OptimizerConfig), chained into
one ``ChainedOptimizer`` - the layout megatron builds for expert and dense parameters - in two
identical copies. The same gradients go into both; one copy steps with
``psft_megatron.training.step._guarded_optimizer_step``, the other with megatron's
``step()``. Reported: grad norms, the largest parameter difference after each of 3 steps
(clipping active), and what a non-finite gradient does to each (ours must skip, both
sub-optimizers untouched).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from megatron.core.optimizer import ChainedOptimizer, OptimizerConfig  # noqa: E402

from psft_megatron.model import ModelConfig  # noqa: E402
from psft_megatron.distributed.runtime import ParallelConfig, initialize  # noqa: E402
from psft_megatron.training.setup import setup_model_and_optimizer  # noqa: E402
from psft_megatron.training.step import _guarded_optimizer_step  # noqa: E402
from tests.parallel.launch import finish_worker  # noqa: E402

MODEL = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=64,
                    vocab_size=64, make_vocab_size_divisible_by=16, max_position_embeddings=32, init_method_std=0.05)


def build(clip: float, seed: int):
    torch.manual_seed(seed)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    opt = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, clip_grad=clip)
    return setup_model_and_optimizer(MODEL, ParallelConfig(), opt, layer_spec="cpu")


def chain(seed_a=1, seed_b=2):
    a, b = build(0.05, seed_a), build(0.05, seed_b)
    return [a, b], ChainedOptimizer([a.optimizer, b.optimizer])


def set_grads(models, step: int, poison: bool = False):
    """Deterministic gradients (large enough that clipping is active) into megatron's main_grad."""
    gen = torch.Generator().manual_seed(100 + step)
    for tm in models:
        for chunk in tm.chunks:
            chunk.zero_grad_buffer()
            for name, p in sorted(chunk.named_parameters()):
                p.main_grad.copy_(torch.randn(p.shape, generator=gen) * 3.0)
    if poison:
        p = next(models[1].chunks[0].parameters())
        p.main_grad.view(-1)[0] = float("nan")


def params_of(models):
    return [p.detach().clone() for tm in models for chunk in tm.chunks for p in chunk.parameters()]


def max_diff(xs, ys):
    return max(float((x - y).abs().max()) for x, y in zip(xs, ys))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    initialize(ParallelConfig())
    ours_models, ours = chain()
    ref_models, ref = chain()
    result = {"steps": []}
    for step in range(3):
        set_grads(ours_models, step)
        set_grads(ref_models, step)
        ok, norm = _guarded_optimizer_step(ours)
        ref_ok, ref_norm, _ = ref.step()
        result["steps"].append({"ok": ok, "ref_ok": bool(ref_ok), "grad_norm": norm, "ref_grad_norm": float(ref_norm),
                                "max_param_diff": max_diff(params_of(ours_models), params_of(ref_models))})
    before = params_of(ours_models)
    set_grads(ours_models, 9, poison=True)
    ok, norm = _guarded_optimizer_step(ours)
    after = params_of(ours_models)
    result["nan"] = {"ok": ok, "grad_norm": str(norm), "max_param_change": max_diff(before, after),
                     "finite": all(bool(torch.isfinite(p).all()) for p in after)}
    ref_before = params_of(ref_models)
    set_grads(ref_models, 9, poison=True)
    ref.step()
    result["nan_megatron"] = {"finite": all(bool(torch.isfinite(p).all()) for p in params_of(ref_models)),
                              "changed": max_diff(ref_before, params_of(ref_models)) != 0.0}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
    finish_worker()
