"""One optimizer step through megatron's pipeline schedules."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from megatron.core.pipeline_parallel import get_forward_backward_func


@dataclass
class StepResult:
    """Outcome of :func:`train_step`.

    Attributes:
        metrics: per-micro-batch metric dicts from the loss function (last pipeline stage
            only; empty elsewhere).
        grad_norm: global gradient norm before clipping (None if not computed).
        update_successful: False if the update was skipped (non-finite grad norm, or an fp16
            loss-scale overflow); the weights, optimizer state and lr schedule are unchanged.
        num_zeros_in_grad: not computed (None).
    """

    metrics: List[dict]
    grad_norm: Optional[float]
    update_successful: bool
    num_zeros_in_grad: Optional[int]


def train_step(
    forward_step_func: Callable,
    data_iterators: List,
    chunks: List,
    optimizer,
    scheduler=None,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """Zero grads, run forward/backward over ``num_microbatches``, step the optimizer.

    Args:
        forward_step_func: megatron ``forward_step(data_iterator, model) -> (output, loss_func)``.
        data_iterators: one iterator per model chunk (virtual stage).
        chunks: DDP-wrapped model chunks.
        optimizer: megatron optimizer.
        scheduler: megatron ``OptimizerParamScheduler``, advanced by one after a successful
            update (as Megatron-LM does); None leaves lr and weight decay as they are.
        num_microbatches: micro-batches per optimizer step on this DP rank.
        seq_length: full (un-split by CP/SP) sequence length in tokens.
        micro_batch_size: sequences per micro-batch.
    """
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    metrics = forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators if len(chunks) > 1 else data_iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_successful, grad_norm = _guarded_optimizer_step(optimizer)
    if update_successful and scheduler is not None:
        scheduler.step(increment=1)
    return StepResult(
        metrics=list(metrics or []),
        grad_norm=grad_norm,
        update_successful=update_successful,
        num_zeros_in_grad=None,
    )


def _guarded_optimizer_step(optimizer) -> Tuple[bool, Optional[float]]:
    """megatron's ``optimizer.step()``, skipping the update when the global gradient norm is not
    finite (megatron's optimizer only skips on a grad-scaler overflow, i.e. with fp16; a NaN in
    fp32/bf16 would otherwise reach the weights).

    A single optimizer runs ``step()``'s own public pieces: prepare the grads, clip by the norm,
    step. A ``ChainedOptimizer`` (several sub-optimizers, e.g. expert and dense parameters)
    keeps its semantics: ONE grad norm over all sub-optimizers, each clipped by it with its own
    ``clip_grad``; its own ``step()`` does the clipping and the update, handed the grads it has
    prepared and the norm it has computed here (:func:`_prepared`), so nothing runs twice.

    Returns (update applied, grad norm before clipping or None if an fp16 overflow was found).
    """
    if optimizer.prepare_grads():  # fp16 loss-scale overflow: megatron's own skip
        return False, None
    if hasattr(optimizer, "chained_optimizers"):
        grad_norm = float(optimizer.get_grad_norm())
        if not math.isfinite(grad_norm):
            return False, grad_norm
        with _prepared(optimizer, grad_norm):
            update_successful = optimizer.step()[0]
        return bool(update_successful), grad_norm
    clip = optimizer.config.clip_grad
    grad_norm = float(optimizer.clip_grad_norm(clip) if clip > 0.0 else optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    return bool(optimizer.step_with_ready_grads()), grad_norm


@contextlib.contextmanager
def _prepared(optimizer, grad_norm: float):
    """Inside, ``optimizer.prepare_grads()`` reports no overflow without preparing the grads
    again, and ``optimizer.get_grad_norm()`` returns ``grad_norm`` (both already done)."""
    optimizer.prepare_grads = lambda: False
    optimizer.get_grad_norm = lambda: grad_norm
    try:
        yield
    finally:
        del optimizer.prepare_grads, optimizer.get_grad_norm
