"""Atomic, rotated training checkpoints of one run under ``<log dir>/checkpoints``.

Layout::

    checkpoints/
      iter_0000100/      a megatron distributed checkpoint (torch_dist), complete, with checksums.json
      iter_0000200/
      latest             text: the directory name of the newest complete checkpoint

A save writes into ``.tmp_iter_N`` (every file hashed and fsynced by the rank that wrote it,
``checksums.json`` last), renames it to ``iter_N`` and only then replaces ``latest`` (write +
fsync + rename). A process killed mid-save leaves the previous checkpoint as ``latest`` and
loadable. A failure on any rank during a save ends the save on every rank within seconds
(:mod:`psft_megatron.checkpointing.save_guard`). Checkpoints beyond the newest ``keep_last``
are renamed away (instant) and deleted by a thread of rank 0 while training goes on; only
checkpoints of this run (the run id in their common state) older than the new one are
rotated.

Every decision that reads the filesystem (where to resume from, whether a checkpoint is
intact) is made by global rank 0 and broadcast
(:func:`psft_megatron.distributed.decisions.rank0_decides`); what was found is kept, so each
checkpoint is read once per start.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from typing import List, Optional, Tuple

import torch

from psft_megatron.errors import CheckpointError

_ITER = re.compile(r"^iter_(\d{7,})$")
#: prefix of directories being deleted (rotated, replaced, or left by a killed save)
_TRASH = ".trash_"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _run_id_of(path: str) -> Optional[str]:
    """The run id in a checkpoint's common state; None when it has none (written before run
    ids) or cannot be read."""
    try:
        common = torch.load(os.path.join(path, "common.pt"), map_location="cpu", weights_only=False)
        return common.get("run_id") if isinstance(common, dict) else None
    except Exception:  # noqa: BLE001 - unreadable: not provably this run's, so never rotated away
        return None


def same_run(checkpoint_run_id: Optional[str], run_id: Optional[str]) -> bool:
    """Whether a checkpoint belongs to the run ``run_id``: a checkpoint written before run ids
    existed (None) cannot be told apart and counts as the run's, as does any checkpoint when the
    run's id is unknown."""
    return checkpoint_run_id is None or run_id is None or checkpoint_run_id == run_id


def _trash_name(path: str) -> str:
    return os.path.join(os.path.dirname(path), f"{_TRASH}{os.path.basename(path)}_{uuid.uuid4().hex[:8]}")


def _publish(tmp: str, final: str, pointer_name: str) -> None:
    """Rename the complete ``tmp`` to ``final`` and point ``latest`` at it (rank 0). A
    checkpoint already at ``final`` (a damaged one passed over at resume) goes to the trash."""
    root = os.path.dirname(final)
    _fsync_dir(tmp)
    if os.path.exists(final):
        os.rename(final, _trash_name(final))
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer_tmp = os.path.join(root, ".latest.tmp")
    with open(pointer_tmp, "w", encoding="utf-8") as f:
        f.write(pointer_name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(root, "latest"))
    _fsync_dir(root)


def _no_fallback(problem: str) -> str:
    return (f"{problem}; set exp_manager.resume_fallback=true to resume from the newest intact checkpoint, or "
            "exp_manager.overwrite=true with exp_manager.resume_if_exists=false to move the run aside and start over")


class CheckpointManager:
    """Saves and finds checkpoints of one run (collective calls: every rank calls them).

    Args:
        root: the run's ``checkpoints/`` directory.
        keep_last: checkpoints kept by rotation (at least 1).
        run_id: the run's id (recorded in each checkpoint's common state by the trainer);
            resume, fallback and rotation only take this run's checkpoints.
    """

    def __init__(self, root: str, keep_last: int = 2, run_id: Optional[str] = None):
        self.root = root
        self.keep_last = max(1, keep_last)
        self.run_id = run_id
        self.latest_path: Optional[str] = None  # the newest checkpoint of this run, known on every rank
        self.saved_step: Optional[int] = None  # the step this process last saved
        self._deleter: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ reading (rank 0)
    def latest(self) -> Optional[str]:
        """Path of the checkpoint the ``latest`` file names, or None (reads the file: rank 0)."""
        pointer = os.path.join(self.root, "latest")
        if not os.path.isfile(pointer):
            return None
        try:
            with open(pointer, encoding="utf-8") as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{pointer}: unreadable ({type(exc).__name__}); it should hold the name of the newest "
                                  "checkpoint, e.g. iter_0000100") from None
        path = os.path.join(self.root, name)
        if not _ITER.match(name) or not os.path.isdir(path):
            raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory in {self.root}")
        return path

    def checkpoints(self) -> List[str]:
        """Complete checkpoints, oldest first (lists the directory: rank 0)."""
        if not os.path.isdir(self.root):
            return []
        names = sorted((n for n in os.listdir(self.root) if _ITER.match(n)), key=lambda n: int(n[5:]))
        return [os.path.join(self.root, n) for n in names]

    def _candidates(self) -> Tuple[Optional[str], List[str]]:
        """(why ``latest`` cannot be used, or None; the checkpoints to try, best first): the one
        ``latest`` names, then the others newest first."""
        try:
            latest, problem = self.latest(), None
        except CheckpointError as exc:
            latest, problem = None, str(exc)
        try:
            others = [path for path in reversed(self.checkpoints()) if path != latest]
        except OSError as exc:  # rank 0 must answer, or the other ranks wait forever
            raise CheckpointError(f"{self.root}: cannot be listed ({type(exc).__name__}: {exc})") from None
        return problem, ([latest] if latest else []) + others

    def resume_point(self, fallback: bool = True):
        """The checkpoint to resume from, as the
        :class:`~psft_megatron.checkpointing.dist_checkpoint.CheckpointInfo` of its check (common
        state included), and, when it is not the one ``latest`` names, why. (None, None) when
        there is nothing to resume from. Collective.

        ``latest`` and the checkpoint it names are checked (sizes, checksums, common state,
        :func:`~psft_megatron.checkpointing.dist_checkpoint.inspect_checkpoint`), and so is the
        run id: a checkpoint of another run is never resumed. With ``fallback``, a damaged one
        is passed over for the newest intact older checkpoint of the same run; without it, it
        is a CheckpointError naming the file. Rank 0 reads, every rank gets its answer.
        """
        from psft_megatron.checkpointing.dist_checkpoint import inspect_checkpoint
        from psft_megatron.distributed.decisions import rank0_decides

        first_problem, candidates = rank0_decides(self._candidates)
        if first_problem and not fallback:
            raise CheckpointError(_no_fallback(first_problem))
        for path in candidates:
            info = inspect_checkpoint(path)
            problem = info.problem
            if problem is None and not same_run(info.common.get("run_id"), self.run_id):
                problem = (f"{path}: written by another run (run id {info.common.get('run_id')}; this directory's "
                           f"run is {self.run_id})")
            if problem is None:
                why = f"{first_problem}: resuming from the newest intact checkpoint, {path}" if first_problem else None
                self.latest_path = path
                return info, why
            if not fallback:
                raise CheckpointError(_no_fallback(problem))
            first_problem = first_problem or problem
        if first_problem is None:
            return None, None
        raise CheckpointError(f"{first_problem}; no older intact checkpoint of this run in {self.root}")

    # ------------------------------------------------------------------ writing
    def _prepare(self, tmp: str) -> None:
        """Rank 0: the directory exists and takes a write; stale temporary directories go to
        the trash."""
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):
            if name.startswith(".tmp_iter_"):  # a save killed midway (this one's name included)
                os.rename(os.path.join(self.root, name), _trash_name(os.path.join(self.root, name)))
        os.makedirs(tmp)
        probe = os.path.join(tmp, ".write_probe")
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)

    def save(self, step: int, write) -> str:
        """Write checkpoint ``step`` atomically; ``write(tmp_dir)`` does the collective save.

        Returns the final path. A step already saved by this process is not written again (its
        path is returned). Raises CheckpointError naming the directory if it is not writable or
        the write fails on any rank; the previous checkpoint stays ``latest``.
        """
        from psft_megatron.checkpointing.save_guard import SaveGuard

        if self.saved_step == step and self.latest_path:
            return self.latest_path
        name = f"iter_{step:07d}"
        tmp, final = os.path.join(self.root, ".tmp_" + name), os.path.join(self.root, name)
        rank0 = torch.distributed.get_rank() == 0
        previous = self.latest_path or "(none)"
        with SaveGuard(lambda failure: f"writing checkpoint {final} failed ({failure}); the previous checkpoint "
                                       f"{previous} is intact") as guard:
            if rank0:
                guard.run(self._prepare, tmp)
            failure = guard.agree()
            if failure:
                raise CheckpointError(f"checkpoint directory {self.root} is not writable ({failure.split(': ', 1)[1]}); "
                                      f"the previous checkpoint {previous} is intact")
            guard.run(write, tmp)
            failure = guard.agree()
            if not failure and rank0:
                guard.run(_publish, tmp, final, name)
            failure = failure or guard.agree()
            if failure:
                if rank0:
                    self._discard(tmp)
                raise CheckpointError(f"writing checkpoint {final} failed ({failure}); the previous checkpoint "
                                      f"{previous} is intact")
        self.latest_path, self.saved_step = final, step
        if rank0:
            self._rotate(step)
        return final

    def _rotate(self, step: int) -> None:
        """Rank 0, after a save: this run's checkpoints older than ``step`` beyond the newest
        ``keep_last`` go to the trash (a rename), and a thread deletes them."""
        try:
            older = [path for path in self.checkpoints()
                     if int(os.path.basename(path)[5:]) < step and same_run(_run_id_of(path), self.run_id)]
            for path in older[: max(0, len(older) - (self.keep_last - 1))]:
                os.rename(path, _trash_name(path))
        except OSError as exc:  # the new checkpoint is published; an old one stays
            print(f"WARNING: rotating checkpoints in {self.root}: {type(exc).__name__}: {exc}", flush=True)
        self._empty_trash()

    def _discard(self, tmp: str) -> None:
        """Rank 0: a failed save's temporary directory goes to the trash."""
        try:
            if os.path.exists(tmp):
                os.rename(tmp, _trash_name(tmp))
        except OSError:
            return
        self._empty_trash()

    def _empty_trash(self) -> None:
        """Delete every trash directory of ``root`` in a background thread (rank 0)."""
        if self._deleter is not None and self._deleter.is_alive():
            return  # it lists the trash again before it ends

        def trash() -> List[str]:
            return sorted(n for n in os.listdir(self.root) if n.startswith(_TRASH)) if os.path.isdir(self.root) else []

        def delete() -> None:
            done: List[str] = []
            while trash() and trash() != done:  # until empty, or nothing more can be deleted
                done = trash()
                for name in done:
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

        self._deleter = threading.Thread(target=delete, name="psft-checkpoint-rotation", daemon=True)
        self._deleter.start()

    def close(self) -> None:
        """Wait for the deletions of rotated checkpoints to finish (rank 0)."""
        if self._deleter is not None:
            self._deleter.join()
