"""Forward steps for megatron's schedules: the training step and forward-only log-prob passes.

A micro-batch is the dict made by :mod:`psft_megatron.data.collate` (and CP-sliced by
:func:`slice_for_context_parallel`): ``tokens``, ``labels``, ``loss_mask``, ``position_ids``
[b, s], optionally ``seq_ids`` [b, s] and ``packed_seq_params``; the trainer adds
``old_logprobs`` / ``ref_logprobs`` [b, s] (fp32, last pipeline stage only).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

_SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "seq_ids")


def slice_for_context_parallel(micro: Dict[str, object]) -> Dict[str, object]:
    """This CP rank's share of a micro-batch (megatron's load-balanced 2*CP chunks)."""
    from megatron.core import parallel_state

    from psft_megatron.compat.releases import get_batch_on_this_cp_rank

    if parallel_state.get_context_parallel_world_size() == 1:
        return micro
    if micro.get("packed_seq_params") is not None:
        raise NotImplementedError("packed sequences with context parallelism need TE (GPU); "
                                  "set model.data.train_ds.packing=false or context_parallel_size=1")
    sliced = get_batch_on_this_cp_rank({k: micro[k] for k in _SEQUENCE_KEYS if micro.get(k) is not None})
    return dict(micro, **sliced)


def model_forward(model, micro: Dict[str, object], loss=None, *, return_entropy=None) -> torch.Tensor:
    """GPTModel forward without labels: this stage's output (logits [b, s, V/tp] on the last).

    With ``loss`` (a PSFTLoss) configured with ``fused_output_layer``: the output layer runs
    inside the log-prob op and the last stage returns fp32 [b, s, 2] (log-prob, entropy) of the
    micro-batch's labels instead, loss-masked rows not projected (``PSFTLoss.model_forward``)."""
    if loss is not None and loss.config.fused_output_layer:
        return loss.model_forward(model, micro["tokens"], micro["position_ids"], None, labels=micro["labels"],
                                  loss_mask=micro["loss_mask"], seq_ids=_seq_ids(micro),
                                  packed_seq_params=micro.get("packed_seq_params"), return_entropy=return_entropy)
    return model(micro["tokens"], micro["position_ids"], None, packed_seq_params=micro.get("packed_seq_params"))


def _seq_ids(micro: Dict[str, object]) -> Optional[torch.Tensor]:
    # Packed rows (micro-batch of one row) carry several samples: seq-mean aggregation needs
    # their ids. Unpacked rows are one sample each: the loss's default (row = sequence).
    return micro.get("seq_ids") if micro.get("packed_seq_params") is not None else None


def make_train_forward_step(loss):
    """``forward_step(data_iterator, model)`` training with ``loss`` (a PSFTLoss)."""

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        output = model_forward(model, micro, loss)
        return output, loss.loss_func(micro["labels"], micro["loss_mask"], old_logprobs=micro.get("old_logprobs"),
                                      ref=micro.get("ref_logprobs"), seq_ids=_seq_ids(micro))

    return forward_step


def forward_only(chunks: List, micros: List[Dict[str, object]], forward_step, *, seq_length: int) -> List[dict]:
    """Run ``forward_step`` over ``micros`` without gradients, modules in eval mode.

    Returns what the loss functions returned (the list is non-empty on the last stage only).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=[iter(micros) for _ in chunks] if len(chunks) > 1 else iter(micros),
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(micros),
                seq_length=seq_length,
                micro_batch_size=int(micros[0]["tokens"].shape[0]),
                forward_only=True,
            )
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)
    return list(out or [])


def attach_logprobs(chunks: List, micros: List[Dict[str, object]], loss, key: str, *, seq_length: int) -> None:
    """Store the log-probs of each micro-batch's labels under the current weights of ``chunks``
    as ``micro[key]`` (fp32 [b, s], last pipeline stage only; other stages get nothing)."""

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        return model_forward(model, micro, loss, return_entropy=False), loss.logprob_func(micro["labels"],
                                                                                         return_entropy=False)

    results = forward_only(chunks, micros, forward_step, seq_length=seq_length)
    for micro, result in zip(micros, results):
        micro[key] = result["logprobs"]
