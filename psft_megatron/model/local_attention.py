"""Core attention of the ``local`` layer spec (CUDA without Transformer Engine).

:class:`LocalCoreAttention` computes what :class:`psft_megatron.model.cpu_layers.SDPACoreAttention`
(the ``cpu`` spec's reference) computes, in the way a GPU wants it:

- grouped-query attention without repeating K/V to every query head (SDPA's ``enable_gqa``);
- packed rows (THD) without the dense ``[t, t]`` block-diagonal mask: flash-attn's varlen
  kernel when ``flash_attn`` is installed (CUDA, bf16/fp16), otherwise one causal SDPA call
  per segment, cut at the segment boundaries the data pipeline packed the row with
  (``packed_seq_params.segment_bounds``, host integers: no device-to-host read per layer);
- no ``.item()`` / ``int(tensor)`` on the forward path.

Context parallelism keeps the reference's all-gathered K/V with a causal mask over the
load-balanced positions (see cpu_layers). Values equal the reference's within fp32 rounding
(tests/test_local_attention.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from psft_megatron.model.cpu_layers import SDPACoreAttention


def _flash_attn_varlen():
    """flash-attn's varlen function, or None when flash-attn is not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


class LocalCoreAttention(SDPACoreAttention):
    """The ``local`` spec's core attention (module docstring); same contract and arguments as
    :class:`SDPACoreAttention`."""

    def _dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def _rng(self):
        return get_cuda_rng_tracker().fork() if self._dropout() > 0 else contextlib.nullcontext()

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """SDPA on q [b, np, sq, d], k/v [b, ng, sk, d]; GQA inside the kernel."""
        with self._rng():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self._dropout(), is_causal=mask is None,
                scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])

    def _thd(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """query [t, np, hn], key/value [t, ng, hn] -> [t, np * hn], causal within segments."""
        t, heads, dim = query.shape
        varlen = _flash_attn_varlen() if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) else None
        if varlen is not None:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            max_len = packed_seq_params.max_seqlen_q
            with self._rng():
                out = varlen(query, key, value, cu.to(torch.int32), cu.to(torch.int32), max_len, max_len,
                             dropout_p=self._dropout(), softmax_scale=self.softmax_scale, causal=True)
            return out.reshape(t, heads * dim)
        bounds = segment_bounds(packed_seq_params, t)
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                # [L, n, d] -> [1, n, L, d]
                q, k, v = (x[start:end].permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
                pieces.append(self._attend(q, k, v, None).squeeze(0).permute(1, 0, 2))
        return torch.cat(pieces).reshape(t, heads * dim)


def segment_bounds(packed_seq_params, t: int) -> Sequence[int]:
    """The row's segment boundaries as host ints ``[0, ..., t]``: ``segment_bounds`` when the data
    pipeline set it (no device read), else read back from ``cu_seqlens`` once (a host sync)."""
    bounds = getattr(packed_seq_params, "segment_bounds", None)
    if not bounds:
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != t:
        raise ValueError(f"THD attention: segment bounds {bounds[0]}..{bounds[-1]} do not cover the packed length {t}")
    return bounds
