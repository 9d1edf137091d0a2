"""Layer specs: ``te`` (Transformer Engine, GPU), ``local`` (megatron-core modules) and ``cpu``.

- ``te``: megatron-core's Transformer Engine spec unchanged: TE linears with the norms fused
  in, TE attention (including its context-parallel attention), FP8 through TE.
- ``local``: megatron-core's local spec (``ColumnParallelLinear`` / ``RowParallelLinear``,
  its MLP with the fused SwiGLU and fused bias-dropout-add on CUDA) with two modules swapped
  where megatron's local versions refuse this project's layouts: the norms (megatron's torch
  norm wrapper refuses sequence parallelism and apex's ``FusedLayerNorm`` has no RMSNorm) are
  the SP-capable norms of :mod:`psft_megatron.model.cpu_layers` - on apex's fused kernels when
  apex is installed - and the core attention (megatron's ``DotProductAttention`` refuses
  context parallelism and packed sequences and materialises the score matrix) is
  :class:`psft_megatron.model.local_attention.LocalCoreAttention` (PyTorch's flash /
  memory-efficient SDPA kernels with GQA inside, packed rows per segment or through flash-attn's
  varlen kernel, no host syncs).
- ``cpu``: the same modules with every fusion off and the reference attention
  (:class:`psft_megatron.model.cpu_layers.SDPACoreAttention`: K/V repeated for GQA, a dense
  block-diagonal mask for packed rows): the plain-torch reference.

Which fusions are on is decided in :mod:`psft_megatron.model.fusions`. Checkpoint keys are the
TE spec's for all three (the local spec's ``sharded_state_dict_keys_map``), so a checkpoint
moves between CPU and GPU runs and between specs.

MoE models (``config.num_moe_experts`` set) get megatron's ``MoELayer`` in every layer that
``config.moe_layer_freq`` marks, the dense MLP in the others. Keys of an MoE layer N, the same
under all three specs:

- ``decoder.layers.N.pre_mlp_layernorm.weight``: the norm before the MoE block stays a module
  of its own (TE has no norm fused into an MoE layer; megatron's local spec would map it to
  ``mlp.linear_fc1.layer_norm_weight``, which no MoE layer has, so that entry is dropped);
- ``mlp.router.weight`` ``[E, h]``;
- experts: ``SequentialMLP`` under ``cpu`` and ``local`` (one ``MLP`` per local expert),
  ``TEGroupedMLP`` under ``te`` when ``config.moe_grouped_gemm``; both write the same
  sharded keys (``mlp.experts.experts.linear_fc1.weight`` with a global expert axis);
- shared expert: ``mlp.shared_experts.linear_fc1.weight`` ``[2*S, h]``,
  ``linear_fc2.weight`` ``[h, S]`` and ``gate_weight`` ``[1, h]`` (Qwen2-MoE).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from psft_megatron.model.fusions import Kernels
from psft_megatron.model.fusions import default_layer_spec as _default_for
from psft_megatron.optional import require

LAYER_SPECS = ("te", "local", "cpu")


def default_layer_spec(kernels: Optional[Kernels] = None) -> str:
    """``te`` on a CUDA machine with Transformer Engine, ``local`` on CUDA without it, else ``cpu``."""
    return _default_for(kernels or Kernels.detect())


def resolve_layer_spec(name: Optional[str], kernels: Optional[Kernels] = None) -> str:
    """``name`` checked against :data:`LAYER_SPECS`, or the machine's default when None."""
    if name is None:
        return default_layer_spec(kernels)
    if name not in LAYER_SPECS:
        raise ValueError(f"layer_spec={name!r} is not one of {', '.join(LAYER_SPECS)}")
    return name


def norm_class(normalization: str, apex: bool = False) -> type:
    """The SP-capable norm for megatron's ``config.normalization``; apex's kernels if ``apex``."""
    from psft_megatron.model.cpu_layers import norm_class as torch_norm_class

    if not apex:
        return torch_norm_class(normalization)
    if normalization == "RMSNorm":
        from psft_megatron.model.apex_norm import ApexRMSNorm

        return ApexRMSNorm
    if normalization == "LayerNorm":
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm  # apex, SP-capable

        return FusedLayerNorm
    return torch_norm_class(normalization)  # raises naming the valid values


def _local_layer_spec(config, norm, core_attention, moe: bool = False):
    """megatron's local layer spec with this project's norms and core attention; ``moe``: the
    MoE layer (``SequentialMLP`` experts), its pre-MLP norm kept under its own key."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    # Built with LayerNorm so that megatron's torch-norm wrapper is not asked about SP here;
    # every norm is replaced below.
    experts = dict(num_experts=config.num_moe_experts, moe_grouped_gemm=False) if moe else {}
    spec = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, **experts))
    layer = spec.submodules
    if moe:
        layer.sharded_state_dict_keys_map = {
            key: value for key, value in layer.sharded_state_dict_keys_map.items() if key != "pre_mlp_layernorm."}
    layer.input_layernorm = norm
    layer.pre_mlp_layernorm = norm
    attention = layer.self_attention.submodules
    attention.core_attention = core_attention
    if config.qk_layernorm:
        attention.q_layernorm = norm
        attention.k_layernorm = norm
    return spec


def _moe_layers(config) -> list:
    """Per global layer: True for an MoE layer (``config.moe_layer_freq``, an int or a 0/1 list)."""
    if not config.num_moe_experts:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    return [bool(x) for x in freq]


def _stage_layers(config, vp_stage) -> range:
    """Global indices of the layers this pipeline (and virtual) stage builds."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    return range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage))


def build_block_spec(name: str, config, vp_stage=None, kernels: Optional[Kernels] = None):
    """Block spec for this rank's pipeline stage (and virtual stage ``vp_stage``).

    Args:
        name: one of :data:`LAYER_SPECS`.
        config: megatron ``TransformerConfig`` (its fusion switches should come from
            :func:`psft_megatron.model.fusions.fusion_fields` for the same spec).
        kernels: what this machine offers (detected when None).
    Returns:
        a ``ModuleSpec`` (layer spec) or ``TransformerBlockSubmodules`` for ``GPTModel``.
    """
    if name == "te":
        require("transformer_engine", "layer_spec 'te'")
        if not torch.cuda.is_available():
            raise RuntimeError("layer_spec 'te' needs CUDA; use 'cpu' on a machine without GPUs")
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_decoder_block_spec,
            get_gpt_layer_with_transformer_engine_spec,
        )

        if config.num_moe_experts:  # MoE and dense layers per moe_layer_freq; TEGroupedMLP with grouped GEMM
            return get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    if name in ("local", "cpu"):
        apex = name == "local" and (kernels or Kernels.detect()).apex_norm
        norm = norm_class(config.normalization, apex=apex)
        if name == "local":
            from psft_megatron.model.local_attention import LocalCoreAttention as core_attention
        else:
            from psft_megatron.model.cpu_layers import SDPACoreAttention as core_attention
        dense = _local_layer_spec(config, norm, core_attention)
        moe = _local_layer_spec(config, norm, core_attention, moe=True) if config.num_moe_experts else None
        is_moe = _moe_layers(config)
        return TransformerBlockSubmodules(
            layer_specs=[moe if is_moe[i] else dense for i in _stage_layers(config, vp_stage)], layer_norm=norm
        )
    raise ValueError(f"layer_spec={name!r} is not one of {', '.join(LAYER_SPECS)}")
