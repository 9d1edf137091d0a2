"""Checksums of a checkpoint's files: written at save, verified before anything trusts the data.

``<ckpt>/checksums.json``::

    {"algorithm": "sha256",
     "files": {"__0_0.distcp": {"bytes": 821878, "sha256": "9f2c..."}, ".metadata": {...}, ...}}

It covers every data file the torch_dist index (``.metadata``) references, the index itself,
``common.pt`` and ``metadata.json``. It is written into the temporary directory of a save, before
the rename that publishes the checkpoint, so a published checkpoint always has it. A byte
overwritten anywhere in those files (tensor data or a record header) is a mismatch naming the
file; size checks alone catch only truncation. Checkpoints written before checksums existed have
no such file and get the size checks only.

Hashing is spread over the ranks (:func:`hash_files`): data file ``__<r>_<i>.distcp`` (written by
rank r) is hashed by rank ``r % world``, every other file by rank 0, which wrote them. At a save
the hashing rank is the writer: the file is still in its page cache, and its fsync (done in the
same pass) is the one that flushes the writer's pages, also on NFS.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Dict, List, Optional, Union

CHECKSUMS = "checksums.json"
ALGORITHM = "sha256"
#: files of a torch_dist checkpoint that are not named in its index
INDEX_FILES = (".metadata", "common.pt", "metadata.json")
_CHUNK = 8 << 20  # bytes read per call: the memory a hash pass needs
_WRITER = re.compile(r"__(\d+)_\d+\.distcp$")

#: what :func:`hash_files` reports per file: {"bytes": size, "sha256": hex digest}, or why not
Digest = Union[Dict[str, object], str]


def file_digest(path: str, fsync: bool = False) -> Digest:
    """Size and sha256 of one file in one streaming pass (``fsync``: then flush it to disk);
    a string saying why on an OSError."""
    digest, size = hashlib.new(ALGORITHM), 0
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(_CHUNK)
                if not block:
                    break
                digest.update(block)
                size += len(block)
            if fsync:
                os.fsync(f.fileno())
    except OSError as exc:
        return f"unreadable ({type(exc).__name__}: {exc.strerror or exc})"
    return {"bytes": size, ALGORITHM: digest.hexdigest()}


def hashing_rank(name: str, world: int) -> int:
    """The rank that hashes file ``name`` of a checkpoint (see the module docstring)."""
    match = _WRITER.search(name)
    return int(match.group(1)) % world if match else 0


def hash_files(root: str, names: List[str], fsync: bool = False) -> Optional[Dict[str, Digest]]:
    """``{name: digest}`` of the files ``root/name``, on global rank 0 (None on the others).

    Collective under torch.distributed (every rank passes the same ``names``); each rank hashes
    its share (:func:`hashing_rank`) and rank 0 gathers the results (one gather). Outside
    torch.distributed every file is hashed here.
    """
    from psft_megatron.distributed.decisions import rank0_gathers

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    mine = {name: file_digest(os.path.join(root, name), fsync) for name in names if hashing_rank(name, world) == rank}
    gathered = rank0_gathers(mine)
    if gathered is None:
        return None
    merged: Dict[str, Digest] = {}
    for part in gathered:
        merged.update(part)
    return merged


def covered_files(ckpt_dir: str, index) -> List[str]:
    """The files checksums.json covers: the data files ``index`` (the unpickled ``.metadata``)
    references and the :data:`INDEX_FILES` present, sorted."""
    names = {info.relative_path for info in index.storage_data.values()}
    names.update(n for n in INDEX_FILES if os.path.isfile(os.path.join(ckpt_dir, n)))
    return sorted(names)


def write_checksums(ckpt_dir: str, fsync: bool = True) -> None:
    """Hash (and fsync) the files of a just-written checkpoint and write ``checksums.json``
    (rank 0; fsynced). Collective under torch.distributed: call on every rank after the save."""
    import pickle

    from psft_megatron.distributed.decisions import rank0_decides

    def listing() -> List[str]:
        with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
            return covered_files(ckpt_dir, pickle.load(f))

    names = rank0_decides(listing)
    digests = hash_files(ckpt_dir, names, fsync=fsync)
    if digests is None:
        return
    problems = [f"{name}: {d}" for name, d in digests.items() if isinstance(d, str)]
    if problems:
        raise OSError(f"{ckpt_dir}: cannot hash {problems[0]}")
    path = os.path.join(ckpt_dir, CHECKSUMS)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"algorithm": ALGORITHM, "files": digests}, f, indent=1, sort_keys=True)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def read_checksums(ckpt_dir: str) -> Union[None, str, Dict[str, Dict[str, object]]]:
    """The ``files`` of ``checksums.json``; None when the checkpoint has none (written before
    checksums existed); a string saying why when the file is unreadable."""
    path = os.path.join(ckpt_dir, CHECKSUMS)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        files = data["files"]
        if data.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError("unknown format")
        return files
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path}: unreadable ({type(exc).__name__})"


def uncovered(ckpt_dir: str, recorded: Dict[str, object], index) -> Optional[str]:
    """Why ``recorded`` (checksums.json's files) does not cover every file the index needs, or None."""
    for name in covered_files(ckpt_dir, index):
        if name not in recorded:
            return f"{os.path.join(ckpt_dir, name)}: not in {CHECKSUMS}"
    return None


def mismatch(ckpt_dir: str, recorded: Dict[str, Dict[str, object]], hashed: Dict[str, Digest]) -> Optional[str]:
    """The first file whose size or checksum differs from ``checksums.json`` (naming it), or None."""
    for name in sorted(recorded):
        want, got, path = recorded[name], hashed.get(name), os.path.join(ckpt_dir, name)
        if isinstance(got, str) or got is None:
            return f"{path}: {got or 'not hashed'}"
        if got["bytes"] != want.get("bytes"):
            return f"{path}: {got['bytes']} bytes, {CHECKSUMS} records {want.get('bytes')}"
        if got[ALGORITHM] != want.get(ALGORITHM):
            return f"{path}: {ALGORITHM} mismatch (the data was changed after the save: corrupted)"
    return None
