"""Long-job behaviour in ONE 4-process launch (TP=2 + PP=2, PSFT with K = 4):

- exact resume: 12 uninterrupted steps vs 6 steps (stopping inside the window [4, 8)) +
  resume + 6 steps: the per-step metrics must be bitwise identical;
- numerical faults: an injected NaN loss is skipped and counted; M in a row stop the run
  with a message naming the step, the metric and the last good checkpoint;
- an unwritable checkpoint directory is one clean error on every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.config import load_run_config  # noqa: E402
from psft_megatron.checkpointing.manager import CheckpointError  # noqa: E402
from psft_megatron.training.trainer import NonFiniteTrainingError, Trainer  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BASE = ["trainer.val_check_interval=0", "trainer.progress_bar=false", "trainer.devices=null",
        "model.psft.old_policy_interval=4", "model.global_batch_size=8", "model.micro_batch_size=2",
        "model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2", "model.num_layers=4",
        "exp_manager.create_tensorboard_logger=false", "exp_manager.resume_if_exists=true"]


class NaNTrainer(Trainer):
    """Multiplies the loss by NaN on the given (1-based) steps."""

    nan_steps = ()

    def setup(self):
        super().setup()
        loss_func = self.loss.loss_func

        def poisoned(*args, **kwargs):
            inner = loss_func(*args, **kwargs)
            if self.step + 1 not in self.nan_steps:
                return inner

            def bad(output):
                loss_sum, normaliser, metrics = inner(output)
                poison = torch.tensor([float("nan"), 1.0])  # the sum goes NaN, the token count does not
                return loss_sum * float("nan"), normaliser, dict(metrics, loss=metrics["loss"] * poison)

            return bad

        self.loss.loss_func = poisoned


def trainer(workdir, name, overrides, cls=Trainer):
    cfg, raw = load_run_config(os.path.join(REPO, "configs"), "tiny_cpu",
                               BASE + [f"exp_manager.explicit_log_dir={os.path.join(workdir, name)}"] + overrides)
    t = cls(cfg, raw)
    t.setup()
    return t


def metrics_of(t):
    return [{k: h[k] for k in ("step", "loss", "nll", "entropy", "clip_frac", "grad_norm")} for h in t.history]


def main() -> None:
    from psft_megatron.distributed.runtime import ParallelConfig, initialize

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(REPO)
    initialize(ParallelConfig())
    holder = [tempfile.mkdtemp(prefix="psft_resume_") if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(holder, src=0)
    work = holder[0]
    results = {}

    # exact resume: 12 steps straight vs 6 + resume + 6 (step 6 is inside the window [4, 8))
    t = trainer(work, "straight", ["trainer.max_steps=12"])
    t.train()
    results["straight"] = metrics_of(t)
    t.close()
    t = trainer(work, "resumed", ["trainer.max_steps=6"])
    t.train()
    t.save()
    first = metrics_of(t)
    t.close()
    t = trainer(work, "resumed", ["trainer.max_steps=12"])
    results["resumed_from_step"] = t.step
    t.train()
    results["resumed"] = first + metrics_of(t)
    t.close()

    # another layout (TP=1, PP=2): weights, optimizer, schedule and data position load; the
    # open window is re-synced; a distributed-optimizer run refuses the plain-optimizer state
    t = trainer(work, "relayout", ["trainer.max_steps=6"])  # stops inside the window [4, 8)
    t.train()
    t.save()
    t.close()
    other = ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false", "trainer.max_steps=8"]
    t = trainer(work, "relayout", other)
    results["other_layout_step"] = t.step
    t.train()
    results["other_layout"] = metrics_of(t)
    t.close()
    try:
        trainer(work, "relayout", other + ["trainer.max_steps=10", "model.optim.use_distributed_optimizer=true"])
        results["optimizer_kind_error"] = None
    except ValueError as exc:
        results["optimizer_kind_error"] = str(exc)

    # NaN: one is skipped and counted; two in a row stop the run (max_consecutive_skipped_steps=2)
    NaNTrainer.nan_steps = (2, 5, 6)
    t = trainer(work, "nan", ["trainer.max_steps=8", "trainer.max_consecutive_skipped_steps=2",
                              "exp_manager.checkpoint_callback_params.every_n_train_steps=3"], NaNTrainer)
    try:
        t.train()
        results["nan_error"] = None
    except NonFiniteTrainingError as exc:
        results["nan_error"] = str(exc)
    results["nan_history"] = [{"step": h["step"], "skipped": h.get("skipped_steps", 0.0),
                               "loss": h["loss"], "nll": h["nll"]} for h in t.history]
    t.close()

    # unwritable checkpoint directory: its parent is a regular file
    blocker = os.path.join(work, "blocker")
    if torch.distributed.get_rank() == 0:
        with open(blocker, "w") as f:
            f.write("not a directory\n")
    torch.distributed.barrier()
    t = trainer(work, "unwritable", ["trainer.max_steps=1"])
    t.checkpoints.root = os.path.join(blocker, "checkpoints")
    t.train()
    try:
        t.save()
        results["unwritable_error"] = None
    except CheckpointError as exc:
        results["unwritable_error"] = str(exc)
    t.close()

    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
        shutil.rmtree(work, ignore_errors=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
