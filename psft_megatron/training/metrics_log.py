"""Rank-0 logging: a progress line, TensorBoard scalars, ``metrics.jsonl`` and (optionally) wandb.

``metrics.jsonl`` holds one JSON object per logged step with ``step`` and full-precision floats;
validation records carry ``"split": "val"``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Optional

#: order and format of the progress line
_PROGRESS = (("loss", "{:+.4f}"), ("nll", "{:.4f}"), ("entropy", "{:.4f}"), ("clip_frac", "{:.3f}"),
             ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"), ("tokens_per_s", "{:.0f}"), ("step_time_s", "{:.2f}"),
             ("forward_only_s", "{:.2f}"), ("peak_mem_gib", "{:.2f}"), ("mfu", "{:.3f}"),
             ("moe_aux_loss", "{:.4f}"), ("moe_z_loss", "{:.4f}"), ("moe_load_max_mean", "{:.2f}"))


class MetricsLogger:
    """Writes metrics on global rank 0; a no-op elsewhere.

    Args:
        log_dir: directory for ``metrics.jsonl`` and ``tensorboard/``.
        max_steps: for the ETA.
        tensorboard: write TensorBoard scalars.
        wandb_kwargs: ``wandb.init`` keyword arguments, or None for no wandb.
        progress: print a progress line per logged step.
        resume_step: the step a resumed run continues after: records of later steps (written
            by the run past the checkpoint it resumed from) are removed from metrics.jsonl and
            TensorBoard, so each step keeps one record. None: a fresh run (metrics.jsonl
            starts empty).
    """

    def __init__(self, log_dir: str, max_steps: int, *, enabled: bool, tensorboard: bool = True,
                 wandb_kwargs: Optional[dict] = None, progress: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.max_steps = max_steps
        self.progress = progress
        self.start = time.time()
        self.first_step: Optional[int] = None
        self._tb = self._wandb = self._jsonl = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self.dropped_records = _truncate_after(self.jsonl_path, resume_step) if resume_step is not None else 0
        if self.dropped_records:
            print(f"metrics.jsonl: removed {self.dropped_records} record(s) after step {resume_step} (written past "
                  "the checkpoint this run resumes from)", flush=True)
        self._jsonl = open(self.jsonl_path, "a" if resume_step is not None else "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = os.path.join(log_dir, "tensorboard")
            self._tb = SummaryWriter(self.tb_dir, purge_step=None if resume_step is None else resume_step + 1)
        if wandb_kwargs is not None:
            try:
                import wandb
            except ImportError:
                print("exp_manager.create_wandb_logger is true but wandb is not installed "
                      "(pip install wandb); continuing without it", file=sys.stderr)
            else:
                self._wandb = wandb.init(**wandb_kwargs)

    def log(self, step: int, metrics: Dict[str, float], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **({"split": split} if split != "train" else {}), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        prefix = "" if split == "train" else split + "/"
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(prefix + key, value, step)
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in metrics.items()}, step=step)
        if self.progress:
            self._print(step, metrics, split)

    def _print(self, step: int, metrics: Dict[str, float], split: str) -> None:
        if self.first_step is None:
            self.first_step, self.start = step, time.time()
        parts = [f"[{split}] step {step}/{self.max_steps}"]
        parts += [f"{key} {fmt.format(metrics[key])}" for key, fmt in _PROGRESS if key in metrics]
        done = step - self.first_step
        if split == "train" and done > 0:
            eta = (time.time() - self.start) / done * (self.max_steps - step)
            parts.append(f"eta {eta:.0f}s")
        print("  ".join(parts), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: str, step: int) -> int:
    """Remove the records of steps > ``step`` from a metrics.jsonl (atomically); returns how many."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    def kept(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:  # a line cut short by a killed process
            return False

    keep = [line for line in lines if line.strip() and kept(line)]
    if len(keep) == len(lines):
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(lines) - len(keep)
