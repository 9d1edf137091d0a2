"""SFT / PSFT / DFT / SFT-KL / ASFT / EAFT objectives and their megatron-core loss functions.

See ``docs/logprobs.md`` for the formulas, gradients and aggregation modes.
"""

from psft_megatron.losses.config import AGG_MODES, KL_ESTIMATORS, LOSS_KINDS, LossConfig
from psft_megatron.losses.megatron_loss import PSFTLoss, aggregate_loss, reduce_loss_metrics
from psft_megatron.losses.objectives import (
    K3_CLAMP,
    asft_objective,
    dft_objective,
    eaft_objective,
    eaft_weight,
    importance_ratio,
    kl_k1,
    kl_k3,
    kl_term,
    psft_objective,
    sft_kl_objective,
    sft_objective,
)

__all__ = [
    "LossConfig",
    "LOSS_KINDS",
    "KL_ESTIMATORS",
    "AGG_MODES",
    "PSFTLoss",
    "aggregate_loss",
    "reduce_loss_metrics",
    "K3_CLAMP",
    "sft_objective",
    "dft_objective",
    "importance_ratio",
    "psft_objective",
    "kl_k1",
    "kl_k3",
    "kl_term",
    "sft_kl_objective",
    "asft_objective",
    "eaft_weight",
    "eaft_objective",
]
