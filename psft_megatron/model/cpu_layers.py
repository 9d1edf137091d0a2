"""Pure-torch layers for the ``cpu`` layer spec: runs everywhere, including SP and CP on gloo.

- :class:`ParallelRMSNorm` / :class:`ParallelLayerNorm`: torch norms whose parameters carry
  ``sequence_parallel = config.sequence_parallel`` so that ``finalize_model_grads``
  all-reduces their gradients over TP (megatron's torch-norm wrapper refuses SP).
- :class:`SDPACoreAttention`: megatron core-attention contract on
  ``F.scaled_dot_product_attention``, with GQA and context parallelism.

Context parallelism here gathers K and V over the CP group (same math as ring attention,
memory O(full sequence) for K/V): megatron's load-balanced layout gives CP rank r the
sequence chunks r and 2*CP-1-r of 2*CP equal chunks, so the causal mask is built from the
global positions of the local queries and the gathered keys.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, get_cuda_rng_tracker
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class _ParallelNorm(torch.nn.Module):
    """Base of the SP-capable norms: weight (and bias) marked for TP grad all-reduce under SP."""

    has_bias = False

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.normalized_shape = (hidden_size,)
        # where megatron's own modules put their parameters
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype, device=device))
            if self.has_bias else None
        )
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)


class ParallelRMSNorm(_ParallelNorm):
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight``; x [..., h]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class ParallelLayerNorm(_ParallelNorm):
    """LayerNorm over the last dim with weight and bias; x [..., h]."""

    has_bias = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def norm_class(normalization: str) -> type:
    """The SP-capable norm class for megatron's ``config.normalization`` name."""
    classes = {"RMSNorm": ParallelRMSNorm, "LayerNorm": ParallelLayerNorm}
    if normalization not in classes:
        raise ValueError(f"normalization={normalization!r} is not one of {sorted(classes)}")
    return classes[normalization]


def load_balanced_positions(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global token positions [local_len] held by ``cp_rank`` in megatron's CP layout.

    The full sequence of ``local_len * cp_size`` tokens is cut into ``2 * cp_size`` chunks;
    rank r holds chunk r followed by chunk ``2 * cp_size - 1 - r``.
    """
    if local_len % 2:
        raise ValueError(f"context parallel needs an even local sequence length, got {local_len}")
    chunk = local_len // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


class SDPACoreAttention(MegatronModule):
    """Causal self-attention core on ``F.scaled_dot_product_attention``.

    Shapes (megatron's core-attention contract, per TP rank):
        query [sq, b, np, hn], key/value [sk, b, ng, hn] -> output [sq, b, np * hn],
        with np query heads and ng key/value groups on this rank (GQA: np % ng == 0).
    With CP > 1, sq = sk = this rank's share of the sequence; K/V are all-gathered.
    The attention mask passed by GPTModel is ignored: the mask type is causal.

    Packed sequences (``packed_seq_params.qkv_format == 'thd'``): megatron squeezes the batch
    dim, so query is [t, np, hn] and key/value [t, ng, hn] -> output [t, np * hn]. Attention
    is causal inside each segment of ``cu_seqlens_q`` (``cu_seqlens_q_padded`` if set) and
    never crosses segments (block-diagonal causal mask). Not supported with CP > 1.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPACoreAttention supports causal masks only, got {attn_mask_type}")
        self.layer_number = layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if softmax_scale is None:
            softmax_scale = config.softmax_scale
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.cp_group = pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp") else None

    def _cp_group(self):
        if self.cp_group is not None:
            return self.cp_group
        return parallel_state.get_context_parallel_group()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention does not support attention_bias")
        if packed_seq_params is not None:
            return self._forward_thd(query, key, value, packed_seq_params)
        cp_group = self._cp_group()
        cp_size = cp_group.size()
        mask = None
        if cp_size > 1:
            # [s, b, ...] -> gather along the sequence dim; backward reduce-scatters the grads.
            key = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=cp_group)
            value = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=cp_group)
            local_len = query.shape[0]
            q_pos = load_balanced_positions(local_len, cp_size, cp_group.rank(), query.device)
            k_pos = torch.cat(
                [load_balanced_positions(local_len, cp_size, r, query.device) for r in range(cp_size)]
            )
            mask = k_pos[None, :] <= q_pos[:, None]  # [sq, sk], True = attend
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._attend(q, k, v, mask)
        sq, b, heads = query.shape[0], query.shape[1], query.shape[2]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * query.shape[3])

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """SDPA on q [b, np, sq, d], k/v [b, ng, sk, d] (GQA: np % ng == 0); ``mask`` [sq, sk]
        (True = attend) or None for causal. Here K/V are repeated to np heads (the reference)."""
        heads, groups = q.shape[1], k.shape[1]
        if heads != groups:
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0
        with get_cuda_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None, scale=self.softmax_scale
            )

    def _forward_thd(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """THD (packed) attention: block-diagonal causal mask from the cu_seqlens boundaries."""
        if packed_seq_params.qkv_format != "thd":
            raise NotImplementedError(
                f"SDPACoreAttention supports packed_seq_params with qkv_format='thd' only, "
                f"got {packed_seq_params.qkv_format!r}"
            )
        if self._cp_group().size() > 1:
            raise NotImplementedError(
                "SDPACoreAttention: packed sequences (THD) with context parallelism (CP > 1) are not "
                "supported on the CPU layer spec; use the 'te' spec on GPU or disable packing"
            )
        if query.dim() == 4:  # tolerate an unsqueezed batch dim of 1: [t, 1, n, d]
            if query.shape[1] != 1:
                raise ValueError(f"THD attention needs batch size 1, got query {tuple(query.shape)}")
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        return self._thd(query, key, value, packed_seq_params)

    def _thd(self, query, key, value, packed_seq_params) -> torch.Tensor:
        """query [t, np, hn], key/value [t, ng, hn] -> [t, np * hn]. The reference: one SDPA over
        the whole row with a dense block-diagonal causal [t, t] mask."""
        cu = packed_seq_params.cu_seqlens_q_padded
        if cu is None:
            cu = packed_seq_params.cu_seqlens_q
        if cu is None:
            raise ValueError("THD attention needs packed_seq_params.cu_seqlens_q")
        t = query.shape[0]
        cu = cu.to(device=query.device, dtype=torch.long)
        if int(cu[-1]) != t:
            raise ValueError(f"THD attention: cu_seqlens ends at {int(cu[-1])} but the packed length is {t}")
        lengths = cu[1:] - cu[:-1]
        segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=query.device), lengths)
        pos = torch.arange(t, device=query.device)
        mask = (segment[None, :] == segment[:, None]) & (pos[None, :] <= pos[:, None])  # [t, t]
        # [t, n, d] -> [1, n, t, d]
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))
        out = self._attend(q, k, v, mask)
        return out.squeeze(0).permute(1, 0, 2).reshape(t, query.shape[1] * query.shape[2])
