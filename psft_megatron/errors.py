"""Errors a user can fix: bad configs, data, checkpoints. Each is ONE line naming the key, the
file and line/row, or the path, and the fix where there is one.

``pretrain_psft.py`` catches :class:`UserError` on every rank, prints ``<kind> error: <message>``
once (global rank 0) and exits with status 2, without a traceback. Every error of this kind is
raised identically on all ranks (it depends on the config, the data or the files, not on the
rank), so all ranks stop at the same point and none is left waiting in a collective.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors reported as one line. ``kind`` prefixes the line."""

    kind = "error"

    def line(self) -> str:
        """The one line shown to the user: ``config error: model.optim.lr: must be > 0, got -1``."""
        return f"{self.kind} error: {self}"


class ConfigError(UserError, ValueError):
    """A bad run configuration; the message names the key."""

    kind = "config"


class DataErrorBase(UserError, ValueError):
    """Bad input data or data settings; the message names the file and line/row, or the key."""

    kind = "data"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path."""

    kind = "checkpoint"


def on_rank0_then_all(fn):
    """Run ``fn()`` on global rank 0 while the other ranks wait, then return on every rank.

    A :class:`UserError` raised by ``fn`` on rank 0 is raised on every rank (same class, same
    message), so no rank is left waiting at the barrier. Outside torch.distributed (or in a
    world of one) this is ``fn()``. The value ``fn`` returns is rank 0's only.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    error, value = None, None
    if dist.get_rank() == 0:
        try:
            value = fn()
        except UserError as exc:
            error = exc
    holder = [(type(error), str(error)) if error is not None else None]
    dist.broadcast_object_list(holder, src=0)  # on the backend's device (torch picks it)
    if holder[0] is not None:
        cls, message = holder[0]
        raise error if error is not None else cls(message)
    return value

