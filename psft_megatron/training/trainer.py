"""The PSFT trainer behind ``pretrain_psft.py``: megatron-core model, DDP, optimizer and
schedules; our data pipeline and loss plug-in; the dynamic old policy.

Old policy (``model.psft.old_policy_interval = K``, after ``warmup_sft_steps = W`` steps of
plain SFT): the K global batches of a window are read up front; batch 1 uses the current
log-probs detached (ratio 1); batches 2..K get their old log-probs from a forward-only pass
(eval mode, no grad) with the window-start weights, kept on the last pipeline stage - K-1
extra forwards per window. ``freeze_old_policy`` keeps pi_old = the initial model: every
batch's old log-probs then come from a frozen copy of the initial weights. For SFT-KL the
reference (a frozen copy of the initial weights, same layout, no optimizer state) gives
``ref_logprobs`` the same way, in the same step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import signal
import time
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from psft_megatron.config.loader import fp8_config
from psft_megatron.config.schema import PRECISIONS, RunConfig
from psft_megatron.errors import ConfigError, UserError
from psft_megatron.checkpointing.model_record import write_model_record
from psft_megatron.checkpointing.manager import CheckpointManager
from psft_megatron.checkpointing.restore import describe_restore, record_for_save

logger = logging.getLogger(__name__)

#: metrics shared from the last pipeline stage to rank 0 each step (fixed order)
STEP_KEYS = ("loss", "nll", "entropy", "clip_frac", "ratio_mean", "ratio_max", "approx_kl", "kl", "eaft_weight",
             "topk_entropy", "num_tokens")


class NonFiniteTrainingError(UserError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm: reported like a bad
    input (``training error: stopping at step N: ...``, one line, exit status 2; raised alike on
    every rank), since what fixes it is a setting (lr, precision, clipping) or the data."""

    kind = "training"


class StopSignals:
    """SIGTERM / SIGUSR1 (SLURM preemption): the first asks the trainer to finish the current
    step, save and exit 0; a second one exits at once (exit code 128 + signal number).

    The same signal again within :attr:`REPEAT_S` seconds is the same request delivered twice
    (SLURM signals every process of a job step, and torchrun forwards what it receives to its
    workers) and is ignored."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    REPEAT_S = 10.0

    def __init__(self):
        self.name: Optional[str] = None
        self._first = (None, 0.0)  # (signal number, monotonic time) of the first signal
        self._previous = {}

    def _handle(self, signum, frame):
        if self.name is not None:
            first, when = self._first
            if signum == first and time.monotonic() - when < self.REPEAT_S:
                return
            os._exit(128 + signum)
        self.name = signal.Signals(signum).name
        self._first = (signum, time.monotonic())

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """True on every rank if any rank got a signal (one all-reduce per step)."""
        from psft_megatron.distributed.runtime import all_reduce_values

        (flag,) = all_reduce_values([self.name is not None], op="max")
        if flag and self.name is None:
            self.name = "a signal on another rank"
        return bool(flag)


def _epochs(sampler_state: dict) -> float:
    """Fractional epochs the training data has been read for after a step: consumed items over
    the items of one pass (all sources together for a mixing sampler)."""
    total = sampler_state.get("num_samples", 0)
    total = sum(total) if isinstance(total, (list, tuple)) else total
    return float(sampler_state.get("consumed_samples", 0)) / total if total else 0.0


def _rng_states() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if torch.cuda.is_available() and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def log_dir_of(cfg: RunConfig) -> str:
    em = cfg.exp_manager
    return em.explicit_log_dir or os.path.join(em.exp_dir, em.name)


def model_config(architecture: Dict, tokenizer_vocab: int, precision: str):
    """The run's :class:`psft_megatron.model.ModelConfig`: the architecture keys, the vocab
    size (default the tokenizer's) and the parameter dtype of ``trainer.precision``; a missing
    or bad key is a ConfigError naming it."""
    from psft_megatron.model import ModelConfig

    arch = dict(architecture)
    arch.setdefault("vocab_size", tokenizer_vocab)
    arch["params_dtype"] = PRECISIONS[precision]
    missing = ModelConfig.missing_keys(arch)
    if missing:
        raise ConfigError(f"{', '.join('model.' + k for k in missing)}: not set (set them, or restore a checkpoint "
                          "that records its model with model.restore_from_path)")
    try:
        return ModelConfig.from_dict(arch)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


class Trainer:
    """Builds everything from a :class:`RunConfig` and trains. See the module docstring."""

    def __init__(self, cfg: RunConfig, resolved: Optional[dict] = None):
        self.cfg = cfg
        self.resolved = resolved or {}
        self.log_dir = log_dir_of(cfg)
        self.step = 0
        self.history: List[Dict[str, float]] = []  # one record per optimizer step (all ranks)
        self.pending: List = []  # the open old-policy window: (micro-batches, sampler state after) per step
        self.forward_only: Dict[int, object] = {}  # each pending batch's old-policy pass: a timer Interval
        self.window_mode = "psft"
        self.sampler_state: Optional[dict] = None
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.preempted = False
        self.restored = None  # the model.yaml of model.restore_from_path (psft_megatron.checkpointing.model_record)
        self.restore_info = None  # its check, when its weights are read in this start
        self.run_dir = None  # psft_megatron.checkpointing.run_dir.RunDir, once set-up decided it
        self.checkpoints: Optional[CheckpointManager] = None
        self.nothing_to_do: Optional[str] = None  # set when the resumed checkpoint is at or past max_steps
        self.needs_ref = False  # the objective needs the frozen initial model's log-probs (SFT-KL, ASFT)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Everything before the first step, in order: the config checks that need no process
        group (:func:`psft_megatron.training.run_objects.preflight`), megatron's process groups,
        the run directory and resume point (rank 0 decides), the tokenizer and model config with
        what the objective requires, the data, the model and optimizer, then the objective's
        objects and the resume itself. Sets ``nothing_to_do`` (and stops) when the resumed
        checkpoint is already at ``trainer.max_steps``."""
        from psft_megatron.distributed.runtime import ParallelConfig, initialize
        from psft_megatron.training import run_objects

        cfg, m = self.cfg, self.cfg.model
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank0 = int(os.environ.get("RANK", "0")) == 0
        pre = run_objects.preflight(cfg, world, announce=rank0)  # everything before distributed work
        self.restored, self.data = pre.restored, pre.data
        self.parallel = ParallelConfig.from_section(m, warn=(lambda line: print(line, flush=True)) if rank0 else None)
        self.info = initialize(self.parallel, seed=m.seed)
        self.is_rank0 = self.info.rank == 0
        resume = self._open_run()  # the run directory and the resume point, decided by rank 0
        if self.nothing_to_do:
            return
        needs_frozen = self._setup_model_config(pre.loss)
        self.restore_info = self._check_restore(resuming=resume is not None, needs_frozen=needs_frozen)
        self._setup_data()
        self._setup_model(pre, resume)
        self._setup_objective(pre, resume, needs_frozen)
        if resume:
            self._resume(resume)
        self._open_logs(resume)

    def _setup_model_config(self, loss_config) -> bool:
        """The tokenizer, the model config (its vocabulary checked against the tokenizer's) and
        what the objective requires of them: ``needs_ref`` (the frozen initial model's log-probs:
        SFT-KL, ASFT), EAFT's k within the vocabulary. Returns whether a frozen copy of the
        initial weights is needed (the reference, or a frozen pi_old)."""
        from psft_megatron.data import build_tokenizer
        from psft_megatron.losses.objectives import OBJECTIVES

        m, tok_cfg = self.cfg.model, self.data.tokenizer
        self.tokenizer = build_tokenizer(tok_cfg)
        self.model_cfg = model_config(m.architecture, self.tokenizer.vocab_size, str(self.cfg.trainer.precision))
        if self.model_cfg.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(f"model.vocab_size={self.model_cfg.vocab_size} is smaller than the tokenizer's "
                              f"{self.tokenizer.vocab_size} ({tok_cfg.model or tok_cfg.type})")
        psft = m.psft
        required = OBJECTIVES[psft.loss].requires(loss_config)
        vocab = self.model_cfg.padded_vocab_size(self.parallel.tensor_model_parallel_size)
        if "topk_entropy" in required and psft.eaft_topk > vocab:
            raise ConfigError(f"model.psft.eaft_topk={psft.eaft_topk} exceeds the model's vocabulary ({vocab} entries)")
        self.needs_ref = "ref" in required
        return self.needs_ref or (psft.loss == "psft" and psft.freeze_old_policy)

    def _setup_data(self) -> None:
        """The training and validation sets (laid out for TP/CP/SP and FP8's alignment), the
        micro-batch size (1 packed row when packing), the DP-sharded samplers and the padding
        rule: under PP every micro-batch is padded to the full row length (fixed-shape
        activations), otherwise to its longest sample."""
        from megatron.core import parallel_state

        from psft_megatron.data import SFTDataset

        m, tok_cfg = self.cfg.model, self.data.tokenizer
        p = self.parallel
        self.fp8 = fp8_config(m)
        layout = dict(tp=p.tensor_model_parallel_size, cp=p.context_parallel_size, sequence_parallel=p.sequence_parallel,
                      align=self.fp8.align_size)
        self.train_set = SFTDataset.build(self.data.train, self.tokenizer, tok_cfg, **layout)
        self.val_set = (SFTDataset.build(self.data.validation, self.tokenizer, tok_cfg, **layout)
                        if self.data.validation else None)
        self.micro_batch_size = self.train_set.micro_batch_size(m.micro_batch_size)
        if self.micro_batch_size != m.micro_batch_size and self.is_rank0:
            print(f"packing: micro-batches hold one packed row (model.micro_batch_size={m.micro_batch_size} "
                  "ignored); model.global_batch_size counts packed rows", flush=True)
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        self.sampler = self.data.train_sampler(self.train_set, self.micro_batch_size, dp_rank, dp_size)
        self.val_sampler = self.data.validation_sampler(self.val_set, dp_rank, dp_size)
        self.row_length = self.train_set.row_length
        self.pad_to = self.row_length if p.pipeline_model_parallel_size > 1 else None

    def _setup_model(self, pre, resume) -> None:
        """The model chunks, DDP, optimizer and lr schedule (``self.tm``); a new run reads
        ``model.restore_from_path`` into them, a resume leaves that to its checkpoint."""
        from psft_megatron.training.setup import setup_model_and_optimizer

        m = self.cfg.model
        restoring = bool(m.restore_from_path) and resume is None
        if self.is_rank0:
            c = self.model_cfg
            experts = (f", {c.num_experts} experts top-{c.moe_router_topk} in "
                       f"{sum(c.moe_layer_pattern())} MoE layers" if c.is_moe else "")
            print(f"building the model: {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}{experts} "
                  f"({c.params_dtype}) at {self.parallel.describe()} on {self.info.world_size} process(es)"
                  + (f"; then restoring its weights from {m.restore_from_path}" if restoring else ""), flush=True)
        self.tm = setup_model_and_optimizer(
            self.model_cfg, self.parallel, pre.optimizer, schedule=pre.schedule, layer_spec=pre.layer_spec,
            use_distributed_optimizer=m.optim.use_distributed_optimizer,
            overlap_grad_reduce=m.optim.overlap_grad_reduce, after_build=None if resume else self._load_initial_weights,
            fp8=self.fp8)
        if self.is_rank0:
            if restoring:
                print(describe_restore(m.restore_from_path, self.restored, dataclasses.asdict(self.model_cfg)), flush=True)
            print(f"model: layer spec {self.tm.layer_spec}, FP8 {self.fp8.describe()}", flush=True)

    def _setup_objective(self, pre, resume, needs_frozen: bool) -> None:
        """The run's loss and the SFT loss (warm-up, validation), the frozen copy of the initial
        weights when needed, the MoE metrics, the parameter counts for MFU."""
        from megatron.core import parallel_state

        from psft_megatron.losses import PSFTLoss

        psft = self.cfg.model.psft
        self.loss, self.sft_loss = PSFTLoss(pre.loss), PSFTLoss(pre.sft_loss)
        if psft.loss == "psft" and psft.old_policy_interval == 1 and not psft.freeze_old_policy and self.is_rank0:
            print("WARNING: model.psft.old_policy_interval=1: the ratio is always 1 and PSFT equals SFT", flush=True)
        self.frozen = self._build_frozen_copy(resuming=resume is not None) if needs_frozen else None
        self.dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.moe_metrics = None  # aux loss and expert load per step (MoE models)
        if self.model_cfg.is_moe:
            from psft_megatron.training.moe_metrics import MoEMetrics

            self.moe_metrics = MoEMetrics(self.tm.chunks, self.tm.config)
        self.parameters = self._count_parameters()
        self.num_parameters = self.parameters.total
        self.sampler_state = self.sampler.state_dict()

    def _open_logs(self, resume) -> None:
        """metrics.jsonl / TensorBoard / wandb (rank 0), config_resolved.json, and the data report."""
        from psft_megatron.training.metrics_log import MetricsLogger

        cfg = self.cfg
        self.metrics_log = MetricsLogger(
            self.log_dir, cfg.trainer.max_steps, enabled=self.is_rank0,
            tensorboard=cfg.exp_manager.create_tensorboard_logger,
            wandb_kwargs=(cfg.exp_manager.wandb_logger_kwargs if cfg.exp_manager.create_wandb_logger else None),
            progress=cfg.trainer.progress_bar, resume_step=self.step if resume else None)
        if self.is_rank0:
            os.makedirs(self.log_dir, exist_ok=True)
            with open(os.path.join(self.log_dir, "config_resolved.json"), "w") as f:
                json.dump(self.resolved, f, indent=1)
            for line in self.train_set.report_lines() + (self.val_set.report_lines() if self.val_set else []) \
                    + self.data.plan_lines(self.train_set, self.sampler, cfg.trainer.max_steps, self.val_set,
                                           self.val_sampler, cfg.trainer.val_check_interval):
                print(line, flush=True)

    def _count_parameters(self):
        """Total and active (MoE: routed experts at top-k / E) parameters, each TP/PP/EP shard
        counted once, DP/CP replicas not (:func:`psft_megatron.training.throughput.count_parameters`)."""
        from psft_megatron.training.throughput import count_parameters

        c = self.model_cfg
        return count_parameters(self.tm.chunks, c.num_experts if c.is_moe else None, c.moe_router_topk)

    def _with_positions(self, metrics: List[dict], micros) -> List[dict]:
        """The step's loss metrics plus ``num_positions``: every position this rank ran through
        the model (prompt and padding included; this CP rank's share), summed over DP x CP by
        the same reduction as the metrics (last pipeline stage)."""
        from megatron.core import parallel_state

        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return metrics
        local = float(sum(int(m["tokens"].numel()) for m in micros))
        return list(metrics) + [{"num_positions": torch.tensor([local, 1.0], device=self.info.device)}]

    def _throughput(self, step, forward_only, positions: float) -> Dict[str, float]:
        """Step time, throughput, peak memory and MFU with the active parameters
        (:func:`psft_megatron.training.throughput.throughput_metrics`) from the step's timer
        and its forward-only pass's (None: there was none)."""
        from psft_megatron.training.throughput import throughput_metrics

        return throughput_metrics(step.seconds(), forward_only.seconds() if forward_only else 0.0, positions,
                                  self.parameters.active, self.info.world_size)

    def _open_run(self):
        """The run directory (:mod:`psft_megatron.checkpointing.run_dir`) and the checkpoint to
        resume from, decided by global rank 0 and known on every rank. Sets ``checkpoints`` and,
        when the resumed checkpoint is at or past ``trainer.max_steps``, ``nothing_to_do`` (the
        line to print; nothing is written then). Returns the resume checkpoint's
        :class:`~psft_megatron.checkpointing.dist_checkpoint.CheckpointInfo`, or None."""
        from psft_megatron.checkpointing.run_dir import check_writable, prepare_run_dir

        em = self.cfg.exp_manager
        self.run_dir = prepare_run_dir(em, self.log_dir)
        self.checkpoints = CheckpointManager(os.path.join(self.log_dir, "checkpoints"),
                                             keep_last=em.checkpoint_callback_params.save_top_k,
                                             run_id=self.run_dir.run_id)
        resume, why = self.checkpoints.resume_point(em.resume_fallback) if self.run_dir.resume else (None, None)
        if why and self.is_rank0:
            print(f"checkpoint: {why}", flush=True)
        max_steps = self.cfg.trainer.max_steps
        if resume is not None and int(resume.common["iteration"]) >= max_steps:
            self.step = int(resume.common["iteration"])
            self.nothing_to_do = (f"nothing to train: {resume.path} is at step {self.step} and trainer.max_steps="
                                  f"{max_steps}; raise trainer.max_steps to train further (nothing was written)")
            return resume
        check_writable(self.run_dir)
        self.checkpoints.run_id = self.run_dir.settle_run_id(resume.common if resume else None)
        return resume

    def _check_restore(self, resuming: bool, needs_frozen: bool):
        """Check ``model.restore_from_path`` once (rank 0 reads, the data hashed by every rank)
        when this start reads its weights: a new run (the initial weights), or a resume that
        needs the frozen copy of them (a resume takes the trained weights from its checkpoint
        and never reads the restore into the model). Without a model.yaml the checkpoint's vocab
        must be the model's. Returns its CheckpointInfo, or None when it is not read."""
        from psft_megatron.checkpointing.dist_checkpoint import inspect_checkpoint
        from psft_megatron.checkpointing.restore import vocab_problem
        from psft_megatron.errors import CheckpointError

        path = self.cfg.model.restore_from_path
        if not path or (resuming and not needs_frozen):
            return None
        info = inspect_checkpoint(path)
        if info.problem:
            raise CheckpointError(f"model.restore_from_path: {info.problem}")
        problem = None if self.restored else vocab_problem(info, self.model_cfg)
        if problem:
            raise ConfigError(problem)
        return info

    def _load_initial_weights(self, chunks) -> None:
        if self.restore_info is not None:
            from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint

            load_checkpoint(self.restore_info.path, chunks, checked=True)

    def _build_frozen_copy(self, resuming: bool = False) -> List:
        """A frozen copy of the live model's current weights: at set-up, the initial weights
        (the SFT-KL reference, or a frozen pi_old), taken before a resume loads into the model.
        ``resuming`` with ``model.restore_from_path``: its weights are read into the copy only.

        Under FP8 it runs with the training recipe, except the delayed recipe: TE updates
        delayed scales only at the end of a forward with autograd enabled, and a frozen copy
        only runs forward without gradients, so its scales would stay at their initial 1.0 -
        it runs in bf16 instead (docs/fp8.md). It never keeps FP8 weights (no optimizer)."""
        import dataclasses

        from psft_megatron.model.unwrap import unwrap
        from psft_megatron.model.builder import build_gpt_chunks

        config = dataclasses.replace(self.tm.config, fp8_param=False)
        if self.fp8.has_scaling_state:
            config = dataclasses.replace(config, fp8=None)
        chunks = build_gpt_chunks(self.model_cfg, config, self.tm.layer_spec)
        from_restore = resuming and self.restore_info is not None  # else the live model holds them (no resume yet)
        if from_restore:
            from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint

            load_checkpoint(self.restore_info.path, chunks, checked=True)
            if self.is_rank0:
                print(f"frozen copy of the initial weights: read from {self.restore_info.path} "
                      "(model.restore_from_path)", flush=True)
        for frozen, live in zip(chunks, self.tm.chunks):
            if not from_restore:
                frozen.load_state_dict(unwrap(live).state_dict())
            frozen.requires_grad_(False)
            frozen.eval()
        return chunks

    # ------------------------------------------------------------------ data
    def _micro_batches(self, dataset, sampler) -> Iterator[List[Dict[str, object]]]:
        """Per optimizer step: (this rank's micro-batches, collated, CP-sliced and on this
        process's device; the sampler state after this batch)."""
        from psft_megatron.training.batches import to_device
        from psft_megatron.training.forward import slice_for_context_parallel

        for step_items in sampler:
            state = sampler.state_dict()  # the position after this batch (for resume)
            yield [to_device(slice_for_context_parallel(dataset.collate(items, pad_to=self.pad_to)), self.info.device)
                   for items in step_items], state

    def _seq_length(self, micros) -> int:
        return int(micros[0]["tokens"].shape[1]) * self.parallel.context_parallel_size

    # ------------------------------------------------------------------ metrics
    def _share(self, metrics: List[dict], keys=STEP_KEYS) -> Dict[str, float]:
        """Step metrics reduced on the last stage over DP x CP, then known on every rank."""
        from megatron.core import parallel_state

        from psft_megatron.losses import reduce_loss_metrics
        from psft_megatron.distributed.runtime import all_reduce_values

        values, present = [0.0] * len(keys), [0.0] * len(keys)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            reduced = reduce_loss_metrics(metrics, group=self.dp_cp_group)
            if parallel_state.get_tensor_model_parallel_rank() == 0 and torch.distributed.get_rank(self.dp_cp_group) == 0:
                for i, key in enumerate(keys):
                    if key in reduced:
                        values[i], present[i] = reduced[key], 1.0
        both = all_reduce_values(values + present)  # one rank contributes; NaN/Inf values pass through
        return {k: v for k, v, p in zip(keys, both[: len(keys)], both[len(keys):]) if p}

    # ------------------------------------------------------------------ the loop
    def train(self) -> Dict[str, float]:
        """Train to ``trainer.max_steps`` (or until SIGTERM/SIGUSR1: then save and return).

        Returns the last step's metrics. Sets ``self.preempted`` when stopped by a signal.
        """
        from psft_megatron.training.forward import make_train_forward_step

        cfg = self.cfg
        forward_steps = {"psft": make_train_forward_step(self.loss), "sft": make_train_forward_step(self.sft_loss)}
        batches = self._micro_batches(self.train_set, self.sampler)
        last: Dict[str, float] = {}
        max_steps = cfg.trainer.max_steps
        self.preempted = False
        with StopSignals() as signals:
            while self.step < max_steps:
                if not self.pending:
                    self._start_window(batches)
                last = self._train_step(forward_steps[self.window_mode])
                if cfg.trainer.val_check_interval and self.step % cfg.trainer.val_check_interval == 0:
                    self.validate()
                every = cfg.exp_manager.checkpoint_callback_params.every_n_train_steps
                if every and self.step % every == 0 and self.step < max_steps:
                    self.save()
                if signals.agreed():
                    path = self.save()
                    self.preempted = True
                    if self.is_rank0:
                        print(f"stopped by {signals.name} after step {self.step}: saved {path}; "
                              "rerun the same command to resume", flush=True)
                    break
        return last

    def _train_step(self, forward_step) -> Dict[str, float]:
        """One optimizer step on the next batch of the open window (its reference pass first
        when the objective needs one), its metrics shared to rank 0, logged and returned;
        a step past the non-finite limit raises :class:`NonFiniteTrainingError`."""
        from psft_megatron.training.forward import attach_logprobs
        from psft_megatron.training.step import train_step
        from psft_megatron.training.throughput import start_timer

        micros, sampler_state = self.pending.pop(0)
        forward_only = self.forward_only.pop(id(micros), None)  # its old-policy pass
        if self.needs_ref:
            forward_only = start_timer()
            attach_logprobs(self.frozen, micros, self.loss, "ref_logprobs", seq_length=self._seq_length(micros))
            forward_only.stop()
        lr = self.tm.optimizer.param_groups[0]["lr"]  # what this step's update uses
        step_timer = start_timer()  # CUDA events on a GPU: the GPU's time, not the launches'
        result = train_step(forward_step, [iter(micros) for _ in self.tm.chunks],
                            self.tm.chunks, self.tm.optimizer, self.tm.scheduler,
                            num_microbatches=len(micros), seq_length=self._seq_length(micros),
                            micro_batch_size=int(micros[0]["tokens"].shape[0]))
        step_timer.stop()
        self.step += 1
        self.sampler_state = sampler_state
        last = self._share(self._with_positions(result.metrics, micros), STEP_KEYS + ("num_positions",))
        last.update(lr=lr, phase=0.0 if self.window_mode == "sft" else 1.0, epoch=_epochs(sampler_state))
        last.update(self._throughput(step_timer, forward_only, last.get("num_positions", 0.0)))
        if self.moe_metrics is not None:
            last.update(self.moe_metrics.step_metrics(len(micros)))
        if result.grad_norm is not None:
            last["grad_norm"] = result.grad_norm
        fault = self._count_skip(result, last)
        self.history.append(dict(last, step=self.step))
        if self.step % self.cfg.trainer.log_every_n_steps == 0 or self.step == self.cfg.trainer.max_steps or fault:
            self.metrics_log.log(self.step, last)
        if fault:
            raise NonFiniteTrainingError(fault)
        return last

    def _start_window(self, batches) -> None:
        """Read the next window of global batches and give them their pi_old log-probs."""
        psft = self.cfg.model.psft
        in_warmup = psft.loss == "psft" and self.step < psft.warmup_sft_steps
        if psft.loss == "psft" and not in_warmup:
            # Windows sit on a fixed grid W + j*K, whatever max_steps is: a run extended after
            # it ended (or resumed) continues its open window exactly. A window may therefore
            # reach past max_steps; its unused batches are kept for a resume.
            k = psft.old_policy_interval
            end = self.step + k - (self.step - psft.warmup_sft_steps) % k
        else:
            end = self.step + 1
        self.window_mode = "sft" if in_warmup else "psft"
        self.pending = [next(batches) for _ in range(end - self.step)]
        if psft.loss == "psft" and not in_warmup:
            self._attach_old_logprobs([micros for micros, _ in self.pending])

    def _count_skip(self, result, metrics: Dict[str, float]) -> Optional[str]:
        """Count skipped updates; after ``trainer.max_consecutive_skipped_steps`` in a row return
        the message to stop with (naming the step, the metric and the last good checkpoint)."""
        if result.update_successful:
            self.consecutive_skips = 0
            return None
        self.consecutive_skips += 1
        self.skipped_steps += 1
        metrics["skipped_steps"] = float(self.skipped_steps)
        bad = [k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])] or ["grad_norm"]
        if self.is_rank0:
            print(f"WARNING: step {self.step}: non-finite {' and '.join(bad)}; update skipped "
                  f"({self.consecutive_skips} in a row, {self.skipped_steps} in total)", flush=True)
        limit = self.cfg.trainer.max_consecutive_skipped_steps
        if limit and self.consecutive_skips >= limit:
            return (f"stopping at step {self.step}: {self.consecutive_skips} consecutive steps with a non-finite "
                    f"{' and '.join(bad)} (trainer.max_consecutive_skipped_steps={limit}); last good checkpoint: "
                    f"{self.checkpoints.latest_path or '(none)'}")
        return None

    def _attach_old_logprobs(self, window: List[List[Dict[str, object]]]) -> None:
        """pi_old log-probs for a window of global batches (see the module docstring)."""
        from psft_megatron.training.forward import attach_logprobs
        from psft_megatron.training.throughput import start_timer

        # frozen pi_old: every batch against the initial model; else batch 1 has ratio 1 (old =
        # current, detached) and batches 2..K get the window-start weights
        chunks, todo = (self.frozen, window) if self.frozen is not None else (self.tm.chunks, window[1:])
        for micros in todo:
            timer = start_timer()  # read when the batch's step is logged (no host sync here)
            attach_logprobs(chunks, micros, self.loss, "old_logprobs", seq_length=self._seq_length(micros))
            self.forward_only[id(micros)] = timer.stop()

    def validate(self) -> Dict[str, float]:
        """NLL and entropy on held-out data (``model.data.validation_ds``), forward only: one
        pass in a fixed order (``trainer.limit_val_batches`` global batches of it), each sample
        at most once; the last partial batch is filled with loss-free rows, so the metrics are
        token means over exactly the evaluated samples (``num_samples``)."""
        from psft_megatron.training.forward import forward_only, make_train_forward_step

        if self.val_set is None:
            return {}
        forward_step = make_train_forward_step(self.sft_loss)
        collected: List[dict] = []
        for micros, _ in self._micro_batches(self.val_set, self.val_sampler):
            collected += forward_only(self.tm.chunks, micros, forward_step, seq_length=self._seq_length(micros))
        metrics = self._share(collected, keys=("nll", "entropy", "num_tokens"))
        metrics["num_samples"] = float(sum(len(self.val_set.item_samples(i)) for batch in
                                           self.val_sampler.global_batches() for i in batch if i >= 0))
        self.metrics_log.log(self.step, metrics, split="val")
        return metrics

    def save(self) -> str:
        """Atomic checkpoint of everything a resume needs (see docs/long_jobs.md); a step is
        saved once. Everything is gathered inside the guarded save, so a failure on any rank
        (even building the state) ends the save on every rank."""
        return self.checkpoints.save(self.step, self._write_checkpoint)

    def _write_checkpoint(self, path: str) -> None:
        """The collective write of :meth:`save` into ``path``."""
        from psft_megatron.checkpointing.dist_checkpoint import save_checkpoint, uses_distributed_optimizer
        from psft_megatron.training.batches import to_host

        common = {
            "iteration": self.step,
            "run_id": self.checkpoints.run_id,
            "vocab_size": self.model_cfg.vocab_size,
            "scheduler": self.tm.scheduler.state_dict(),
            "sampler": self.sampler_state,
            "skipped_steps": self.skipped_steps,
            "window": {"mode": self.window_mode, "remaining": len(self.pending)},
            "layout": {"world_size": self.info.world_size, "parallel": self.parallel.describe()},
            "distributed_optimizer": uses_distributed_optimizer(self.tm.optimizer),
            "config": json.dumps(self.resolved, sort_keys=True),
        }
        per_rank = {"rng": _rng_states(),
                    "pending_old_logprobs": to_host([[m.get("old_logprobs") for m in micros]
                                                     for micros, _ in self.pending])}
        save_checkpoint(path, self.tm.chunks, self.tm.optimizer, common=common, per_rank=per_rank)
        if torch.distributed.get_rank() == 0:
            record = record_for_save(self.model_cfg, self.cfg.model.tokenizer, self.step,
                                     self.cfg.model.restore_from_path, self.restored, run_id=self.checkpoints.run_id)
            write_model_record(path, **record)  # the model this checkpoint holds (export, restore)

    def _resume(self, resume) -> None:
        """Load a checkpoint written by :meth:`save` (``resume``: its CheckpointInfo, checked
        once in this start): weights, optimizer, schedule, counters, data position, RNG and
        (same layout only) the open old-policy window."""
        from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint, uses_distributed_optimizer

        from psft_megatron.training.run_objects import resumed_schedule_note

        path, common = resume.path, resume.common
        mine = uses_distributed_optimizer(self.tm.optimizer)
        if common.get("distributed_optimizer", mine) != mine:
            raise ConfigError(f"{path} was saved with model.optim.use_distributed_optimizer="
                             f"{str(common['distributed_optimizer']).lower()}; this run has {str(mine).lower()}: "
                             "the optimizer state formats differ. Set the same value to resume, or start from the "
                             "weights only with model.restore_from_path and exp_manager.resume_if_exists=false")
        layout = {"world_size": self.info.world_size, "parallel": self.parallel.describe()}
        same_layout = common.get("layout") == layout
        state = load_checkpoint(path, self.tm.chunks, self.tm.optimizer, per_rank=same_layout, checked=True)
        self.step = int(common["iteration"])
        configured = self.tm.scheduler.state_dict()
        self.tm.scheduler.load_state_dict(common["scheduler"])
        note = resumed_schedule_note(configured, common["scheduler"])
        if note and self.is_rank0:
            print(note, flush=True)
        self.sampler.load_state_dict(common["sampler"])
        self.sampler_state = common["sampler"]
        self.skipped_steps = int(common.get("skipped_steps", 0))
        window = common.get("window", {"remaining": 0})
        per_rank = state.get("per_rank_state") if same_layout else None
        if per_rank is not None:
            _set_rng_states(per_rank["rng"])
        if window["remaining"]:
            if per_rank is not None:  # same layout: finish the window with its saved pi_old log-probs
                batches = self._micro_batches(self.train_set, self.sampler)
                self.window_mode = window["mode"]
                self.pending = [next(batches) for _ in range(window["remaining"])]
                for (micros, _), saved in zip(self.pending, per_rank["pending_old_logprobs"]):
                    for micro, old in zip(micros, saved):
                        if old is not None:
                            micro["old_logprobs"] = old.to(self.info.device)
            elif self.is_rank0:
                print(f"note: {path} was saved inside an old-policy window at another layout "
                      f"({common.get('layout')}); pi_old is re-synced at step {self.step + 1}", flush=True)
        if self.is_rank0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def close(self) -> None:
        if getattr(self, "metrics_log", None) is not None:  # None when set-up stopped early
            self.metrics_log.close()
        if self.checkpoints is not None:
            self.checkpoints.close()
