"""The converters' inputs and outputs on disk: what a path given on the command line is, and an
output directory that appears only when the conversion is complete.

- :func:`hf_model_dir`: ``--hf-dir`` must be a Hugging Face model directory (not missing, not
  a file, not a megatron checkpoint).
- :func:`checkpoint_to_export`: ``--ckpt`` is a megatron checkpoint, or a trainer's
  ``checkpoints/`` directory whose checkpoint :class:`~psft_megatron.checkpointing.manager.
  CheckpointManager` picks (the one ``latest`` names, or the newest intact older one when that
  is damaged); either way it is checked by :func:`~psft_megatron.checkpointing.dist_checkpoint.
  damaged` before anything is read.
- :func:`staged_output`: the conversion writes into a hidden directory beside ``--out``
  (``.<name>.partial-<pid>-<random>``) that is renamed to ``--out`` at the end and removed on
  any failure, so a failed run leaves nothing behind and a retry starts clean.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Callable, Iterator

from psft_megatron.convert.errors import ConversionError

#: what a megatron checkpoint directory has that a Hugging Face model directory has not
_MEGATRON_MARKERS = ("metadata.json", ".metadata", "model.yaml", "latest")


def existing_dir(path: str, option: str, what: str) -> str:
    """``path`` if it is a directory; else ConversionError naming ``option`` and what it should be."""
    if not os.path.exists(path):
        raise ConversionError(f"{option} {path}: no such directory (expected {what})")
    if not os.path.isdir(path):
        raise ConversionError(f"{option} {path}: a file, not a directory (expected {what})")
    return path


def hf_model_dir(path: str, option: str = "--hf-dir") -> str:
    """``path`` if it is a Hugging Face model directory (it has ``config.json``).

    Raises:
        ConversionError: missing, a file, a megatron checkpoint (with the export command), or a
            directory without ``config.json``.
    """
    existing_dir(path, option, "a Hugging Face model directory with config.json")
    names = set(os.listdir(path))
    if "config.json" not in names and names & set(_MEGATRON_MARKERS):
        raise ConversionError(f"{option} {path} is a megatron checkpoint, not a Hugging Face model directory; export "
                              f"it with: python tools/convert_megatron_to_hf.py --ckpt {path} --out <hf dir>")
    if "config.json" not in names:
        raise ConversionError(f"{option} {path}: no config.json (not a Hugging Face model directory)")
    return path


def _without_resume_wording(why: str) -> str:
    """The manager's reason for passing over a checkpoint, without its advice for resuming."""
    return why.split(": resuming from", 1)[0]


def checkpoint_to_export(path: str, log: Callable[[str], None], option: str = "--ckpt") -> str:
    """The intact megatron checkpoint directory that ``path`` names.

    ``path`` is a checkpoint (``metadata.json`` in it) or a trainer's ``checkpoints/``
    directory: then the checkpoint ``latest`` names, or - when that one is damaged - the newest
    intact older one, with a note (:meth:`CheckpointManager.resume_point`).

    Raises:
        ConversionError: ``path`` is missing, a file, a run directory (its ``checkpoints/`` is
            named), or a checkpoints/ directory with nothing complete in it.
        CheckpointError: the checkpoint is damaged (the file is named), is a Hugging Face model
            directory, or is no checkpoint at all
            (:func:`~psft_megatron.checkpointing.dist_checkpoint.damaged`).
    """
    from psft_megatron.checkpointing.dist_checkpoint import damaged
    from psft_megatron.checkpointing.manager import CheckpointManager
    from psft_megatron.errors import CheckpointError

    existing_dir(path, option, "a megatron checkpoint directory, or a trainer's checkpoints/ directory")
    manager = CheckpointManager(path)
    if not os.path.isfile(os.path.join(path, "metadata.json")) and (
            os.path.exists(os.path.join(path, "latest")) or manager.checkpoints()):
        if not os.path.exists(os.path.join(path, "latest")):
            newest = manager.checkpoints()[-1]
            raise ConversionError(f"{option} {path}: a trainer's checkpoints/ directory without a 'latest' file (no "
                                  f"save completed); name one of its checkpoints, e.g. --ckpt {newest}")
        chosen, why = manager.resume_point(fallback=True)
        log(f"note: {_without_resume_wording(why)}: exporting the newest intact checkpoint, {chosen.path}" if why
            else f"using {chosen.path} (named by {os.path.join(path, 'latest')})")
        return chosen.path  # checked whole by resume_point (sizes, checksums, common state)
    elif not os.path.isfile(os.path.join(path, "metadata.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
        raise ConversionError(f"{option} {path} is a training run's directory; pass its checkpoints: "
                              f"{option} {os.path.join(path, 'checkpoints')}")
    problem = damaged(path)
    if problem:
        raise CheckpointError(f"{option} {problem}")
    return path


def check_output(out_dir: str, option: str = "--out") -> None:
    """ConversionError unless ``out_dir`` is missing or an empty directory (checked before any
    reading, and again by :func:`staged_output`)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"{option} {out_dir}: a file, not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"{option} {out_dir}: the output directory is not empty (the converters write only "
                              "into a new or empty directory)")


@contextlib.contextmanager
def staged_output(out_dir: str, option: str = "--out") -> Iterator[str]:
    """Yield a new hidden directory beside ``out_dir`` to write into; it becomes ``out_dir``
    (one rename) when the body finishes, and is removed when the body raises.

    ``out_dir`` must be missing or empty (an empty one is replaced); its parent is created.

    Raises:
        ConversionError: ``out_dir`` is a file or not empty, or the staging directory cannot
            be created or renamed (the reason is named).
    """
    out = os.path.abspath(out_dir)
    check_output(out, option)
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        os.mkdir(staging)
    except OSError as exc:
        raise ConversionError(f"{option} {out_dir}: cannot create {staging} ({exc.strerror or exc})") from None
    try:
        yield staging
        try:
            os.rename(staging, out)  # replaces an empty directory; fails on a non-empty one
        except OSError as exc:
            raise ConversionError(f"{option} {out_dir}: cannot move the finished output there ({exc.strerror or exc}); "
                                  "did something else write into it meanwhile?") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
