"""CPU compatibility layer: lets megatron-core's CUDA-only code paths run on CPU with gloo.

This is the ONE place where psft-megatron adapts megatron-core's hard-coded CUDA usage.
It is installed by :func:`psft_megatron.runtime.initialize` on CPU runs only, and
:func:`install` refuses to run when CUDA is available: a GPU run never sees it.

Why it exists: megatron-core 0.16.x allocates buffers with ``device="cuda"`` or
``torch.cuda.current_device()`` on a training step's path (pipeline schedules' token
counters, p2p receive buffers, sequence-parallel all-gather/reduce-scatter buffers, the
DDP grad buffers, optimizer/clip-grad helpers, RoPE, dist-checkpoint strategies), keeps its
model-parallel RNG streams in CUDA generator state, and compares ``tensor.type()`` against
``'torch.cuda.FloatTensor'``. See ``shared/notes/megatron-core-on-cpu.md`` for the list.

What it patches (and nothing else):

1. A :class:`torch.overrides.TorchFunctionMode`, pushed once for the process, that
   - rewrites ``device=`` arguments naming CUDA ("cuda", "cuda:N", ``torch.device("cuda")``
     or an int ordinal) to ``"cpu"`` and drops ``pin_memory=True``;
   - makes ``Tensor.cuda()`` return the tensor itself and ``Tensor.to("cuda")`` go to CPU;
   - reports ``Tensor.type()`` (no arguments) of a CPU tensor as ``'torch.cuda.<T>'``,
     the string megatron's optimizers compare against.
2. ``torch.cuda`` functions that have no CPU meaning:
   - ``current_device()`` returns ``torch.device("cpu")`` - a device, not the int 0: a
     function mode is not active inside autograd ``backward()`` of megatron's custom
     Functions, which allocate with ``device=torch.cuda.current_device()``;
   - ``synchronize``/``empty_cache`` are no-ops; ``Stream``/``Event``/``stream``/
     ``current_stream``/``default_stream`` are inert stand-ins;
   - CUDA RNG state (``get_rng_state``, ``set_rng_state``, ``manual_seed``,
     ``manual_seed_all``) maps to the CPU default generator, and so do megatron's
     ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``, so the stock
     ``CudaRNGStatesTracker`` and ``model_parallel_cuda_manual_seed`` work unchanged.

Threads: torch function modes are thread-local, so the patch in (2) is what covers
autograd's worker threads and dist-checkpointing's helpers.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.Lock()
_installed_mode: "_CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Bare ints are CUDA ordinals in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU (see the module docstring, item 1)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(args[0])
            if args[0].device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                return "torch.cuda." + name[len("torch.") :]
            return name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Inert stand-in for ``torch.cuda.Stream`` on CPU (all work is synchronous)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event or _NullEvent()


class _NullEvent:
    """Inert stand-in for ``torch.cuda.Event`` on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _cpu_get_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state.cpu() if new_state.device.type != "cpu" else new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _noop(*args, **kwargs) -> None:
    return None


_NULL_STREAM = _NullStream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.synchronize = _noop
    cuda.empty_cache = _noop
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.random.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    cuda.manual_seed_all = _cpu_manual_seed
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.current_stream = lambda device=None: _NULL_STREAM
    cuda.default_stream = lambda device=None: _NULL_STREAM


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _cpu_get_rng_state
    mp_random._set_cuda_rng_state = _cpu_set_rng_state


def is_installed() -> bool:
    """True once :func:`install` has run in this process."""
    return _installed_mode is not None


def install() -> None:
    """Install the CPU compatibility layer for the rest of the process (idempotent).

    Raises:
        RuntimeError: if CUDA is available - GPU runs must use megatron-core unchanged.
    """
    global _installed_mode
    with _lock:
        if _installed_mode is not None:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "psft_megatron.cpu_compat must not be installed when CUDA is available; "
                "GPU runs use megatron-core's CUDA paths unchanged."
            )
        _patch_torch_cuda()
        _patch_megatron_rng()
        mode = _CudaToCpuMode()
        mode.__enter__()
        _installed_mode = mode
