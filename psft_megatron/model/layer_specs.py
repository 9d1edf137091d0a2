"""Layer specs: ``te`` (Transformer Engine, GPU), ``local`` (megatron-core modules) and ``cpu``.

``cpu`` is megatron's local spec with two substitutions from
:mod:`psft_megatron.model.cpu_layers`: the core attention (SDPA, with GQA and CP) and the
norms (SP-capable). Checkpoint keys stay those of the TE spec thanks to the local spec's
``sharded_state_dict_keys_map``, so a checkpoint moves between ``cpu`` and ``te`` runs.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from psft_megatron.optional import require

LAYER_SPECS = ("te", "local", "cpu")


def default_layer_spec() -> str:
    """``te`` on a CUDA machine with Transformer Engine installed, else ``cpu``."""
    from psft_megatron.optional import is_available

    return "te" if torch.cuda.is_available() and is_available("transformer_engine") else "cpu"


def _cpu_layer_spec(config):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from psft_megatron.model.cpu_layers import SDPACoreAttention, norm_class

    # Built with LayerNorm so that megatron's torch-norm wrapper is not asked about SP here;
    # every norm is replaced below.
    spec = copy.deepcopy(get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm))
    norm = norm_class(config.normalization)
    layer = spec.submodules
    layer.input_layernorm = norm
    layer.pre_mlp_layernorm = norm
    attention = layer.self_attention.submodules
    attention.core_attention = SDPACoreAttention
    if config.qk_layernorm:
        attention.q_layernorm = norm
        attention.k_layernorm = norm
    return spec, norm


def build_block_spec(name: str, config, vp_stage=None):
    """Block spec for this rank's pipeline stage (and virtual stage ``vp_stage``).

    Args:
        name: one of :data:`LAYER_SPECS`.
        config: megatron ``TransformerConfig``.
    Returns:
        a ``ModuleSpec`` (layer spec) or ``TransformerBlockSubmodules`` for ``GPTModel``.
    """
    if name == "te":
        require("transformer_engine", "layer_spec 'te'")
        if not torch.cuda.is_available():
            raise RuntimeError("layer_spec 'te' needs CUDA; use 'cpu' on a machine without GPUs")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    if name == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    if name == "cpu":
        layer, norm = _cpu_layer_spec(config)
        return TransformerBlockSubmodules(
            layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=norm
        )
    raise ValueError(f"layer_spec={name!r} is not one of {', '.join(LAYER_SPECS)}")
