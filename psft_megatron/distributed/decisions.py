"""Decisions from the filesystem, made once and shared: rank 0 reads, every rank agrees.

On a cluster, ranks reading the same files can see different things (NFS attribute caches, a
file written a moment ago, node-local disks). A collective step decided from each rank's own
read is then a hang or a divergence. The rule here: global rank 0 reads the filesystem and
decides; the decision (any picklable value) or the :class:`~psft_megatron.errors.UserError` it
raised reaches every rank by one broadcast.

- :func:`rank0_decides`: run a decision on rank 0, return it on every rank.
- :func:`rank0_gathers`: every rank's finding (a few bytes each) on rank 0 only, for rank 0
  to decide from (one gather: no rank receives the whole world's values).
- :func:`ranks_seeing`: which ranks see a file that rank 0 has just written into a directory
  (a shared filesystem check).
- :func:`require_shared_directory`: stop on every rank, in one line, when some rank does not.

Outside torch.distributed (or in a world of one) each function is its plain local version.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Callable, List, Optional, TypeVar

from psft_megatron.errors import ConfigError, UserError

T = TypeVar("T")


def _world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _broadcast_outcome(dist, outcome):
    """``outcome`` (rank 0's ``(error, value)``) on every rank: one object broadcast."""
    holder = [outcome]
    dist.broadcast_object_list(holder, src=0)  # on the backend's device (torch picks it)
    return holder[0]


def rank0_decides(fn: Callable[[], T], share_value: bool = True) -> Optional[T]:
    """Run ``fn()`` on global rank 0 while the other ranks wait; return its value on every rank.

    A :class:`UserError` raised by ``fn`` on rank 0 is raised on every rank (same class, same
    message), so no rank is left waiting. ``share_value=False``: the other ranks return None
    (``fn`` runs for its effect, e.g. building a cache, or its value is not picklable).
    """
    dist = _world()
    if dist is None:
        return fn()
    error, value = None, None
    if dist.get_rank() == 0:
        try:
            value = fn()
        except UserError as exc:
            error = exc
        outcome = ((type(error), str(error)) if error is not None else None, value if share_value else None)
    else:
        outcome = None
    failure, shared = _broadcast_outcome(dist, outcome)
    if failure is not None:
        if error is not None:
            raise error
        cls, message = failure
        raise cls(message)
    return value if dist.get_rank() == 0 else shared


def rank0_gathers(value: T) -> Optional[List[T]]:
    """Every global rank's ``value`` (picklable), in rank order, on global rank 0; None on the
    other ranks. One gather: rank 0 receives world_size values, the others send one."""
    dist = _world()
    if dist is None:
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def ranks_seeing(directory: str) -> List[bool]:
    """For every global rank: does it see the file that rank 0 writes into ``directory``?

    Rank 0 creates ``directory`` if needed and writes a file with a fresh nonce; after a
    barrier every rank reads it back; rank 0 removes it. One gather to rank 0 and one broadcast
    of the answers (no all-gather: O(world) traffic). A rank on another
    node's local disk sees no such file (or another nonce): False.
    """
    dist = _world()
    if dist is None:
        return [True]
    name = os.path.join(directory, ".psft_shared_fs_check")
    nonce = None
    if dist.get_rank() == 0:
        nonce = uuid.uuid4().hex
        os.makedirs(directory, exist_ok=True)
        with open(name, "w") as f:
            f.write(nonce)
    nonce = _broadcast_outcome(dist, nonce)
    try:
        with open(name) as f:
            seen = f.read() == nonce
    except OSError:
        seen = False
    seen_by = _broadcast_outcome(dist, rank0_gathers((seen, socket.gethostname())))  # O(world), not O(world^2)
    if dist.get_rank() == 0:
        try:
            os.remove(name)
        except OSError:
            pass
    ranks_seeing.hosts = [host for _, host in seen_by]
    return [bool(s) for s, _ in seen_by]


def require_shared_directory(directory: str, key: str, purpose: str) -> None:
    """Raise :class:`ConfigError` on every rank unless every rank sees ``directory`` as rank 0
    does. ``key`` is the config key that set it; ``purpose`` says what needs it shared."""
    seen = ranks_seeing(directory)
    missing = [r for r, ok in enumerate(seen) if not ok]
    if missing:
        hosts = sorted({ranks_seeing.hosts[r] for r in missing})
        raise ConfigError(f"{key}: {directory} is not one shared directory: rank(s) {_ranges(missing)} on "
                          f"{', '.join(hosts)} cannot read a file rank 0 wrote there; {purpose} needs a filesystem "
                          "shared by every node (docs/long_jobs.md, Multi-node requirements)")


def _ranges(ranks: List[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)
