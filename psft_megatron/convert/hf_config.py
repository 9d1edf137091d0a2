"""HF ``config.json`` <-> :class:`~psft_megatron.model.config.ModelConfig`, with validation.

Supported: ``LlamaForCausalLM`` (Llama-3.x, incl. ``llama3`` RoPE scaling with megatron-core's
fixed low/high frequency factors 1/4 and original length 8192), ``Qwen2ForCausalLM``
(Qwen2/2.5: QKV bias, tied or untied embeddings), ``Qwen3ForCausalLM`` (QK RMSNorm,
head_dim != hidden / heads), and the Mixture-of-Experts ``Qwen3MoeForCausalLM`` (Qwen3
attention, top-k softmax router, ``norm_topk_prob``) and ``Qwen2MoeForCausalLM`` (Qwen2
attention, a shared expert scaled by sigmoid(x @ shared_expert_gate)). HF's
``decoder_sparse_step`` and ``mlp_only_layers`` become ``moe_dense_layers``: layer i is an MoE
layer iff i is not in ``mlp_only_layers`` and (i + 1) % ``decoder_sparse_step`` == 0. Anything else raises :class:`ConversionError` naming the
architecture or feature and what is supported. Both the transformers 4 (``rope_theta`` /
``rope_scaling``) and 5 (``rope_parameters``) spellings of RoPE are read.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Optional, Tuple

from psft_megatron.convert.errors import ConversionError
from psft_megatron.model.config import LLAMA3_ROPE_FIXED, ModelConfig

#: HF architecture -> model_type.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")
#: ModelConfig fields that say how a model is stored or trained, not what it computes: an HF
#: template and a checkpoint may differ in them
_NOT_COMPARED = ("params_dtype", "init_method_std", "make_vocab_size_divisible_by", "moe_aux_loss_type",
                 "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_token_dispatcher_type", "moe_router_dtype")
_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
                "fp16": "float16", "float16": "float16"}


def _supported() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


def architecture_of(hf: Dict[str, Any]) -> str:
    """The single supported architecture named by ``hf`` (``architectures`` or ``model_type``)."""
    archs = hf.get("architectures") or []
    if len(archs) > 1:
        raise ConversionError(f"config.json lists several architectures {archs}; supported: {_supported()}")
    if archs:
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConversionError(
                f"architecture {archs[0]!r} is not supported; supported: {_supported()}"
            )
        return archs[0]
    model_type = hf.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ConversionError(f"model_type {model_type!r} (no 'architectures' in config.json) is not supported; "
                          f"supported: {_supported()}")


def rope_of(hf: Dict[str, Any]) -> Tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None), validated against what megatron-core implements."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        params.update(scaling)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    for key, value in (("rope_theta", theta), ("factor", params.get("factor", 1.0))):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConversionError(f"config.json rope {key}={value!r} must be a number")
    theta = float(theta)
    if theta != int(theta):
        raise ConversionError(f"rope_theta={theta} is not an integer; megatron's GPTModel takes an integer rotary_base")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConversionError(
            f"rope scaling type {kind!r} is not supported: megatron-core implements only 'llama3' "
            "(and no scaling)"
        )
    if "factor" not in params:
        raise ConversionError("rope scaling 'llama3' without a 'factor'")
    out = {"rope_type": "llama3", "factor": float(params["factor"])}
    for key, fixed in LLAMA3_ROPE_FIXED.items():
        value = float(params.get(key, fixed))
        if value != fixed:
            raise ConversionError(
                f"rope scaling llama3 with {key}={params.get(key)} is not supported: megatron-core's "
                f"RotaryEmbedding hard-codes {key}={fixed:g}"
            )
        out[key] = fixed if key != "original_max_position_embeddings" else int(fixed)
    return theta, out


def model_config_from_hf(
    hf: Dict[str, Any], *, dtype: str = "float32", make_vocab_size_divisible_by: int = 128
) -> Tuple[ModelConfig, str]:
    """(ModelConfig, architecture) for an HF config.json dict.

    Raises:
        ConversionError: unsupported architecture, activation, RoPE type or feature, a missing
            key or a value of the wrong kind (named).
    """
    arch = architecture_of(hf)
    if dtype not in _DTYPE_NAMES:
        raise ConversionError(f"dtype {dtype!r} is not one of bf16, fp32, fp16")
    _check_features(hf, arch)
    theta, scaling = rope_of(hf)
    heads = _int(hf, "num_attention_heads", arch, 1)
    hidden = _int(hf, "hidden_size", arch, 1)
    moe = moe_fields_from_hf(hf, arch) if arch in MOE_ARCHITECTURES else {}
    values = dict(
        num_layers=_int(hf, "num_hidden_layers", arch, 1),
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=_int(hf, "intermediate_size", arch, 1),
        vocab_size=_int(hf, "vocab_size", arch, 1),
        num_query_groups=_int(hf, "num_key_value_heads", arch, 1, heads),
        head_dim=_int(hf, "head_dim", arch, 1, None),
        max_position_embeddings=_int(hf, "max_position_embeddings", arch, 1, 4096),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_epsilon=_float(hf, "rms_norm_eps", arch, 1e-6),
        add_qkv_bias=arch == "Qwen2ForCausalLM" or (arch == "Qwen2MoeForCausalLM" and bool(hf.get("qkv_bias", True))),
        qk_layernorm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        params_dtype=_DTYPE_NAMES[dtype],
        **moe,
    )
    try:
        cfg = ModelConfig(**values)
    except ValueError as exc:
        raise ConversionError(f"{arch}: config.json describes a model megatron cannot build: {exc}") from None
    if cfg.head_dim is not None and cfg.head_dim * heads == hidden:
        cfg.head_dim = None  # the default; keeps the YAML minimal
    return cfg, arch


def _check_features(hf: Dict[str, Any], arch: str) -> None:
    """Refuse, by name, the config.json features megatron's GPTModel here does not compute."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{arch} with hidden_act={act!r} is not supported (only silu / SwiGLU)")
    if hf.get("mlp_bias"):
        raise ConversionError(f"{arch} with mlp_bias=true is not supported (megatron: add_bias_linear=False)")
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM") and hf.get("attention_bias"):
        raise ConversionError(
            f"{arch} with attention_bias=true is not supported (it also adds an o_proj bias; "
            "only Qwen2-style q/k/v biases are)"
        )
    if hf.get("use_sliding_window"):
        raise ConversionError(f"{arch} with use_sliding_window=true is not supported")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise ConversionError(f"{arch} with pretraining_tp={hf['pretraining_tp']} is not supported")


_REQUIRED = object()


def _int(hf: Dict[str, Any], key: str, arch: str, low: int, default: Any = _REQUIRED) -> Optional[int]:
    """config.json ``key`` as an integer >= ``low``; ``default`` (which may be None) when it is
    absent or null, and a ConversionError naming the key when there is no default."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConversionError(f"{arch}: config.json has no {key!r}" if key not in hf
                                  else f"{arch}: config.json {key}=null must be an integer >= {low}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConversionError(f"{arch}: config.json {key}={value!r} must be an integer >= {low}")
    return value


def _float(hf: Dict[str, Any], key: str, arch: str, default: float) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConversionError(f"{arch}: config.json {key}={value!r} must be a number")
    return float(value)


def moe_fields_from_hf(hf: Dict[str, Any], arch: str) -> Dict[str, Any]:
    """The ModelConfig MoE fields of a Qwen3-MoE / Qwen2-MoE config.json.

    ``num_experts`` (or transformers 5's ``num_local_experts``), ``num_experts_per_tok``,
    ``moe_intermediate_size``, ``norm_topk_prob`` (HF's default false), ``decoder_sparse_step``
    and ``mlp_only_layers`` (-> ``moe_dense_layers``), ``router_aux_loss_coef`` (the training
    weight, -> ``moe_aux_loss_coeff``); Qwen2-MoE: ``shared_expert_intermediate_size`` and its
    sigmoid gate.
    """
    key = "num_experts" if "num_experts" in hf else "num_local_experts"
    experts = _int(hf, key, arch, 1)
    layers = _int(hf, "num_hidden_layers", arch, 1)
    step = _int(hf, "decoder_sparse_step", arch, 1, 1)
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
        raise ConversionError(f"{arch}: config.json mlp_only_layers={only!r} must be a list of layer indices")
    dense = sorted(set(i for i in only if 0 <= i < layers) | {i for i in range(layers) if (i + 1) % step})
    out = dict(
        num_experts=experts,
        moe_router_topk=_int(hf, "num_experts_per_tok", arch, 1),
        moe_ffn_hidden_size=_int(hf, "moe_intermediate_size", arch, 1),
        moe_norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_dense_layers=dense,
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)),
    )
    if arch == "Qwen2MoeForCausalLM":
        out.update(moe_shared_expert_intermediate_size=_int(hf, "shared_expert_intermediate_size", arch, 1),
                   moe_shared_expert_gate=True)
    return out


def architecture_for(cfg: ModelConfig) -> str:
    """Best guess of the HF architecture of a ModelConfig (used without a template)."""
    if cfg.is_moe:
        return "Qwen2MoeForCausalLM" if cfg.moe_shared_expert_intermediate_size else "Qwen3MoeForCausalLM"
    if cfg.qk_layernorm:
        return "Qwen3ForCausalLM"
    if cfg.add_qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def _comparable(cfg: ModelConfig, name: str):
    value = getattr(cfg, name)
    if name == "moe_dense_layers":
        return sorted(value or []) if cfg.is_moe else []
    if name.startswith("moe_") and not cfg.is_moe:
        return None  # the MoE fields mean nothing for a dense model
    return value


def _check_moe_architecture(cfg: ModelConfig, arch: str) -> None:
    """A ModelConfig's MoE fields against what ``arch`` can express."""
    if arch not in MOE_ARCHITECTURES:
        if cfg.is_moe:
            raise ConversionError(f"{arch} is a dense architecture, but the model has num_experts={cfg.num_experts}; "
                                  f"MoE architectures: {', '.join(MOE_ARCHITECTURES)}")
        return
    if not cfg.is_moe:
        raise ConversionError(f"{arch} needs an MoE model (num_experts set)")
    if arch == "Qwen3MoeForCausalLM":
        if cfg.add_qkv_bias or not cfg.qk_layernorm:
            raise ConversionError("Qwen3MoeForCausalLM needs qk_layernorm=True and add_qkv_bias=False")
        if cfg.moe_shared_expert_intermediate_size:
            raise ConversionError("Qwen3MoeForCausalLM has no shared expert, but the model has "
                                  f"moe_shared_expert_intermediate_size={cfg.moe_shared_expert_intermediate_size}")
    if arch == "Qwen2MoeForCausalLM":
        if cfg.qk_layernorm:
            raise ConversionError("Qwen2MoeForCausalLM needs qk_layernorm=False")
        if not (cfg.moe_shared_expert_intermediate_size and cfg.moe_shared_expert_gate):
            raise ConversionError("Qwen2MoeForCausalLM needs a gated shared expert (moe_shared_expert_intermediate_size "
                                  "and moe_shared_expert_gate=True)")


def hf_config_from_model(
    cfg: ModelConfig, architecture: Optional[str] = None, template: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """An HF config.json dict for ``cfg``: the template's, checked and updated, or a fresh one.

    Both RoPE spellings are written (:func:`set_rope`), and the dtype as ``dtype`` (transformers
    5) and ``torch_dtype`` (transformers 4).

    Raises:
        ConversionError: the template's architecture differs from ``cfg`` (named fields), or
            ``cfg`` cannot be expressed in the requested / inferred architecture.
    """
    if template is not None:
        arch = _check_template(cfg, template)
        hf = copy.deepcopy(template)
    else:
        arch = _export_architecture(cfg, architecture)
        hf = _fresh_hf_config(cfg, arch)
    set_rope(hf, cfg)
    hf["architectures"] = [arch]
    set_dtype(hf, cfg.params_dtype)
    return hf


def _check_template(cfg: ModelConfig, template: Dict[str, Any]) -> str:
    """The template's architecture, after checking that it describes the same model as ``cfg``
    (fields in :data:`_NOT_COMPARED` may differ)."""
    arch = architecture_of(template)
    expect, _ = model_config_from_hf(template, dtype=cfg.params_dtype,
                                     make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
    diffs = [f.name for f in dataclasses.fields(ModelConfig)
             if f.name not in _NOT_COMPARED and _comparable(expect, f.name) != _comparable(cfg, f.name)
             and not (f.name == "head_dim" and expect.kv_channels == cfg.kv_channels)]
    if diffs:
        raise ConversionError(
            "the HF template's config.json does not match the checkpoint's model config: "
            + ", ".join(f"{d}: template {getattr(expect, d)!r} vs checkpoint {getattr(cfg, d)!r}" for d in diffs)
        )
    return arch


#: dense architectures -> (add_qkv_bias, qk_layernorm) they need
_DENSE_ATTENTION = {"LlamaForCausalLM": (False, False), "Qwen2ForCausalLM": (True, False),
                    "Qwen3ForCausalLM": (False, True)}


def _export_architecture(cfg: ModelConfig, architecture: Optional[str]) -> str:
    """``architecture`` (default :func:`architecture_for`), checked to be able to hold ``cfg``."""
    arch = architecture or architecture_for(cfg)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"architecture {arch!r} is not supported; supported: {_supported()}")
    if arch in _DENSE_ATTENTION and (cfg.add_qkv_bias, cfg.qk_layernorm) != _DENSE_ATTENTION[arch]:
        bias, norm = _DENSE_ATTENTION[arch]
        raise ConversionError(f"{arch} needs add_qkv_bias={bias} and qk_layernorm={norm}; the model has "
                              f"add_qkv_bias={cfg.add_qkv_bias}, qk_layernorm={cfg.qk_layernorm}")
    _check_moe_architecture(cfg, arch)
    return arch


def _fresh_hf_config(cfg: ModelConfig, arch: str) -> Dict[str, Any]:
    """config.json of ``cfg`` as ``arch`` without a template: the keys transformers reads."""
    hf = {
        "architectures": [arch],
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups or cfg.num_attention_heads,
        "head_dim": cfg.kv_channels,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "vocab_size": cfg.vocab_size,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if arch == "LlamaForCausalLM":
        hf.update(attention_bias=False, mlp_bias=False)
    if arch in MOE_ARCHITECTURES:
        hf.update(_moe_hf_keys(cfg, arch))
    return hf


def _moe_hf_keys(cfg: ModelConfig, arch: str) -> Dict[str, Any]:
    """The MoE keys of a fresh Qwen3-MoE / Qwen2-MoE config.json (dense layers as ``mlp_only_layers``)."""
    keys = dict(
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.moe_router_topk,
        moe_intermediate_size=cfg.moe_ffn_hidden_size,
        norm_topk_prob=cfg.moe_norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=sorted(cfg.moe_dense_layers or []),
        router_aux_loss_coef=cfg.moe_aux_loss_coeff,
        output_router_logits=False,
        use_sliding_window=False,
    )
    if arch == "Qwen2MoeForCausalLM":
        keys.update(shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size, qkv_bias=cfg.add_qkv_bias)
    else:
        keys.update(attention_bias=False)
    return keys


def set_rope(hf: Dict[str, Any], cfg: ModelConfig) -> None:
    """Write ``cfg``'s RoPE into ``hf`` in both spellings, in place.

    transformers 4 reads ``rope_theta`` and ``rope_scaling`` (None, or a dict with
    ``rope_type`` and its parameters); transformers 5 reads ``rope_parameters`` (``rope_type``,
    ``rope_theta`` and the parameters), and when a config also has a ``rope_scaling`` dict it
    takes that instead, filling in ``rope_theta`` from the top-level key - so both readers see
    the same values.
    """
    theta = float(cfg.rotary_base)
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    hf["rope_theta"] = theta
    hf["rope_scaling"] = scaling
    hf["rope_parameters"] = dict(scaling, rope_theta=theta) if scaling else {"rope_type": "default", "rope_theta": theta}


def set_dtype(hf: Dict[str, Any], dtype: str) -> None:
    """The weights' dtype name (``bfloat16``, ...) as transformers 5 (``dtype``) and 4
    (``torch_dtype``) read it, in place."""
    hf["dtype"] = hf["torch_dtype"] = dtype
