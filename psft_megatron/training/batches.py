"""Micro-batches onto the compute device: the one place where batch tensors leave the host.

The data pipeline (:mod:`psft_megatron.data.collate`) builds every micro-batch on the host.
:func:`to_device` copies the tensors the model and the loss read - ``tokens``, ``labels``,
``loss_mask``, ``position_ids``, ``seq_ids``, the ``cu_seqlens*`` of ``packed_seq_params``,
and ``old_logprobs`` / ``ref_logprobs`` when present - to :func:`psft_megatron.distributed.runtime.device`.
On CUDA each tensor is staged in pinned host memory and copied with ``non_blocking=True``, so
the copy overlaps with the GPU's work; the trainer moves a micro-batch once, when it is read,
and every later pass over it (old-policy or reference pass, training step) reuses the device
copy. Host-only bookkeeping (``sample_index``) and the host integers of ``packed_seq_params``
(``max_seqlen_*``) stay where they are. On a CPU run nothing is copied.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch

#: keys that never go to the device (host bookkeeping)
HOST_KEYS = ("sample_index",)
_PACKED_FIELDS = ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")


def _copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def to_device(micro: Dict[str, object], device: Optional[torch.device] = None) -> Dict[str, object]:
    """A copy of the micro-batch dict whose tensors live on ``device`` (default: this
    process's device). Tensors shared between fields (``cu_seqlens_q`` is ``cu_seqlens_kv``)
    are copied once and stay shared."""
    from psft_megatron.distributed.runtime import device as runtime_device

    device = device or runtime_device()
    if device.type == "cpu":
        return micro
    copies: Dict[int, torch.Tensor] = {}

    def move(t):
        if id(t) not in copies:
            copies[id(t)] = _copy(t, device)
        return copies[id(t)]

    out = {}
    for key, value in micro.items():
        if key in HOST_KEYS:
            out[key] = value
        elif isinstance(value, torch.Tensor):
            out[key] = move(value)
        elif key == "packed_seq_params" and value is not None:
            out[key] = dataclasses.replace(value, **{
                f: move(getattr(value, f)) for f in _PACKED_FIELDS if getattr(value, f, None) is not None})
        else:
            out[key] = value
    return out


def to_host(value):
    """``value`` with its tensors copied to host memory (for checkpoints: a resumed run puts
    them back with :func:`to_device`). Lists and dicts are walked; other values pass."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    return value
