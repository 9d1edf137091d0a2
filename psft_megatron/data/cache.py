"""Tokenised samples in flat arrays, and their on-disk, memory-mapped cache.

A :class:`TokenizedStore` holds N samples (before the length policy)::

    ids      int32 [T]      all samples' input_ids, concatenated
    mask     uint8 [T]      their loss masks
    offsets  int64 [N + 1]  sample i is ids[offsets[i]:offsets[i + 1]]
    src_file int32 [N], src_pos int64 [N]   where sample i came from (file index, line or row)

The cache directory ``<cache_dir>/<key>/`` holds ``ids.bin``, ``mask.bin``, ``offsets.npy``,
``src_file.npy``, ``src_pos.npy`` and ``meta.json`` (files, tokenizer fingerprint, settings,
counts). ``key`` = sha256 over the data files' bytes, the tokenizer files' bytes and the
tokenisation settings (schema, keys, templates, end-of-turn). It does not depend on
``max_seq_length`` or the length policy, which are applied after loading. A cache is written
to a temporary directory and renamed into place, so a concurrent reader (another rank) sees
either nothing or a complete cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import List, Optional, Sequence, Tuple

import numpy as np

from psft_megatron.data.errors import DataError, Location

FORMAT_VERSION = 1


def hash_data_files(paths: Sequence[str]) -> str:
    """sha256 over the bytes of the data files (directories: all their files, sorted)."""
    h = hashlib.sha256()
    for p in paths:
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs) if os.path.isdir(p) else [p]
        for f in files:
            h.update(os.path.relpath(f, p).encode() if os.path.isdir(p) else b"file")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


class TokenizedStore:
    """N tokenised samples in flat arrays (see the module docstring).

    ``source_counts``: samples per ``file_names`` entry, in order (samples are stored file by
    file), or None when unknown; ``stats``: the formatter's counts (e.g. field truncation).
    """

    def __init__(self, ids, mask, offsets, src_file, src_pos, files: List[str], kinds: List[str],
                 source_counts: Optional[List[int]] = None, stats: Optional[dict] = None):
        self.ids, self.mask, self.offsets = ids, mask, offsets
        self.src_file, self.src_pos = src_file, src_pos
        self.files, self.kinds = files, kinds  # kinds[f] = "line" | "row"
        self.source_counts = list(source_counts) if source_counts is not None else None
        self.stats = dict(stats or {})

    def sample_sources(self) -> np.ndarray:
        """int64 [N]: the ``file_names`` index of every sample (all 0 when unknown)."""
        if self.source_counts is None:
            return np.zeros(len(self), dtype=np.int64)
        return np.repeat(np.arange(len(self.source_counts), dtype=np.int64), self.source_counts)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        """int64 [N] token counts."""
        return np.diff(self.offsets)

    def get(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[lo:hi], self.mask[lo:hi]

    def location(self, i: int) -> Location:
        f = int(self.src_file[i])
        pos = int(self.src_pos[i])
        return Location(self.files[f], line=pos) if self.kinds[f] == "line" else Location(self.files[f], row=pos)

    @classmethod
    def from_samples(cls, samples: Sequence[Tuple[np.ndarray, np.ndarray]], locs: Sequence[Location],
                     files: List[str], source_counts: Optional[List[int]] = None,
                     stats: Optional[dict] = None) -> "TokenizedStore":
        lengths = np.fromiter((len(s[0]) for s in samples), dtype=np.int64, count=len(samples))
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate([s[0] for s in samples]).astype(np.int32) if samples else np.zeros(0, np.int32)
        mask = np.concatenate([s[1] for s in samples]).astype(np.uint8) if samples else np.zeros(0, np.uint8)
        files = list(files)
        index = {f: k for k, f in enumerate(files)}
        for l in locs:  # e.g. the split dir of a DatasetDict
            if l.file not in index:
                index[l.file] = len(files)
                files.append(l.file)
        src_file = np.array([index[l.file] for l in locs], dtype=np.int32)
        src_pos = np.array([l.line if l.line is not None else l.row for l in locs], dtype=np.int64)
        kinds = ["row"] * len(files)
        for l in locs:
            if l.line is not None:
                kinds[index[l.file]] = "line"
        return cls(ids, mask, offsets, src_file, src_pos, list(files), kinds, source_counts, stats)

    # ------------------------------------------------------------------ disk
    def save(self, directory: str, meta: dict) -> None:
        """Write atomically to ``directory`` (tmp dir + rename); keeps an existing one."""
        parent = os.path.dirname(os.path.abspath(directory))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        try:
            self.ids.astype(np.int32).tofile(os.path.join(tmp, "ids.bin"))
            self.mask.astype(np.uint8).tofile(os.path.join(tmp, "mask.bin"))
            for name in ("offsets", "src_file", "src_pos"):
                np.save(os.path.join(tmp, f"{name}.npy"), getattr(self, name))
            meta = dict(meta, format_version=FORMAT_VERSION, num_samples=len(self), num_tokens=int(self.offsets[-1]),
                        files=self.files, kinds=self.kinds, source_counts=self.source_counts)
            meta.setdefault("stats", self.stats)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
            try:
                os.rename(tmp, directory)
            except OSError:  # another process won the race: its cache is identical
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str) -> "TokenizedStore":
        """Memory-map a cache written by :meth:`save`; a damaged cache is a DataError naming
        the directory (delete it and it is rebuilt)."""
        try:
            return cls._load(directory)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated arrays, bad JSON, missing files
            raise DataError(f"unreadable token cache ({type(exc).__name__}: {exc}); delete the directory and it is "
                            "rebuilt", Location(directory)) from None

    @classmethod
    def _load(cls, directory: str) -> "TokenizedStore":
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"token cache has format {meta.get('format_version')}, expected {FORMAT_VERSION}; "
                            "delete the directory and it is rebuilt", Location(directory))
        n_tok = meta["num_tokens"]
        ids = np.memmap(os.path.join(directory, "ids.bin"), dtype=np.int32, mode="r", shape=(n_tok,)) if n_tok \
            else np.zeros(0, np.int32)
        mask = np.memmap(os.path.join(directory, "mask.bin"), dtype=np.uint8, mode="r", shape=(n_tok,)) if n_tok \
            else np.zeros(0, np.uint8)
        arrays = {name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
                  for name in ("offsets", "src_file", "src_pos")}
        store = cls(ids, mask, arrays["offsets"], arrays["src_file"], arrays["src_pos"], meta["files"], meta["kinds"],
                    meta.get("source_counts"), meta.get("stats"))
        store.meta = meta
        return store


def is_complete(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "meta.json"))
