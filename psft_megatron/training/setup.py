"""Model, DDP and optimizer set-up with megatron-core's own classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from psft_megatron.model.builder import build_gpt_chunks, wrap_ddp, wrap_float16
from psft_megatron.model.config import ModelConfig
from psft_megatron.model.fp8 import FP8Config
from psft_megatron.model.fusions import Kernels, fusion_fields
from psft_megatron.model.layer_specs import resolve_layer_spec


@dataclass
class TrainingModel:
    """What :func:`setup_model_and_optimizer` builds for this rank."""

    config: object  # megatron TransformerConfig
    chunks: List  # megatron DDP-wrapped GPTModel chunks (one per virtual stage)
    optimizer: object  # megatron optimizer (possibly a ChainedOptimizer)
    scheduler: OptimizerParamScheduler  # sets lr and weight decay (x wd_mult) per param group
    layer_spec: str = "cpu"  # the resolved layer spec ("te", "local" or "cpu")
    fp8: FP8Config = FP8Config()  # FP8 settings (off by default)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule in optimizer steps (megatron's OptimizerParamScheduler).

    After n optimizer steps (so for step n + 1) the lr is, with W = ``lr_warmup_steps``,
    D = ``lr_decay_steps`` and ``lr`` the optimizer's peak:

    - n <= W (W > 0): ``lr * n / W`` (linear warm-up from 0: step 1 trains with lr 0);
    - constant: ``lr``;
    - W < n <= D: ``min_lr + (lr - min_lr) * c`` with ``c = 1 - r`` (linear) or
      ``c = (1 + cos(pi r)) / 2`` (cosine), ``r = (n - W) / (D - W)``;
    - n > D: ``min_lr``.

    Attributes:
        lr_warmup_steps: linear warm-up from 0 to ``OptimizerConfig.lr``.
        lr_decay_steps: D, the step at which the decay reaches ``min_lr`` (None: 1; at least
            W + 1, megatron's requirement).
        lr_decay_style: "constant", "linear", "cosine", "inverse-square-root" or "WSD".
        min_lr: lr at the end of the decay.
    """

    lr_warmup_steps: int = 0
    lr_decay_steps: Optional[int] = None
    lr_decay_style: str = "constant"
    min_lr: float = 0.0


def build_scheduler(optimizer, optimizer_config: OptimizerConfig, schedule: ScheduleConfig) -> OptimizerParamScheduler:
    """megatron's scheduler; it also applies the no-weight-decay groups (``wd_mult``) -
    without it every group would decay with ``optimizer_config.weight_decay``.

    megatron's scheduler reads the peak and the floor of each parameter group
    (``max_lr``, ``min_lr``), which ``get_megatron_optimizer`` copied from
    ``optimizer_config.lr`` / ``.min_lr``: the optimizer must have been made from an
    ``optimizer_config`` whose ``min_lr`` is the schedule's (:func:`optimizer_and_scheduler`).
    """
    decay_steps = max(schedule.lr_decay_steps or 1, schedule.lr_warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optimizer_config.lr,
        min_lr=schedule.min_lr,
        lr_warmup_steps=schedule.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=schedule.lr_decay_style,
        start_wd=optimizer_config.weight_decay,
        end_wd=optimizer_config.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


def optimizer_and_scheduler(optimizer_config: OptimizerConfig, schedule: ScheduleConfig, ddp_chunks,
                            make_optimizer=None):
    """megatron's optimizer over ``ddp_chunks`` (``make_optimizer(optimizer_config, ddp_chunks)``)
    and its lr scheduler; ``make_optimizer`` defaults to megatron's ``get_megatron_optimizer``.

    The optimizer is made from an ``optimizer_config`` that carries the schedule's floor
    (``min_lr``, set here in place): megatron copies ``lr`` and ``min_lr`` into every parameter
    group, and its decay styles compute ``max_lr - min_lr`` from the group (megatron's default
    ``min_lr`` None fails the first step after the warm-up)."""
    optimizer_config.min_lr = schedule.min_lr
    optimizer = (make_optimizer or get_megatron_optimizer)(optimizer_config, ddp_chunks)
    return optimizer, build_scheduler(optimizer, optimizer_config, schedule)


def setup_model_and_optimizer(
    model_cfg: ModelConfig,
    parallel,
    optimizer_config: OptimizerConfig,
    *,
    schedule: Optional[ScheduleConfig] = None,
    layer_spec: Optional[str] = None,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    transformer_overrides: Optional[dict] = None,
    fp8: Optional[FP8Config] = None,
    after_build=None,
) -> TrainingModel:
    """Build the GPTModel chunks of this rank, wrap them in megatron DDP, make the optimizer.

    Args:
        model_cfg: architecture.
        parallel: :class:`psft_megatron.distributed.runtime.ParallelConfig` (already initialised).
        optimizer_config: megatron ``OptimizerConfig`` (lr, weight decay, betas, clip_grad...).
        schedule: lr schedule; default constant lr.
        layer_spec: "te", "local" or "cpu" (None: te with CUDA + TE, local with CUDA only,
            else cpu); megatron's fusion switches follow it
            (:func:`psft_megatron.model.fusions.fusion_fields`).
        use_distributed_optimizer: shard optimizer state over DP (ZeRO-1).
        overlap_grad_reduce: overlap the DP grad reduce-scatter/all-reduce with backward.
        transformer_overrides: extra ``TransformerConfig`` fields (win over the fusion switches).
        fp8: FP8 settings (:class:`psft_megatron.model.fp8.FP8Config`); they fill megatron's
            ``TransformerConfig`` FP8 fields and DDP's ``fp8_param_gather``.
        after_build: optional ``fn(chunks)`` called on the bare chunks before DDP wrapping
            (e.g. to load weights).
    """
    kernels = Kernels.detect()
    layer_spec = resolve_layer_spec(layer_spec, kernels)
    fp8 = fp8 or FP8Config()
    fields = dict(fusion_fields(layer_spec, kernels), **fp8.transformer_config_fields())
    fields.update(transformer_overrides or {})
    config = model_cfg.to_transformer_config(parallel, **fields)
    chunks = build_gpt_chunks(model_cfg, config, layer_spec)
    if after_build is not None:
        after_build(chunks)
    if config.bf16 or config.fp16:
        # Half-precision params; the logits leave the last stage in half precision too.
        chunks = wrap_float16(chunks, config)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        **fp8.ddp_config_fields(),
    )
    ddp_chunks = wrap_ddp(chunks, config, ddp_config)
    optimizer_config.use_distributed_optimizer = use_distributed_optimizer
    optimizer_config.params_dtype = config.params_dtype
    optimizer_config.bf16 = config.bf16
    optimizer_config.fp16 = config.fp16
    optimizer, scheduler = optimizer_and_scheduler(optimizer_config, schedule or ScheduleConfig(), ddp_chunks)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss  # fp16: the schedule scales the loss (1.0 otherwise)
    if len(ddp_chunks) == 1:
        config.no_sync_func = ddp_chunks[0].no_sync
        config.grad_sync_func = ddp_chunks[0].start_grad_sync if overlap_grad_reduce else None
    else:
        config.no_sync_func = [chunk.no_sync for chunk in ddp_chunks]
        config.grad_sync_func = [chunk.start_grad_sync for chunk in ddp_chunks] if overlap_grad_reduce else None
    return TrainingModel(config=config, chunks=ddp_chunks, optimizer=optimizer, scheduler=scheduler,
                         layer_spec=layer_spec, fp8=fp8)
