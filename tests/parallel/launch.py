"""Launch a worker script under torchrun (or functions under torch.multiprocessing) from a test.

Every launch of the CPU lane runs with no GPU visible (``CUDA_VISIBLE_DEVICES=""``): on a GPU
machine its ranks would otherwise pick NCCL and one GPU per local rank (more ranks than GPUs
fail, and the parity tests are gloo layouts). Only tests/gpu asks for the GPUs (``gpu=True``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile

from tests.parallel.rank_slots import rank_slots

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def hang_guard(seconds: float) -> float:
    """A subprocess timeout: ``seconds`` (several times the job's time on a quiet 2-core machine)
    times ``PSFT_TEST_TIMEOUT_SCALE`` (default 3). It catches a hung job; it is not a speed
    check, and a slow or shared CI machine must not trip it."""
    return seconds * float(os.environ.get("PSFT_TEST_TIMEOUT_SCALE", "3"))


def worker_env(gpu: bool = False, **extra) -> dict:
    """The environment of a test's subprocess: one intra-op thread, no warnings, the repo
    importable, no rank-slot waits inside it (the launching test holds the slots) and, unless
    ``gpu``, no GPU visible (a CPU-lane run on a GPU machine)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=REPO, PSFT_TEST_RANK_SLOTS="0")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


@contextlib.contextmanager
def no_visible_gpus():
    """``CUDA_VISIBLE_DEVICES=""`` in this process's environment while the block runs: the
    processes started in it (torch.multiprocessing, subprocess without ``env``) see no GPU."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def cpu_spawn(fn, args, nprocs: int) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` on the CPU lane: ``nprocs`` rank slots
    held, no GPU visible to the processes."""
    import torch.multiprocessing as mp

    with rank_slots(nprocs), no_visible_gpus():
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)


def torchrun(script: str, nproc: int, args, timeout: int = 600, env: dict = None, python: str = None,
             gpu: bool = False) -> dict:
    """Run ``script`` on ``nproc`` processes (gloo on the CPU lane; ``gpu``: the machine's GPUs
    visible, NCCL, tests/gpu only); the script writes JSON to ``--out``. ``env``: extra
    environment variables. ``python``: another interpreter (another environment: the
    cross-release checkpoint test); default this one.

    The launch holds ``nproc`` machine-wide rank slots (tests/parallel/rank_slots.py) and runs
    under ``hang_guard(timeout)``. Raises AssertionError with the tail of the log if it fails.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(REPO, script), *args, "--out", out]
        with rank_slots(nproc):
            returncode, log = run_job(cmd, hang_guard(timeout), env=worker_env(gpu, **(env or {})))
        if returncode != 0 or not os.path.exists(out):
            raise AssertionError(f"{' '.join(cmd)} failed (exit {returncode}):\n{log[-6000:]}")
        with open(out) as f:
            result = json.load(f)
        result["log"] = log
        return result


_LAUNCHED = {}


def torchrun_once(script: str, nproc: int, args=(), **kwargs) -> dict:
    """:func:`torchrun` run once per test session for the tests that share its results: a failed
    launch fails every test that reads it, without a relaunch per test."""
    key = (script, nproc, tuple(args))
    if key not in _LAUNCHED:
        try:
            _LAUNCHED[key] = torchrun(script, nproc, list(args), **kwargs)
        except AssertionError as exc:
            _LAUNCHED[key] = exc
    if isinstance(_LAUNCHED[key], AssertionError):
        raise _LAUNCHED[key]
    return _LAUNCHED[key]


def run_job(cmd, timeout: float, env: dict = None, cwd: str = REPO):
    """Run ``cmd`` in its own session, its output (stdout and stderr) to a file; returns
    ``(returncode, log)``, returncode None if it ran past ``timeout`` seconds.

    When ``cmd`` ends (or times out), everything left in its session is killed. A rank that
    dies without running its finalizers (``os._exit``, torchrun's SIGTERM to the other ranks)
    leaves its children behind - megatron's checkpoint writer keeps a multiprocessing manager
    process - and those would hold a captured pipe open, so that a failed launch waited for the
    hang guard, and would hold rank slots for the jobs after it."""
    with tempfile.TemporaryFile("w+") as log_file:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.seek(0)
        log = log_file.read()
    if returncode is None:
        log += f"\n[hang guard] killed after {timeout:.0f} s"
    return returncode, log


def finish_worker() -> None:
    """End a worker cleanly: all ranks meet, then megatron's groups and the process group are
    destroyed (exiting with live gloo threads can abort a rank after its results are written)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        from psft_megatron.distributed.runtime import shutdown

        shutdown()


def train_tiny(overrides, log_dir: str, cls=None):
    """Train ``configs/tiny_cpu.yaml`` with ``overrides`` into ``log_dir`` (inside a worker);
    ``cls``: a Trainer subclass (default Trainer). Returns the trainer, closed."""
    from psft_megatron.config import load_run_config
    from psft_megatron.training.trainer import Trainer

    cfg, resolved = load_run_config(os.path.join(REPO, "configs"), "tiny_cpu",
                                    list(overrides) + [f"exp_manager.explicit_log_dir={log_dir}"])
    trainer = (cls or Trainer)(cfg, resolved)
    trainer.setup()
    trainer.train()
    trainer.close()
    return trainer
