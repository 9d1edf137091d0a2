"""Per-token objectives: pure functions on fp32 ``[...]`` tensors of log-probabilities.

Every function returns the per-token loss (to be MINIMISED), same shape as ``logp``; the
masking and aggregation into a scalar happen in :mod:`psft_megatron.losses.megatron_loss`.
Formulas and gradients: ``docs/logprobs.md``, section "Objectives".
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "K3_CLAMP",
    "sft_objective",
    "dft_objective",
    "importance_ratio",
    "psft_objective",
    "kl_k1",
    "kl_k3",
    "sft_kl_objective",
    "kl_term",
]

#: the k3 ("low-variance") KL estimate is clamped to [-K3_CLAMP, K3_CLAMP]
K3_CLAMP = 10.0


def sft_objective(logp: torch.Tensor) -> torch.Tensor:
    """Cross-entropy: ``-logp``. Gradient ``-grad(logp)``."""
    return -logp


def dft_objective(logp: torch.Tensor) -> torch.Tensor:
    """Dynamic fine-tuning: ``-sg(p) * logp`` with ``p = exp(logp)`` the target's probability.

    ``sg`` = stop-gradient: the gradient is ``-p * grad(logp)``, i.e. cross-entropy re-weighted
    by the model's own (detached) probability of the target token.
    """
    return -torch.exp(logp.detach()) * logp


def importance_ratio(
    logp: torch.Tensor, old_logp: Optional[torch.Tensor], log_ratio_clamp: float = 20.0
) -> torch.Tensor:
    """``r = exp(clamp(logp - old_logp, -c, c))``; ``old_logp=None`` means ``old = sg(logp)``
    (r == 1 exactly, ``grad r = grad logp``). Differentiable in ``logp`` only."""
    old = logp.detach() if old_logp is None else old_logp.detach().to(logp.dtype)
    return torch.exp(torch.clamp(logp - old, -log_ratio_clamp, log_ratio_clamp))


def psft_objective(
    logp: torch.Tensor,
    old_logp: Optional[torch.Tensor] = None,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    log_ratio_clamp: float = 20.0,
) -> torch.Tensor:
    """Proximal SFT: PPO's clipped surrogate with advantage 1 for every target token.

    ``L = -min(r, clip(r, 1 - eps_low, 1 + eps_high))``, ``r = exp(clamp(logp - old, -c, c))``.

    With advantage 1 only the upper clip can bind, ``min(r, clip(r, lo, hi)) = min(r, hi)``,
    so this is implemented as ``-where(r > 1 + eps_high, 1 + eps_high, r)``: the gradient is
    EXACTLY zero on tokens with ``r > 1 + eps_high`` and ``-r * grad(logp)`` elsewhere (also
    0 where the log-ratio is clamped below ``-c``, i.e. ``r < e^-c``). ``clip_eps_low`` is
    accepted for completeness; it cannot change the value or the gradient.
    ``old_logp=None``: ``r == 1`` and the gradient is identical to SFT's.
    """
    del clip_eps_low  # never binds with a positive advantage (docs/logprobs.md)
    r = importance_ratio(logp, old_logp, log_ratio_clamp)
    hi = 1.0 + clip_eps_high
    return -torch.where(r > hi, torch.full_like(r, hi), r)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 estimate of ``KL(pi || pi_ref)`` on the target token: ``logp - ref_logp``."""
    return logp - ref_logp.detach()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = K3_CLAMP) -> torch.Tensor:
    """k3 (low-variance) estimate: ``exp(ref - logp) - (ref - logp) - 1`` clamped to
    ``[-clamp, clamp]`` (>= 0 before the clamp). Gradient ``(1 - exp(ref - logp)) grad(logp)``
    inside the clamp range, 0 outside."""
    delta = ref_logp.detach() - logp
    # expm1(d) - d == exp(d) - d - 1 without the cancellation of "exp(d) - 1" at small d
    return torch.clamp(torch.expm1(delta) - delta, -clamp, clamp)


def sft_kl_objective(
    logp: torch.Tensor,
    ref_logp: Optional[torch.Tensor] = None,
    *,
    kl_coef: float = 0.5,
    kl_estimator: str = "k3",
    full_kl: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cross-entropy plus a KL penalty to a reference policy: ``-logp + kl_coef * KL``.

    ``KL`` per token is ``kl_k1(logp, ref_logp)``, ``kl_k3(logp, ref_logp)``, or, for
    ``kl_estimator='full'``, the given ``full_kl`` (exact full-vocabulary KL from
    :func:`psft_megatron.ops.vocab_parallel_kl`).
    """
    return -logp + kl_coef * kl_term(logp, ref_logp, kl_estimator=kl_estimator, full_kl=full_kl)


def kl_term(
    logp: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    *,
    kl_estimator: str = "k3",
    full_kl: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The per-token KL used by :func:`sft_kl_objective` (see there)."""
    if kl_estimator == "full":
        if full_kl is None:
            raise ValueError("kl_estimator='full' needs full_kl (from vocab_parallel_kl)")
        return full_kl
    if ref_logp is None:
        raise ValueError(f"kl_estimator={kl_estimator!r} needs ref_logp")
    if kl_estimator == "k1":
        return kl_k1(logp, ref_logp)
    if kl_estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kl_estimator={kl_estimator!r} is not one of k1, k3, full")
