"""Entropy of the renormalised top-k distribution from vocab-parallel logits (EAFT's gate).

For a token with logits ``z`` over the full vocabulary (split over the TP ranks as in
:mod:`psft_megatron.ops.vocab_parallel_logprobs`), with ``T`` the ``k`` largest logits,

    ``H_k = -sum_{j in T} q_j log q_j``,   ``q_j = e^{z_j} / sum_{i in T} e^{z_i}``   (nats, ``0 <= H_k <= log k``)

The ``k`` largest of the whole vocabulary are among the union of every rank's ``k`` largest:
each rank reduces its shard to its local top-k values (chunk by chunk, read from the input
dtype: no fp32 copy of the logits), ONE all-gather exchanges the ``[tokens, k]`` values and
every rank takes the top-k of the ``R k`` candidates and their entropy. Only values travel:
which token ids they belong to does not matter (ties give the same distribution). The result
is a constant of the backward (EAFT detaches its gate): no autograd, no gradient.
The math and its place in EAFT: ``docs/logprobs.md``, "Top-k entropy".
"""

from __future__ import annotations

from typing import Optional

import torch

from psft_megatron.ops.softmax_stats import all_gather_stats, resolve_tp_group

__all__ = ["vocab_parallel_topk_entropy", "local_topk", "merge_topk", "entropy_of_top_values", "check_topk"]


def check_topk(k, vocab_size: int) -> int:
    """``k`` as an int, refusing anything but ``2 <= k <= vocab_size`` (one line naming both)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"top-k entropy: k={k!r} must be an int >= 2")
    if k > vocab_size:
        raise ValueError(f"top-k entropy: k={k} exceeds the vocabulary ({vocab_size} entries)")
    return k


def local_topk(z: torch.Tensor, k: int) -> torch.Tensor:
    """fp32 ``[n, min(k, V')]``: the largest logits of each row of ``z [n, V']`` (any float dtype;
    the values are exact: selected from the input, then converted). Unordered."""
    return torch.topk(z, min(k, z.shape[-1]), dim=-1, sorted=False).values.float()


def merge_topk(run: Optional[torch.Tensor], part: torch.Tensor, k: int) -> torch.Tensor:
    """The ``min(k, m1 + m2)`` largest of two candidate sets ``[n, m1]`` and ``[n, m2]`` of the
    same rows over disjoint parts of the vocabulary (``run`` None: ``part`` itself)."""
    if run is None:
        return part
    both = torch.cat([run, part], dim=1)
    return torch.topk(both, min(k, both.shape[1]), dim=1, sorted=False).values


def entropy_of_top_values(values: torch.Tensor, k: int) -> torch.Tensor:
    """fp32 ``[n]``: the entropy of the softmax over the ``k`` largest of ``values [n, m]``
    (``m >= k`` candidates that contain each row's top-k; ``m == k``: all of them).

    With ``d_j = v_j - max v <= 0``, ``e_j = e^{d_j}``, ``s = sum e_j``:
    ``H = log s - (sum e_j d_j) / s``; every term keeps its sign (no cancellation)."""
    top = values if values.shape[1] == k else torch.topk(values, k, dim=1, sorted=False).values
    d = top - top.amax(dim=1, keepdim=True)
    e = torch.exp(d)
    s = e.sum(dim=1)
    return torch.log(s) - (e * d).sum(dim=1) / s


def vocab_parallel_topk_entropy(
    logits: torch.Tensor,
    k: int,
    *,
    tp_group=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Entropy of the renormalised top-``k`` distribution of vocab-parallel logits.

    Args:
        logits: ``[..., Vt]`` this TP rank's shard (rank ``r`` owns ids ``[r Vt, (r+1) Vt)``);
            any float dtype, never modified or copied whole.
        k: how many of the largest logits of the FULL vocabulary, ``2 <= k <= V``.
        tp_group: the tensor-parallel group (``None``: megatron's when initialised, else none).
        chunk_size: tokens per local top-k (``None``: all at once).

    Returns:
        fp32 ``[...]`` in nats, ``0 <= H_k <= log k``, the same on every TP rank; no gradient.

    Communication: one all-gather of ``[tokens, min(k, Vt)]`` fp32 values over ``tp_group``.
    """
    if not torch.is_floating_point(logits) or logits.dim() < 1:
        raise TypeError(f"logits must be a floating-point tensor with a vocabulary dimension, got {logits.dtype}")
    group, _rank, world = resolve_tp_group(tp_group)
    vt = logits.shape[-1]
    k = check_topk(k, vt * world)
    lead = logits.shape[:-1]
    z2 = logits.detach().reshape(-1, vt)
    n = z2.shape[0]
    kl = min(k, vt)
    cs = n if chunk_size is None else max(1, int(chunk_size))
    with torch.no_grad():
        top = torch.empty((n, kl), dtype=torch.float32, device=logits.device)
        for a in range(0, n, cs):
            top[a: a + cs] = local_topk(z2[a: a + cs], kl)
        if world > 1:
            gathered = all_gather_stats(top, group, world)  # [R, n, kl]
            top = gathered.permute(1, 0, 2).reshape(n, world * kl)
        out = entropy_of_top_values(top, k) if n else top.new_zeros(0)
    return out.reshape(lead)
