"""``ModelConfig``: the architecture of a Llama/Qwen-style decoder, independent of parallelism.

It maps onto megatron's ``TransformerConfig`` (:meth:`ModelConfig.to_transformer_config`),
with the parallel layout taken from :class:`psft_megatron.distributed.runtime.ParallelConfig`.
The family of models covered: pre-norm decoder, RMSNorm, SwiGLU MLP, RoPE (optionally with
Llama-3 frequency scaling), grouped-query attention, optional QKV bias (Qwen2/2.5), optional
per-head QK RMSNorm (Qwen3), a head dimension that may differ from hidden / heads (Qwen3),
tied or untied input/output embeddings; and Mixture-of-Experts MLPs (Qwen3-MoE, Qwen2-MoE:
top-k softmax router, SwiGLU experts, optional gated shared expert, dense layers by index).
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

#: megatron's ``moe_router_load_balancing_type`` values
MOE_AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
#: token dispatchers; ``flex`` (DeepEP / HybridEP) is GPU-only
MOE_DISPATCHERS = ("alltoall", "allgather", "flex")


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

    Mixture-of-Experts (all ignored while ``num_experts`` is None, a dense model):
        num_experts: routed experts E per MoE layer.
        moe_router_topk: experts k each token is sent to.
        moe_ffn_hidden_size: SwiGLU inner width of one expert (required with num_experts).
        moe_norm_topk_prob: True (Qwen3): the k chosen probabilities are renormalised to sum to
            1 (megatron: softmax over the top-k logits, ``moe_router_pre_softmax=False``);
            False (Qwen2-MoE): softmax over all E experts, the top k kept as they are
            (``moe_router_pre_softmax=True``).
        moe_shared_expert_intermediate_size: SwiGLU width of the shared expert every token goes
            through (Qwen2-MoE); None for none.
        moe_shared_expert_gate: the shared expert's output scaled by sigmoid(x @ gate), gate
            ``[1, h]`` (Qwen2-MoE).
        moe_aux_loss_type: load-balancing loss, megatron's ``moe_router_load_balancing_type``:
            aux_loss (per micro-batch), seq_aux_loss (per sequence), global_aux_loss, none.
        moe_aux_loss_coeff: its weight in the training loss.
        moe_z_loss_coeff: router z-loss weight (mean of logsumexp(logits)^2); None for none.
        moe_token_dispatcher_type: alltoall or allgather (flex needs DeepEP on GPUs).
        moe_router_dtype: dtype of the router's GEMM and softmax: "fp32", "fp64" or None (the
            model's dtype).
        moe_dense_layers: 0-based indices of layers that keep the dense MLP (Qwen's
            ``mlp_only_layers``); every other layer is an MoE layer.
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
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_norm_topk_prob: bool = True
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    moe_aux_loss_type: str = "aux_loss"
    moe_aux_loss_coeff: float = 0.001
    moe_z_loss_coeff: Optional[float] = None
    moe_token_dispatcher_type: str = "alltoall"
    moe_router_dtype: Optional[str] = "fp32"
    moe_dense_layers: List[int] = dataclasses.field(default_factory=list)

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
        if self.num_experts is not None:
            self._check_moe()

    def _check_moe(self) -> None:
        """The MoE fields, each error naming its key."""
        def whole(name: str, low: int) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"model.{name} must be an integer >= {low}, got {value!r}")
            return value

        experts = whole("num_experts", 1)
        topk = whole("moe_router_topk", 1)
        if topk > experts:
            raise ValueError(f"model.moe_router_topk={topk} is larger than model.num_experts={experts}")
        if self.moe_ffn_hidden_size is None:
            raise ValueError("model.moe_ffn_hidden_size is not set: an MoE model (model.num_experts set) needs the "
                             "width of one expert")
        whole("moe_ffn_hidden_size", 1)
        if self.moe_shared_expert_intermediate_size is not None:
            whole("moe_shared_expert_intermediate_size", 1)
        elif self.moe_shared_expert_gate:
            raise ValueError("model.moe_shared_expert_gate=true needs model.moe_shared_expert_intermediate_size")
        if self.moe_aux_loss_type not in MOE_AUX_LOSS_TYPES:
            raise ValueError(f"model.moe_aux_loss_type={self.moe_aux_loss_type!r} is not one of "
                             f"{', '.join(MOE_AUX_LOSS_TYPES)}")
        if self.moe_aux_loss_coeff < 0:
            raise ValueError(f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff} must be >= 0")
        if self.moe_z_loss_coeff is not None and self.moe_z_loss_coeff < 0:
            raise ValueError(f"model.moe_z_loss_coeff={self.moe_z_loss_coeff} must be >= 0 (or null for none)")
        if self.moe_token_dispatcher_type not in MOE_DISPATCHERS:
            raise ValueError(f"model.moe_token_dispatcher_type={self.moe_token_dispatcher_type!r} is not one of "
                             f"{', '.join(MOE_DISPATCHERS)}")
        if self.moe_router_dtype not in (None, "fp32", "fp64"):
            raise ValueError(f"model.moe_router_dtype={self.moe_router_dtype!r} is not one of fp32, fp64, null")
        dense = list(self.moe_dense_layers or [])
        bad = [i for i in dense if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"model.moe_dense_layers={dense}: {bad[0]!r} is not a layer index in "
                             f"[0, model.num_layers={self.num_layers})")
        if len(set(dense)) == self.num_layers:
            raise ValueError(f"model.moe_dense_layers={dense} names every layer: no MoE layer is left "
                             "(unset model.num_experts for a dense model)")

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
        return [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in values]

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def moe_layer_pattern(self) -> List[int]:
        """megatron's ``moe_layer_freq`` as a list: 1 for an MoE layer, 0 for a dense one."""
        dense = set(self.moe_dense_layers or [])
        return [0 if i in dense else 1 for i in range(self.num_layers)]

    def moe_transformer_fields(self, parallel) -> dict:
        """The ``TransformerConfig`` MoE fields (empty for a dense model). Grouped GEMM and the
        permute/router fusions start off; :mod:`psft_megatron.model.fusions` turns them on where
        the machine offers them."""
        if not self.is_moe:
            return {}
        return dict(
            num_moe_experts=self.num_experts,
            moe_router_topk=self.moe_router_topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not self.moe_norm_topk_prob,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=self.moe_shared_expert_gate,
            moe_router_load_balancing_type=self.moe_aux_loss_type,
            moe_aux_loss_coeff=self.moe_aux_loss_coeff,
            moe_z_loss_coeff=self.moe_z_loss_coeff,
            moe_token_dispatcher_type=self.moe_token_dispatcher_type,
            moe_router_dtype=self.moe_router_dtype,
            moe_layer_freq=self.moe_layer_pattern(),
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_router_fusion=False,
            expert_model_parallel_size=getattr(parallel, "expert_model_parallel_size", 1),
            expert_tensor_parallel_size=getattr(parallel, "expert_tensor_parallel_size", None)
            or parallel.tensor_model_parallel_size,
        )

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocab rounded up to a multiple of make_vocab_size_divisible_by * TP (as Megatron-LM)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def to_transformer_config(self, parallel, **overrides):
        """megatron ``TransformerConfig`` for this architecture under ``parallel``.

        Args:
            parallel: :class:`psft_megatron.distributed.runtime.ParallelConfig`.
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
        values.update(self.moe_transformer_fields(parallel))
        values.update(overrides)
        return TransformerConfig(**values)
