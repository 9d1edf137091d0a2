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
