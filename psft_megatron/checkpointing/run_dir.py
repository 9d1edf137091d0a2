"""The run directory: one run's logs, metrics and checkpoints, never mixed with another run's.

The log dir (``exp_manager.explicit_log_dir``, else ``exp_dir/name``) holds ``run.json`` (the run
id), ``metrics.jsonl``, ``tensorboard/``, ``config_resolved.json`` and ``checkpoints/``. At
start-up, before the run writes anything (:func:`prepare_run_dir`, collective):

1. global rank 0 checks the paths: the log dir and its ``checkpoints/`` are directories, or can
   be created (not files, not under a file);
2. rank 0 looks at what the directory holds. A run is there when ``checkpoints/`` has a
   checkpoint (or ``latest``) or ``metrics.jsonl`` has a record:

   - ``exp_manager.resume_if_exists`` and a checkpoint: this start continues that run;
   - else ``exp_manager.overwrite``: the directory is moved aside, whole, to
     ``<dir>.old-<YYYYmmdd-HHMMSS>`` (never deleted), and a new run starts in a fresh one;
   - else the start stops in one line naming both keys;
3. every rank must read a file rank 0 wrote into ``checkpoints/``: a filesystem shared by every
   node (:func:`psft_megatron.distributed.decisions.require_shared_directory`).

Once a start is known to train (:func:`check_writable`), one process per node writes a probe
file into the log dir and ``checkpoints/``, so a directory some node cannot write to stops the
start in one line instead of failing at the first save, after the steps were computed.

A new run gets a fresh run id in ``run.json``; every checkpoint records it in its common state
(resume, fallback and rotation never take another run's checkpoint:
:mod:`psft_megatron.checkpointing.manager`).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Optional

from psft_megatron.errors import ConfigError

RUN_RECORD = "run.json"
METRICS = "metrics.jsonl"


@dataclass
class RunDir:
    """Rank 0's decision about the run directory (the same on every rank).

    Attributes:
        path: the log dir, absolute.
        key: the config key that names it (for messages).
        run_id: the run's id; None when a resumed directory has no readable ``run.json``
            (written before run ids): it is then taken from the checkpoint resumed.
        resume: it holds a run with checkpoints, and ``resume_if_exists`` asks to continue it.
        moved_to: where ``exp_manager.overwrite`` moved the previous run, if it did.
    """

    path: str
    key: str
    run_id: Optional[str]
    resume: bool
    moved_to: Optional[str] = None

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.path, "checkpoints")

    def settle_run_id(self, resumed_common: Optional[Dict[str, Any]]) -> str:
        """The run id this start goes on with (every rank): ``run.json``'s, else the resumed
        checkpoint's, else a new one; rank 0 writes ``run.json`` when it lacked one. Call once
        the start is known to train."""
        import torch.distributed as dist

        if self.run_id is None:
            recorded = (resumed_common or {}).get("run_id")
            self.run_id = recorded or _new_run_id()  # every rank: from the broadcast decision
            if recorded is None:  # a new id must be the same on every rank
                from psft_megatron.distributed.decisions import rank0_decides

                self.run_id = rank0_decides(lambda: self.run_id)
            if not dist.is_initialized() or dist.get_rank() == 0:
                _write_run_record(self.path, self.run_id)
        return self.run_id


def log_dir_key(exp_manager) -> str:
    """The config key naming the log dir."""
    return "exp_manager.explicit_log_dir" if exp_manager.explicit_log_dir else "exp_manager.exp_dir/name"


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:12]


def _write_run_record(path: str, run_id: str) -> None:
    record = os.path.join(path, RUN_RECORD)
    tmp = record + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        f.write("\n")
    os.replace(tmp, record)


def _read_run_id(path: str) -> Optional[str]:
    try:
        with open(os.path.join(path, RUN_RECORD), encoding="utf-8") as f:
            run_id = json.load(f).get("run_id")
        return run_id if isinstance(run_id, str) and run_id else None
    except (OSError, ValueError, AttributeError):
        return None


def _path_problem(path: str, key: str) -> Optional[str]:
    """Why ``path`` cannot be (or become) a directory, or None."""
    if os.path.exists(path):
        return None if os.path.isdir(path) else f"{key}: {path} is a file, not a directory"
    ancestor = os.path.dirname(path)
    while ancestor and not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if ancestor and not os.path.isdir(ancestor):
        return f"{key}: {path} cannot be created: {ancestor} is a file, not a directory"
    return None


def _held_run(path: str) -> Optional[Dict[str, Any]]:
    """What of a run ``path`` holds: {"checkpoints": [names], "latest": bool, "records": N}; None
    when nothing (an empty directory, or only files of a start that stopped before step 1)."""
    ckpt_dir = os.path.join(path, "checkpoints")
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("iter_")) if os.path.isdir(ckpt_dir) else []
    latest = os.path.isfile(os.path.join(ckpt_dir, "latest"))
    records = 0
    metrics = os.path.join(path, METRICS)
    if os.path.isfile(metrics):
        with open(metrics, "rb") as f:
            records = sum(1 for line in f if line.strip())
    if not (names or latest or records):
        return None
    return {"checkpoints": names, "latest": latest, "records": records}


def _describe(held: Dict[str, Any]) -> str:
    parts = []
    names = held["checkpoints"]
    if names:
        parts.append(f"checkpoints {names[0]}" + (f" .. {names[-1]}" if len(names) > 1 else ""))
    elif held["latest"]:
        parts.append("checkpoints/latest")
    if held["records"]:
        parts.append(f"{METRICS} with {held['records']} record(s)")
    return ", ".join(parts)


def _move_aside(path: str) -> str:
    """Rename ``path`` to ``<path>.old-<time>`` (a free name); returns the new path."""
    base = f"{path}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = base, 1
    while os.path.exists(target):
        n += 1
        target = f"{base}-{n}"
    os.rename(path, target)
    return target


def _decide(exp_manager, log_dir: str) -> RunDir:
    """Rank 0: the decision of :func:`prepare_run_dir` (ConfigError for what stops the start)."""
    key = log_dir_key(exp_manager)
    path = os.path.abspath(log_dir)
    problem = _path_problem(path, key) or _path_problem(os.path.join(path, "checkpoints"), key + " (its checkpoints/)")
    if problem:
        raise ConfigError(problem)
    try:
        held = _held_run(path) if os.path.isdir(path) else None
        resumable = bool(held and (held["checkpoints"] or held["latest"]))
        if held and resumable and exp_manager.resume_if_exists:
            return RunDir(path, key, _read_run_id(path), resume=True)
        moved = None
        if held:
            if not exp_manager.overwrite:
                what = _describe(held)
                if exp_manager.resume_if_exists:
                    raise ConfigError(f"{key}: {path} holds a run with no checkpoint to resume from ({what}); set "
                                      f"exp_manager.overwrite=true to move it aside to {path}.old-<time> and start a "
                                      "new run, or choose another directory")
                raise ConfigError(f"{key}: {path} holds another run ({what}); set exp_manager.resume_if_exists=true "
                                  f"to continue it, or exp_manager.overwrite=true to move it aside to "
                                  f"{path}.old-<time> and start a new run, or choose another directory")
            moved = _move_aside(path)
        os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)
        run_id = _new_run_id()
        _write_run_record(path, run_id)
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: cannot be prepared ({type(exc).__name__}: {exc.strerror or exc})") from None
    return RunDir(path, key, run_id, resume=False, moved_to=moved)


def prepare_run_dir(exp_manager, log_dir: str) -> RunDir:
    """Steps 1-3 of the module docstring; collective. Returns rank 0's decision on every rank;
    raises ConfigError (one line) on every rank for a directory that stops the start."""
    from psft_megatron.distributed.decisions import rank0_decides, require_shared_directory

    decision = rank0_decides(lambda: _decide(exp_manager, log_dir))
    if decision.moved_to and _is_rank0():
        print(f"exp_manager.overwrite: moved the previous run in {decision.path} to {decision.moved_to}", flush=True)
    # each rank's own path: the one its files go to (on a cluster, the same string as rank 0's)
    require_shared_directory(os.path.join(os.path.abspath(log_dir), "checkpoints"), decision.key,
                             "checkpointing (rank 0 decides where to resume from; every rank writes and reads the "
                             "checkpoint files)")
    return decision


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _probe(directory: str) -> Optional[str]:
    """Write, fsync and remove a small file in ``directory``; why not, or None."""
    probe = os.path.join(directory, f".write_probe_{socket.gethostname()}_{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def check_writable(run_dir: RunDir) -> None:
    """One process per node (local rank 0) writes a probe into the log dir and ``checkpoints/``;
    ConfigError on every rank, naming the directory and the node, if one cannot. Collective."""
    from psft_megatron.distributed.decisions import rank0_decides, rank0_gathers

    finding = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for directory in (run_dir.path, run_dir.checkpoints):
            why = _probe(directory)
            if why:
                finding = f"{run_dir.key}: {directory} is not writable on {socket.gethostname()} ({why})"
                break
    findings = rank0_gathers(finding)

    def decide() -> None:
        first = next((f for f in findings if f), None)
        if first:
            raise ConfigError(first)

    rank0_decides(decide)
