"""A Megatron-Bridge ``forward_step_func`` with the loss plug-in (psft_megatron.plugin).

With Megatron-Bridge (a GPU machine with Transformer Engine)::

    from megatron.bridge.training.finetune import finetune
    finetune(config, forward_step)          # config: Bridge's ConfigContainer

Bridge calls ``forward_step(state, data_iterator, model)``: it hands ``state`` (its GlobalState)
to a step whose first parameter is named ``state`` or annotated ``GlobalState``, and reduces the
metrics each ``[sum, count]`` pair at a time (PluginLoss's default metric set is exact there).
Megatron-Bridge cannot be imported on a CPU machine (it imports Transformer Engine), so this
file's CPU run drives the same function with megatron-core's schedule, state injected as Bridge
does it (:func:`inject_state`), PSFT with K = 4 through examples/plugin_mcore_loop.py's loop::

    torchrun --nproc_per_node 2 examples/plugin_bridge_forward_step.py --tp 2
    torchrun --nproc_per_node 2 examples/plugin_bridge_forward_step.py --pp 2

The batch format is Bridge's GPT step's: ``tokens``, ``labels``, ``loss_mask``, ``position_ids``,
``attention_mask`` (may be None) [b, s]; ``old_logprobs`` [b, s] added for PSFT windows.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from functools import partial
from types import SimpleNamespace
from typing import Callable, List

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from psft_megatron.losses import LossConfig  # noqa: E402
from psft_megatron.plugin import PluginLoss, enable_logprob_output  # noqa: E402

LOSS = PluginLoss(LossConfig(kind="psft", clip_eps_high=0.28))


def forward_step(state: "GlobalState", data_iterator, model, return_schedule_plan: bool = False):  # noqa: F821
    """Bridge's forward-step contract: ``(output_tensor, partial(loss_fn, loss_mask, ...))``."""
    if return_schedule_plan:
        raise NotImplementedError("the combined 1F1B schedule plan is not supported by this step")
    enable_logprob_output(model, return_entropy=True)  # idempotent: labels= -> log-probs [b, s, 2]
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(LOSS, batch["loss_mask"], old_logprobs=batch.get("old_logprobs"))


def inject_state(step: Callable, state) -> Callable:
    """What Bridge does with a forward step before its schedule sees it: ``partial(step, state)``
    when the first parameter is named ``state``/``global_state`` or a parameter is annotated
    ``GlobalState``; the step itself otherwise."""
    params = inspect.signature(step).parameters
    annotated = any("GlobalState" in str(p.annotation) for p in params.values()
                    if p.annotation is not inspect.Parameter.empty)
    first = next(iter(params), None)
    return partial(step, state) if annotated or first in ("state", "global_state") else step


def run(tp: int, pp: int, steps: int = 8, k: int = 4) -> List[dict]:
    """PSFT with :func:`forward_step` at TP x PP on an initialised process group, driven by
    megatron-core's schedule (examples/plugin_mcore_loop.py)."""
    import plugin_mcore_loop as loop

    model, optimizer, scheduler, _ = loop.build(loop.TINY, tp, pp)
    state = SimpleNamespace(cfg=None, train_state=SimpleNamespace(step=0))  # Bridge's GlobalState stands here
    return loop.train(model, optimizer, scheduler, inject_state(forward_step, state), loop.synthetic_batches(steps), k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    if not torch.cuda.is_available():
        from psft_megatron.compat import cpu

        cpu.install()
    from megatron.core import parallel_state

    for step, record in enumerate(run(args.tp, args.pp, steps=args.steps), 1):
        if record["metrics"] is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            print(f"step {step:3d}  loss {record['metrics']['loss']:+.4f}  grad_norm {record['grad_norm']:.3f}",
                  flush=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
