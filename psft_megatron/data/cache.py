"""Tokenised samples in flat arrays, and their on-disk, memory-mapped cache.

A :class:`TokenizedStore` holds N samples (before the length policy)::

    ids        int32 [T]      all samples' input_ids, concatenated
    mask       uint8 [T]      their loss masks
    offsets    int64 [N + 1]  sample i is ids[offsets[i]:offsets[i + 1]]
    src_file   int32 [N], src_pos int64 [N]   where sample i came from (file index, line or row)
    has_target uint8 [N]      1 when some token after the first is trained (mask[1:].any())

The cache directory ``<cache_dir>/<key>/`` holds ``ids.bin``, ``mask.bin``, ``offsets.npy``,
``src_file.npy``, ``src_pos.npy``, ``has_target.npy`` and ``meta.json`` (files, tokenizer
fingerprint, settings, counts). ``key`` = sha256 over the data files' bytes, the tokenizer
files' bytes and the tokenisation settings (schema, keys, templates, end-of-turn); see
:mod:`psft_megatron.data.fingerprint` for how the bytes are fingerprinted without reading them
at every start. It does not depend on ``max_seq_length`` or the length policy, which are
applied after loading.

:class:`StoreWriter` streams chunks of tokenised samples (:class:`TokenChunk`) into a
temporary directory next to the cache and renames it into place when complete, so a
concurrent reader (another rank) sees either nothing or a complete cache, and memory stays
bounded by a chunk whatever the data size (plus 21 bytes per sample of index arrays).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from psft_megatron.data.errors import DataError, Location

FORMAT_VERSION = 2
INDEX_ARRAYS = ("offsets", "src_file", "src_pos", "has_target")


@dataclass
class TokenChunk:
    """Tokenised samples of consecutive records of ONE file, what a worker hands back.

    ``ids`` int32 [t] and ``mask`` uint8 [t] concatenated, ``lengths`` int64 [n] tokens per
    sample, ``positions`` int64 [n] their lines (``kind`` ``line``) or rows (``row``) in
    ``file``, ``has_target`` uint8 [n] (see :class:`TokenizedStore`).
    """

    file: str
    kind: str
    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    positions: np.ndarray
    has_target: np.ndarray

    @classmethod
    def from_samples(cls, samples: Sequence[Tuple[np.ndarray, np.ndarray]], locs: Sequence[Location]) -> "TokenChunk":
        """From ``(ids, mask)`` pairs and their locations (all of one file)."""
        n = len(samples)
        kind = "line" if n and locs[0].line is not None else "row"
        return cls(file=locs[0].file if n else "", kind=kind,
                   ids=np.concatenate([s[0] for s in samples]).astype(np.int32) if n else np.zeros(0, np.int32),
                   mask=np.concatenate([s[1] for s in samples]).astype(np.uint8) if n else np.zeros(0, np.uint8),
                   lengths=np.fromiter((len(s[0]) for s in samples), dtype=np.int64, count=n),
                   positions=np.fromiter((l.line if l.line is not None else l.row for l in locs), dtype=np.int64,
                                         count=n),
                   has_target=np.fromiter((bool(s[1][1:].any()) for s in samples), dtype=np.uint8, count=n))


class StoreWriter:
    """Writes a cache directory chunk by chunk (see the module docstring).

    ``directory``: where the cache goes; None = a private temporary directory that
    :meth:`finish` removes once the store is memory-mapped (the mapping keeps the data). Use
    as a context manager: an exception removes the half-written directory.
    """

    def __init__(self, directory: Optional[str], files: Sequence[str]):
        self.directory = directory
        parent = os.path.dirname(os.path.abspath(directory)) if directory else None
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        self.files, self.kinds = list(files), ["row"] * len(files)
        self._index = {f: k for k, f in enumerate(self.files)}
        self._ids = open(os.path.join(self.tmp, "ids.bin"), "wb")
        self._mask = open(os.path.join(self.tmp, "mask.bin"), "wb")
        self._parts = {name: [] for name in ("lengths", "src_file", "src_pos", "has_target")}
        self.num_samples = self.num_tokens = 0

    def add(self, chunk: TokenChunk) -> None:
        """Append a chunk's samples (its ids and mask go straight to disk)."""
        if not len(chunk.lengths):
            return
        if chunk.file not in self._index:  # e.g. the split dir of a DatasetDict
            self._index[chunk.file] = len(self.files)
            self.files.append(chunk.file)
            self.kinds.append("row")
        k = self._index[chunk.file]
        if chunk.kind == "line":
            self.kinds[k] = "line"
        chunk.ids.astype(np.int32, copy=False).tofile(self._ids)
        chunk.mask.astype(np.uint8, copy=False).tofile(self._mask)
        self._parts["lengths"].append(chunk.lengths.astype(np.int64, copy=False))
        self._parts["src_file"].append(np.full(len(chunk.lengths), k, dtype=np.int32))
        self._parts["src_pos"].append(chunk.positions.astype(np.int64, copy=False))
        self._parts["has_target"].append(chunk.has_target.astype(np.uint8, copy=False))
        self.num_samples += len(chunk.lengths)
        self.num_tokens += len(chunk.ids)

    def finish(self, meta: dict, source_counts: Optional[List[int]], stats: dict) -> "TokenizedStore":
        """Write the index arrays and ``meta.json``, move the directory into place and return
        the store memory-mapped from it."""
        self._ids.close()
        self._mask.close()
        joined = {name: (np.concatenate(parts) if parts else np.zeros(0, np.int64))
                  for name, parts in self._parts.items()}
        offsets = np.zeros(self.num_samples + 1, dtype=np.int64)
        np.cumsum(joined["lengths"], out=offsets[1:])
        arrays = {"offsets": offsets, "src_file": joined["src_file"].astype(np.int32),
                  "src_pos": joined["src_pos"].astype(np.int64), "has_target": joined["has_target"].astype(np.uint8)}
        for name in INDEX_ARRAYS:
            np.save(os.path.join(self.tmp, f"{name}.npy"), arrays[name])
        meta = dict(meta, format_version=FORMAT_VERSION, num_samples=self.num_samples, num_tokens=self.num_tokens,
                    files=self.files, kinds=self.kinds, source_counts=source_counts, stats=stats)
        with open(os.path.join(self.tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if self.directory is None:
            store = TokenizedStore.load(self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return store
        try:
            os.rename(self.tmp, self.directory)
        except OSError:  # another process won the race: its cache is identical
            shutil.rmtree(self.tmp, ignore_errors=True)
        return TokenizedStore.load(self.directory)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self._ids.close()
            self._mask.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


class TokenizedStore:
    """N tokenised samples in flat arrays (see the module docstring).

    ``source_counts``: samples per ``file_names`` entry, in order (samples are stored file by
    file), or None when unknown; ``stats``: the formatter's counts (e.g. field truncation).
    """

    def __init__(self, ids, mask, offsets, src_file, src_pos, files: List[str], kinds: List[str],
                 source_counts: Optional[List[int]] = None, stats: Optional[dict] = None, has_target=None):
        self.ids, self.mask, self.offsets = ids, mask, offsets
        self.src_file, self.src_pos, self.has_target = src_file, src_pos, has_target
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

    def relabel(self, file_names: Sequence[str]) -> None:
        """Name the sources as ``file_names`` (this run's paths): a cache is keyed by content,
        so it may have been written from the same files at other paths. Entries derived from a
        path (a DatasetDict's split directory) and the first locations in ``stats`` follow it."""
        renamed = dict(zip(self.files[:len(file_names)], file_names))

        def new_name(old: str) -> str:
            if old in renamed:
                return renamed[old]
            base = next((o for o in renamed if old.startswith(o + os.sep)), None)
            return renamed[base] + old[len(base):] if base is not None else old

        self.files = [new_name(f) for f in self.files]
        for key, value in self.stats.items():  # first locations, "path:line N"
            if isinstance(value, str):
                old = next((o for o in renamed if value.startswith((o + ":", o + os.sep))), None)
                self.stats[key] = value if old is None else renamed[old] + value[len(old):]

    def location(self, i: int) -> Location:
        f = int(self.src_file[i])
        pos = int(self.src_pos[i])
        return Location(self.files[f], line=pos) if self.kinds[f] == "line" else Location(self.files[f], row=pos)

    @classmethod
    def load(cls, directory: str) -> "TokenizedStore":
        """Memory-map a cache written by :class:`StoreWriter`; a damaged cache is a DataError naming
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
        arrays = {name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r") for name in INDEX_ARRAYS}
        store = cls(ids, mask, arrays["offsets"], arrays["src_file"], arrays["src_pos"], meta["files"], meta["kinds"],
                    meta.get("source_counts"), meta.get("stats"), has_target=arrays["has_target"])
        store.meta = meta
        return store


def is_complete(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "meta.json"))
