"""Record readers: JSONL, Parquet, and Hugging Face ``save_to_disk`` directories (local only).

``iter_records(path)`` yields ``(record: dict, Location)`` in file order; ``iter_chunks(path)``
yields the same records in :class:`RecordChunk` s (raw lines or Arrow batches) that worker
processes parse. Parquet and Arrow
need ``pyarrow`` (optional: ``pip install -e '.[data]'``); a ``save_to_disk`` directory is read
with pyarrow alone (``state.json`` lists the Arrow stream files), not with ``datasets``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from psft_megatron.data.errors import DataError, Location
from psft_megatron.optional import require

Record = Dict[str, Any]


def _pyarrow():
    return require("pyarrow", "reading Parquet / Hugging Face datasets directories")


def detect_format(path: str) -> str:
    """``jsonl`` | ``parquet`` | ``hf_dir`` for a path; raises DataError if unknown/missing."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "state.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
            return "hf_dir"
        raise DataError(
            "directory is not a Hugging Face save_to_disk dataset (no state.json or dataset_dict.json)",
            Location(path),
        )
    if not os.path.exists(path):
        raise DataError("file not found", Location(path))
    lower = path.lower()
    if lower.endswith((".jsonl", ".json", ".jsonl.txt", ".ndjson")):
        return "jsonl"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    raise DataError("unknown data format (expected .jsonl, .parquet or a save_to_disk directory)", Location(path))


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", Location(path)) from None


def _read_json(path: str, what: str):
    """A small JSON file of a ``save_to_disk`` directory; errors name it."""
    with _open(path) as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} is not valid JSON ({exc}); the directory is not a readable save_to_disk "
                        "dataset", Location(path)) from None


def _parse_jsonl_line(raw: bytes, loc: Location) -> Optional[Record]:
    """One JSONL line -> its object (None for a blank line); errors name the line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 (byte offset {exc.start} in the line: {exc.reason})", loc) from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ""
        if loc.line == 1 and text.lstrip().startswith("["):
            hint = " (a JSON array? this reader wants JSONL: one object per line; tools/prepare_data.py converts)"
        raise DataError(f"malformed JSON: {exc.msg} at column {exc.colno}{hint}", loc) from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object per line, got {type(record).__name__}", loc)
    return record


@dataclass
class RecordChunk:
    """Up to a chunk's worth of consecutive records of one source, in a form that crosses to
    a worker process cheaply: raw JSONL lines (``lines``, blank ones included, the first at
    line ``first``) or an Arrow record batch (``batch``, its first row is row ``first``).
    ``file`` is the path locations name; :meth:`records` parses them."""

    file: str
    first: int
    lines: Optional[List[bytes]] = None
    batch: Any = None

    def records(self) -> Iterator[Tuple[Record, Location]]:
        """``(record, Location)`` in order; errors name the line or row."""
        if self.lines is not None:
            for lineno, raw in enumerate(self.lines, start=self.first):
                loc = Location(self.file, line=lineno)
                record = _parse_jsonl_line(raw, loc)
                if record is not None:
                    yield record, loc
            return
        try:
            rows = self.batch.to_pylist()
        except Exception as exc:  # noqa: BLE001 - e.g. invalid UTF-8 in a string column
            raise DataError(f"cannot read rows from {self.first} on: {exc}", Location(self.file, row=self.first)) \
                from None
        for i, record in enumerate(rows):
            yield record, Location(self.file, row=self.first + i)


def _jsonl_chunks(path: str, size: int) -> Iterator[RecordChunk]:
    with _open(path) as f:
        lines: List[bytes] = []
        first = 1
        for raw in f:
            lines.append(raw)
            if len(lines) == size:
                yield RecordChunk(path, first, lines=lines)
                first += len(lines)
                lines = []
        if lines:
            yield RecordChunk(path, first, lines=lines)


def _parquet_chunks(path: str, size: int) -> Iterator[RecordChunk]:
    pq = require("pyarrow.parquet", "reading Parquet files")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read Parquet file: {exc}", Location(path)) from None
    row = 0
    batches = pf.iter_batches(batch_size=size)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - e.g. invalid UTF-8 in a string column
            raise DataError(f"cannot read rows from {row} on: {exc}", Location(path, row=row)) from None
        yield RecordChunk(path, row, batch=batch)
        row += batch.num_rows


def hf_dir_files(path: str, split: str = "train") -> Tuple[str, List[str]]:
    """(dataset dir, Arrow files) of a ``save_to_disk`` directory (a Dataset, or ``split`` of a
    DatasetDict, whose dir is ``path/split``)."""
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        info = _read_json(os.path.join(path, "dataset_dict.json"), "dataset_dict.json")
        splits = info.get("splits", []) if isinstance(info, dict) else []
        if split not in splits:
            raise DataError(f"DatasetDict has no split {split!r}; splits present: {splits}", Location(path))
        path = os.path.join(path, split)
    state_file = os.path.join(path, "state.json")
    if not os.path.exists(state_file):
        raise DataError("split directory has no state.json (not a save_to_disk dataset)", Location(path))
    state = _read_json(state_file, "state.json")
    entries = state.get("_data_files", []) if isinstance(state, dict) else []
    files = [os.path.join(path, d["filename"]) for d in entries if isinstance(d, dict) and "filename" in d]
    if not files:
        raise DataError("state.json lists no _data_files", Location(state_file))
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"state.json lists {os.path.basename(f)}, which is missing", Location(path))
    return path, files


def _hf_dir_chunks(path: str, split: str, size: int) -> Iterator[RecordChunk]:
    """Rows of a ``datasets`` save_to_disk directory (Arrow IPC stream files)."""
    pa = _pyarrow()
    row = 0
    path, files = hf_dir_files(path, split)
    for arrow_file in files:
        try:
            with pa.memory_map(arrow_file, "r") as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                table = reader.read_all()
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot read Arrow file: {exc}", Location(arrow_file)) from None
        for batch in table.to_batches(max_chunksize=size):
            yield RecordChunk(path, row, batch=batch)
            row += batch.num_rows


def iter_chunks(path: str, split: str = "train", size: int = 256) -> Iterator[RecordChunk]:
    """The records of any supported source in chunks of up to ``size`` (``split``: of a
    DatasetDict dir); errors opening or reading the file are raised here, errors in a record
    by :meth:`RecordChunk.records`."""
    fmt = detect_format(path)
    if fmt == "jsonl":
        return _jsonl_chunks(path, size)
    if fmt == "parquet":
        return _parquet_chunks(path, size)
    return _hf_dir_chunks(path, split, size)


def iter_records(path: str, split: str = "train") -> Iterator[Tuple[Record, Location]]:
    """Records of any supported source, with their location (``split``: of a DatasetDict dir).
    An unknown or missing source is an error here, before the first record is asked for."""
    chunks = iter_chunks(path, split)
    return (item for chunk in chunks for item in chunk.records())


def iter_hf_dir(path: str, split: str = "train") -> Iterator[Tuple[Record, Location]]:
    """Rows of a ``datasets`` save_to_disk directory."""
    return (item for chunk in _hf_dir_chunks(path, split, 4096) for item in chunk.records())
