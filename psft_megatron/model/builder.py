"""Build megatron ``GPTModel`` chunks for this rank, and wrap them in megatron's DDP."""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module

from psft_megatron.model.config import ModelConfig
from psft_megatron.model.layer_specs import build_block_spec, resolve_layer_spec


def build_gpt_chunks(model_cfg: ModelConfig, config, layer_spec: Optional[str] = None) -> List[GPTModel]:
    """The ``GPTModel`` chunk(s) of this pipeline rank: one, or VPP of them (interleaved).

    Args:
        model_cfg: architecture.
        config: megatron ``TransformerConfig`` (``model_cfg.to_transformer_config(parallel)``).
        layer_spec: "te", "local" or "cpu"; None: te on CUDA with TE, local on CUDA
            without TE, else cpu (:func:`psft_megatron.model.layer_specs.default_layer_spec`).
    Returns:
        list of GPTModel on this rank's device; chunk i is virtual stage i.
    """
    layer_spec = resolve_layer_spec(layer_spec)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    scaling = model_cfg.rope_scaling
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=build_block_spec(layer_spec, config, vp_stage=stage),
            vocab_size=model_cfg.padded_vocab_size(tp),
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=model_cfg.rotary_base,  # a float theta is used as is (no int truncation)
            rope_scaling=scaling is not None,
            rope_scaling_factor=float(scaling["factor"]) if scaling else 8.0,
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def wrap_float16(chunks: List[GPTModel], config) -> list:
    """Wrap each chunk in megatron's ``Float16Module`` (bf16/fp16 parameters and activations)
    that hands the last stage's output on in the model's precision (:class:`HalfPrecisionOutput`)."""
    return [HalfPrecisionOutput(config, chunk) for chunk in chunks]


class HalfPrecisionOutput(Float16Module):
    """megatron's ``Float16Module`` with ``fp32_output=False`` by default: the last stage's
    logits [b, s, V/tp] reach the loss in bf16/fp16, not as an fp32 copy (which would double the
    largest tensor of the step and its gradient). The log-prob op upcasts chunk by chunk
    (docs/logprobs.md)."""

    def forward(self, *inputs, fp32_output: bool = False, **kwargs):
        return super().forward(*inputs, fp32_output=fp32_output, **kwargs)


def wrap_ddp(chunks: List[GPTModel], config, ddp_config) -> list:
    """Wrap each chunk in megatron's ``DistributedDataParallel`` (bucketing on chunk 0 only)."""
    from megatron.core.distributed import DistributedDataParallel

    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
