"""Megatron distributed checkpoints (torch_dist) of model chunks and optimizer state.

The layout on disk is megatron's: tensors are keyed by their global (unsharded) identity, so
a checkpoint saved at one TP/PP/VPP/CP/DP layout loads at another. Model chunks are stored
under ``model`` (one chunk) or ``model0``, ``model1``, ... (virtual pipeline stages), as
Megatron-LM does; the keys inside are global layer numbers, so VPP may change between save
and load. Distributed-optimizer state is saved ``fully_reshardable``
(:data:`psft_megatron.compat.distopt_fixes.DISTOPT_SAVE_METADATA`), which DP changes need; a plain
optimizer and a distributed optimizer checkpoint are not interchangeable.

Before its data is used, a checkpoint is checked once per start (:func:`inspect_checkpoint`):
global rank 0 reads its index, sizes, ``checksums.json`` and common state, every rank hashes
its share of the data files, and every rank gets the same :class:`CheckpointInfo` (the common
state included, so nothing is read twice). :func:`damaged` is the same check in one process
(the converter).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from psft_megatron.compat.distopt_fixes import DISTOPT_SAVE_METADATA
from psft_megatron.model.unwrap import unwrap


def _model_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def uses_distributed_optimizer(optimizer) -> bool:
    """True if ``optimizer`` (or any optimizer in a ChainedOptimizer) is a DistributedOptimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(opt, DistributedOptimizer) for opt in inner)


PER_RANK_KEY = "per_rank_state"


def _per_rank_object(data: Any):
    """A ShardedObject holding ``data`` for this global rank (loadable at the same world size)."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return ShardedObject(PER_RANK_KEY, data, (world,), (rank,), replica_id=0)


def _sharded_state_dict(chunks, optimizer, is_loading: bool, common: Optional[Dict[str, Any]],
                        per_rank: Any = None) -> dict:
    state: Dict[str, Any] = {
        _model_key(i, len(chunks)): unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)
    }
    if optimizer is not None:
        metadata = DISTOPT_SAVE_METADATA if uses_distributed_optimizer(optimizer) else None
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    if common:
        state.update(common)
    if per_rank is not None:
        state[PER_RANK_KEY] = _per_rank_object(per_rank)
    return state


def save_checkpoint(ckpt_dir: str, chunks: List, optimizer=None, common: Optional[Dict[str, Any]] = None,
                    per_rank: Any = None) -> None:
    """Save model chunks (and optimizer state) to ``ckpt_dir`` (collective: call on every rank).

    Args:
        ckpt_dir: directory; created if missing, must be empty.
        chunks: this rank's model chunks (GPTModel or megatron DDP wrappers).
        optimizer: megatron optimizer, or None for weights only.
        common: small picklable values stored once (e.g. ``{"iteration": 10}``); identical on
            every rank.
        per_rank: a picklable value of this rank (RNG states, ...), loadable only at the same
            world size (``load_checkpoint(..., per_rank=True)``).

    Last, every file is hashed and fsynced (each by the rank that wrote it) and rank 0 writes
    ``checksums.json`` (:mod:`psft_megatron.checkpointing.integrity`).
    """
    from megatron.core import dist_checkpointing

    from psft_megatron.checkpointing.integrity import write_checksums
    from psft_megatron.compat.releases import write_legacy_common_state

    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(chunks, optimizer, False, common, per_rank), ckpt_dir)
    write_legacy_common_state(ckpt_dir)  # loadable by every supported megatron-core release
    write_checksums(ckpt_dir)


def not_a_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Why ``ckpt_dir`` is not a megatron distributed checkpoint (with the fix), or None."""
    if not os.path.isdir(ckpt_dir):
        return "not a directory"
    if os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        return None
    names = set(os.listdir(ckpt_dir))
    if "config.json" in names and any(n.endswith((".safetensors", ".bin")) or n.endswith(".index.json") for n in names):
        return (f"a Hugging Face model directory, not a megatron checkpoint; convert it first: "
                f"python tools/convert_hf_to_megatron.py --hf-dir {ckpt_dir} --out <megatron checkpoint dir>")
    if "latest" in names:
        return "a trainer's checkpoints/ directory; name one checkpoint in it (its 'latest' file says which)"
    return "not a megatron distributed checkpoint (no metadata.json)"


@dataclass
class CheckpointInfo:
    """What one look at a checkpoint found (:func:`inspect_checkpoint`: rank 0 reads the files,
    every rank gets this).

    Attributes:
        path: the checkpoint directory.
        problem: why it cannot be loaded, naming the file; None if intact.
        common: its common state (``iteration``, ``run_id``, ...); None when damaged.
        checksums: ``checksums.json``'s files; None for a checkpoint written before checksums.
        vocab_rows: rows of the stored embedding (the vocab padded at the saving TP), if any.
    """

    path: str
    problem: Optional[str] = None
    common: Optional[Dict[str, Any]] = None
    checksums: Optional[Dict[str, Any]] = None
    vocab_rows: Optional[int] = None


def _read_index(ckpt_dir: str):
    """The unpickled torch_dist index ``.metadata``, or the string saying why not."""
    import pickle

    index = os.path.join(ckpt_dir, ".metadata")
    try:
        with open(index, "rb") as f:
            metadata = pickle.load(f)
        metadata.storage_data.values()
        return metadata
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle the index means a damaged file
        return f"{index}: unreadable ({type(exc).__name__})"


def _file_sizes_problem(ckpt_dir: str, index) -> Optional[str]:
    """Every data file the index references exists and holds every byte range it names."""
    needed: Dict[str, int] = {}
    for info in index.storage_data.values():
        path = os.path.join(ckpt_dir, info.relative_path)
        needed[path] = max(needed.get(path, 0), int(info.offset) + int(info.length))
    for path, size in sorted(needed.items()):
        if not os.path.isfile(path):
            return f"{path}: missing"
        if os.path.getsize(path) < size:
            return f"{path}: truncated ({os.path.getsize(path)} bytes, the index needs {size})"
    return None


def _inspect(ckpt_dir: str) -> CheckpointInfo:
    """The structural look of :func:`damaged` (no tensor data read), in this process."""
    import json

    from psft_megatron.checkpointing import integrity

    problem = not_a_checkpoint(ckpt_dir)
    if problem:
        return CheckpointInfo(ckpt_dir, f"{ckpt_dir}: {problem}")
    meta_json = os.path.join(ckpt_dir, "metadata.json")
    try:
        with open(meta_json, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as exc:
        return CheckpointInfo(ckpt_dir, f"{meta_json}: unreadable ({type(exc).__name__})")
    index = _read_index(ckpt_dir)
    if isinstance(index, str):
        return CheckpointInfo(ckpt_dir, index)
    _remember_index(ckpt_dir, index)
    checksums = integrity.read_checksums(ckpt_dir)
    problem = _file_sizes_problem(ckpt_dir, index) or (checksums if isinstance(checksums, str) else None) \
        or (integrity.uncovered(ckpt_dir, checksums, index) if checksums else None)
    if problem:
        return CheckpointInfo(ckpt_dir, problem)
    common_path = os.path.join(ckpt_dir, "common.pt")
    if not os.path.isfile(common_path):
        return CheckpointInfo(ckpt_dir, f"{common_path}: missing")
    try:
        import torch

        common = torch.load(common_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to load it means a damaged file
        return CheckpointInfo(ckpt_dir, f"{common_path}: unreadable ({type(exc).__name__})")
    embedding = index.state_dict_metadata.get(EMBEDDING_KEY)
    rows = int(embedding.size[0]) if embedding is not None and hasattr(embedding, "size") else None
    return CheckpointInfo(ckpt_dir, None, common if isinstance(common, dict) else {}, checksums, rows)


#: the stored key of the input embedding (vocab rows x hidden)
EMBEDDING_KEY = "embedding.word_embeddings.weight"
#: the stored keys of the last indexes read in this process: {path: (.metadata mtime, key -> shape)}
_INDEXES: Dict[str, Any] = {}
_INDEXES_KEPT = 4  # a start checks and loads at most two checkpoints (the resume, the restore)


def _stored_shapes(index) -> Dict[str, Optional[tuple]]:
    """key -> global shape of every stored tensor (None for stored objects) of an index."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {key: tuple(meta.size) if isinstance(meta, TensorStorageMetadata) else None
            for key, meta in index.state_dict_metadata.items()}


def _remember_index(ckpt_dir: str, index) -> None:
    path = os.path.abspath(ckpt_dir)
    while len(_INDEXES) >= _INDEXES_KEPT:
        _INDEXES.pop(next(iter(_INDEXES)))  # the oldest
    _INDEXES[path] = (os.stat(os.path.join(path, ".metadata")).st_mtime_ns, _stored_shapes(index))


def _stored_keys(ckpt_dir: str) -> Dict[str, Optional[tuple]]:
    """The stored key -> shape map of ``ckpt_dir``: the one its check just read in this process,
    else read from its index now."""
    from psft_megatron.errors import CheckpointError

    path = os.path.abspath(ckpt_dir)
    cached = _INDEXES.get(path)
    try:
        if cached and cached[0] == os.stat(os.path.join(path, ".metadata")).st_mtime_ns:
            return cached[1]
    except OSError as exc:
        raise CheckpointError(f"{os.path.join(ckpt_dir, '.metadata')}: unreadable ({type(exc).__name__})") from None
    index = _read_index(ckpt_dir)
    if isinstance(index, str):
        raise CheckpointError(index)
    return _stored_shapes(index)


def damaged(ckpt_dir: str, verify_data: bool = False) -> Optional[str]:
    """Why the files of checkpoint ``ckpt_dir`` cannot be loaded, naming the file; None if they
    look intact. In this process only (no collectives): for a single reader, e.g. the converter.

    Reads ``metadata.json``, the torch_dist index ``.metadata``, the size of every data file
    it references (present and long enough for every byte range it names), ``checksums.json``
    (it must cover those files) and ``common.pt``. ``verify_data``: also one streaming pass
    over every file ``checksums.json`` covers, comparing sizes and sha256
    (:mod:`psft_megatron.checkpointing.integrity`).
    """
    from psft_megatron.checkpointing import integrity

    info = _inspect(ckpt_dir)
    if info.problem or not verify_data or not info.checksums:
        return info.problem
    hashed = {name: integrity.file_digest(os.path.join(ckpt_dir, name)) for name in info.checksums}
    return integrity.mismatch(ckpt_dir, info.checksums, hashed)


def inspect_checkpoint(ckpt_dir: str, verify_data: bool = True) -> CheckpointInfo:
    """:func:`damaged`'s checks once for the whole job: global rank 0 reads the index, the sizes,
    ``checksums.json`` and ``common.pt``; the data files are hashed by every rank, each its
    share (``verify_data``); rank 0 compares and every rank gets the same
    :class:`CheckpointInfo`. Collective under torch.distributed (call on every rank)."""
    from psft_megatron.checkpointing import integrity
    from psft_megatron.distributed.decisions import rank0_decides

    info = rank0_decides(lambda: _inspect_or_why(ckpt_dir))
    if info.problem or not verify_data or not info.checksums:
        return info
    hashed = integrity.hash_files(ckpt_dir, sorted(info.checksums))
    problem = rank0_decides(lambda: integrity.mismatch(ckpt_dir, info.checksums, hashed))
    return dataclasses.replace(info, problem=problem, common=None) if problem else info


def _inspect_or_why(ckpt_dir: str) -> CheckpointInfo:
    """:func:`_inspect`, with any failure (a file changed while it was read) as the problem:
    rank 0 must answer, or the other ranks wait forever."""
    try:
        return _inspect(ckpt_dir)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        return CheckpointInfo(ckpt_dir, f"{ckpt_dir}: cannot be read ({type(exc).__name__}: {exc})")


def _checked(ckpt_dir: str) -> CheckpointInfo:
    from psft_megatron.errors import CheckpointError

    info = inspect_checkpoint(ckpt_dir)
    if info.problem:
        raise CheckpointError(info.problem)
    return info


def load_common(ckpt_dir: str) -> Dict[str, Any]:
    """The ``common`` values of a checkpoint, without loading tensors (CheckpointError naming the
    file if the checkpoint is damaged). Collective under torch.distributed."""
    return _checked(ckpt_dir).common


def _model_items(state: dict):
    """(key, item) of every ShardedTensor / factory / object in one chunk's request."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    for item in nested_values(state):
        if isinstance(item, ShardedObject):
            yield item.unique_key, item  # stored objects are keyed per shard
        elif isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            yield item.key, item


#: stored keys that are not model weights: optimizer state, per-rank state
_NOT_MODEL_PREFIXES = ("optimizer.", PER_RANK_KEY)
#: megatron's ChainedOptimizer (an MoE model's dense + expert optimizers) stores each
#: sub-optimizer's state under "chained_<i>.optimizer..."
_CHAINED_PREFIX = re.compile(r"^chained_\d+\.")


def _is_model_key(key: str) -> bool:
    return not _CHAINED_PREFIX.sub("", key).startswith(_NOT_MODEL_PREFIXES)


def _global_shape(item):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(item, ShardedTensor) and not item.allow_shape_mismatch:
        return tuple(item.global_shape)
    return None  # factories, objects, vocab-padded tensors: no shape to compare


def _is_extra_state(key: str) -> bool:
    """FP8 metadata; objects are stored per shard: ``<key>/shard_<i>_<n>``."""
    return key.split("/", 1)[0].endswith("_extra_state")


def check_model_keys(ckpt_dir: str, wanted: Dict[str, Any], stored: Dict[str, Optional[tuple]]) -> None:
    """Every weight the model asks for is in the checkpoint with the same global shape, and
    every weight of the checkpoint is asked for; else CheckpointError naming the first keys.

    Exceptions (docs/config.md, "Restoring a model"): ``_extra_state`` (FP8 metadata) either
    way; the vocab dimension of the embedding and output layer (megatron marks them
    ``allow_shape_mismatch``: vocab padding rows depend on TP); stored objects and optimizer
    state (a weights-only load skips them).

    Args:
        wanted: every rank's model items together (a pipeline stage asks only for its own
            layers): key -> global shape, or None where there is no shape to compare.
        stored: the checkpoint's stored keys -> global shape (None for stored objects), from its
            torch_dist index.
    """
    from psft_megatron.errors import CheckpointError

    missing = sorted(k for k in wanted if k not in stored and not _is_extra_state(k))
    unexpected = sorted(k for k, shape in stored.items() if shape is not None and k not in wanted
                        and not _is_extra_state(k) and _is_model_key(k))

    def few(keys):
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    hint = "; was it saved with another architecture? (compare its model.yaml with the run's model keys)"
    if missing:
        raise CheckpointError(f"{ckpt_dir}: the model needs weights the checkpoint does not have: {few(missing)}{hint}")
    if unexpected:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint has weights the model does not use: {few(unexpected)}{hint}")
    for key, shape in sorted(wanted.items()):
        have = stored.get(key)
        if shape is not None and have is not None and shape != have:
            raise CheckpointError(f"{ckpt_dir}: weight {key} has shape {list(have)} in the checkpoint, "
                                  f"the model needs {list(shape)}{hint}")


def _stored_extra_states(ckpt_dir: str, requests: List[dict], strict: bool) -> set:
    """The checkpoint's ``_extra_state`` keys, the same on every rank; with ``strict``, first
    :func:`check_model_keys`. Every rank's model keys go to global rank 0 only (one gather, not
    an all-gather: O(world) traffic); rank 0 decides from the index its check of the checkpoint
    read (no second read)."""
    from psft_megatron.distributed.decisions import rank0_decides, rank0_gathers

    mine = {}
    for request in requests:
        mine.update((key, _global_shape(item)) for key, item in _model_items(request))
    everyone = rank0_gathers(mine)

    def decide() -> set:
        stored = _stored_keys(ckpt_dir)
        if strict:
            wanted: Dict[str, Any] = {}
            for part in everyone:
                wanted.update(part)
            check_model_keys(ckpt_dir, wanted, stored)
        return {key for key in stored if _is_extra_state(key)}

    return rank0_decides(decide)


def _drop_missing_extra_states(model_state: dict, stored: set) -> Dict[str, str]:
    """Remove from one model chunk's load request every ``_extra_state`` object the checkpoint
    lacks (``stored``: the checkpoint's object/tensor keys); returns {state-dict name: key}.

    Transformer Engine modules keep their FP8 metadata (scales, amax histories) as
    ``_extra_state``; a checkpoint written by a spec without such modules (``cpu``/``local``
    have no TE attention state) has none to give, and those modules keep their fresh state.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    dropped = {}
    for name, item in list(model_state.items()):
        if isinstance(item, ShardedObject) and item.key.endswith("_extra_state") and item.unique_key not in stored:
            dropped[name] = item.unique_key
            del model_state[name]
    return dropped


def load_checkpoint(ckpt_dir: str, chunks: List, optimizer=None, strict: bool = True,
                    per_rank: bool = False, checked: bool = False) -> Dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into ``chunks`` (and ``optimizer``), at any layout
    and across layer specs (``te`` <-> ``local``/``cpu``).

    FP8 metadata (``_extra_state`` of Transformer Engine modules) is restored when the checkpoint
    has it; a checkpoint without it (written by the ``cpu``/``local`` spec, or without FP8)
    leaves those modules with fresh FP8 state, and the keys are reported in the returned
    ``missing_extra_state`` list. Extra state the model has no module for (a TE checkpoint
    loaded into the ``cpu`` spec) is not read.

    ``checked``: the caller has had ``ckpt_dir`` checked (:func:`inspect_checkpoint`) in this
    start; otherwise it is checked here (checksums included). Collective under
    torch.distributed.

    Returns:
        the loaded state dict's non-model, non-optimizer entries (the ``common`` values, and
        this rank's ``per_rank_state`` if ``per_rank``), plus ``missing_extra_state``.
    Raises:
        CheckpointError: naming the file if ``ckpt_dir`` is no megatron distributed checkpoint
            or is damaged; with ``strict``, naming the first weights the model and the
            checkpoint disagree on (:func:`check_model_keys`).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    from psft_megatron.errors import CheckpointError

    if not checked:
        _checked(ckpt_dir)
    request = _sharded_state_dict(chunks, optimizer, True, None, per_rank=0 if per_rank else None)
    keys = [_model_key(i, len(chunks)) for i in range(len(chunks))]
    stored = _stored_extra_states(ckpt_dir, [request[key] for key in keys], strict)
    dropped = {key: _drop_missing_extra_states(request[key], stored) for key in keys}
    try:
        state = dist_checkpointing.load(request, ckpt_dir)
    except (OSError, EOFError, RuntimeError, KeyError, CheckpointingException, CheckpointException) as exc:
        # files changed under us, or unreadable data (torch.distributed.checkpoint reports a
        # failure on any rank to every rank as a CheckpointException)
        first = (str(exc).splitlines() or [""])[0][:300]
        raise CheckpointError(f"{ckpt_dir}: loading failed ({type(exc).__name__}: {first})") from None
    for key, chunk in zip(keys, chunks):
        loaded = state.pop(key)
        # None means "no saved state" to TE's set_extra_state (fresh FP8 metadata), as it does
        # to megatron's local linears.
        loaded.update(dict.fromkeys(dropped[key]))
        unwrap(chunk).load_state_dict(loaded, strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(state.pop("optimizer"))
    state["missing_extra_state"] = sorted(set().union(*(d.values() for d in dropped.values())))
    return state
