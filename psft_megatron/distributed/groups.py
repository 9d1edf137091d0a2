"""Default process groups for the plug-in: an explicit group, else megatron's, else none."""

from __future__ import annotations

import sys

import torch.distributed as dist

# kind -> (parallel_state getter of the world size, getter of the group)
_MEGATRON_GETTERS = {
    "tp": ("get_tensor_model_parallel_world_size", "get_tensor_model_parallel_group"),
    "cp": ("get_context_parallel_world_size", "get_context_parallel_group"),
}


def resolve_group(group, kind: str):
    """``(group, rank, world_size)`` for ``group``, or megatron's ``kind`` ("tp" or "cp") group.

    ``group=None`` means megatron's group of that kind when megatron's parallel state is
    initialised with size > 1. A world of one is returned as ``(None, 0, 1)``: callers skip
    communication then.
    """
    if group is None:
        # parallel state can only be initialised if its module was imported: looking it up in
        # sys.modules avoids importing megatron (seconds) just to learn "no TP/CP".
        parallel_state = sys.modules.get("megatron.core.parallel_state")
        if parallel_state is None or not parallel_state.model_parallel_is_initialized():
            return None, 0, 1
        size_getter, group_getter = _MEGATRON_GETTERS[kind]
        if getattr(parallel_state, size_getter)() <= 1:
            return None, 0, 1
        group = getattr(parallel_state, group_getter)()
    world = dist.get_world_size(group=group)
    if world <= 1:
        return None, 0, 1
    return group, dist.get_rank(group=group), world
