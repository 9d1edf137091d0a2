"""Load a run config: Hydra/OmegaConf YAML + dotted overrides -> validated :class:`RunConfig`.

    python pretrain_psft.py --config-path configs --config-name tiny_cpu model.psft.clip_eps_high=0.2

Unknown or misspelled keys are errors naming the key and the closest valid one; values of the
wrong type name the key; nothing is silently ignored. Cross-field checks that need the world
size (batch divisibility, TP/PP/CP fitting) run before torch.distributed starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from psft_megatron.config.schema import (
    LOSS_KINDS,
    MODEL_KEY_ALIASES,
    PRECISIONS,
    SCHEDULES,
    ModelSection,
    RunConfig,
)
from psft_megatron.errors import ConfigError


def _closest(key: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(options))}"


def _check_type(value: Any, default: Any, annotation: Any, key: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:  # Optional[T]
        annotation = next(a for a in args if a is not type(None))
        origin = typing.get_origin(annotation)
    if annotation is bool or isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
    elif annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
    elif origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        value = list(value)
    elif origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        value = dict(value)
    return value


def _build(cls, raw: Optional[Mapping], prefix: str):
    """Dataclass ``cls`` from ``raw``; unknown keys and wrong types raise naming ``prefix.key``."""
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{full}'" + _closest(key, fields))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, full)
            continue
        field = fields[key]
        default = field.default if field.default is not dataclasses.MISSING else None
        values[key] = _check_type(value, default, hint, full)
    return cls(**values)


def _split_model_section(raw: Mapping) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``model`` keys -> (ModelSection keys, architecture keys); NeMo aliases resolved."""
    from psft_megatron.model.config import ModelConfig

    arch_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    section_fields = {f.name for f in dataclasses.fields(ModelSection)} - {"architecture"}
    section, arch = {}, {}
    for key, value in raw.items():
        name = MODEL_KEY_ALIASES.get(key, key)
        if key in section_fields:
            section[key] = value
        elif name in arch_fields:
            if name in arch:
                raise ConfigError(f"model.{key} and its alias both set ({name})")
            arch[name] = value
        else:
            raise ConfigError(f"unknown config key 'model.{key}'" + _closest(key, sorted(section_fields | arch_fields | set(MODEL_KEY_ALIASES))))
    return section, arch


def build_run_config(raw: Mapping) -> RunConfig:
    """Validate a plain nested dict (the resolved YAML) into a :class:`RunConfig`."""
    raw = dict(raw)
    model_raw = raw.pop("model", None) or {}
    cfg = _build(RunConfig, raw, "")
    section, arch = _split_model_section(model_raw)
    cfg.model = _build(ModelSection, section, "model")
    cfg.model.architecture = arch
    _check_values(cfg)
    return cfg


def _check_values(cfg: RunConfig) -> None:
    psft = cfg.model.psft
    if psft.loss not in LOSS_KINDS:
        raise ConfigError(f"model.psft.loss={psft.loss!r} is not one of {', '.join(LOSS_KINDS)}")
    if not 0.0 <= psft.clip_eps_low < 1.0:
        raise ConfigError(f"model.psft.clip_eps_low={psft.clip_eps_low} must be in [0, 1)")
    if psft.clip_eps_high <= 0.0:
        raise ConfigError(f"model.psft.clip_eps_high={psft.clip_eps_high} must be > 0")
    if psft.old_policy_interval < 1:
        raise ConfigError(f"model.psft.old_policy_interval={psft.old_policy_interval} must be >= 1")
    if psft.warmup_sft_steps < 0:
        raise ConfigError(f"model.psft.warmup_sft_steps={psft.warmup_sft_steps} must be >= 0")
    if str(cfg.trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.model.optim.sched.name not in SCHEDULES:
        raise ConfigError(f"model.optim.sched.name={cfg.model.optim.sched.name!r} is not one of {', '.join(SCHEDULES)}")
    if cfg.model.optim.name not in ("adam", "adamw"):
        raise ConfigError(f"model.optim.name={cfg.model.optim.name!r} is not one of adam, adamw")
    optim = cfg.model.optim
    if len(optim.betas) != 2:
        raise ConfigError(f"model.optim.betas must have two values, got {optim.betas}")
    ranges = (
        ("model.optim.lr", optim.lr, optim.lr > 0, "must be > 0"),
        ("model.optim.weight_decay", optim.weight_decay, optim.weight_decay >= 0, "must be >= 0"),
        ("model.optim.betas", optim.betas, all(0 <= b < 1 for b in optim.betas), "must be in [0, 1)"),
        ("model.optim.eps", optim.eps, optim.eps > 0, "must be > 0"),
        ("model.optim.sched.warmup_steps", optim.sched.warmup_steps, optim.sched.warmup_steps >= 0, "must be >= 0"),
        ("model.optim.sched.min_lr", optim.sched.min_lr, 0 <= optim.sched.min_lr <= optim.lr,
         f"must be in [0, model.optim.lr={optim.lr}]"),
        ("trainer.gradient_clip_val", cfg.trainer.gradient_clip_val, cfg.trainer.gradient_clip_val >= 0,
         "must be >= 0 (0: no clipping)"),
        ("trainer.val_check_interval", cfg.trainer.val_check_interval, cfg.trainer.val_check_interval >= 0,
         "must be >= 0 (0: never)"),
        ("trainer.log_every_n_steps", cfg.trainer.log_every_n_steps, cfg.trainer.log_every_n_steps >= 1, "must be >= 1"),
        ("model.psft.kl_coef", psft.kl_coef, psft.kl_coef >= 0, "must be >= 0"),
        ("model.psft.asft_kl_coef", psft.asft_kl_coef, psft.asft_kl_coef >= 0, "must be >= 0"),
        ("model.psft.eaft_topk", psft.eaft_topk, psft.eaft_topk >= 2, "must be >= 2"),
        ("model.psft.eaft_alpha", psft.eaft_alpha, psft.eaft_alpha >= 0, "must be >= 0"),
        ("model.global_batch_size", cfg.model.global_batch_size, cfg.model.global_batch_size >= 1, "must be >= 1"),
    )
    for key, value, ok, rule in ranges:
        if not ok:
            raise ConfigError(f"{key}={value} {rule}")
    _check_counts(cfg)
    _check_schedule(cfg)
    fp8 = fp8_config(cfg.model)
    if fp8.param_gather and not cfg.model.optim.use_distributed_optimizer:
        raise ConfigError("model.fp8_param_gather=true needs model.optim.use_distributed_optimizer=true (megatron "
                          "all-gathers the FP8 weights from the distributed optimizer's shards)")


def _check_counts(cfg: RunConfig) -> None:
    """The step counts and sizes of ``trainer`` and ``exp_manager``."""
    trainer, ckpt = cfg.trainer, cfg.exp_manager.checkpoint_callback_params
    counts = (
        ("trainer.max_steps", trainer.max_steps, 1, ""),
        ("trainer.num_nodes", trainer.num_nodes, 1, ""),
        ("trainer.devices", trainer.devices, 1, " (or null: torchrun's processes per node)"),
        ("trainer.max_consecutive_skipped_steps", trainer.max_consecutive_skipped_steps, 0, " (0: never stop)"),
        ("exp_manager.checkpoint_callback_params.every_n_train_steps", ckpt.every_n_train_steps, 0,
         " (0: save only at the end)"),
        ("exp_manager.checkpoint_callback_params.save_top_k", ckpt.save_top_k, 1,
         " (checkpoints kept; NeMo's -1, keep all, is not supported: give a number)"),
    )
    for key, value, minimum, note in counts:
        if value is not None and value < minimum:
            raise ConfigError(f"{key}={value} must be >= {minimum}{note}")


def _check_schedule(cfg: RunConfig) -> None:
    """``model.optim.sched``: a decaying schedule needs its horizon after the warm-up (megatron's
    scheduler requires warm-up < decay steps)."""
    sched = cfg.model.optim.sched
    if sched.max_steps is not None and sched.max_steps < 1:
        raise ConfigError(f"model.optim.sched.max_steps={sched.max_steps} must be >= 1 (or null: trainer.max_steps)")
    if SCHEDULES[sched.name] == "constant":
        return
    horizon, key = ((sched.max_steps, "model.optim.sched.max_steps") if sched.max_steps is not None else
                    (cfg.trainer.max_steps, "trainer.max_steps (the decay horizon while model.optim.sched.max_steps "
                                            "is null)"))
    if sched.warmup_steps >= horizon:
        raise ConfigError(f"model.optim.sched.warmup_steps={sched.warmup_steps} must be less than {key}={horizon}: "
                          f"{sched.name} decays to min_lr between the two")


#: the ``model`` keys that :func:`fp8_config` reads
FP8_KEYS = ("fp8", "fp8_e4m3", "fp8_hybrid", "fp8_recipe", "fp8_margin", "fp8_amax_history_len",
            "fp8_amax_compute_algo", "fp8_param_gather", "fp8_params", "fp8_interval", "reduce_amax")


def fp8_config(model: ModelSection):
    """The run's resolved :class:`psft_megatron.model.fp8.FP8Config` (both spellings)."""
    from psft_megatron.model.fp8 import FP8Config

    try:
        return FP8Config.from_model_keys({key: getattr(model, key) for key in FP8_KEYS})
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def check_layout(cfg: RunConfig, world_size: int, vocab_size: Optional[int] = None) -> None:
    """Cross-field checks that need the world size; run before torch.distributed starts."""
    m = cfg.model
    tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
    vpp = m.virtual_pipeline_model_parallel_size or 1
    for key, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                       ("context_parallel_size", cp), ("micro_batch_size", m.micro_batch_size)):
        if value < 1:
            raise ConfigError(f"model.{key}={value} must be >= 1")
    if world_size % (tp * pp * cp):
        raise ConfigError(f"world size {world_size} is not divisible by model.tensor_model_parallel_size * "
                          f"pipeline_model_parallel_size * context_parallel_size = {tp}*{pp}*{cp}")
    dp = world_size // (tp * pp * cp)
    arch = m.architecture
    heads = arch.get("num_attention_heads")
    groups = arch.get("num_query_groups") or heads
    if heads and heads % tp:
        raise ConfigError(f"model.num_attention_heads={heads} is not divisible by model.tensor_model_parallel_size={tp}")
    if groups and groups % tp:
        raise ConfigError(f"model.num_query_groups={groups} is not divisible by model.tensor_model_parallel_size={tp}")
    layers = arch.get("num_layers")
    if layers and layers % (pp * vpp):
        raise ConfigError(f"model.num_layers={layers} is not divisible by pipeline_model_parallel_size * "
                          f"virtual_pipeline_model_parallel_size = {pp}*{vpp}")
    if m.virtual_pipeline_model_parallel_size and pp < 2:
        raise ConfigError("model.virtual_pipeline_model_parallel_size needs model.pipeline_model_parallel_size >= 2")
    _check_expert_layout(m, world_size)
    if m.global_batch_size % (m.micro_batch_size * dp):
        raise ConfigError(f"model.global_batch_size={m.global_batch_size} is not divisible by "
                          f"model.micro_batch_size * data-parallel size = {m.micro_batch_size}*{dp}")
    if cfg.trainer.devices is not None and "LOCAL_WORLD_SIZE" in os.environ:
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        if local != cfg.trainer.devices:
            raise ConfigError(f"trainer.devices={cfg.trainer.devices} but torchrun started {local} processes per node")


def _check_expert_layout(m: ModelSection, world_size: int) -> None:
    """EP / ETP against the world and the MoE architecture (megatron's expert grid is
    ETP * EP * PP, with expert data parallelism the rest of the world)."""
    tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
    ep, etp = m.expert_model_parallel_size, m.expert_tensor_parallel_size
    for key, value in (("expert_model_parallel_size", ep), ("expert_tensor_parallel_size", etp)):
        if value is not None and value < 1:
            raise ConfigError(f"model.{key}={value} must be >= 1")
    etp = etp or tp
    arch = m.architecture
    experts = arch.get("num_experts")
    if experts is None:
        if ep > 1 or m.expert_tensor_parallel_size is not None:
            key = "expert_model_parallel_size" if ep > 1 else "expert_tensor_parallel_size"
            raise ConfigError(f"model.{key}={getattr(m, key)} needs an MoE model: model.num_experts is not set")
        return
    if world_size % (etp * ep * pp):
        raise ConfigError(f"world size {world_size} is not divisible by model.expert_tensor_parallel_size * "
                          f"expert_model_parallel_size * pipeline_model_parallel_size = {etp}*{ep}*{pp}")
    if isinstance(experts, int) and experts % ep:
        raise ConfigError(f"model.num_experts={experts} is not divisible by model.expert_model_parallel_size={ep}")
    width = arch.get("moe_ffn_hidden_size")
    if isinstance(width, int) and width % etp:
        raise ConfigError(f"model.moe_ffn_hidden_size={width} is not divisible by model.expert_tensor_parallel_size"
                          f"={etp}" + (" (null: the tensor-parallel size)" if m.expert_tensor_parallel_size is None else ""))
    shared = arch.get("moe_shared_expert_intermediate_size")
    if isinstance(shared, int) and shared % tp:
        raise ConfigError(f"model.moe_shared_expert_intermediate_size={shared} is not divisible by "
                          f"model.tensor_model_parallel_size={tp}")
    if tp > 1 and not m.sequence_parallel:
        raise ConfigError(f"model.sequence_parallel must be true for an MoE model at model.tensor_model_parallel_size"
                          f"={tp} (megatron's MoE layers refuse to train with TP and without SP)")


def check_requirements(cfg: RunConfig) -> None:
    """Optional packages and hardware the config asks for are there; before distributed start.

    FP8: Transformer Engine installed (else the install command), the ``te`` layer spec, and a
    GPU that supports the recipe (compute capability and CUDA, as TE checks them).
    """
    from psft_megatron.model.fp8 import check_fp8_hardware
    from psft_megatron.optional import is_available

    _check_moe_requirements(cfg.model)
    fp8 = fp8_config(cfg.model)
    if not fp8.enabled:
        return
    if not is_available("transformer_engine"):
        raise ConfigError(f"model.fp8={fp8.format} needs Transformer Engine, which is not installed: "
                          "pip install -e '.[te]' (or use an NGC PyTorch container)")
    if cfg.model.layer_spec not in (None, "te"):
        raise ConfigError(f"model.fp8={fp8.format} needs model.layer_spec=te, got {cfg.model.layer_spec!r}")
    try:
        check_fp8_hardware(fp8)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from exc


def _check_moe_requirements(m: ModelSection) -> None:
    """The flex token dispatcher needs CUDA and DeepEP (megatron's default flex backend)."""
    import torch

    from psft_megatron.optional import is_available

    if m.architecture.get("num_experts") is None or m.architecture.get("moe_token_dispatcher_type") != "flex":
        return
    if not torch.cuda.is_available():
        raise ConfigError("model.moe_token_dispatcher_type=flex needs GPUs (DeepEP kernels); on CPU use alltoall "
                          "or allgather")
    if not is_available("deep_ep"):
        raise ConfigError("model.moe_token_dispatcher_type=flex needs DeepEP (deep_ep), which is not installed; "
                          "use alltoall or allgather")


def check_paths(cfg: RunConfig) -> None:
    """Files the run needs exist (data, tokenizer, initial checkpoint); before distributed start."""
    m = cfg.model
    for section in ("train_ds", "validation_ds"):
        files = (getattr(m.data, section) or {}).get("file_names") or []
        if isinstance(files, str):  # one file, as NeMo allows; a bad type is the data keys' to report
            files = [files]
        if not isinstance(files, (list, tuple)):
            continue
        for i, path in enumerate(files):
            if not os.path.exists(path):
                raise ConfigError(f"model.data.{section}.file_names[{i}]: {path} does not exist")
    for key in ("model", "type"):
        path = m.tokenizer.get(key)
        if key == "model" or not m.tokenizer.get("model"):
            if path and not os.path.exists(path):
                raise ConfigError(f"model.tokenizer.{key}: {path} does not exist")
    if m.restore_from_path and not os.path.isdir(m.restore_from_path):
        raise ConfigError(f"model.restore_from_path: {m.restore_from_path} is not a directory")


def compose_yaml(config_path: str, config_name: str, overrides: List[str]) -> Dict[str, Any]:
    """Hydra compose of ``config_path/config_name.yaml`` with ``overrides``; returns a plain dict."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config_dir = os.path.abspath(config_path)
    name = config_name[:-5] if config_name.endswith(".yaml") else config_name
    if not os.path.isfile(os.path.join(config_dir, name + ".yaml")):
        raise ConfigError(f"config file {os.path.join(config_dir, name + '.yaml')} does not exist")
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            try:
                cfg = compose(config_name=name, overrides=overrides)
            except HydraException:
                # A key that the YAML leaves at its schema default is overridden like any other:
                # Hydra needs '+' to add it. Unknown keys are then caught by build_run_config.
                base = compose(config_name=name)
                overrides = [_as_addition(o) if _missing(base, o) else o for o in overrides]
                cfg = compose(config_name=name, overrides=overrides)
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(_yaml_error_line(exc) or f"{os.path.join(config_dir, name + '.yaml')}: "
                          f"{str(exc).splitlines()[0]}") from None


def _yaml_error_line(exc: BaseException) -> Optional[str]:
    """``FILE:LINE:COLUMN: problem`` of the YAML syntax error behind ``exc`` (raised by PyYAML
    itself, or wrapped by Hydra / OmegaConf), or None when ``exc`` has no position."""
    import yaml

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
            mark = exc.problem_mark
            context = ""
            if exc.context and exc.context_mark is not None:
                context = f" ({exc.context} at line {exc.context_mark.line + 1})"
            return f"{mark.name}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {exc.problem}{context}"
        exc = exc.__cause__ or exc.__context__
    return None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _missing(base, override: str) -> bool:
    from omegaconf import OmegaConf

    if override.startswith(("+", "~")) or "=" not in override:
        return False
    sentinel = object()
    return OmegaConf.select(base, _override_key(override), default=sentinel) is sentinel


def _as_addition(override: str) -> str:
    return "+" + override


def load_run_config(config_path: str, config_name: str, overrides: Sequence[str] = ()) -> Tuple[RunConfig, Dict[str, Any]]:
    """Compose, validate and return (RunConfig, the resolved plain dict for saving with the run)."""
    raw = compose_yaml(config_path, config_name, list(overrides))
    return build_run_config(raw), raw
