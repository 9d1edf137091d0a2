"""Per-token objectives: pure functions on fp32 ``[...]`` tensors of log-probabilities, and the
table of loss kinds (:data:`OBJECTIVES`) the loss function dispatches on.

Every function returns the per-token loss (to be MINIMISED), same shape as ``logp``; the
masking and aggregation into a scalar happen in :mod:`psft_megatron.losses.megatron_loss`.
Formulas and gradients: ``docs/logprobs.md``, section "Objectives".

A loss kind is ONE entry of :data:`OBJECTIVES` (:func:`register_objective`): a function from
the micro-batch's :class:`TokenInputs` to an :class:`ObjectiveResult` (the per-token loss and
the per-token values it reports), and the inputs it needs beyond the log-probs ("ref",
"entropy", "logits"; ``old_logprobs`` is always optional). ``LossConfig.kind`` accepts exactly
the registered kinds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Optional

import torch

__all__ = [
    "TokenInputs",
    "ObjectiveResult",
    "Objective",
    "OBJECTIVES",
    "register_objective",
    "K3_CLAMP",
    "sft_objective",
    "dft_objective",
    "importance_ratio",
    "psft_objective",
    "kl_k1",
    "kl_k3",
    "sft_kl_objective",
    "kl_term",
    "asft_objective",
    "eaft_weight",
    "eaft_objective",
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


def asft_objective(logp: torch.Tensor, kl: torch.Tensor, *, kl_coef: float = 0.1) -> torch.Tensor:
    """Anchored SFT (arXiv 2509.23753): DFT's loss plus ``kl_coef`` times a KL to a reference.

    ``L = -sg(p) logp + kl_coef * KL`` with ``p = exp(logp)`` and ``KL`` the per-token value of
    :func:`kl_term` (label-token k1/k3 estimates of ``KL(pi || pi_ref)``) or of
    ``vocab_parallel_kl(..., reverse=True)`` (the exact ``KL(pi_ref || pi)`` over the vocabulary,
    the authors' form). Gradient w.r.t. ``logp``: ``-p + kl_coef * dKL/dlogp`` (k1: ``1``; k3:
    ``1 - exp(ref - logp)`` inside the clamp); for the full KL, w.r.t. the logits,
    ``-p (onehot(y) - softmax) + kl_coef * (softmax - softmax_ref)``. The weight ``p`` carries
    no gradient, the reference none either.
    """
    return dft_objective(logp) + kl_coef * kl


def eaft_weight(topk_entropy: torch.Tensor, k: int, alpha: float = 1.0) -> torch.Tensor:
    """EAFT's gate (arXiv 2601.02151): ``(H_k / log k) ** alpha``, detached, in ``[0, 1]``.

    ``H_k`` is the entropy of the renormalised top-``k`` distribution
    (:func:`psft_megatron.ops.vocab_parallel_topk_entropy`), ``0 <= H_k <= log k``; the ratio
    is clamped to ``[0, 1]`` against rounding. ``alpha = 0`` gives weight 1 (cross-entropy)."""
    ratio = (topk_entropy.detach().float() / math.log(k)).clamp(0.0, 1.0)
    return ratio if alpha == 1.0 else ratio.pow(alpha)


def eaft_objective(logp: torch.Tensor, topk_entropy: torch.Tensor, *, k: int = 20, alpha: float = 1.0) -> torch.Tensor:
    """Entropy-adaptive fine-tuning: ``L = -w logp`` with ``w = sg((H_k / log k) ** alpha)``
    (:func:`eaft_weight`). The gate is a constant of the backward: gradient w.r.t. ``logp`` is
    ``-w`` (w.r.t. the logits ``-w (onehot(y) - softmax)``); confident tokens (low top-k
    entropy) are down-weighted, uncertain ones learned at full strength."""
    return -eaft_weight(topk_entropy, k, alpha) * logp


# --------------------------------------------------------------------------------------------
# the table of loss kinds
# --------------------------------------------------------------------------------------------
@dataclass
class TokenInputs:
    """What an objective may read for one micro-batch (``[b, s]`` fp32 unless noted).

    Attributes:
        logp: log p(label) under the current policy, differentiable.
        entropy: the current policy's entropy (no gradient) or None (computed when the config's
            ``compute_entropy`` is set or the objective requires "entropy").
        topk_entropy: the entropy of the renormalised top-``eaft_topk`` distribution (no
            gradient) when the objective requires "topk_entropy", else None.
        old_logprobs: the old policy's log-probs, or None (= the current ones, detached).
        ref: the reference policy's log-probs ``[b, s]``, or its logits ``[b, s, V/tp]`` when the
            objective requires "logits" (``kl_estimator='full'``); None when not given.
        output: the model output the loss was handed (the logits, or the per-token log-probs).
        config: the :class:`psft_megatron.losses.LossConfig`.
        tp_group: the tensor-parallel group (None: megatron's).
    """

    logp: torch.Tensor
    entropy: Optional[torch.Tensor]
    old_logprobs: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    output: torch.Tensor
    config: Any
    tp_group: Any = None
    topk_entropy: Optional[torch.Tensor] = None


@dataclass
class ObjectiveResult:
    """An objective's per-token loss ``[b, s]`` and what it reports: ``means`` are per-token
    values logged as token means (``clip_frac``, ``kl``...), ``maxima`` as maxima over the
    step's loss tokens (``ratio_max``)."""

    per_token: torch.Tensor
    means: Dict[str, torch.Tensor] = field(default_factory=dict)
    maxima: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """One loss kind: ``fn(TokenInputs) -> ObjectiveResult`` and ``requires(config)``, the names
    of the inputs it cannot do without: "ref" (a reference policy's log-probs or logits),
    "entropy" (the current entropy), "topk_entropy" (the entropy of the top-``eaft_topk``
    distribution: from the logits, or a third channel of the fused output), "logits" (the
    vocab-parallel logits themselves, so no fused output layer)."""

    kind: str
    fn: Callable[[TokenInputs], ObjectiveResult]
    requires: Callable[[Any], FrozenSet[str]]
    summary: str


#: kind -> Objective, in registration order
OBJECTIVES: Dict[str, Objective] = {}


def register_objective(kind: str, fn: Callable[[TokenInputs], ObjectiveResult], *, summary: str,
                       requires: Callable[[Any], FrozenSet[str]] = lambda cfg: frozenset()) -> Objective:
    """Add a loss kind to :data:`OBJECTIVES` (and so to ``LossConfig.kind``); returns its entry."""
    if kind in OBJECTIVES:
        raise ValueError(f"loss kind {kind!r} is already registered")
    OBJECTIVES[kind] = Objective(kind, fn, requires, summary)
    return OBJECTIVES[kind]


def _sft(x: TokenInputs) -> ObjectiveResult:
    return ObjectiveResult(sft_objective(x.logp))


def _dft(x: TokenInputs) -> ObjectiveResult:
    return ObjectiveResult(dft_objective(x.logp))


def _psft(x: TokenInputs) -> ObjectiveResult:
    cfg = x.config
    old = None if x.old_logprobs is None else x.old_logprobs.to(torch.float32)
    per_token = psft_objective(x.logp, old, clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                               log_ratio_clamp=cfg.log_ratio_clamp)
    with torch.no_grad():
        ratio = importance_ratio(x.logp, old, cfg.log_ratio_clamp)
        approx_kl = torch.zeros_like(ratio) if old is None else old - x.logp
    means = {"clip_frac": (ratio > 1.0 + cfg.clip_eps_high).float(), "ratio_mean": ratio, "approx_kl": approx_kl}
    return ObjectiveResult(per_token, means=means, maxima={"ratio_max": ratio})


def _kl(x: TokenInputs, reverse: bool) -> torch.Tensor:
    """The micro-batch's per-token KL term: label-token k1/k3 from ``ref`` log-probs, or the
    exact full-vocabulary KL from ``ref`` logits (``reverse``: ``KL(pi_ref || pi)``)."""
    cfg = x.config
    if cfg.kl_estimator == "full":
        from psft_megatron.ops import vocab_parallel_kl

        if tuple(x.ref.shape) != tuple(x.output.shape):
            raise ValueError(f"kl_estimator='full' needs reference logits of shape {tuple(x.output.shape)}, "
                             f"got {tuple(x.ref.shape)}")
        return vocab_parallel_kl(x.output, x.ref, tp_group=x.tp_group, chunk_size=cfg.chunk_size, reverse=reverse)
    return kl_term(x.logp, x.ref.to(torch.float32), kl_estimator=cfg.kl_estimator)


def _sft_kl(x: TokenInputs) -> ObjectiveResult:
    kl = _kl(x, reverse=False)
    return ObjectiveResult(sft_objective(x.logp) + x.config.kl_coef * kl, means={"kl": kl.detach()})


def _asft(x: TokenInputs) -> ObjectiveResult:
    kl = _kl(x, reverse=True)
    return ObjectiveResult(asft_objective(x.logp, kl, kl_coef=x.config.asft_kl_coef), means={"kl": kl.detach()})


def _eaft(x: TokenInputs) -> ObjectiveResult:
    cfg = x.config
    weight = eaft_weight(x.topk_entropy, cfg.eaft_topk, cfg.eaft_alpha)
    return ObjectiveResult(-weight * x.logp, means={"eaft_weight": weight, "topk_entropy": x.topk_entropy.detach()})


def _needs_ref(cfg) -> FrozenSet[str]:
    return frozenset({"ref", "logits"} if cfg.kl_estimator == "full" else {"ref"})


register_objective("sft", _sft, summary="cross-entropy -logp")
register_objective("psft", _psft, summary="-min(r, clip(r, 1 - eps_low, 1 + eps_high)), r = p / p_old")
register_objective("dft", _dft, summary="-sg(p) * logp")
register_objective("sft_kl", _sft_kl, summary="-logp + kl_coef * KL(pi || pi_ref)", requires=_needs_ref)
register_objective("asft", _asft, summary="-sg(p) * logp + asft_kl_coef * KL (full: KL(pi_ref || pi))",
                   requires=_needs_ref)
register_objective("eaft", _eaft, summary="-sg((H_topk / log k) ** alpha) * logp",
                   requires=lambda cfg: frozenset({"topk_entropy"}))
