"""Per-token log-probabilities, entropy and full-vocabulary KL from vocab-parallel logits.

The logits of a tensor-parallel LM head are split along the vocabulary: TP rank ``r`` holds
``logits[..., r*Vt:(r+1)*Vt]`` with ``Vt = V / tp``. The functions here compute, per token,

* ``logp = log softmax(z)[y]`` of the label ``y`` under the FULL (all-rank) softmax,
* ``H = -sum_j p_j log p_j``, the entropy of the full distribution (optional),
* ``KL(p || q) = sum_j p_j (log p_j - log q_j)`` against reference logits, or ``KL(q || p)``
  (``vocab_parallel_kl``),

all in fp32 and in nats, differentiable with respect to the (local shard of the) logits, with
correct gradients on every TP rank.

Design (the math, with derivations, is in ``docs/logprobs.md``):

* forward: the logits are processed in chunks of tokens; each chunk is converted to fp32
  into a reused ``[chunk, Vt]`` work buffer and reduced to four numbers per token (local max,
  sum of exps, max-relative exp-weighted logit sum, target logit). The per-token statistics of
  all chunks are merged across TP ranks with ONE ``all_gather`` (non-differentiable
  statistics: the backward is purely local);
* saved for backward: the input logits themselves (no fp32 copy) and O(tokens) statistics;
* backward: recomputes ``p = exp(z - M) / S`` chunk by chunk, needs no communication, and
  writes the gradient into a freshly allocated tensor of the input dtype;
* the input is never modified; transient memory is two fp32 work buffers of ``chunk x Vt``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from psft_megatron.ops.softmax_stats import (
    all_gather_stats,
    local_softmax_stats,
    merge_logsumexp,
    merge_ranks,
    resolve_tp_group,
    shift_into,
)

__all__ = ["vocab_parallel_logprobs", "vocab_parallel_kl", "default_chunk_size"]

#: Budget, in bytes, for ONE fp32 ``[chunk, Vt]`` work buffer on CUDA. The forward holds two
#: such buffers (the backward two, plus the gradient being written), so the transient memory
#: of the op is about ``2 * budget`` whatever the number of tokens.
_CHUNK_BYTES_CUDA = 128 * 1024 * 1024
#: On CPU a small, cache-sized buffer is faster: the several passes over a chunk stay in cache
#: and no fresh memory has to be page-faulted in per chunk.
_CHUNK_BYTES_CPU = 4 * 1024 * 1024


def default_chunk_size(num_tokens: int, vocab_per_rank: int, device: Union[str, torch.device] = "cuda") -> int:
    """Tokens per chunk so that one fp32 ``[chunk, vocab_per_rank]`` work buffer fits the budget.

    The budget is 128 MiB on accelerators and 4 MiB on CPU. Returns ``num_tokens`` when
    everything fits in one chunk, and at least 1.
    """
    budget = _CHUNK_BYTES_CPU if torch.device(device).type == "cpu" else _CHUNK_BYTES_CUDA
    per_chunk = max(1, budget // (4 * max(1, vocab_per_rank)))
    return max(1, min(num_tokens, per_chunk))


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tp_group, rank, world, compute_entropy, chunk_size):
        vt = logits.shape[-1]
        lead_shape = logits.shape[:-1]
        z2 = logits.reshape(-1, vt)  # a view for contiguous inputs
        n = z2.shape[0]
        y = labels.reshape(-1)
        if y.shape[0] != n:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)}"
            )
        vocab_start = rank * vt
        v_total = vt * world
        local_y = y - vocab_start
        owned = (local_y >= 0) & (local_y < vt)
        valid = (y >= 0) & (y < v_total)
        # the target logit on the owner rank (0 elsewhere), read from the input dtype directly
        safe_idx = torch.where(owned, local_y, torch.zeros_like(local_y))
        z_y = torch.gather(z2, 1, safe_idx.unsqueeze(1)).squeeze(1).float()
        z_y = torch.where(owned, z_y, torch.zeros_like(z_y))

        k = 4 if compute_entropy else 3
        stats = torch.empty((n, k), dtype=torch.float32, device=logits.device)
        cs = chunk_size or default_chunk_size(n, vt, logits.device)
        cs = min(cs, max(n, 1))
        # two fp32 work buffers reused by every chunk (one without entropy)
        d_buf = torch.empty((cs, vt), dtype=torch.float32, device=logits.device)
        e_buf = torch.empty_like(d_buf) if compute_entropy else None
        for a in range(0, n, cs):
            b = min(n, a + cs)
            m, s_, t = local_softmax_stats(
                z2[a:b], compute_entropy, d_buf[: b - a], None if e_buf is None else e_buf[: b - a]
            )
            stats[a:b, 0] = m
            stats[a:b, 1] = s_
            if compute_entropy:
                stats[a:b, 3] = t
        del d_buf, e_buf
        stats[:, 2] = z_y

        allstats = all_gather_stats(stats, tp_group, world) if world > 1 else stats.unsqueeze(0)  # [R, N, k]
        logp, ent, M, S = merge_ranks(allstats, valid, compute_entropy)
        if not compute_entropy:
            ent = torch.zeros_like(M)
            ctx.mark_non_differentiable(ent)

        ctx.set_materialize_grads(False)
        # z2 is a view of the input for contiguous logits (a copy only for non-viewable ones)
        ctx.save_for_backward(z2, local_y, owned, valid, M, S, ent)
        ctx.logits_shape = logits.shape
        ctx.compute_entropy = compute_entropy
        ctx.chunk_size = cs
        return logp.reshape(lead_shape), ent.reshape(lead_shape)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        z2, local_y, owned, valid, M, S, ent = ctx.saved_tensors
        if not ctx.compute_entropy:
            g_ent = None
        if g_lp is None and g_ent is None:
            return (None,) * 7
        vt = z2.shape[-1]
        n = z2.shape[0]
        # per-token coefficients (O(tokens)): dz_j = e_j * (a * (z_j - M) + c) [+ g_lp at y],
        # e_j = exp(z_j - M) = S p_j. See docs/logprobs.md, "Backward".
        neg_inv_s = -1.0 / S
        if g_lp is not None:
            # logp of an out-of-range label is the constant 0: no gradient flows through it
            g_lp = torch.where(valid, g_lp.reshape(-1).float(), torch.zeros((), device=M.device))
            tgt_idx = torch.where(owned, local_y, torch.zeros_like(local_y)).unsqueeze(1)
            tgt_add = torch.where(owned, g_lp, torch.zeros_like(g_lp)).unsqueeze(1)
        if g_ent is None:
            # dz = -p g_lp = e * (-g_lp / S)
            coef_c = neg_inv_s * g_lp
            coef_a = None
        else:
            # dz = -p [g_lp + g_H (log p + H)], log p = (z - M) - log S
            #    = e * [(-g_H / S)(z - M) + (-(g_lp + g_H (H - log S)) / S)]
            g_ent = g_ent.reshape(-1).float()
            coef_a = neg_inv_s * g_ent
            c = g_ent * (ent - torch.log(S))
            if g_lp is not None:
                c = c + g_lp
            coef_c = neg_inv_s * c
        g2 = torch.empty((n, vt), dtype=z2.dtype, device=z2.device)
        fp32_out = g2.dtype == torch.float32
        cs = ctx.chunk_size
        d_buf = None if fp32_out else torch.empty((min(cs, n), vt), dtype=torch.float32, device=z2.device)
        e_buf = None if coef_a is None else torch.empty((min(cs, n), vt), dtype=torch.float32, device=z2.device)
        for a in range(0, n, cs):
            b = min(n, a + cs)
            # d = z_j - M in fp32, written straight into the output when that is fp32
            d = shift_into(g2[a:b] if fp32_out else d_buf[: b - a], z2[a:b], M[a:b])
            if coef_a is None:
                d.exp_().mul_(coef_c[a:b].unsqueeze(1))
            else:
                e = torch.exp(d, out=e_buf[: b - a])
                d.mul_(coef_a[a:b].unsqueeze(1)).add_(coef_c[a:b].unsqueeze(1)).mul_(e)
            if g_lp is not None:
                d.scatter_add_(1, tgt_idx[a:b], tgt_add[a:b])  # + g_lp on the owned target
            if not fp32_out:
                g2[a:b].copy_(d)
        del d_buf, e_buf
        return g2.view(ctx.logits_shape), None, None, None, None, None, None


def _check_inputs(logits: torch.Tensor, labels: Optional[torch.Tensor] = None):
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    if labels is not None:
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal logits.shape[:-1] "
                f"{tuple(logits.shape[:-1])}"
            )


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group=None,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probability of ``labels`` (and optionally the entropy) under vocab-parallel logits.

    Args:
        logits: ``[..., Vt]`` this TP rank's shard of the logits, ``Vt = V / tp`` (bf16, fp16
            or fp32; any leading shape, e.g. ``[b, s]`` or ``[s, b]``). Rank ``r`` of the TP
            group owns vocabulary ids ``[r*Vt, (r+1)*Vt)``. Never modified.
        labels: ``[...]`` integer GLOBAL vocabulary ids (int64 preferred), same leading shape.
            A label outside ``[0, V)`` means "no target": its ``logp`` is returned as exactly
            0 and carries no gradient (the entropy of that token is still computed). Such
            tokens are expected to be masked out by the caller's loss mask.
        tp_group: the tensor-parallel process group. ``None``: megatron's TP group when
            ``megatron.core.parallel_state`` is initialised with TP size > 1, else no TP
            (megatron is never imported by this lookup).
        return_entropy: also return the entropy of the full distribution.
        chunk_size: tokens (of the flattened leading dims) processed at once. ``None``:
            :func:`default_chunk_size` - the largest chunk whose fp32 ``[chunk, Vt]`` work
            buffer fits in 128 MiB on accelerators, 4 MiB (cache-sized) on CPU.

    Returns:
        ``logp`` fp32 ``[...]`` in nats (``<= 0``), or ``(logp, entropy)`` with ``entropy``
        fp32 ``[...]`` in nats (``0 <= H <= log V``). Both are differentiable w.r.t.
        ``logits``; the gradient is returned in ``logits.dtype`` and is correct on every TP
        rank, including ranks that do not own the label.

    Communication: one ``all_gather`` of ``[tokens, 4]`` fp32 statistics (3 without entropy)
    over ``tp_group`` in the forward, none in the backward. Memory: the op saves only the input
    logits and O(tokens) statistics for backward; besides its outputs (and, in the backward,
    the gradient) it allocates two fp32 ``[chunk, Vt]`` work buffers.
    Non-contiguous ``logits`` that cannot be viewed as ``[tokens, Vt]`` are copied once.
    The math (statistics, merge, backward, numerical stability) is in ``docs/logprobs.md``.
    """
    _check_inputs(logits, labels)
    if chunk_size is not None and int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    group, rank, world = resolve_tp_group(tp_group)
    logp, ent = _VocabParallelLogprobs.apply(
        logits, labels.long(), group, rank, world, bool(return_entropy), chunk_size
    )
    if return_entropy:
        return logp, ent
    return logp


# --------------------------------------------------------------------------------------------
# full-vocabulary KL(p || q) against reference logits
# --------------------------------------------------------------------------------------------
class _VocabParallelKL(torch.autograd.Function):
    """``KL(p || q)`` (``reverse=False``) or ``KL(q || p)`` (``reverse=True``), ``p = softmax(z)``
    the differentiable policy, ``q = softmax(w)`` the constant reference."""

    @staticmethod
    def forward(ctx, logits, ref_logits, tp_group, world, chunk_size, reverse):
        vt = logits.shape[-1]
        lead_shape = logits.shape[:-1]
        z2 = logits.reshape(-1, vt)
        q2 = ref_logits.reshape(-1, vt)
        n = z2.shape[0]
        stats = torch.empty((n, 5), dtype=torch.float32, device=logits.device)
        cs = chunk_size or default_chunk_size(n, vt, logits.device)
        for a in range(0, n, cs):
            b = min(n, a + cs)
            z = z2[a:b]
            w = q2[a:b]
            mz = z.amax(dim=-1).float()
            mw = w.amax(dim=-1).float()
            # every in-place op below acts on a fresh fp32 temporary, never on the inputs
            ez = (z - mz.unsqueeze(1)).exp_()
            ew = (w - mw.unsqueeze(1)).exp_()
            stats[a:b, 0] = mz
            stats[a:b, 1] = ez.sum(dim=-1)
            stats[a:b, 3] = mw
            stats[a:b, 4] = ew.sum(dim=-1)
            diff = z.float() - w.float()
            # the expectation's distribution: sum_j e^(z_j - m_z) (z_j - w_j), or
            # sum_j e^(w_j - m_w) (w_j - z_j) for the reverse direction
            stats[a:b, 2] = ew.mul_(diff).sum(dim=-1).neg_() if reverse else ez.mul_(diff).sum(dim=-1)
            del diff, ez, ew
        if world > 1:
            allstats = all_gather_stats(stats, tp_group, world)
        else:
            allstats = stats.unsqueeze(0)
        Mz, Sz, wz = merge_logsumexp(allstats[..., 0], allstats[..., 1])
        Mw, Sw, ww = merge_logsumexp(allstats[..., 3], allstats[..., 4])
        # offsets grouped first: log Z_z - log Z_w, with log Z = M + log S
        offset = (Mz - Mw) + (torch.log(Sz) - torch.log(Sw))
        if reverse:  # KL(q || p) = E_q[w - z] + (log Z_z - log Z_w)
            kl = ((ww * allstats[..., 2]).sum(dim=0) / Sw + offset).clamp_min(0.0)
        else:  # KL(p || q) = E_p[z - w] - (log Z_z - log Z_w)
            kl = ((wz * allstats[..., 2]).sum(dim=0) / Sz - offset).clamp_min(0.0)
        ctx.save_for_backward(logits, ref_logits, Mz, Sz, Mw, Sw, offset, kl)
        ctx.chunk_size = cs
        ctx.reverse = reverse
        return kl.reshape(lead_shape)

    @staticmethod
    def backward(ctx, g):
        logits, ref_logits, Mz, Sz, Mw, Sw, offset, kl = ctx.saved_tensors
        vt = logits.shape[-1]
        z2 = logits.reshape(-1, vt)
        q2 = ref_logits.reshape(-1, vt)
        n = z2.shape[0]
        g = g.reshape(-1).float()
        grad = torch.empty((n, vt), dtype=logits.dtype, device=logits.device)
        cs = ctx.chunk_size
        for a in range(0, n, cs):
            b = min(n, a + cs)
            e = (z2[a:b] - Mz[a:b].unsqueeze(1)).exp_()  # = S_z * p, a fresh fp32 temporary
            if ctx.reverse:
                # dKL(q||p)/dz_j = p_j - q_j
                d = e.div_(Sz[a:b].unsqueeze(1))
                d.sub_((q2[a:b] - Mw[a:b].unsqueeze(1)).exp_().div_(Sw[a:b].unsqueeze(1)))
                d.mul_(g[a:b].unsqueeze(1))
            else:
                # dKL(p||q)/dz_j = p_j (log p_j - log q_j - KL), log p_j - log q_j = z_j - w_j - offset
                d = z2[a:b].float() - q2[a:b].float()  # fresh fp32 temporary
                d.sub_((offset[a:b] + kl[a:b]).unsqueeze(1))
                d.mul_(e).mul_((g[a:b] / Sz[a:b]).unsqueeze(1))
            grad[a:b].copy_(d)
            del d, e
        return grad.view(logits.shape), None, None, None, None, None


def vocab_parallel_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    tp_group=None,
    chunk_size: Optional[int] = None,
    reverse: bool = False,
) -> torch.Tensor:
    """Exact per-token ``KL(p || q)`` (or ``KL(q || p)``) over the full vocabulary from
    vocab-parallel logits.

    Args:
        logits: ``[..., Vt]`` this rank's shard of the current policy's logits (p).
        ref_logits: ``[..., Vt]`` the same shard of the reference policy's logits (q); treated
            as a constant (no gradient flows to it).
        tp_group, chunk_size: as in :func:`vocab_parallel_logprobs`.
        reverse: ``False``: ``KL(p || q) = sum_j p_j (log p_j - log q_j)`` (SFT-KL's);
            ``True``: ``KL(q || p) = sum_j q_j (log q_j - log p_j)`` (ASFT's).

    Returns:
        fp32 ``[...]`` in nats (>= 0), differentiable w.r.t. ``logits``:
        ``dKL(p||q)/dz_j = p_j (log p_j - log q_j - KL)``, ``dKL(q||p)/dz_j = p_j - q_j``
        (docs/logprobs.md), correct on every TP rank; one all-gather of ``[tokens, 5]``
        statistics forward, none backward.
    """
    _check_inputs(logits)
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(
            f"ref_logits shape {tuple(ref_logits.shape)} must equal logits shape {tuple(logits.shape)}"
        )
    if chunk_size is not None and int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    group, _rank, world = resolve_tp_group(tp_group)
    return _VocabParallelKL.apply(logits, ref_logits.detach(), group, world, chunk_size, bool(reverse))
