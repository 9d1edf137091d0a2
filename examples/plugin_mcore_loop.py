"""PSFT (K = 4) in a plain megatron-core training loop, with the loss plug-in (psft_megatron.plugin).

    torchrun --nproc_per_node 2 examples/plugin_mcore_loop.py --tp 2      # TP=2, gloo on CPU
    torchrun --nproc_per_node 2 examples/plugin_mcore_loop.py --pp 2      # PP=2

Everything around the loss is megatron-core's own: GPTModel, DistributedDataParallel, the
megatron optimizer and its lr scheduler, get_forward_backward_func() with
``config.finalize_model_grads_func``. A tiny decoder learns to continue arithmetic progressions
(token_i = a + i*d mod V; the first PROMPT tokens are the masked prompt). PSFT re-syncs pi_old
every K optimizer steps: the K global batches of a window are read up front; batch 1 uses
``old_logprobs=None`` (ratio exactly 1), batches 2..K get their old log-probs from a forward-only
pass with the window-start weights (collect_old_logprobs).

The lines marked PLUG-IN are all the plug-in needs (docs/plugin.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed import finalize_model_grads  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

from psft_megatron.losses import LossConfig  # noqa: E402
from psft_megatron.model import ModelConfig  # noqa: E402
from psft_megatron.model.builder import build_gpt_chunks  # noqa: E402
from psft_megatron.distributed.runtime import ParallelConfig  # noqa: E402
from psft_megatron.plugin import PluginLoss, collect_old_logprobs, enable_logprob_output, reduce_metrics  # noqa: E402

VOCAB, SEQ, PROMPT = 64, 32, 6
TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                   vocab_size=VOCAB, make_vocab_size_divisible_by=16, max_position_embeddings=SEQ)


def progressions(gen: torch.Generator, size: int) -> Dict[str, torch.Tensor]:
    """``size`` sequences a + i*d mod VOCAB: tokens, labels, loss_mask, position_ids [size, SEQ]."""
    start = torch.randint(0, VOCAB, (size, 1), generator=gen)
    step = torch.randint(1, 5, (size, 1), generator=gen)
    seq = (start + step * torch.arange(SEQ + 1)) % VOCAB
    mask = torch.ones(size, SEQ)
    mask[:, : PROMPT - 1] = 0.0  # labels[i] = seq[i + 1]: the response starts at token PROMPT
    return {"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(), "loss_mask": mask,
            "position_ids": torch.arange(SEQ).expand(size, SEQ).contiguous()}


def build(model_cfg: ModelConfig, tp: int, pp: int, *, per_token_loss: bool = True, lr: float = 3e-3,
          weight_decay: float = 0.1, fused: bool = False, load: Optional[Callable] = None):
    """Megatron's model parallel groups, GPTModel, DDP, optimizer and scheduler for TP x PP.

    ``load(chunks)`` may fill the bare model with weights first. Returns (model, optimizer,
    scheduler, config); ``model`` is the DDP-wrapped GPTModel of this rank."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(1234)
    config = model_cfg.to_transformer_config(ParallelConfig(tp, pp))
    config.calculate_per_token_loss = per_token_loss
    (gpt_model,) = build_gpt_chunks(model_cfg, config, "cpu")  # GPTModel with a CPU layer spec
    if load is not None:
        load([gpt_model])
    enable_logprob_output(gpt_model, fused=fused, return_entropy=True)  # PLUG-IN: labels= -> log-probs [b, s, 2]
    model = DistributedDataParallel(config=config, module=gpt_model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False))
    opt_cfg = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, clip_grad=1.0,
                              params_dtype=config.params_dtype)
    optimizer = get_megatron_optimizer(opt_cfg, [model])
    scheduler = OptimizerParamScheduler(optimizer, init_lr=lr, max_lr=lr, min_lr=lr, lr_warmup_steps=0,
                                        lr_decay_steps=1, lr_decay_style="constant", start_wd=weight_decay,
                                        end_wd=weight_decay, wd_incr_steps=1, wd_incr_style="constant")
    config.finalize_model_grads_func = finalize_model_grads  # PLUG-IN: megatron then divides by the token count
    config.no_sync_func = model.no_sync
    return model, optimizer, scheduler, config


def forward_step(loss: PluginLoss, data_iterator, model):
    """megatron's forward step: ``model(..., labels=)`` and ``partial(loss_func, loss_mask)``."""
    micro = next(data_iterator)
    output = model(micro["tokens"], micro["position_ids"], None, labels=micro["labels"],
                   loss_mask=micro["loss_mask"])  # [b, s, 2] on the last stage
    return output, partial(loss, micro["loss_mask"], old_logprobs=micro.get("old_logprobs"))  # PLUG-IN


def train_step(model, optimizer, scheduler, step_func: Callable, micros: List[dict], on_grads: Callable = None):
    """One optimizer step of ``step_func`` (a forward step) over ``micros`` (this rank's
    micro-batches); ``on_grads(model)`` sees the finalized gradients. Returns (metrics, grad norm)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=step_func, data_iterator=iter(micros), model=model,
        num_microbatches=len(micros), seq_length=micros[0]["tokens"].shape[1],
        micro_batch_size=micros[0]["tokens"].shape[0], forward_only=False)
    if on_grads is not None:
        on_grads(model)
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    metrics = None
    if parallel_state.is_pipeline_last_stage():
        metrics = reduce_metrics(losses, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return metrics, grad_norm


def train(model, optimizer, scheduler, step_func: Callable, batches: List[List[dict]], k: int,
          on_grads: Callable = None) -> List[dict]:
    """PSFT with the forward step ``step_func`` over ``batches`` (per step: this rank's
    micro-batches), pi_old re-synced every ``k`` steps. Returns one record per step (metrics on
    the last stage, grad norm everywhere)."""
    history = []
    for start in range(0, len(batches), k):
        window = batches[start:start + k]
        for micros in window[1:]:  # batch 1 of the window: old_logprobs=None, ratio exactly 1
            old = collect_old_logprobs(model, iter(micros), len(micros), seq_length=micros[0]["tokens"].shape[1],
                                       micro_batch_size=micros[0]["tokens"].shape[0],
                                       forward_step_func=step_func)  # PLUG-IN
            for micro, lp in zip(micros, old or [None] * len(micros)):
                micro["old_logprobs"] = lp
        for micros in window:
            metrics, grad_norm = train_step(model, optimizer, scheduler, step_func, micros, on_grads)
            history.append({"metrics": metrics, "grad_norm": grad_norm})
    return history


def synthetic_batches(steps: int, global_batch: int = 8, micro_batches: int = 2) -> List[List[dict]]:
    """This DP rank's micro-batches of ``steps`` global batches of progressions."""
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = global_batch // dp
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        mine = {key: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for key, v in progressions(gen, global_batch).items()}
        batches.append([{key: v[i::micro_batches] for key, v in mine.items()} for i in range(micro_batches)])
    return batches


def run(tp: int, pp: int, steps: int = 8, k: int = 4) -> List[dict]:
    """The example at TP x PP on an initialised process group."""
    model, optimizer, scheduler, _ = build(TINY, tp, pp)
    loss = PluginLoss(LossConfig(kind="psft"))  # PLUG-IN: megatron's loss_func contract
    return train(model, optimizer, scheduler, partial(forward_step, loss), synthetic_batches(steps), k)


def main(argv=None) -> List[dict]:
    """Run the example (``argv`` as the command line's); returns its per-step records."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")  # torchrun's environment
    if not torch.cuda.is_available():
        from psft_megatron.compat import cpu

        cpu.install()  # megatron-core's CUDA-only code paths on CPU (docs/plugin.md)
    history = run(args.tp, args.pp, steps=args.steps)
    for step, record in enumerate(history, 1):
        m = record["metrics"]
        if m is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            print(f"step {step:3d}  loss {m['loss']:+.4f}  nll {m['nll']:.4f}  entropy {m['entropy']:.4f}  "
                  f"clip_frac {m['clip_frac']:.3f}  ratio_mean {m['ratio_mean']:.4f}  "
                  f"grad_norm {record['grad_norm']:.3f}", flush=True)
    return history


if __name__ == "__main__":
    main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
