"""Record readers: JSONL, Parquet, and Hugging Face ``save_to_disk`` directories (local only).

``iter_records(path)`` yields ``(record: dict, Location)`` in file order. Parquet and Arrow
need ``pyarrow`` (optional: ``pip install -e '.[data]'``); a ``save_to_disk`` directory is read
with pyarrow alone (``state.json`` lists the Arrow stream files), not with ``datasets``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Tuple

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


def iter_jsonl(path: str) -> Iterator[Tuple[Record, Location]]:
    """One JSON object per line; blank lines are skipped. Errors name the 1-based line."""
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            loc = Location(path, line=lineno)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"not valid UTF-8 (byte offset {exc.start} in the line: {exc.reason})", loc) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                hint = ""
                if lineno == 1 and text.lstrip().startswith("["):
                    hint = " (a JSON array? this reader wants JSONL: one object per line; tools/prepare_data.py converts)"
                raise DataError(f"malformed JSON: {exc.msg} at column {exc.colno}{hint}", loc) from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object per line, got {type(record).__name__}", loc)
            yield record, loc


def iter_parquet(path: str) -> Iterator[Tuple[Record, Location]]:
    """Rows of a Parquet file; errors name the 0-based row."""
    pq = require("pyarrow.parquet", "reading Parquet files")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read Parquet file: {exc}", Location(path)) from None
    row = 0
    batches = pf.iter_batches(batch_size=4096)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - e.g. invalid UTF-8 in a string column
            raise DataError(f"cannot read rows from {row} on: {exc}", Location(path, row=row)) from None
        try:
            records = batch.to_pylist()
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot read rows from {row} on: {exc}", Location(path, row=row)) from None
        for record in records:
            yield record, Location(path, row=row)
            row += 1


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


def iter_hf_dir(path: str, split: str = "train") -> Iterator[Tuple[Record, Location]]:
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
        for record in table.to_pylist():
            yield record, Location(path, row=row)
            row += 1


def iter_records(path: str, split: str = "train") -> Iterator[Tuple[Record, Location]]:
    """Records of any supported source, with their location (``split``: of a DatasetDict dir)."""
    fmt = detect_format(path)
    if fmt == "jsonl":
        return iter_jsonl(path)
    if fmt == "parquet":
        return iter_parquet(path)
    return iter_hf_dir(path, split)
