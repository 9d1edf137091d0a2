"""Samples -> megatron micro-batch (a dict of tensors).

The SHIFT (per sample, never across samples): a sample of n tokens (``input_ids`` [n],
``loss_mask`` [n]) gives n - 1 positions::

    tokens    = input_ids[:-1]
    labels    = input_ids[1:]
    loss_mask = loss_mask[1:]        # 1 where labels[j] is a trained target
    position_ids = 0 .. n-2          # restart per sample

Unpacked (``collate_unpacked``), micro-batch of b samples, one per row, right-padded to
``s = round_up(max(n_i - 1), multiple)`` (or to ``round_up(pad_to, multiple)`` if given:
fixed shapes, needed with pipeline parallelism)::

    tokens int64 [b, s], labels int64 [b, s], loss_mask float32 [b, s],
    position_ids int64 [b, s], seq_ids int64 [b, s]   (row index j for sample j, -1 on padding)

Padding: tokens/labels = pad_id, loss_mask = 0, position_ids continue counting (harmless
under the causal mask), seq_ids = -1.

Packed (``collate_packed``), micro-batch size 1 (megatron's THD convention: one packed row
of s = ``packed_row_length(max_seq_length, multiple)`` positions)::

    tokens, labels, loss_mask, position_ids, seq_ids   [1, s] as above; seq_ids = 0..k-1
    cu_seqlens       int32 [k + 1] or [k + 2]  segment boundaries in the row: the k samples,
                                    then the tail padding (its own segment of pad tokens,
                                    seq_id -1) if any. With segment_multiple > 1 these are the
                                    PADDED boundaries (= cu_seqlens_q_padded); the unpadded
                                    cumulative real lengths are in packed_seq_params.cu_seqlens_q
    packed_seq_params PackedSeqParams(qkv_format='thd', cu_seqlens_q = cu_seqlens_kv = cu_seqlens,
                                    cu_seqlens_q/kv_padded (only when segment_multiple > 1: each
                                    sample padded to a multiple of 2*CP), max_seqlen_q/kv = the
                                    longest segment; plus segment_bounds = cu_seqlens as host
                                    ints, see packed_seq_params_class)

``max_seqlen`` is the true longest segment, not s: megatron sizes the RoPE table with it and
restarts RoPE positions at every cu_seqlens boundary. Both layouts also carry
``sample_index`` int64 [k] (dataset index of seq_id j; -1 for none).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from psft_megatron.data.lengths import round_up

SampleArrays = Tuple[np.ndarray, np.ndarray]  # (input_ids int32 [n], loss_mask uint8 [n])


def _shift(ids: np.ndarray, mask: np.ndarray):
    if len(ids) < 2:
        raise ValueError(f"a sample needs at least 2 tokens, got {len(ids)}")
    return ids[:-1], ids[1:], mask[1:]


def collate_unpacked(samples: Sequence[Optional[SampleArrays]], pad_id: int, multiple: int = 1,
                     pad_to: Optional[int] = None, sample_index: Optional[Sequence[int]] = None
                     ) -> Dict[str, torch.Tensor]:
    """b samples -> a [b, s] batch (see the module docstring). A ``None`` sample gives a
    padding row (pad tokens, loss mask 0, seq_ids -1): the filler of a partial batch."""
    b = len(samples)
    longest = max((len(sample[0]) - 1 for sample in samples if sample is not None), default=1)
    s = round_up(pad_to if pad_to is not None else longest, multiple)
    if longest > s:
        raise ValueError(f"a sample has {longest} positions > pad_to={pad_to} (rounded to {s})")
    tokens = np.full((b, s), pad_id, dtype=np.int64)
    labels = np.full((b, s), pad_id, dtype=np.int64)
    loss_mask = np.zeros((b, s), dtype=np.float32)
    seq_ids = np.full((b, s), -1, dtype=np.int64)
    for j, sample in enumerate(samples):
        if sample is None:  # a padding row: no tokens, no loss
            continue
        t, lab, m = _shift(*sample)
        n = len(t)
        tokens[j, :n], labels[j, :n], loss_mask[j, :n], seq_ids[j, :n] = t, lab, m, j
    position_ids = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
    out = {k: torch.from_numpy(v) for k, v in (("tokens", tokens), ("labels", labels), ("loss_mask", loss_mask),
                                               ("position_ids", position_ids), ("seq_ids", seq_ids))}
    out["sample_index"] = torch.tensor(list(sample_index) if sample_index is not None else [-1] * b,
                                       dtype=torch.int64)
    return out


def collate_packed(samples: Sequence[SampleArrays], row_length: int, pad_id: int, segment_multiple: int = 1,
                   sample_index: Optional[Sequence[int]] = None) -> Dict[str, object]:
    """k samples -> one packed [1, row_length] row with THD metadata (module docstring)."""
    s = row_length
    tokens = np.full(s, pad_id, dtype=np.int64)
    labels = np.full(s, pad_id, dtype=np.int64)
    loss_mask = np.zeros(s, dtype=np.float32)
    seq_ids = np.full(s, -1, dtype=np.int64)
    position_ids = np.zeros(s, dtype=np.int64)
    cu, cu_padded = [0], [0]
    at = 0
    for j, (ids, mask) in enumerate(samples):
        t, lab, m = _shift(ids, mask)
        n = len(t)
        padded = round_up(n, segment_multiple)
        if at + padded > s:
            raise ValueError(f"packed samples need more than row_length={s} positions")
        tokens[at : at + n], labels[at : at + n], loss_mask[at : at + n], seq_ids[at : at + n] = t, lab, m, j
        position_ids[at : at + padded] = np.arange(padded)
        cu.append(cu[-1] + n)
        cu_padded.append(cu_padded[-1] + padded)
        at += padded
    if at < s:  # tail padding: its own segment, so no sample attends to it or it to them
        position_ids[at:] = np.arange(s - at)
        cu.append(cu[-1] + (s - at))
        cu_padded.append(s)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    cu_p = torch.tensor(cu_padded, dtype=torch.int32)
    seglens = (cu_p[1:] - cu_p[:-1])
    max_len = int(seglens.max())
    use_padded = segment_multiple > 1
    params = packed_seq_params_class()(
        segment_bounds=tuple(cu_padded if use_padded else cu),
        qkv_format="thd",
        cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
        cu_seqlens_q_padded=cu_p if use_padded else None,
        cu_seqlens_kv_padded=cu_p if use_padded else None,
        max_seqlen_q=max_len, max_seqlen_kv=max_len,
    )
    k = len(samples)
    return {
        "tokens": torch.from_numpy(tokens)[None], "labels": torch.from_numpy(labels)[None],
        "loss_mask": torch.from_numpy(loss_mask)[None], "position_ids": torch.from_numpy(position_ids)[None],
        "seq_ids": torch.from_numpy(seq_ids)[None],
        "cu_seqlens": cu_p if use_padded else cu_t,
        "packed_seq_params": params,
        "sample_index": torch.tensor(list(sample_index) if sample_index is not None else [-1] * k,
                                     dtype=torch.int64),
    }


@functools.lru_cache(maxsize=None)
def packed_seq_params_class():
    """megatron's ``PackedSeqParams`` with one more field, ``segment_bounds``: the segment
    boundaries of the row (the ``cu_seqlens`` attention uses) as host integers. They are known
    when the row is packed, so attention kernels that need them on the host (one SDPA call per
    segment, :mod:`psft_megatron.model.local_attention`) never read them back from the device."""
    from megatron.core.packed_seq_params import PackedSeqParams

    @dataclasses.dataclass
    class PackedSeqParamsWithBounds(PackedSeqParams):
        segment_bounds: Tuple[int, ...] = ()

    return PackedSeqParamsWithBounds


def per_sample_sum(values: torch.Tensor, seq_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Sum ``values`` [b, s] per sample id (``seq_ids`` [b, s], -1 ignored) -> [num_samples]."""
    keep = seq_ids >= 0
    out = torch.zeros(num_samples, dtype=values.dtype, device=values.device)
    return out.index_add_(0, seq_ids[keep], values[keep])
