"""Process runtime: torch.distributed, megatron parallel_state and RNG seeds in one call.

Typical use (inside a ``torchrun`` launch, or a plain ``python`` run as a world of one)::

    from psft_megatron.distributed.runtime import ParallelConfig, initialize
    info = initialize(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))

:func:`initialize` picks NCCL when CUDA is present and gloo otherwise (override with
``backend=`` or the ``PSFT_DIST_BACKEND`` environment variable), binds the local GPU, installs
the CPU compatibility layer on CPU runs only (:mod:`psft_megatron.compat.cpu`), applies the
distributed-optimizer checkpoint fixes (:mod:`psft_megatron.compat.distopt_fixes`, all runs) and the MoE
fixes (:mod:`psft_megatron.compat.moe_fixes`, all runs), builds
megatron's TP/PP/VPP/CP/DP groups and seeds the model-parallel RNG streams.
:func:`reinitialize_model_parallel` swaps the layout inside one process (the parity tests run
many layouts per launch this way).
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import torch

from psft_megatron.compat import distopt_fixes, moe_fixes
from psft_megatron.distributed.layout import ParallelConfig  # the layout; defined without torch


@dataclass(frozen=True)
class RuntimeInfo:
    """What :func:`initialize` set up."""

    backend: str
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    data_parallel_size: int
    parallel: ParallelConfig
    cpu_compat: bool


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: True when :func:`initialize` created the default process group (so :func:`shutdown` ends it)
_owns_default_group = False


def _init_process_group(backend: Optional[str], timeout_minutes: int) -> str:
    global _owns_default_group
    if torch.distributed.is_initialized():
        return torch.distributed.get_backend()
    _owns_default_group = True
    if "RANK" not in os.environ:  # plain `python script.py`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = backend or os.environ.get("PSFT_DIST_BACKEND") or (
        "nccl" if torch.cuda.is_available() else "gloo"
    )
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend 'nccl' needs CUDA, but torch.cuda.is_available() is False; use 'gloo'")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(
        backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    return backend


def set_seeds(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG streams.

    As in Megatron-LM, each pipeline stage gets ``seed + 100 * pp_rank``; megatron then
    derives the tensor-parallel stream (``+2718 + tp_rank``) and the data-parallel stream.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional here
        pass
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def reinitialize_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Tear down megatron's groups (if any) and build ``parallel``'s; reseed the RNGs."""
    from megatron.core import parallel_state

    parallel.validate(torch.distributed.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
    )
    set_seeds(seed)


def initialize(
    parallel: ParallelConfig = ParallelConfig(),
    *,
    backend: Optional[str] = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> RuntimeInfo:
    """Initialise torch.distributed (from torchrun's env), megatron parallel state and seeds.

    Args:
        parallel: the TP/PP/VPP/CP/SP layout; DP = world_size / (TP*PP*CP).
        backend: "nccl" or "gloo"; default nccl with CUDA, gloo without
            (or ``$PSFT_DIST_BACKEND``).
        seed: base random seed.
        timeout_minutes: collective timeout.
    """
    backend = _init_process_group(backend, timeout_minutes)
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        from psft_megatron.compat import cpu as cpu_compat

        cpu_compat.install()
    distopt_fixes.install()
    moe_fixes.install()
    reinitialize_model_parallel(parallel, seed)
    world = torch.distributed.get_world_size()
    return RuntimeInfo(
        backend=backend,
        device=torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device()),
        rank=torch.distributed.get_rank(),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        data_parallel_size=world // parallel.model_parallel_size,
        parallel=parallel,
        cpu_compat=on_cpu,
    )


def device() -> torch.device:
    """The device this process computes on (``cuda:<local>`` or ``cpu``): every tensor handed to
    the model, the loss or a collective lives here (NCCL only takes CUDA tensors)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce_values(values, op: str = "sum", group=None) -> list:
    """All-reduce a few host numbers over ``group`` (default: the world) and return them as
    Python floats on every rank. The float64 tensor that travels is made on :func:`device`, as
    the backend needs; NaN and Inf pass through. One collective and one device-to-host read.

    Args:
        values: numbers (a list or tuple of floats, ints or bools).
        op: "sum", "max" or "min".
    """
    flat = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(flat, op=getattr(torch.distributed.ReduceOp, _REDUCE_OPS[op]), group=group)
    return flat.tolist()


def shutdown() -> None:
    """Destroy megatron's groups, and the default process group if :func:`initialize` created
    it (end of a run; a caller that started torch.distributed itself keeps its group)."""
    global _owns_default_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized() and _owns_default_group:
        torch.distributed.destroy_process_group()
        _owns_default_group = False

