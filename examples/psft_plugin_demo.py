"""PSFT with the loss plug-in inside a plain megatron-core training loop.

    torchrun --nproc_per_node 2 examples/psft_plugin_demo.py            # TP=2 + SP, gloo on CPU
    torchrun --nproc_per_node 2 examples/psft_plugin_demo.py --tp 1     # DP=2

A tiny decoder learns to continue arithmetic progressions (token_i = a + i*d mod V): the
first PROMPT tokens are the prompt (masked), the rest is the trained response. PSFT re-syncs
pi_old every K optimizer steps: the K global batches of a window are read up front, batch 1
uses the current log-probs detached (ratio 1), batches 2..K get their old log-probs from a
forward-only pass with the window-start weights (PSFTLoss.logprob_func).

The three places where the plug-in meets megatron are marked "PLUG-IN".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron.core import parallel_state  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from psft_megatron.losses import LossConfig, PSFTLoss, reduce_loss_metrics  # noqa: E402
from psft_megatron.model import ModelConfig  # noqa: E402
from psft_megatron.distributed.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from psft_megatron.training.setup import setup_model_and_optimizer  # noqa: E402
from psft_megatron.training.step import train_step  # noqa: E402

VOCAB = 64
SEQ = 32
PROMPT = 6


def make_batch(gen: torch.Generator, size: int) -> dict:
    """``size`` progressions: tokens/labels/loss_mask/position_ids [size, SEQ]."""
    start = torch.randint(0, VOCAB, (size, 1), generator=gen)
    step = torch.randint(1, 5, (size, 1), generator=gen)
    seq = (start + step * torch.arange(SEQ + 1)) % VOCAB
    mask = torch.ones(size, SEQ)
    mask[:, : PROMPT - 1] = 0.0  # labels[i] = seq[i+1]: the response starts at token PROMPT
    return {
        "tokens": seq[:, :-1].contiguous(),
        "labels": seq[:, 1:].contiguous(),
        "loss_mask": mask,
        "position_ids": torch.arange(SEQ).expand(size, SEQ).contiguous(),
    }


def split(batch: dict, parts: int) -> list:
    return [{k: v[i::parts] for k, v in batch.items()} for i in range(parts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--loss", default="psft", choices=["psft", "sft", "dft"])
    parser.add_argument("--old-policy-interval", type=int, default=4, help="K")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batches", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, sequence_parallel=args.tp > 1)
    info = initialize(parallel, seed=1234)
    model_cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, vocab_size=VOCAB, make_vocab_size_divisible_by=16,
                            max_position_embeddings=SEQ)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=3e-3, weight_decay=0.1, clip_grad=1.0)
    tm = setup_model_and_optimizer(model_cfg, parallel, opt_cfg, layer_spec="cpu")

    loss = PSFTLoss(LossConfig(kind=args.loss))  # PLUG-IN 1: the objective
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = args.global_batch // dp
    mbs = per_rank // args.micro_batches
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    gen = torch.Generator().manual_seed(0)

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        output = model(micro["tokens"], micro["position_ids"], None)  # logits [b, s, V/tp]
        # PLUG-IN 2: megatron's per-token-loss contract, (loss_sum, num_tokens, metrics)
        return output, loss.loss_func(micro["labels"], micro["loss_mask"], old_logprobs=micro.get("old_logprobs"))

    def old_logprobs(micros: list) -> list:
        """Forward-only pass with the current (window-start) weights: [mbs, s] per micro-batch."""
        def collect_step(data_iterator, model):
            micro = next(data_iterator)
            output = model(micro["tokens"], micro["position_ids"], None)
            return output, loss.logprob_func(micro["labels"], return_entropy=False)  # PLUG-IN 3

        for chunk in tm.chunks:
            chunk.eval()
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=collect_step, data_iterator=iter(micros), model=tm.chunks[0],
                num_microbatches=len(micros), seq_length=SEQ, micro_batch_size=mbs, forward_only=True)
        for chunk in tm.chunks:
            chunk.train()
        return [item["logprobs"] for item in out]

    k = args.old_policy_interval if args.loss == "psft" else 1
    start = time.time()
    for window_start in range(0, args.steps, k):
        window = []
        for _ in range(min(k, args.steps - window_start)):
            global_batch = make_batch(gen, args.global_batch)
            mine = {key: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for key, v in global_batch.items()}
            window.append(split(mine, args.micro_batches))
        for micros in window[1:]:  # batch 1 of the window: ratio 1 (old = current, detached)
            for micro, lp in zip(micros, old_logprobs(micros)):
                micro["old_logprobs"] = lp
        for offset, micros in enumerate(window):
            result = train_step(forward_step, [iter(micros)], tm.chunks, tm.optimizer, tm.scheduler,
                                num_microbatches=args.micro_batches, seq_length=SEQ, micro_batch_size=mbs)
            metrics = reduce_loss_metrics(result.metrics, group=dp_cp_group)
            if info.rank == 0:
                step = window_start + offset + 1
                print(f"step {step:3d}  loss {metrics['loss']:+.4f}  nll {metrics['nll']:.4f}  "
                      f"entropy {metrics['entropy']:.4f}  clip_frac {metrics['clip_frac']:.3f}  "
                      f"approx_kl {metrics.get('approx_kl', 0.0):+.5f}  grad_norm {result.grad_norm:.3f}",
                      flush=True)
    if info.rank == 0:
        print(f"{args.steps} steps, {parallel.describe()} x DP={info.data_parallel_size} on "
              f"{info.backend}, {time.time() - start:.1f} s", flush=True)
    shutdown()


if __name__ == "__main__":
    main()
