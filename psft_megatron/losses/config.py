"""``LossConfig``: which per-token objective to train and how to aggregate it.

The formulas behind every field are in ``docs/logprobs.md`` (sections "Objectives" and
"Aggregation").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from psft_megatron.losses.objectives import OBJECTIVES

__all__ = ["LossConfig", "LOSS_KINDS", "KL_ESTIMATORS", "AGG_MODES"]

#: supported objectives: the kinds registered in psft_megatron.losses.objectives.OBJECTIVES
LOSS_KINDS = tuple(OBJECTIVES)
#: per-token KL estimators for ``kind='sft_kl'`` and ``kind='asft'``
KL_ESTIMATORS = ("k1", "k3", "full")
#: aggregation of per-token losses into the optimised scalar
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class LossConfig:
    """Configuration of the training objective (the ``loss:`` section of a run config).

    Attributes:
        kind: ``'sft'`` (cross-entropy), ``'psft'`` (clipped-ratio surrogate against an old
            policy), ``'dft'`` (probability-weighted cross-entropy), ``'sft_kl'``
            (cross-entropy plus ``kl_coef`` times a KL penalty to a reference policy),
            ``'asft'`` (DFT plus ``asft_kl_coef`` times a KL to a reference policy), ``'eaft'``
            (cross-entropy gated by the top-``eaft_topk`` entropy).
        clip_eps_low: PPO's lower clip ``1 - eps_low`` of the ratio. PSFT's advantage is 1 on
            every token, where ``min(r, clip(r, lo, hi)) = min(r, hi)``: this value changes NO
            loss value, gradient or metric (docs/logprobs.md, "Objectives"). It is accepted, in
            ``[0, 1)``, only so that PPO-style configs load; not logged.
        clip_eps_high: PSFT upper clip ``1 + eps_high``: tokens whose ratio exceeds it get
            zero gradient. ``>= 0``.
        log_ratio_clamp: ``logp - old_logp`` is clamped to ``[-c, c]`` before ``exp`` (> 0).
        kl_coef: weight of the KL term for ``'sft_kl'`` (``>= 0``).
        kl_estimator: the KL term of ``'sft_kl'`` and ``'asft'``: ``'k1'`` (``logp - ref_logp``),
            ``'k3'`` (low-variance ``exp(ref - logp) - (ref - logp) - 1`` clamped to
            ``[-10, 10]``) or ``'full'`` (exact full-vocabulary KL from reference logits:
            ``KL(pi || pi_ref)`` for ``'sft_kl'``, ``KL(pi_ref || pi)`` for ``'asft'``, as the
            ASFT authors compute it).
        asft_kl_coef: weight of the KL term for ``'asft'`` (``>= 0``; 0.1, the ASFT authors'
            code default).
        eaft_topk: ``k`` of EAFT's top-k entropy (an int ``>= 2``; 20, the EAFT authors').
        eaft_alpha: exponent of EAFT's gate ``(H_k / log k) ** alpha`` (``>= 0``; 1.0).
        agg_mode: ``'token-mean'`` (global mean over all loss tokens of the optimizer step),
            ``'seq-mean-token-mean'`` (mean over sequences of each sequence's token mean) or
            ``'seq-mean-token-sum'`` (mean over sequences of each sequence's token sum).
        chunk_size: tokens per chunk of the vocab-parallel log-prob op (``None``: automatic,
            fp32 temporaries bounded to ~128 MiB each).
        compute_entropy: also compute the per-token entropy (a metric, not differentiated;
            costs one extra multiply and sum per logit and a second fp32 chunk buffer in the
            forward, nothing in the backward).
        fused_output_layer: the model's output layer runs inside the log-prob op
            (:func:`psft_megatron.ops.fused_linear_logprobs`): no logits tensor, prompt and
            padding rows never projected. The model is then run with
            :meth:`PSFTLoss.model_forward`, whose output ``[b, s, 2]`` (log-prob, entropy) the
            loss functions take instead of logits. Not with ``kl_estimator='full'``.
    """

    kind: str = "psft"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    log_ratio_clamp: float = 20.0
    kl_coef: float = 0.5
    kl_estimator: str = "k3"
    asft_kl_coef: float = 0.1
    eaft_topk: int = 20
    eaft_alpha: float = 1.0
    agg_mode: str = "token-mean"
    chunk_size: Optional[int] = None
    compute_entropy: bool = True
    fused_output_layer: bool = False

    def __post_init__(self) -> None:
        def one_of(key: str, allowed) -> None:
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(
                    f"loss.{key}={value!r} is not one of {', '.join(allowed)}"
                )

        one_of("kind", LOSS_KINDS)
        one_of("kl_estimator", KL_ESTIMATORS)
        one_of("agg_mode", AGG_MODES)

        def real(key: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> None:
            value = getattr(self, key)
            ok = _is_real(value)
            if ok:
                ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
            if not ok:
                lb = "(" if lo_open else "["
                rb = ")" if hi_open else "]"
                raise ValueError(f"loss.{key}={value!r} must be a finite number in {lb}{lo}, {hi}{rb}")
            setattr(self, key, float(value))

        real("clip_eps_low", 0.0, 1.0)
        real("clip_eps_high", 0.0, math.inf)
        real("log_ratio_clamp", 0.0, math.inf, lo_open=True)
        real("kl_coef", 0.0, math.inf)
        real("asft_kl_coef", 0.0, math.inf)
        real("eaft_alpha", 0.0, math.inf)
        k = self.eaft_topk
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"loss.eaft_topk={k!r} must be an int >= 2")

        cs = self.chunk_size
        if cs is not None and (isinstance(cs, bool) or not isinstance(cs, int) or cs <= 0):
            raise ValueError(f"loss.chunk_size={cs!r} must be a positive int or None")
        if not isinstance(self.compute_entropy, bool):
            raise ValueError(f"loss.compute_entropy={self.compute_entropy!r} must be true or false")
        if not isinstance(self.fused_output_layer, bool):
            raise ValueError(f"loss.fused_output_layer={self.fused_output_layer!r} must be true or false")
        if self.fused_output_layer and "logits" in OBJECTIVES[self.kind].requires(self):
            raise ValueError(f"loss.fused_output_layer=true cannot be used with loss.kind={self.kind!r}, "
                             f"kl_estimator={self.kl_estimator!r} (it needs both models' logits); use k1 or k3")

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "LossConfig":
        """Build from a mapping (e.g. the ``loss:`` section of a YAML config).

        Raises ValueError naming any unknown key and listing the known ones.
        """
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"loss config must be a mapping, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in d if k not in known)
        if unknown:
            raise ValueError(
                f"unknown loss config key(s): {', '.join('loss.' + str(k) for k in unknown)}; "
                f"known keys: {', '.join(known)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
