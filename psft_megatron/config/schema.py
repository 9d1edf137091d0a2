"""The run configuration: NeMo's layout (``trainer``, ``exp_manager``, ``model.*``) plus
``model.psft``. Every key is documented in docs/config.md; unknown keys are errors
(:mod:`psft_megatron.config.loader`).

The architecture keys of ``model`` are :class:`psft_megatron.model.ModelConfig`'s fields;
NeMo's spellings are accepted as aliases (:data:`MODEL_KEY_ALIASES`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Dict, List, Optional

from psft_megatron.distributed.layout import ParallelConfig

#: NeMo spelling -> ModelConfig field.
MODEL_KEY_ALIASES = {
    "kv_channels": "head_dim",
    "layernorm_epsilon": "norm_epsilon",
    "share_embeddings_and_output_weights": "tie_word_embeddings",
}

LOSS_KINDS = ("psft", "sft", "dft", "sft_kl", "asft", "eaft")
PRECISIONS = {"32": "float32", "32-true": "float32", "bf16": "bfloat16", "bf16-mixed": "bfloat16",
              "16": "float16", "16-mixed": "float16"}
SCHEDULES = {"constant": "constant", "CosineAnnealing": "cosine", "cosine": "cosine", "linear": "linear",
             "WarmupAnnealing": "linear"}


@dataclass
class TrainerSection:
    """``trainer``: how long and how to step."""

    devices: Optional[int] = None  # processes per node; checked against torchrun's LOCAL_WORLD_SIZE
    num_nodes: int = 1
    max_steps: int = 100
    val_check_interval: int = 0  # validate every N optimizer steps (0: never)
    limit_val_batches: int = 8  # validation micro-batch groups per validation
    log_every_n_steps: int = 1
    precision: Any = "32"  # 32 | bf16 | bf16-mixed | 16 | 16-mixed
    gradient_clip_val: float = 1.0
    max_consecutive_skipped_steps: int = 10  # stop after this many non-finite steps in a row (0: never)
    progress_bar: bool = True


@dataclass
class CheckpointSection:
    """``exp_manager.checkpoint_callback_params``."""

    every_n_train_steps: int = 0  # 0: only at the end
    save_top_k: int = 2  # keep the last N checkpoints
    save_last: bool = True  # always save when training ends at max_steps


@dataclass
class ExpManagerSection:
    """``exp_manager``: where logs and checkpoints go."""

    explicit_log_dir: Optional[str] = None  # wins over exp_dir/name
    exp_dir: str = "runs"
    name: str = "psft"
    create_tensorboard_logger: bool = True
    create_wandb_logger: bool = False
    wandb_logger_kwargs: Dict[str, Any] = field(default_factory=dict)
    resume_if_exists: bool = True
    resume_fallback: bool = True  # a damaged latest checkpoint: resume from the newest intact one
    overwrite: bool = False  # a new run into a directory holding another run: move that run aside to <dir>.old-<time>
    checkpoint_callback_params: CheckpointSection = field(default_factory=CheckpointSection)


@dataclass
class SchedSection:
    """``model.optim.sched``."""

    name: str = "constant"  # constant | CosineAnnealing | linear
    warmup_steps: int = 0
    min_lr: float = 0.0
    max_steps: Optional[int] = None  # decay horizon; default trainer.max_steps


@dataclass
class OptimSection:
    """``model.optim``: megatron's OptimizerConfig (Adam/AdamW) and distributed optimizer."""

    name: str = "adamw"  # adam | adamw (megatron's Adam has decoupled weight decay)
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    sched: SchedSection = field(default_factory=SchedSection)


@dataclass
class PSFTSection:
    """``model.psft``: the objective and the old policy (see docs/logprobs.md)."""

    loss: str = "psft"  # psft | sft | dft | sft_kl | asft | eaft
    clip_eps_low: float = 0.2  # no effect with advantage 1 (the ratio is never clipped from below): PPO form only
    clip_eps_high: float = 0.28
    kl_coef: float = 0.5  # SFT-KL's KL coefficient
    kl_estimator: str = "k3"  # k1 | k3 | full (the KL term of sft_kl and asft)
    asft_kl_coef: float = 0.1  # ASFT's KL coefficient (the ASFT authors' default)
    eaft_topk: int = 20  # k of EAFT's top-k entropy (the EAFT authors')
    eaft_alpha: float = 1.0  # exponent of EAFT's gate (H_k / log k) ** alpha
    agg_mode: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    old_policy_interval: int = 8  # K: re-sync pi_old every K optimizer steps
    freeze_old_policy: bool = False  # pi_old = the initial model for the whole run
    warmup_sft_steps: int = 0  # plain SFT for W steps, then PSFT
    compute_entropy: bool = True
    chunk_size: Optional[int] = None
    fused_output_layer: bool = False  # output layer fused into the log-prob op: no logits tensor


@dataclass
class DataSection:
    """``model.data``: train and validation sets (keys of psft_megatron.data.DataConfig)."""

    train_ds: Dict[str, Any] = field(default_factory=dict)
    validation_ds: Optional[Dict[str, Any]] = None
    test_ds: Optional[Dict[str, Any]] = None  # NeMo's test set: accepted, not used (reported once)


#: ``model``'s parallel-layout keys (``tensor_model_parallel_size``, ``sequence_parallel``, ...):
#: the fields of :class:`psft_megatron.distributed.layout.ParallelConfig`, declared there only
ParallelSection = make_dataclass("ParallelSection", ParallelConfig.section_fields())
ParallelSection.__module__ = __name__


@dataclass
class ModelSection(ParallelSection):
    """``model``: parallel layout, batch sizes, architecture, optimiser, data, tokenizer, PSFT.

    The layout keys are :class:`ParallelSection`'s (ParallelConfig's fields; the trainer builds
    the layout with ``ParallelConfig.from_section``). The architecture keys (``num_layers``,
    ``hidden_size``, ...) live in ``architecture`` after loading; in YAML they sit directly
    under ``model`` as in NeMo.
    """

    micro_batch_size: int = 1
    global_batch_size: int = 8
    seed: int = 1234
    layer_spec: Optional[str] = None  # te | local | cpu; None: te with CUDA+TE, local with CUDA, else cpu
    restore_from_path: Optional[str] = None  # megatron checkpoint with the initial weights
    # FP8 through Transformer Engine (GPU, te layer spec); resolved by psft_megatron.model.fp8.
    fp8: Any = None  # e4m3 | hybrid | null; NeMo 1: true/false with fp8_e4m3 / fp8_hybrid
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise | mxfp8
    fp8_margin: int = 0  # delayed recipe only
    fp8_amax_history_len: int = 1  # delayed recipe only
    fp8_amax_compute_algo: str = "most_recent"  # most_recent | max; delayed recipe only
    fp8_param_gather: Optional[bool] = None  # (false) FP8 weights, all-gathered in FP8 (needs the distributed optimizer)
    fp8_e4m3: Optional[bool] = None  # NeMo 1 spelling
    fp8_hybrid: Optional[bool] = None  # NeMo 1 spelling
    fp8_params: Optional[bool] = None  # NeMo 1 spelling of fp8_param_gather
    fp8_interval: int = 1  # NeMo 1 / TE < 1.8; only 1 is accepted
    reduce_amax: bool = True  # NeMo 1; only true is accepted
    architecture: Dict[str, Any] = field(default_factory=dict)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    tokenizer: Dict[str, Any] = field(default_factory=dict)
    psft: PSFTSection = field(default_factory=PSFTSection)


@dataclass
class RunConfig:
    """The whole run."""

    name: str = "psft"
    trainer: TrainerSection = field(default_factory=TrainerSection)
    exp_manager: ExpManagerSection = field(default_factory=ExpManagerSection)
    model: ModelSection = field(default_factory=ModelSection)
