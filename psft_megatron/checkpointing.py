"""Megatron distributed checkpoints (torch_dist) of model chunks and optimizer state.

The layout on disk is megatron's: tensors are keyed by their global (unsharded) identity, so
a checkpoint saved at one TP/PP/VPP/CP/DP layout loads at another. Model chunks are stored
under ``model`` (one chunk) or ``model0``, ``model1``, ... (virtual pipeline stages), as
Megatron-LM does; the keys inside are global layer numbers, so VPP may change between save
and load. Distributed-optimizer state is saved ``fully_reshardable``
(:data:`psft_megatron.distopt_fixes.DISTOPT_SAVE_METADATA`), which DP changes need; a plain
optimizer and a distributed optimizer checkpoint are not interchangeable.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from psft_megatron.distopt_fixes import DISTOPT_SAVE_METADATA


def _model_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def uses_distributed_optimizer(optimizer) -> bool:
    """True if ``optimizer`` (or any optimizer in a ChainedOptimizer) is a DistributedOptimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(opt, DistributedOptimizer) for opt in inner)


def unwrap(module):
    """The GPTModel inside megatron wrappers (DDP, Float16Module)."""
    while hasattr(module, "module"):
        module = module.module
    return module


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
    """
    from megatron.core import dist_checkpointing

    from psft_megatron.megatron_compat import write_legacy_common_state

    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(chunks, optimizer, False, common, per_rank), ckpt_dir)
    write_legacy_common_state(ckpt_dir)  # loadable by every supported megatron-core release


def load_common(ckpt_dir: str) -> Dict[str, Any]:
    """The ``common`` values of a checkpoint, without loading tensors."""
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: not a megatron distributed checkpoint (no metadata.json)")
    return dist_checkpointing.load_common_state_dict(ckpt_dir)


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
                    per_rank: bool = False) -> Dict[str, Any]:
    """Load what :func:`save_checkpoint` wrote into ``chunks`` (and ``optimizer``), at any layout
    and across layer specs (``te`` <-> ``local``/``cpu``).

    FP8 metadata (``_extra_state`` of Transformer Engine modules) is restored when the checkpoint
    has it; a checkpoint without it (written by the ``cpu``/``local`` spec, or without FP8)
    leaves those modules with fresh FP8 state, and the keys are reported in the returned
    ``missing_extra_state`` list. Extra state the model has no module for (a TE checkpoint
    loaded into the ``cpu`` spec) is not read.

    Returns:
        the loaded state dict's non-model, non-optimizer entries (the ``common`` values, and
        this rank's ``per_rank_state`` if ``per_rank``), plus ``missing_extra_state``.
    Raises:
        FileNotFoundError: naming ``ckpt_dir`` if it holds no megatron distributed checkpoint.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    if not dist_checkpointing.check_is_distributed_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: not a megatron distributed checkpoint (no metadata.json)")
    request = _sharded_state_dict(chunks, optimizer, True, None, per_rank=0 if per_rank else None)
    keys = [_model_key(i, len(chunks)) for i in range(len(chunks))]
    stored = set(load_sharded_metadata(ckpt_dir))
    dropped = {key: _drop_missing_extra_states(request[key], stored) for key in keys}
    state = dist_checkpointing.load(request, ckpt_dir)
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
