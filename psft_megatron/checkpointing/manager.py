"""Atomic, rotated training checkpoints under ``<log dir>/checkpoints``.

Layout::

    checkpoints/
      iter_0000100/      a megatron distributed checkpoint (torch_dist), complete
      iter_0000200/
      latest             text: the directory name of the newest complete checkpoint

A save writes into ``.tmp_iter_N``, fsyncs it, renames it to ``iter_N`` and only then
replaces ``latest`` (write + fsync + rename); checkpoints beyond the newest ``keep_last``
are removed after that. A process killed mid-save leaves the previous checkpoint as
``latest`` and loadable. Before any rank writes, every rank checks that the directory is
writable, so an unwritable directory is one clear error on all ranks, not a hang.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import List, Optional, Tuple

import torch

from psft_megatron.errors import CheckpointError

_ITER = re.compile(r"^iter_(\d{7,})$")


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_ok(ok: bool) -> bool:
    from psft_megatron.distributed.runtime import all_reduce_values

    return all_reduce_values([not ok], op="max")[0] == 0.0


class CheckpointManager:
    """Saves and finds checkpoints of one run (collective calls: every rank calls them)."""

    def __init__(self, root: str, keep_last: int = 2):
        self.root = root
        self.keep_last = max(1, keep_last)

    # ------------------------------------------------------------------ reading
    def latest(self) -> Optional[str]:
        """Path of the newest complete checkpoint, or None."""
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

    def resume_point(self, fallback: bool = True) -> Tuple[Optional[str], Optional[str]]:
        """The checkpoint to resume from and, when it is not the one ``latest`` names, why.

        The checkpoint ``latest`` names is checked for damage (missing or truncated files,
        :func:`psft_megatron.checkpointing.dist_checkpoint.damaged`); so is ``latest`` itself. With
        ``fallback``, a damaged one is passed over for the newest intact older checkpoint;
        without it, a damaged one is a CheckpointError naming the file. Every rank reaches the
        same answer (it reads the same files). Returns (None, None) when there is nothing to
        resume from.
        """
        from psft_megatron.checkpointing.dist_checkpoint import damaged

        try:
            latest = self.latest()
            problem = damaged(latest) if latest else None
        except CheckpointError as exc:
            latest, problem = None, str(exc)
        if problem is None:
            return latest, None
        if not fallback:
            raise CheckpointError(f"{problem}; set exp_manager.resume_fallback=true to resume from the newest intact "
                                  "checkpoint, or exp_manager.resume_if_exists=false to start over")
        for older in reversed(self.checkpoints()):
            if older != latest and damaged(older) is None:
                return older, f"{problem}: resuming from the newest intact checkpoint, {older}"
        raise CheckpointError(f"{problem}; no older intact checkpoint in {self.root}")

    def checkpoints(self) -> List[str]:
        """Complete checkpoints, oldest first."""
        if not os.path.isdir(self.root):
            return []
        names = sorted((n for n in os.listdir(self.root) if _ITER.match(n)), key=lambda n: int(n[5:]))
        return [os.path.join(self.root, n) for n in names]

    # ------------------------------------------------------------------ writing
    def _check_writable(self, tmp: str) -> None:
        error = ""
        if torch.distributed.get_rank() == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
                if os.path.exists(tmp):
                    shutil.rmtree(tmp)
                os.makedirs(tmp)
                probe = os.path.join(tmp, ".write_probe")
                with open(probe, "wb") as f:
                    f.write(b"0" * 4096)
                    f.flush()
                    os.fsync(f.fileno())
                os.remove(probe)
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
        if not _all_ok(not error):
            holder = [error]
            torch.distributed.broadcast_object_list(holder, src=0)
            raise CheckpointError(f"checkpoint directory {self.root} is not writable ({holder[0]}); "
                                  f"the previous checkpoint {self._latest_or_none()} is intact")

    def _latest_or_none(self) -> str:
        try:
            return self.latest() or "(none)"
        except CheckpointError:
            return "(none)"

    def save(self, step: int, write) -> str:
        """Write checkpoint ``step`` atomically; ``write(tmp_dir)`` does the collective save.

        Returns the final path. Raises CheckpointError naming the directory if it is not
        writable or the write fails; the previous checkpoint stays ``latest``.
        """
        name = f"iter_{step:07d}"
        tmp, final = os.path.join(self.root, ".tmp_" + name), os.path.join(self.root, name)
        self._check_writable(tmp)
        torch.distributed.barrier()
        error = ""
        try:
            write(tmp)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if not _all_ok(not error):
            if torch.distributed.get_rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"writing checkpoint {final} failed ({error or 'on another rank'}); "
                                  f"the previous checkpoint {self._latest_or_none()} is intact")
        if torch.distributed.get_rank() == 0:
            _fsync_tree(tmp)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            pointer_tmp = os.path.join(self.root, ".latest.tmp")
            with open(pointer_tmp, "w", encoding="utf-8") as f:
                f.write(name + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(pointer_tmp, os.path.join(self.root, "latest"))
            _fsync_dir(self.root)
            for old in self.checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()
        return final
