"""Streaming safetensors I/O: read single or sharded HF checkpoints, write sharded ones with an index.

Reading opens the file for each tensor (``safe_open`` memory-maps it and copies only that
tensor out), so resident memory holds one tensor, not a shard. Writing streams tensor bytes
to disk as they come (the header is put in front when a shard is complete), so resident
memory holds one tensor, not a shard.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from psft_megatron.convert.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Non-weight files of an HF model directory copied along (tokenizer, generation config).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"


def read_json(path: str, what: str = "a JSON object") -> dict:
    """The JSON object in ``path``.

    Raises:
        ConversionError: the file cannot be read, is not valid JSON (line and column named) or
            holds something other than an object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected {what}, found a JSON {type(data).__name__}")
    return data


def read_config(hf_dir: str) -> dict:
    """``<hf_dir>/config.json`` as a dict (ConversionError naming the file if absent or invalid)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    return read_json(path, "the model config (a JSON object)")


def _safe_open(path: str):
    """``safetensors.safe_open(path)``; a truncated or damaged file is a ConversionError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as exc:
        reason = str(exc).replace("Error while deserializing header: ", "")
        raise ConversionError(f"{path}: not a readable safetensors file ({reason}); it is truncated or damaged "
                              "(copy or download it again)") from None


class SafetensorsReader:
    """Tensors of an HF model directory by name (``model.safetensors`` or an index + shards)."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX_NAME)
        if os.path.exists(index):
            weight_map = read_json(index, "a safetensors index (a JSON object)").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index}: no 'weight_map' object (tensor name -> shard file)")
            self.weight_map: Dict[str, str] = dict(weight_map)
            self.source = INDEX_NAME
            for file in sorted(set(self.weight_map.values())):
                if not os.path.exists(os.path.join(hf_dir, file)):
                    raise ConversionError(f"{hf_dir}: {INDEX_NAME} names {file}, which does not exist")
        elif os.path.exists(os.path.join(hf_dir, SINGLE_NAME)):
            with _safe_open(os.path.join(hf_dir, SINGLE_NAME)) as f:
                self.weight_map = {name: SINGLE_NAME for name in f.keys()}
            self.source = SINGLE_NAME
        else:
            raise ConversionError(f"{hf_dir}: neither {SINGLE_NAME} nor {INDEX_NAME} found")
        self._shapes: Optional[Dict[str, Tuple[int, ...]]] = None

    def names(self) -> List[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise ConversionError(f"tensor {name!r} is missing: not in {os.path.join(self.dir, self.source)}")
        return self.weight_map[name]

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Shape of every tensor, read from the file headers (no tensor data is loaded).

        Raises:
            ConversionError: a tensor the index names is not in its file (tensor and file named).
        """
        if self._shapes is None:
            shapes, by_file = {}, {}
            for name, file in self.weight_map.items():
                by_file.setdefault(file, []).append(name)
            for file, names in by_file.items():
                with _safe_open(os.path.join(self.dir, file)) as f:
                    present = set(f.keys())
                    for name in names:
                        if name not in present:
                            raise ConversionError(
                                f"tensor {name!r} is missing from {os.path.join(self.dir, file)} "
                                f"(named there by {self.source})"
                            )
                        shapes[name] = tuple(f.get_slice(name).get_shape())
            self._shapes = shapes
        return self._shapes

    def get(self, name: str) -> torch.Tensor:
        """One tensor (a copy, the file is closed again)."""
        file = os.path.join(self.dir, self.file_of(name))
        with _safe_open(file) as f:
            if name not in f.keys():
                raise ConversionError(f"tensor {name!r} is missing from {file}")
            return f.get_tensor(name)

    def largest_file_bytes(self) -> int:
        return max(os.path.getsize(os.path.join(self.dir, f)) for f in set(self.weight_map.values()))


_ST_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class ShardedSafetensorsWriter:
    """Write tensors into ``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``.

    Usage: ``add(name, tensor)`` in any order, then ``close()``. Tensor bytes go to disk as
    soon as they are added (a data file per shard; the safetensors header, which must come
    first, is written when the shard is complete and the data is copied behind it on disk),
    so resident memory never holds more than the tensor being added. A new shard starts when
    the next tensor would take the current one past ``max_shard_bytes``.
    """

    def __init__(self, out_dir: str, max_shard_bytes: int = 2 * 1024**3):
        os.makedirs(out_dir, exist_ok=True)
        self.dir = out_dir
        self.max = max_shard_bytes
        self._entries: List[Tuple[str, str, List[int], int, int]] = []  # name, dtype, shape, begin, end
        self._data = None
        self._bytes = 0
        self._shards: List[Tuple[str, List[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _ST_DTYPES:
            raise ConversionError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        tensor = tensor.detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self._entries and self._bytes + nbytes > self.max:
            self._finish_shard()
        if self._data is None:
            self._data = open(os.path.join(self.dir, f".shard-{len(self._shards):05d}.data"), "wb")
        if nbytes:
            self._data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._entries.append((name, _ST_DTYPES[tensor.dtype], list(tensor.shape), self._bytes, self._bytes + nbytes))
        self._bytes += nbytes
        self.total_size += nbytes

    def _finish_shard(self) -> None:
        if self._data is None:  # an empty model: one empty shard
            self._data = open(os.path.join(self.dir, f".shard-{len(self._shards):05d}.data"), "wb")
        data_path = self._data.name
        self._data.close()
        header = {"__metadata__": {"format": "pt"}}
        for name, dtype, shape, begin, end in self._entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        path = os.path.join(self.dir, f".shard-{len(self._shards):05d}.tmp")
        with open(path, "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
        os.remove(data_path)
        self._shards.append((path, [e[0] for e in self._entries]))
        self._entries, self._data, self._bytes = [], None, 0

    def close(self) -> List[str]:
        """Write the last shard and the index; returns the shard file names."""
        if self._entries or not self._shards:
            self._finish_shard()
        n = len(self._shards)
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.dir, final))
            files.append(final)
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.dir, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
        return files


def copy_side_files(src_dir: str, dst_dir: str, names: Iterable[str] = TOKENIZER_FILES + (GENERATION_CONFIG,)) -> List[str]:
    """Copy the tokenizer / generation-config files that exist in ``src_dir``; returns their names."""
    os.makedirs(dst_dir, exist_ok=True)
    copied = []
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
