"""The objects a run config configures, built from a :class:`~psft_megatron.config.schema.RunConfig`
before torch.distributed starts (:func:`preflight`): the restored model's record, the data
settings, the layer spec, megatron's ``OptimizerConfig``, the lr schedule and the loss configs,
after every check that needs no process group. A value an object refuses is a ConfigError
naming the config key (one line, exit 2), never a traceback after distributed start.

The trainer takes these objects as they are; tests/test_config_values.py runs every documented
value of every enumerated key (docs/config.md, "Enumerated keys") through them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from psft_megatron.config.schema import SCHEDULES, RunConfig
from psft_megatron.errors import ConfigError


@dataclass
class Preflight:
    """What :func:`preflight` built: ``restored`` (the model.yaml record of
    ``model.restore_from_path`` or None), ``data`` (:class:`psft_megatron.training.data_plan.DataSettings`),
    ``layer_spec`` (resolved), ``optimizer`` (megatron ``OptimizerConfig``), ``schedule``
    (:class:`psft_megatron.training.setup.ScheduleConfig`), ``loss`` and ``sft_loss``
    (:class:`psft_megatron.losses.LossConfig`)."""

    restored: Optional[Any]
    data: Any
    layer_spec: str
    optimizer: Any
    schedule: Any
    loss: Any
    sft_loss: Any


def preflight(cfg: RunConfig, world_size: int, announce: bool = True) -> Preflight:
    """Every check and object of a run that needs no process group, in order: files, the
    restored model (it may fill the architecture and name the tokenizer; fills ``cfg.model``
    in place), the layout, the data keys, what the config asks of the machine, then the objects.
    ``announce``: print the restore notes (global rank 0)."""
    from psft_megatron.checkpointing.restore import prepare_restore
    from psft_megatron.config.loader import check_layout, check_paths, check_requirements
    from psft_megatron.training.data_plan import load_data_settings

    check_paths(cfg)
    restored = prepare_restore(cfg.model, announce=announce)
    check_layout(cfg, world_size)
    data = load_data_settings(cfg, world_size)
    _check_lengths(cfg.model.architecture, data.train, data.validation)
    check_requirements(cfg)
    loss, sft_loss = loss_configs(cfg)
    return Preflight(restored=restored, data=data, layer_spec=layer_spec(cfg), optimizer=optimizer_config(cfg),
                     schedule=schedule_config(cfg), loss=loss, sft_loss=sft_loss)


def _check_lengths(architecture: dict, *sets) -> None:
    """Every data set's (:class:`psft_megatron.data.DataConfig` or None) ``max_seq_length``
    within the model's ``max_position_embeddings`` (the RoPE table's length; Megatron-LM refuses
    a longer sequence length the same way)."""
    from psft_megatron.model.config import ModelConfig

    limit = architecture.get("max_position_embeddings")
    if limit is None:
        limit = next(f.default for f in dataclasses.fields(ModelConfig) if f.name == "max_position_embeddings")
    for data in sets:
        if data is not None and isinstance(limit, int) and data.max_seq_length > limit:
            raise ConfigError(f"{data.prefix}.max_seq_length={data.max_seq_length} is longer than "
                              f"model.max_position_embeddings={limit}, the longest sequence the model's positions "
                              f"cover; lower {data.prefix}.max_seq_length")


def layer_spec(cfg: RunConfig, kernels=None) -> str:
    """``model.layer_spec`` resolved for this machine (``kernels``: what it offers, detected when
    None): ``te``, ``local`` or ``cpu``; null picks the machine's default. ``te`` without
    Transformer Engine or CUDA is refused with what to install or use."""
    from psft_megatron.model.fusions import Kernels
    from psft_megatron.model.layer_specs import LAYER_SPECS, resolve_layer_spec

    name = cfg.model.layer_spec
    if name is not None and name not in LAYER_SPECS:
        raise ConfigError(f"model.layer_spec={name!r} is not one of {', '.join(LAYER_SPECS)} (or null: the machine's "
                          "default)")
    kernels = kernels or Kernels.detect()
    if name == "te" and not kernels.transformer_engine:
        raise ConfigError("model.layer_spec=te needs Transformer Engine, which is not installed: pip install -e "
                          "'.[te]' (or use an NGC PyTorch container); without it use local (GPU) or cpu")
    if name == "te" and not kernels.cuda:
        raise ConfigError("model.layer_spec=te needs CUDA; use cpu (or null) on a machine without GPUs")
    return resolve_layer_spec(name, kernels)


def optimizer_config(cfg: RunConfig):
    """megatron's ``OptimizerConfig`` of ``model.optim`` and ``trainer.gradient_clip_val``.

    ``adam`` and ``adamw`` are the same optimizer: megatron's Adam decouples the weight decay
    (AdamW). The schedule's ``min_lr`` is filled in where the optimizer is made
    (:func:`psft_megatron.training.setup.optimizer_and_scheduler`)."""
    from megatron.core.optimizer import OptimizerConfig

    optim = cfg.model.optim
    return OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                           adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_eps=optim.eps,
                           clip_grad=cfg.trainer.gradient_clip_val)


def schedule_config(cfg: RunConfig):
    """The lr schedule of ``model.optim.sched`` (:class:`psft_megatron.training.setup.ScheduleConfig`):
    warm-up steps, decay horizon (``sched.max_steps``, default ``trainer.max_steps``), megatron's
    decay style for the NeMo name, ``min_lr``."""
    from psft_megatron.training.setup import ScheduleConfig

    sched = cfg.model.optim.sched
    return ScheduleConfig(lr_warmup_steps=sched.warmup_steps,
                          lr_decay_steps=sched.max_steps or cfg.trainer.max_steps,
                          lr_decay_style=SCHEDULES[sched.name], min_lr=sched.min_lr)


def loss_configs(cfg: RunConfig) -> Tuple[object, object]:
    """(the run's objective, plain SFT with the same aggregation) as :class:`psft_megatron.losses.LossConfig`
    from ``model.psft``; the SFT one trains the warm-up steps and validates."""
    from psft_megatron.losses import LossConfig

    from psft_megatron.losses.objectives import OBJECTIVES

    psft = cfg.model.psft
    common = dict(agg_mode=psft.agg_mode, compute_entropy=psft.compute_entropy, chunk_size=psft.chunk_size,
                  fused_output_layer=psft.fused_output_layer)
    try:
        loss = LossConfig(kind=psft.loss, clip_eps_low=psft.clip_eps_low, clip_eps_high=psft.clip_eps_high,
                          kl_coef=psft.kl_coef, kl_estimator=psft.kl_estimator, asft_kl_coef=psft.asft_kl_coef,
                          eaft_topk=psft.eaft_topk, eaft_alpha=psft.eaft_alpha, **common)
    except ValueError as exc:  # LossConfig names its own fields: loss.<field>
        raise ConfigError(_psft_key(str(exc))) from None
    if "logits" in OBJECTIVES[psft.loss].requires(loss):
        raise ConfigError(f"model.psft.kl_estimator=full needs the reference logits in the training step; the trainer "
                          f"supports k1 and k3 for model.psft.loss={psft.loss} (use the plug-in API for full)")
    return loss, LossConfig(kind="sft", **common)


def _psft_key(message: str) -> str:
    """A LossConfig message with its field names as config keys (``loss.kind`` is ``model.psft.loss``)."""
    return message.replace("loss.kind", "model.psft.loss").replace("loss.", "model.psft.")



#: megatron scheduler state -> the config key that sets it
_SCHEDULE_KEYS = {"max_lr": "model.optim.lr", "min_lr": "model.optim.sched.min_lr",
                  "lr_warmup_steps": "model.optim.sched.warmup_steps",
                  "lr_decay_steps": "model.optim.sched.max_steps (default trainer.max_steps)",
                  "lr_decay_style": "model.optim.sched.name"}


def resumed_schedule_note(configured: dict, checkpoint: dict) -> Optional[str]:
    """One line when a resume keeps a schedule other than the config's: megatron's scheduler (and
    the optimizer's parameter groups) continue with the checkpoint's peak, floor, warm-up,
    horizon and style. ``configured`` / ``checkpoint``: ``OptimizerParamScheduler.state_dict()``
    of this run's config and of the checkpoint. None when they agree."""
    differ = [f"{key} {configured[name]} -> {checkpoint[name]}" for name, key in _SCHEDULE_KEYS.items()
              if name in configured and name in checkpoint and configured[name] != checkpoint[name]]
    if not differ:
        return None
    return ("note: the lr schedule continues from the checkpoint, not from the config: " + "; ".join(differ)
            + " (to change it, start from the weights: model.restore_from_path with exp_manager.resume_if_exists=false)")
