"""Shared helpers for tests/test_data_*.py: bundled assets and small file writers."""

from __future__ import annotations

import json
import os
from typing import Iterable

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HF_TOKENIZER = os.path.join(REPO, "examples", "data", "tiny_tokenizer")
SPM_MODEL = os.path.join(REPO, "examples", "data", "tiny_spm", "tiny.model")
TINY_SFT = os.path.join(REPO, "examples", "data", "tiny_sft")


def write_jsonl(path, records: Iterable) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_parquet(path, records) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(records)), str(path))
    return str(path)


def write_hf_dir(path, records) -> str:
    """A ``datasets.Dataset.save_to_disk``-layout directory written with pyarrow only."""
    import pyarrow as pa

    os.makedirs(path, exist_ok=True)
    table = pa.Table.from_pylist(list(records))
    with pa.OSFile(os.path.join(path, "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}, f)
    with open(os.path.join(path, "dataset_info.json"), "w") as f:
        json.dump({"features": {}}, f)
    return str(path)
