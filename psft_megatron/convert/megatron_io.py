"""Write and read megatron torch_dist checkpoints one tensor / one layer at a time.

Both directions use the sharded state dict of a TP=1/PP=1 ``GPTModel`` built on the *meta*
device (no memory): it gives megatron's checkpoint keys (TE names, layers stacked on a
leading axis, fc1 stored as [gate; up] in 2 chunks) without us re-deriving them.

Writing (:func:`write_checkpoint`): megatron's ``dist_checkpointing.save`` with a save
strategy that hands torch.distributed.checkpoint a planner whose ``resolve_data`` produces
each chunk on demand from a callback (``tensor_fn(megatron_name) -> TP=1 tensor``). DCP's
file writer resolves, writes and drops the chunks one by one, so resident memory holds one
tensor plus what the callback reads. The result is what :func:`psft_megatron.checkpointing.
save_checkpoint` writes for a TP=1/PP=1 model (``model`` key), and loads at any layout.

Reading (:class:`CheckpointReader`): for each TP=1 tensor, the region of its checkpoint key
(e.g. one layer of a stacked tensor) is matched against the stored chunks in the DCP metadata
(torch's resharding helper) and only those chunks are deserialised, from their byte ranges in
the ``.distcp`` files: one layer in memory at a time, whatever TP/PP/VPP/DP layout the
checkpoint was saved at. (``dist_checkpointing.load`` cannot be used for part of a stacked
tensor in a world of one: megatron's conversion to torch ShardedTensors then counts the
other layers' chunks as local.)
"""

from __future__ import annotations

import io
import os
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from psft_megatron.convert.errors import ConversionError
from psft_megatron.errors import CheckpointError
from psft_megatron.model.config import ModelConfig


def quiet_megatron() -> None:
    """Import megatron-core with its notes about missing Transformer Engine / apex and its log
    lines about its own deprecated internals dropped (the trainer's rule,
    :func:`psft_megatron.compat.quiet_imports.quiet_megatron_import`): the converters run on the
    CPU, and their output - one line for bad input - must not be buried under them."""
    from psft_megatron.compat.quiet_imports import quiet_megatron_import

    quiet_megatron_import(announce=False)


def ensure_world_of_one(any_world: bool = False) -> None:
    """torch.distributed + megatron parallel state at TP=PP=1 in this process (a world of one).

    Args:
        any_world: accept an already initialised world of several processes at TP=PP=1
            (reading only; every rank then works alone, without collectives).
    Raises:
        ConversionError: this process already runs another layout.
    """
    quiet_megatron()
    from megatron.core import parallel_state

    from psft_megatron.distributed.runtime import ParallelConfig, initialize

    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        if ((any_world or torch.distributed.get_world_size() == 1) and parallel_state.get_tensor_model_parallel_world_size() == 1
                and parallel_state.get_pipeline_model_parallel_world_size() == 1):
            return
        raise ConversionError("the converters run in a world of one (plain `python`), not under torchrun")
    initialize(ParallelConfig(), backend="gloo")  # CPU collectives only, also on GPU machines


def meta_sharded_state_dict(cfg: ModelConfig, any_world: bool = False) -> dict:
    """``{TP=1 state-dict name: ShardedTensor | ShardedTensorFactory | ShardedObject}`` with meta data."""
    from psft_megatron.model.builder import build_gpt_chunks
    from psft_megatron.distributed.runtime import ParallelConfig

    ensure_world_of_one(any_world)
    config = cfg.to_transformer_config(ParallelConfig(), use_cpu_initialization=True)
    # build_gpt_chunks moves the model to CUDA when there is a GPU; meta tensors cannot move.
    is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: False
    try:
        with torch.device("meta"):
            (model,) = build_gpt_chunks(cfg, config, "cpu")
    finally:
        torch.cuda.is_available = is_available
    return model.sharded_state_dict()


def _is_factory(value) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    return isinstance(value, ShardedTensorFactory)


def _is_tensor(value) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return isinstance(value, ShardedTensor)


def _chunk_map(sharded: dict) -> Dict[Tuple[str, Tuple[int, ...]], Tuple[str, Optional[slice]]]:
    """(checkpoint key, global offset) -> (TP=1 name, dim-0 slice of the TP=1 tensor or None)."""
    out = {}
    for name, value in sharded.items():
        if _is_tensor(value):
            out[(value.key, tuple(value.global_offset))] = (name, None)
        elif _is_factory(value):
            for piece in value.build():
                dim0 = piece.prepend_axis_num
                start = piece.global_offset[dim0]
                out[(piece.key, tuple(piece.global_offset))] = (name, slice(start, start + piece.local_shape[0]))
    return out


def _lazy_strategy(resolve: Callable):
    """A torch_dist save strategy whose tensor data comes from ``resolve(fqn, offset, sizes)``."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            return resolve(write_item.index.fqn, tuple(write_item.index.offset),
                           tuple(write_item.tensor_data.chunk.sizes), write_item.tensor_data.properties.dtype)

    class LazyStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            pyt_state = mcore_to_pyt_state_dict(state, False)
            writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
            dcp.save(pyt_state, storage_writer=writer,
                     planner=LazyPlanner(flatten_state_dict=False, can_run_decentralized_global_plan=False))

    return LazyStrategy("torch_dist", 1)


def write_checkpoint(cfg: ModelConfig, out_dir: str, tensor_fn: Callable[[str], torch.Tensor]) -> None:
    """Write a megatron torch_dist checkpoint (model under ``model``) tensor by tensor.

    Args:
        cfg: the architecture; tensors are stored in ``cfg.params_dtype``.
        out_dir: empty or missing directory.
        tensor_fn: TP=1 megatron state-dict name -> full TP=1 tensor (e.g.
            ``decoder.layers.3.mlp.linear_fc1.weight`` -> [2F, H]); called about once per
            tensor (twice for fc1: its gate and up halves are separate chunks).
    """
    quiet_megatron()
    from megatron.core import dist_checkpointing

    sharded = meta_sharded_state_dict(cfg)
    chunks = _chunk_map(sharded)
    cache: Dict[str, torch.Tensor] = {}

    def resolve(fqn, offset, sizes, dtype):
        if (fqn, offset) not in chunks:
            raise ConversionError(f"internal: no source for checkpoint chunk {fqn} at {offset}")
        name, rows = chunks[(fqn, offset)]
        if name not in cache:
            cache.clear()
            cache[name] = tensor_fn(name)
        full = cache[name]
        piece = full if rows is None else full[rows]
        if tuple(piece.shape) != sizes[len(sizes) - piece.dim():]:
            raise ConversionError(f"{name}: got shape {tuple(piece.shape)}, the model expects {sizes}")
        return piece.reshape(sizes).to(dtype).contiguous()

    os.makedirs(out_dir, exist_ok=True)
    dist_checkpointing.save({"model": sharded}, out_dir, sharded_strategy=_lazy_strategy(resolve))
    cache.clear()
    from psft_megatron.compat.releases import write_legacy_common_state

    write_legacy_common_state(out_dir)  # loadable by every supported megatron-core release
    from psft_megatron.checkpointing.integrity import write_checksums

    write_checksums(out_dir)


def _region_of(value) -> Tuple[str, Tuple[int, ...], Tuple[int, ...]]:
    """(checkpoint key, global offset, sizes) of a TP=1 tensor's whole region (leading 1s for stacked axes)."""
    if _is_factory(value):
        pieces = value.build()
        first = min(pieces, key=lambda p: tuple(p.global_offset))
        lead = (1,) * first.prepend_axis_num
        return value.key, tuple(first.global_offset), lead + tuple(value.data.shape)
    lead = (1,) * value.prepend_axis_num
    return value.key, tuple(value.global_offset), lead + tuple(value.local_shape)


class _FileRange(io.RawIOBase):
    """A read-only, seekable view of bytes [offset, offset + length) of an open file."""

    def __init__(self, file, offset: int, length: int):
        super().__init__()
        self._file, self._start, self._length, self._pos = file, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, pos, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def readinto(self, buffer):
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


class _RegionRequest:
    """Where one TP=1 tensor comes from and where it goes (see :func:`_read_regions`)."""

    def __init__(self, key: str, offset: Tuple[int, ...], sizes: Tuple[int, ...], dtype: torch.dtype):
        self.key, self.offset, self.sizes, self.dtype = key, offset, sizes, dtype
        self.result: Optional[torch.Tensor] = None

    def dest(self) -> torch.Tensor:
        if self.result is None:
            self.result = torch.empty(self.sizes, dtype=self.dtype)
        return self.result


def _open_data_file(path: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be opened ({exc.strerror or exc})") from None


def _load_chunk(f, path: str, info, item, req: "_RegionRequest") -> torch.Tensor:
    """The stored tensor at bytes [info.offset, info.offset + info.length) of the open data file
    ``path``, checked to hold the region ``item`` reads from it.

    Raises:
        CheckpointError: the bytes do not deserialise to such a tensor (a damaged file: torch's
            zip reader, the unpickler or a short read fails), naming the file, the byte range and
            the checkpoint key.
    """
    where = f"{path}: the data of {req.key} at bytes {info.offset}..{info.offset + info.length}"
    try:
        stored = torch.load(_FileRange(f, info.offset, info.length), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, unpickling and read errors all mean damaged bytes
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:120]
        raise CheckpointError(f"{where} cannot be read ({type(exc).__name__}{': ' + first if first else ''}); the "
                              "checkpoint file is damaged") from None
    ends = [start + length for start, length in zip(item.storage_offsets, item.lengths)]
    if not isinstance(stored, torch.Tensor) or stored.dim() != len(ends) \
            or any(end > size for end, size in zip(ends, stored.shape)):
        got = tuple(stored.shape) if isinstance(stored, torch.Tensor) else type(stored).__name__
        raise CheckpointError(f"{where} holds {got}, not the chunk the index describes; the checkpoint file is damaged")
    return stored


def _read_regions(ckpt_dir: str, metadata, requests: Dict[str, _RegionRequest]) -> None:
    """Fill every request's ``result`` from the torch.distributed.checkpoint files of ``ckpt_dir``.

    Chunk overlaps come from ``create_read_items_for_chunk_list`` (torch's resharding
    logic). Each stored chunk is deserialised straight from its byte range of the file; when
    it covers the whole request it *becomes* the result (no second copy, which matters for the
    embedding), otherwise its overlap is copied into a buffer.
    """
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    per_file: Dict[str, list] = {}
    for name, req in requests.items():
        chunk = ChunkStorageMetadata(offsets=torch.Size(req.offset), sizes=torch.Size(req.sizes))
        for item in create_read_items_for_chunk_list(req.key, metadata.state_dict_metadata[req.key], [chunk]):
            info = metadata.storage_data[item.storage_index]
            if getattr(info, "transform_descriptors", None):
                raise ConversionError(f"{ckpt_dir}: {req.key} is stored with transforms "
                                      f"{info.transform_descriptors}, which the reader does not handle")
            per_file.setdefault(info.relative_path, []).append((name, item, info))
    for relative, items in per_file.items():
        path = os.path.join(ckpt_dir, relative)
        with _open_data_file(path) as f:
            for name, item, info in sorted(items, key=lambda x: x[2].offset):
                req = requests[name]
                stored = _load_chunk(f, path, info, item, req)
                whole = all(o == 0 for o in item.dest_offsets) and tuple(item.lengths) == tuple(req.sizes)
                part = stored
                for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                    part = part.narrow(dim, start, length)
                if whole and req.result is None and part.dtype == req.dtype:
                    req.result = part if part.numel() == stored.numel() else part.clone()
                    continue
                dest = req.dest()
                for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
                    dest = dest.narrow(dim, start, length)
                dest.copy_(part)
                del stored, part


class CheckpointReader:
    """Read TP=1 tensors, a few at a time, from a megatron checkpoint saved at any layout.

    Each tensor is one region of a checkpoint tensor (e.g. layer 3 of the stacked
    ``decoder.layers.self_attention.linear_qkv.weight`` [L, (nh + 2 ng) hd, H]); only the
    stored chunks overlapping it are read, straight from the torch.distributed.checkpoint
    files (:func:`_read_regions`).

    Args:
        cfg: the checkpoint's architecture.
        ckpt_dir: a megatron torch_dist checkpoint (weights under ``model`` / ``model0``...),
            saved at any TP/PP/VPP/DP layout.
    """

    def __init__(self, cfg: ModelConfig, ckpt_dir: str):
        quiet_megatron()
        import torch.distributed.checkpoint as dcp
        from megatron.core import dist_checkpointing

        if not dist_checkpointing.check_is_distributed_checkpoint(ckpt_dir):
            raise ConversionError(f"{ckpt_dir}: not a megatron distributed checkpoint (no metadata.json)")
        from psft_megatron.checkpointing.dist_checkpoint import damaged

        problem = damaged(ckpt_dir, verify_data=True)  # sizes, and one streaming pass over the checksums
        if problem:
            raise CheckpointError(problem)  # names the file, like a damaged resume
        self.cfg, self.dir = cfg, ckpt_dir
        self.sharded = meta_sharded_state_dict(cfg, any_world=True)
        self.full_metadata = dcp.FileSystemReader(ckpt_dir).read_metadata()
        self.metadata = self.full_metadata.state_dict_metadata

    def stored_dtype(self) -> torch.dtype:
        return self.metadata[self.sharded["embedding.word_embeddings.weight"].key].properties.dtype

    def stored_padded_vocab(self) -> int:
        return int(self.metadata[self.sharded["embedding.word_embeddings.weight"].key].size[0])

    def read(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """``{name: TP=1 tensor}`` in the dtype stored in the checkpoint.

        Embedding / output rows come back as stored (padded as at the layout it was saved at).

        Raises:
            ConversionError: a tensor is not in the checkpoint, or has another shape (named).
        """
        requests = {}
        for name in names:
            key, offset, sizes = _region_of(self.sharded[name])
            stored = self.metadata.get(key)
            if stored is None:
                raise ConversionError(f"{self.dir}: checkpoint has no tensor {key!r} (needed for {name})")
            stacked = self._ndim(name) < len(sizes)
            shape = tuple(stored.size)
            vocab = name in ("embedding.word_embeddings.weight", "output_layer.weight")
            if not stacked and shape != sizes:
                if not (vocab and shape[1:] == sizes[1:]):
                    raise ConversionError(f"{self.dir}: {key} has shape {shape}, the model config expects {sizes}")
                sizes = shape  # vocab padded for another TP size
            elif stacked and (len(shape) != len(sizes) or shape[1:] != sizes[1:]
                              or any(o + n > g for o, n, g in zip(offset, sizes, shape))):
                raise ConversionError(f"{self.dir}: {key} has shape {tuple(stored.size)}, the model config expects "
                                      f"a region {sizes} at {offset}")
            requests[name] = _RegionRequest(key, offset, sizes, stored.properties.dtype)
        _read_regions(self.dir, self.full_metadata, requests)
        out = {}
        for name, req in requests.items():
            t = req.dest()  # (a region of zero size has no chunks)
            out[name] = t.reshape(t.shape[len(t.shape) - self._ndim(name):])
        return out

    def _ndim(self, name: str) -> int:
        value = self.sharded[name]
        return value.data.dim() if _is_factory(value) else len(value.local_shape)
