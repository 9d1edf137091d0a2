"""Per-token softmax statistics and their merge: the pieces both log-prob ops share.

A token's logits over a part of the vocabulary (a TP rank's shard, or a block of it) reduce to
``m`` (max), ``s = sum exp(z - m)``, ``t = sum exp(z - m) (z - m)`` and the target logit
``z_y``; parts over disjoint vocabularies merge exactly (``docs/logprobs.md``, "Forward:
per-rank statistics", "Merging across TP ranks" and "Merging partial statistics"). Used by
:mod:`psft_megatron.ops.vocab_parallel_logprobs` (from logits) and
:mod:`psft_megatron.ops.fused_linear_logprobs` (from hidden states, one tile at a time).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from psft_megatron.distributed.groups import resolve_group

__all__ = ["ALL_GATHER_SINGLE", "REDUCE_SCATTER_SINGLE", "resolve_tp_group", "all_gather_stats", "shift_into",
           "local_softmax_stats", "merge_logsumexp", "merge_blocks", "merge_ranks"]

#: newer torch releases call all_gather_into_tensor (now a deprecated alias) all_gather_single
ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
#: likewise reduce_scatter_tensor / reduce_scatter_single
REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def resolve_tp_group(tp_group):
    """``(group, rank, world_size)``: ``tp_group``, else megatron's TP group, else no TP."""
    return resolve_group(tp_group, "tp")


def all_gather_stats(stats: torch.Tensor, group, world: int) -> torch.Tensor:
    """All-gather a ``[N, k]`` fp32 tensor over ``group`` -> ``[world, N, k]`` (no autograd)."""
    stats = stats.contiguous()
    # the concatenated [world * N, k] output form is supported by NCCL and gloo alike
    out = torch.empty((world * stats.shape[0],) + tuple(stats.shape[1:]), dtype=stats.dtype, device=stats.device)
    ALL_GATHER_SINGLE(out, stats, group=group)
    return out.view((world,) + tuple(stats.shape))


def shift_into(out: torch.Tensor, z: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[:] = float32(z) - shift[:, None]`` without touching ``z``; returns ``out``.

    One fused kernel on accelerators; on CPU a dtype-converting copy followed by an in-place
    subtraction is several times faster than a mixed-dtype subtraction.
    """
    if z.dtype == out.dtype or z.device.type != "cpu":
        return torch.sub(z, shift.unsqueeze(1), out=out)
    out.copy_(z)
    return out.sub_(shift.unsqueeze(1))


def local_softmax_stats(z: torch.Tensor, want_t: bool, d: torch.Tensor, e: Optional[torch.Tensor]):
    """For a chunk ``z`` [n, V'] (any float dtype) return fp32 ``m, s, t`` of shape [n].

    m = max_j z_j; s = sum_j exp(z_j - m); t = sum_j exp(z_j - m) * (z_j - m)  (t <= 0, and
    |t| <= V'/e: no cancellation, see docs/logprobs.md). ``t`` is None unless ``want_t``.
    ``d`` and ``e`` are fp32 work buffers of z's shape (``e`` only needed for ``t``).
    """
    m = z.amax(dim=-1).float()
    shift_into(d, z, m)  # d = z - m in fp32; the input is untouched
    if want_t:
        torch.exp(d, out=e)
        s = e.sum(dim=-1)
        t = d.mul_(e).sum(dim=-1)  # d is a work buffer: in place
        return m, s, t
    s = d.exp_().sum(dim=-1)
    return m, s, None


def merge_logsumexp(m: torch.Tensor, s: torch.Tensor):
    """Merge per-rank ``m, s`` [R, N] -> (M [N], S [N], w [R, N]) with w_r = exp(m_r - M)."""
    M = m.amax(dim=0)
    w = torch.exp(m - M.unsqueeze(0))
    S = (w * s).sum(dim=0)
    return M, S, w


def merge_blocks(run, part):
    """Merge two partial ``(m, s, t)`` of disjoint vocabulary sets (``t`` max-relative or None)."""
    m1, s1, t1 = run
    m2, s2, t2 = part
    m = torch.maximum(m1, m2)
    d1, d2 = m1 - m, m2 - m
    w1, w2 = torch.exp(d1), torch.exp(d2)
    t = None if t1 is None else w1 * (t1 + d1 * s1) + w2 * (t2 + d2 * s2)
    return m, w1 * s1 + w2 * s2, t


def merge_ranks(allstats: torch.Tensor, valid: torch.Tensor, want_t: bool
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``[R, N, k]`` per-rank statistics (columns ``m, s, z_y[, t]``) -> fp32 ``logp``, the entropy
    (None unless ``want_t``), ``M`` and ``S`` per token ``[N]``.

    ``log p_y = (z_y - M) - log S`` (0 where ``valid`` is False: no rank owns the label) and
    ``H = log S - (1/S) sum_r w_r (t_r + (m_r - M) s_r)``, every term of the sum <= 0 and
    bounded: ``log Z = M + log S`` is never formed as one number (precision at large |z|).
    """
    M, S, w = merge_logsumexp(allstats[..., 0], allstats[..., 1])
    log_s = torch.log(S)
    zy = allstats[..., 2].sum(dim=0)
    logp = torch.where(valid, (zy - M) - log_s, torch.zeros_like(M))
    ent = None
    if want_t:
        m_rel = allstats[..., 0] - M.unsqueeze(0)
        ent = log_s - (w * (allstats[..., 3] + m_rel * allstats[..., 1])).sum(dim=0) / S
    return logp, ent, M, S
