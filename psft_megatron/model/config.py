"""``ModelConfig``: the architecture of a Llama/Qwen-style decoder, independent of parallelism.

It maps onto megatron's ``TransformerConfig`` (:meth:`ModelConfig.to_transformer_config`),
with the parallel layout taken from :class:`psft_megatron.runtime.ParallelConfig`.
The family of models covered: pre-norm decoder, RMSNorm, SwiGLU MLP, RoPE (optionally with
Llama-3 frequency scaling), grouped-query attention, optional QKV bias (Qwen2/2.5), optional
per-head QK RMSNorm (Qwen3), a head dimension that may differ from hidden / heads (Qwen3),
tied or untied input/output embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Llama-3 RoPE scaling parameters hard-coded in megatron-core's RotaryEmbedding; a
#: checkpoint asking for other values cannot be represented exactly.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class ModelConfig:
    """Decoder architecture.

    Attributes:
        num_layers: transformer layers.
        hidden_size: model width h.
        num_attention_heads: query heads.
        ffn_hidden_size: SwiGLU inner width (per projection).
        vocab_size: tokenizer vocabulary; the embedding is padded to
            :meth:`padded_vocab_size`.
        num_query_groups: key/value heads (GQA); None means as many as query heads.
        head_dim: per-head width; None means hidden_size / num_attention_heads.
        max_position_embeddings: longest sequence the RoPE tables are built for.
        rotary_base: RoPE theta.
        rope_scaling: None, or Llama-3 scaling ``{"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}``.
        norm_epsilon: RMSNorm epsilon.
        add_qkv_bias: bias on the QKV projection (Qwen2/2.5).
        qk_layernorm: per-head RMSNorm on queries and keys (Qwen3).
        tie_word_embeddings: share the input embedding with the output layer.
        make_vocab_size_divisible_by: padding multiple, multiplied by TP.
        init_method_std: std of the normal initialiser.
        params_dtype: "float32", "bfloat16" or "float16".
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    num_query_groups: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rope_scaling: Optional[dict] = None
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    params_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={groups}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim"
            )
        if self.params_dtype not in _DTYPES:
            raise ValueError(f"model.params_dtype={self.params_dtype!r} is not one of {sorted(_DTYPES)}")
        if self.rope_scaling is not None:
            self._check_rope_scaling(self.rope_scaling)

    @staticmethod
    def _check_rope_scaling(scaling: Mapping[str, Any]) -> None:
        kind = scaling.get("rope_type", scaling.get("type", "llama3"))
        if kind != "llama3":
            raise ValueError(f"model.rope_scaling.rope_type={kind!r}: only 'llama3' is supported")
        if "factor" not in scaling:
            raise ValueError("model.rope_scaling needs a 'factor'")
        for key, fixed in LLAMA3_ROPE_FIXED.items():
            if key in scaling and float(scaling[key]) != fixed:
                raise ValueError(
                    f"model.rope_scaling.{key}={scaling[key]} is not supported: megatron-core's "
                    f"RotaryEmbedding hard-codes {key}={fixed}"
                )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Build from a mapping; unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join('model.' + k for k in unknown)}")
        return cls(**dict(values))

    @classmethod
    def missing_keys(cls, values: Mapping[str, Any]) -> List[str]:
        """The required fields (no default) that ``values`` does not set, in field order."""
        return [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in values]

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocab rounded up to a multiple of make_vocab_size_divisible_by * TP (as Megatron-LM)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def to_transformer_config(self, parallel, **overrides):
        """megatron ``TransformerConfig`` for this architecture under ``parallel``.

        Args:
            parallel: :class:`psft_megatron.runtime.ParallelConfig`.
            overrides: extra TransformerConfig fields (e.g. ``recompute_granularity``, ``fp8``).
        """
        from megatron.core.transformer import TransformerConfig

        dtype = self.torch_dtype
        values = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups or self.num_attention_heads,
            kv_channels=self.kv_channels,
            ffn_hidden_size=self.ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            pipeline_dtype=dtype,
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            sequence_parallel=parallel.sequence_parallel and parallel.tensor_model_parallel_size > 1,
            calculate_per_token_loss=True,
            # Fusions off: the plain-torch reference. setup_model_and_optimizer switches on
            # what the layer spec and the machine offer (psft_megatron.model.fusions).
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            use_cpu_initialization=not torch.cuda.is_available(),
        )
        values.update(overrides)
        return TransformerConfig(**values)
