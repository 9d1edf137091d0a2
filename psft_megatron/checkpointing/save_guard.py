"""A collective save that fails on one rank fails on every rank, within seconds.

A save is a chain of collectives (megatron's planning and metadata exchange, the writes, the
checksums). An exception on one rank inside it would leave the others waiting in their next
collective until the process group's timeout (30 minutes), with nothing said. Inside a
:class:`SaveGuard`:

- each step runs through :meth:`SaveGuard.run`: an exception is recorded, not raised, and the
  first one of the job is reported in the c10d store (the key-value store of the rendezvous,
  which every rank already talks to);
- :meth:`SaveGuard.agree` is the meeting point after each step. It goes through the store, not
  through a collective: a rank that failed must not enter a collective its peers (still inside
  megatron's save) would pair with a different one. Every rank that gets there learns of a
  reported failure at once and raises the same CheckpointError - one line from rank 0, exit
  status 2; without a failure it returns when every rank has arrived;
- a rank still inside a collective :data:`GRACE_S` seconds after a failure was reported is
  waiting for a rank that will never come: a watcher thread ends its process with exit status
  2, global rank 0 printing the one line first.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Optional

#: seconds a rank may still be inside the save after a failure was reported before the watcher
#: ends it (a rank that reaches :meth:`SaveGuard.agree` learns of it within POLL_S)
GRACE_S = 10.0
#: seconds between the watcher's looks at the store
POLL_S = 0.5


def _store():
    """The default process group's store in a world of more than one, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()  # the rendezvous store every rank shares


class SaveGuard:
    """See the module docstring. ``describe(message) -> str``: the one-line error for a failure
    (``message``: ``rank R: ExceptionType: text`` of the first failing rank)."""

    _saves = 0  # guarded sections of this process: a fresh store key each (saves are collective)

    def __init__(self, describe: Callable[[str], str]):
        self.describe = describe
        self.failure: Optional[str] = None  # this rank's first failure
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self._meetings = 0  # calls of agree()

    def __enter__(self) -> "SaveGuard":
        import torch.distributed as dist

        SaveGuard._saves += 1
        self.key = f"psft_save_failure_{SaveGuard._saves}"
        self.store = _store()
        self.rank = dist.get_rank() if self.store is not None else 0
        if self.store is not None:
            self._watcher = threading.Thread(target=self._watch, name="psft-save-guard", daemon=True)
            self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._closed = True
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()

    def run(self, fn: Callable, *args) -> None:
        """``fn(*args)`` on this rank; an exception is recorded and reported to every rank."""
        if self.failure is not None:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - any failure on one rank must reach the others
            text = (str(exc).splitlines() or [""])[0][:300]
            self.failure = f"rank {self.rank}: {type(exc).__name__}: {text}"
            if self.store is not None:
                if self.store.add(self.key + "_count", 1) == 1:  # the first report of the job wins
                    # with the meeting it comes before: a rank still at an earlier meeting must
                    # not take it for a failure of that step
                    self.store.set(self.key, f"{self._meetings + 1} {self.failure}")

    def agree(self) -> Optional[str]:
        """Every rank: the first failure reported by any rank, or None once every rank has
        arrived (through the store: see the module docstring)."""
        if self.store is None:
            return self.failure
        from datetime import timedelta

        import torch.distributed as dist

        self._meetings += 1
        arrived, everyone = f"{self.key}_arrived_{self._meetings}", f"{self.key}_all_{self._meetings}"
        if self.store.add(arrived, 1) == dist.get_world_size():
            self.store.set(everyone, "1")
        while self._reported() is None:
            try:
                self.store.wait([everyone], timedelta(seconds=POLL_S))
                break
            except RuntimeError:  # not everyone yet (DistStoreError on the timeout): look for a failure again
                continue
        # a failing rank reports before it arrives: once everyone has arrived, the report is final
        return self._reported()

    def _reported(self) -> Optional[str]:
        """The failure reported for a step up to this meeting, or None."""
        if not self.store.check([self.key]):
            return None
        meeting, message = self.store.get(self.key).decode().split(" ", 1)
        return message if int(meeting) <= self._meetings else None

    def _watch(self) -> None:
        first_seen = None
        while not self._stop.wait(POLL_S):
            try:
                if not self.store.check([self.key]):
                    continue
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                return
            first_seen = first_seen or time.monotonic()
            if time.monotonic() - first_seen < GRACE_S:
                continue
            with self._lock:
                if self._closed:
                    return
                if self.rank == 0:
                    from psft_megatron.errors import CheckpointError

                    line = CheckpointError(self.describe(self.store.get(self.key).decode().split(" ", 1)[1])).line()
                    print(line, file=sys.stderr, flush=True)
                os._exit(2)
