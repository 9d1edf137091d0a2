"""Which fused kernels a layer spec uses on this machine: megatron-core's ``TransformerConfig``
fusion switches, decided in one place from what is installed.

| switch | ``te`` (CUDA + TE) | ``local`` on CUDA | ``cpu`` / ``local`` on CPU |
|---|---|---|---|
| ``bias_activation_fusion`` (megatron's fused SwiGLU) | on | on | off |
| ``bias_dropout_fusion`` (megatron's fused bias-dropout-add) | on | on | off |
| ``apply_rope_fusion`` (TE's fused RoPE kernel) | on | off (needs TE) | off |
| ``gradient_accumulation_fusion`` (apex ``fused_weight_gradient_mlp_cuda``) | with apex | with apex | off |
| ``masked_softmax_fusion`` | off (TE attention has its own) | off (SDPA core attention) | off |
| ``persist_layer_norm`` (apex, LayerNorm only) | off | off | off |

``gradient_accumulation_fusion`` needs apex's extension even with TE: megatron's output layer
is a plain ``ColumnParallelLinear``, which refuses the switch without it. The norms of the
``local`` spec use apex's fused kernels when apex is installed (:mod:`psft_megatron.model.apex_norm`).
The ``cpu`` spec is the reference: every switch off, plain torch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Dict

#: every TransformerConfig switch this module decides
FUSION_FIELDS = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
                 "gradient_accumulation_fusion", "masked_softmax_fusion", "persist_layer_norm")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Kernels:
    """What this machine offers.

    Attributes:
        cuda: a CUDA device is visible to torch.
        transformer_engine: ``transformer_engine`` imports.
        apex_norm: apex's ``fused_layer_norm_cuda`` extension (fused LayerNorm / RMSNorm).
        apex_grad_accum: apex's ``fused_weight_gradient_mlp_cuda`` extension (fused wgrad
            accumulation into megatron's fp32 ``main_grad``).
    """

    cuda: bool = False
    transformer_engine: bool = False
    apex_norm: bool = False
    apex_grad_accum: bool = False

    @classmethod
    def detect(cls) -> "Kernels":
        import torch

        from psft_megatron.optional import is_available

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda,
                   transformer_engine=is_available("transformer_engine"),
                   apex_norm=cuda and _importable("apex") and _importable("fused_layer_norm_cuda"),
                   apex_grad_accum=cuda and _importable("fused_weight_gradient_mlp_cuda"))


def default_layer_spec(kernels: Kernels) -> str:
    """``te`` with CUDA and Transformer Engine, ``local`` with CUDA only, else ``cpu``."""
    if kernels.cuda and kernels.transformer_engine:
        return "te"
    return "local" if kernels.cuda else "cpu"


def fusion_fields(layer_spec: str, kernels: Kernels) -> Dict[str, bool]:
    """The ``TransformerConfig`` fusion switches for ``layer_spec`` on a machine with ``kernels``
    (the table in the module docstring)."""
    fields = dict.fromkeys(FUSION_FIELDS, False)
    if layer_spec == "cpu" or not kernels.cuda:
        return fields
    fields.update(bias_activation_fusion=True, bias_dropout_fusion=True,
                  gradient_accumulation_fusion=kernels.apex_grad_accum)
    if layer_spec == "te":
        fields["apply_rope_fusion"] = kernels.transformer_engine
    return fields
