"""Content fingerprints of files (data files, tokenizer files) for the token cache key.

One hasher for the package: :func:`hash_files` is a sha256 over ``(name, sha256 of the file's
bytes)`` pairs, so the same bytes under the same names give the same fingerprint wherever they
live. The per-file hashes can be remembered in a :class:`HashMemo` (a small JSON file kept
beside the token cache): a file whose size and modification time (ns) are those recorded is
not read again. That is what makes a warm start cheap at any data size; what it cannot see is
a file rewritten in place to the same size with its modification time set back (``touch -r``,
some copy tools that keep times). A file modified within the last :data:`RACY_S` seconds is
hashed every time (its time stamp may not yet tell a later write apart, as in git's
"racily clean" files).

Typical use (global rank 0 only, see :mod:`psft_megatron.distributed.decisions`)::

    memo = HashMemo(os.path.join(cache_dir, HashMemo.FILE_NAME))
    key = hash_files(file_entries(paths), memo)
    memo.save()
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

#: files whose modification time is this recent are never remembered (seconds)
RACY_S = 2.0
_BLOCK = 1 << 22


def file_sha256(path: str) -> str:
    """sha256 hex of a file's bytes (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def file_entries(paths: Sequence[str]) -> List[Tuple[str, str]]:
    """``(name, path)`` for every file of ``paths`` in order: a file is named ``file``, the
    files of a directory by their path inside it (sorted), so moving a data set keeps its
    fingerprint while renaming a file inside a directory changes it."""
    out: List[Tuple[str, str]] = []
    for p in paths:
        if os.path.isdir(p):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs)
            out += [(os.path.relpath(f, p), f) for f in files]
        else:
            out.append(("file", p))
    return out


class HashMemo:
    """Per-file sha256 remembered by (real path, size, mtime_ns) in one JSON file.

    ``file_hash(path)`` returns the remembered hash when size and mtime are unchanged, else
    reads the file. ``save()`` writes the file atomically (only when something changed);
    ``hashed`` lists the files read by this memo (for logs and tests). A damaged or missing
    memo file is an empty memo.
    """

    FILE_NAME = "file_hashes.json"

    def __init__(self, path: Optional[str]):
        self.path = path
        self.entries: Dict[str, dict] = {}
        self.hashed: List[str] = []
        self._dirty = False
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    loaded = json.load(f)
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}

    def file_hash(self, path: str) -> str:
        key = os.path.realpath(path)
        before = os.stat(path)
        seen = self.entries.get(key)
        if seen and seen.get("size") == before.st_size and seen.get("mtime_ns") == before.st_mtime_ns:
            return seen["sha256"]
        started = time.time_ns()
        digest = file_sha256(path)
        self.hashed.append(path)
        after = os.stat(path)
        stable = (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        if stable and after.st_mtime_ns < started - int(RACY_S * 1e9):
            self.entries[key] = {"size": after.st_size, "mtime_ns": after.st_mtime_ns, "sha256": digest}
            self._dirty = True
        return digest

    def save(self) -> None:
        """Write the memo atomically beside the cache (tmp file + rename); errors are ignored
        (the memo only saves time)."""
        if not (self.path and self._dirty):
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(self.path)))
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            pass


def hash_files(entries: Sequence[Tuple[str, str]], memo: Optional[HashMemo] = None) -> str:
    """sha256 hex over ``(name, sha256 of the bytes)`` of ``entries`` (``(name, path)`` pairs,
    see :func:`file_entries`), in order. ``memo``: reuse remembered per-file hashes."""
    h = hashlib.sha256()
    for name, path in entries:
        digest = memo.file_hash(path) if memo is not None else file_sha256(path)
        h.update(name.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()
