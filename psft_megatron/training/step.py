"""One optimizer step through megatron's pipeline schedules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

from megatron.core.pipeline_parallel import get_forward_backward_func


@dataclass
class StepResult:
    """Outcome of :func:`train_step`.

    Attributes:
        metrics: per-micro-batch metric dicts from the loss function (last pipeline stage
            only; empty elsewhere).
        grad_norm: global gradient norm before clipping (None if not computed).
        update_successful: False if the optimizer skipped the step (inf/nan grads).
        num_zeros_in_grad: as reported by megatron's optimizer (None unless enabled).
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
    update_successful, grad_norm, num_zeros = optimizer.step()
    if update_successful and scheduler is not None:
        scheduler.step(increment=1)
    return StepResult(
        metrics=list(metrics or []),
        grad_norm=None if grad_norm is None else float(grad_norm),
        update_successful=bool(update_successful),
        num_zeros_in_grad=num_zeros,
    )
