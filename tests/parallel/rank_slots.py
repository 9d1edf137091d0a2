"""Machine-wide rank slots for multi-process test launches.

`make test` runs two lanes side by side, and each launches torchrun / mp.spawn jobs of 2 or 4
gloo ranks. Two such jobs at once put 6-8 ranks on a 2-core machine; gloo collectives then wait
on the scheduler for every rank of the group, and a job takes 4-10x its time alone (measured:
the 4-rank parity suite 101 s alone, 488 s next to another 4-rank job). So every launch first
takes one slot per rank from a pool shared by all test processes on the machine (file locks,
released by the kernel if a test process dies):

    with rank_slots(4):
        subprocess.run([... torchrun --nproc_per_node=4 ...])

Pool size: ``PSFT_TEST_RANK_SLOTS``, default 2 x CPU count (a 4-rank job runs alone on 2 cores,
two 2-rank jobs share them); ``0`` turns the pool off. A launch that wants more ranks than the
pool holds takes the whole pool. Waiting launches queue on a gate lock, so a large launch is not
starved by a stream of small ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from typing import Iterator, List

POLL_SECONDS = 0.2
_held_here = [0]  # slots this process holds: a launch inside a launch does not wait for itself


def pool_size() -> int:
    value = os.environ.get("PSFT_TEST_RANK_SLOTS")
    return int(value) if value not in (None, "") else 2 * (os.cpu_count() or 1)


def _lock_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), f"psft-megatron-rank-slots-{os.getuid()}")
    os.makedirs(path, exist_ok=True)
    return path


def _try_lock(path: str):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def rank_slots(ranks: int) -> Iterator[None]:
    """Hold ``ranks`` slots of the machine-wide pool (at most the pool) while the block runs."""
    size = pool_size()
    if size <= 0 or _held_here[0]:
        yield
        return
    wanted = max(1, min(ranks, size))
    directory = _lock_dir()
    held: List[int] = []
    gate = os.open(os.path.join(directory, "gate"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)  # one collector at a time; the others queue here
        try:
            while True:
                for slot in range(size):
                    if len(held) == wanted:
                        break
                    fd = _try_lock(os.path.join(directory, f"slot{slot}"))
                    if fd is not None:
                        held.append(fd)
                if len(held) == wanted:
                    break
                time.sleep(POLL_SECONDS)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        _held_here[0] = len(held)
        yield
    finally:
        _held_here[0] = 0
        os.close(gate)
        for fd in held:
            os.close(fd)  # closing the descriptor releases its flock
