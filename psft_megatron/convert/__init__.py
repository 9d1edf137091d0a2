"""Hugging Face <-> Megatron checkpoint converters (Llama-3.x, Qwen2/2.5, Qwen3, Qwen3-MoE, Qwen2-MoE).

- :func:`convert_hf_to_megatron`: HF directory -> megatron torch_dist checkpoint + model YAML.
- :func:`convert_megatron_to_hf`: checkpoint saved at any layout -> HF directory.

Modules: ``hf_config`` (config.json <-> ModelConfig, validation), ``mapping`` (tensor names
and layouts, both directions), ``hf_io`` (streaming safetensors), ``megatron_io`` (streaming
dist-checkpoint write/read), ``generation`` (the stop token ids of an export), ``model_yaml``
(a YAML's ``model:`` section), ``paths`` (what the input paths are; the output staged beside
``--out``), ``verify`` (logits comparison). Bad input raises :class:`ConversionError` or
:class:`psft_megatron.errors.CheckpointError` (both ``UserError``: one line). See docs/convert.md.
"""

from psft_megatron.convert.errors import ConversionError
from psft_megatron.convert.hf_to_megatron import convert_hf_to_megatron
from psft_megatron.convert.megatron_to_hf import convert_megatron_to_hf

__all__ = ["ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf"]
