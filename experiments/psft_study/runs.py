"""Training runs through ``pretrain_psft.py`` (torchrun, CPU, gloo) and export of their checkpoints to HF.

Every method gets the same data, seed, lr, batch and steps; only ``model.psft`` differs.
A run resumes from its latest checkpoint when interrupted (``exp_manager.resume_if_exists``).
Checkpoints are exported with ``tools/convert_megatron_to_hf.py`` right after their run; the
megatron checkpoint of an exported step is then removed (except the newest, which a resume needs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

METHODS: Dict[str, List[str]] = {
    "sft": ["model.psft.loss=sft"],
    "psft": ["model.psft.loss=psft", "model.psft.clip_eps_high=0.28", "model.psft.old_policy_interval=8"],
    "psft_frozen": ["model.psft.loss=psft", "model.psft.clip_eps_high=0.28", "model.psft.freeze_old_policy=true"],
    "dft": ["model.psft.loss=dft"],
    "sft_kl": ["model.psft.loss=sft_kl", "model.psft.kl_coef=0.5", "model.psft.kl_estimator=k3"],
    "asft": ["model.psft.loss=asft", "model.psft.asft_kl_coef=0.1", "model.psft.kl_estimator=k3"],
    "eaft": ["model.psft.loss=eaft", "model.psft.eaft_topk=20", "model.psft.eaft_alpha=1.0"],
}


@dataclass
class TrainConfig:
    steps: int = 48
    save_every: int = 16
    lr: float = 2e-5
    global_batch: int = 8
    micro_batch: int = 4
    max_seq_length: int = 320
    seed: int = 1234
    warmup_steps: int = 4
    nproc: int = 1
    threads: int = 2


def train_command(method: str, *, ckpt: str, train_file: str, run_dir: str, cfg: TrainConfig,
                  python: Optional[str] = None, seed: Optional[int] = None) -> List[str]:
    """The torchrun command of one run; ``seed`` (default ``cfg.seed``) sets ``model.seed``, which
    also seeds the data order."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc),
            os.path.join(REPO, "pretrain_psft.py"), "--config-path", HERE, "--config-name", "train_base",
            f"trainer.devices={cfg.nproc}", f"trainer.max_steps={cfg.steps}",
            f"exp_manager.explicit_log_dir={os.path.abspath(run_dir)}",
            f"exp_manager.checkpoint_callback_params.every_n_train_steps={cfg.save_every}",
            "exp_manager.checkpoint_callback_params.save_top_k=1000",
            f"model.tensor_model_parallel_size={cfg.nproc}",
            f"model.restore_from_path={os.path.abspath(ckpt)}",
            f"model.data.train_ds.file_names=[{os.path.abspath(train_file)}]",
            f"model.data.train_ds.max_seq_length={cfg.max_seq_length}",
            f"model.global_batch_size={cfg.global_batch}", f"model.micro_batch_size={cfg.micro_batch}",
            f"model.seed={cfg.seed if seed is None else seed}", f"model.optim.lr={cfg.lr}",
            f"model.optim.sched.warmup_steps={cfg.warmup_steps}"] + METHODS[method]


_STEP = re.compile(r"\[train\] step (\d+)/(\d+)")


def run_training(cmd: List[str], log_path: str, on_step: Optional[Callable[[int, int], None]] = None) -> None:
    """Run ``cmd`` (niced), its output into ``log_path``; ``on_step(step, total)`` per progress line."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(["nice", "-n", "10"] + cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            m = _STEP.search(line)
            if m and on_step:
                on_step(int(m.group(1)), int(m.group(2)))
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"training failed (exit {rc}); log: {log_path}")


def checkpoint_steps(ckpt_root: str) -> List[int]:
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(int(m.group(1)) for m in (re.match(r"^iter_(\d{7,})$", d) for d in os.listdir(ckpt_root)) if m)


def export_checkpoints(pairs: List[tuple], log_path: str, python: Optional[str] = None) -> List[str]:
    """Export several ``(megatron checkpoint, HF out_dir)`` pairs in one process (the imports are paid
    once); each is written to ``out_dir.tmp`` and renamed."""
    if not pairs:
        return []
    for _, out_dir in pairs:
        shutil.rmtree(out_dir + ".tmp", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [a for c, o in pairs for a in (c, o + ".tmp")]
    with open(log_path, "a", encoding="utf-8") as log:
        subprocess.run(["nice", "-n", "10", python or sys.executable, "-m", "experiments.psft_study.runs", "export",
                        *args], cwd=REPO, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    for _, out_dir in pairs:
        os.replace(out_dir + ".tmp", out_dir)
    return [o for _, o in pairs]


def _export_main(args: List[str]) -> int:
    """``python -m experiments.psft_study.runs export CKPT OUT [CKPT OUT ...]``."""
    from psft_megatron.convert import convert_megatron_to_hf
    for ckpt, out in zip(args[0::2], args[1::2]):
        t = time.time()
        convert_megatron_to_hf(ckpt, out)
        print(f"exported {ckpt} -> {out} in {time.time() - t:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "export" or len(sys.argv) % 2:
        sys.exit("usage: python -m experiments.psft_study.runs export CKPT OUT [CKPT OUT ...]")
    sys.exit(_export_main(sys.argv[2:]))
