"""CPU compatibility layer: lets megatron-core's CUDA-only code paths run on CPU with gloo.

This is the ONE place where psft-megatron adapts megatron-core's hard-coded CUDA usage.
It is installed by :func:`psft_megatron.distributed.runtime.initialize` on CPU runs only, and
:func:`install` refuses to run when CUDA is available: a GPU run never sees it.

Why it exists: megatron-core allocates buffers with ``device="cuda"`` or
``torch.cuda.current_device()`` on a training step's path (pipeline schedules' token
counters, p2p receive buffers, sequence-parallel all-gather/reduce-scatter buffers, the
DDP grad buffers, optimizer/clip-grad helpers, RoPE, dist-checkpoint strategies), keeps its
model-parallel RNG streams in CUDA generator state, and compares ``tensor.type()`` against
``'torch.cuda.FloatTensor'``.

The layer is a list of named patches (:data:`PATCHES`). Each names the megatron-core releases
that need it (a PEP 440 range, checked with :func:`psft_megatron.compat.releases.version_in`)
and the call sites that need it; :func:`install` applies a patch only on the releases in its
range. The sites were re-derived for 0.16.1 and 0.19.2 by tracing the whole test suite
(``PSFT_CPU_COMPAT_TRACE``, below) and reading 0.17.1/0.18.2/0.19.0's sources; and
``tests/test_cpu_compat.py`` runs megatron's own code at one site per patch with the patch off
(it must fail, or silently compute a wrong result, exactly on the releases in the range) and on.

Patches:

- ``device_argument``: ``device=`` naming CUDA ("cuda", "cuda:N", ``torch.device("cuda")``
  or an int ordinal) becomes ``"cpu"`` in every torch call (a
  :class:`torch.overrides.TorchFunctionMode` pushed once for the process);
- ``pin_memory``: ``pin_memory=True`` is dropped (no pinned memory without an accelerator);
- ``tensor_cuda``: ``Tensor.cuda()`` returns the tensor itself;
- ``tensor_type_name``: ``Tensor.type()`` (no arguments) of a CPU tensor reports
  ``'torch.cuda.<T>'``, the string megatron's optimizers compare against;
- ``current_device``: ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` - a
  device, not the int 0: a function mode is not active inside autograd ``backward()`` of
  megatron's custom Functions, which allocate with ``device=torch.cuda.current_device()``
  (and ``.to(torch.cuda.current_device())`` then needs no rewrite either);
- ``synchronize``: ``torch.cuda.synchronize()`` is a no-op;
- ``current_stream``: ``torch.cuda.current_stream()`` returns an inert stream; 0.19's
  ``start_grad_sync`` asks for it on every gradient sync, and the MoE alltoall dispatcher of
  every release before its device-to-host copies;
- ``cuda_streams``: ``torch.cuda.Stream()`` returns the inert CPU stream, ``torch.cuda.stream(s)``
  is an empty context and ``torch.cuda.Event()`` an inert event: megatron's MoE alltoall
  dispatcher makes a side stream for its device-to-host copies of the split sizes at
  construction and records an event on it every step;
- ``moe_split_sizes_as_numpy``: the alltoall dispatcher's ``maybe_move_tensor_to_cpu(x,
  as_numpy=True)`` returns a CPU tensor unchanged (it converts only CUDA tensors), so the
  split sizes reach ``all_to_all_single`` as a tensor, which gloo rejects (``TypeError``); on
  CPU they become the numpy array a CUDA run gets;
- ``gloo_uneven_first_dim``: ``tensor_parallel.mappings._gather_along_first_dim`` /
  ``_reduce_scatter_along_first_dim`` with uneven split sizes (the alltoall dispatcher at
  EP > 1 and ETP > 1) use list collectives of unequal tensors, which gloo refuses ("invalid
  tensor size"); here they pad every rank's rows to the largest split, run the equal-size
  collective and cut the padding off;
- ``cuda_rng``: ``torch.cuda.get_rng_state`` / ``torch.cuda.random.get_rng_state`` /
  ``torch.cuda.manual_seed`` act on the CPU default generator, so megatron's
  ``CudaRNGStatesTracker`` and ``model_parallel_cuda_manual_seed`` work unchanged;
- ``megatron_set_rng_state``: megatron's ``tensor_parallel.random._set_cuda_rng_state`` sets
  the CPU generator. Unpatched it hands its work to ``torch.cuda._lazy_call``, which on a
  machine without CUDA queues it forever: every ``tracker.fork()`` then silently draws from,
  and leaves behind, the default stream (dropout masks equal on all TP ranks, the default
  stream disturbed).

Checked and not patched, because nothing on these paths needs it on any supported release:
positional ``Tensor.to("cuda")``; ``torch.cuda.Stream``/``Event``/``stream``/
``default_stream`` and ``empty_cache`` (0.16-0.19 use them only with several
distributed-optimizer instances, CUDA graphs or activation offloading); ``torch.cuda.
set_rng_state``/``manual_seed_all`` (megatron uses its own ``_set_cuda_rng_state``;
``torch.manual_seed`` queues a harmless lazy ``manual_seed_all``); megatron's
``_get_cuda_rng_state`` (it calls ``torch.cuda.random.get_rng_state`` at call time, covered by
``cuda_rng``, unless CUDA-graph-safe RNG is on, which no CPU path uses).

Turning patches off (tests and diagnostics only): ``PSFT_PATCHES_OFF=name,name`` in the
environment skips them at :func:`install`; :func:`disabled` reverts them inside a ``with``
block. ``PSFT_CPU_COMPAT_TRACE=<dir>`` records, per patch, the call sites that needed it and
writes them to ``<dir>/cpu_compat-<pid>.json`` at exit (to re-derive the list for a new
megatron-core release: run the suite with it, and once with each patch off).

Threads: torch function modes are thread-local, so the ``torch.cuda`` patches are what cover
autograd's worker threads and dist-checkpointing's helpers.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode

from psft_megatron.compat.registry import PATCHES_OFF_ENV, GatedChange, Registry  # noqa: F401 (PATCHES_OFF_ENV re-exported)

_CPU = torch.device("cpu")
_lock = threading.Lock()
_installed_mode: "_CudaToCpuMode | None" = None
_mode_features: Dict[str, bool] = {"device_argument": False, "pin_memory": False, "tensor_cuda": False,
                                   "tensor_type_name": False}
_originals: Dict[str, Dict[str, Any]] = {}  # patch name -> {"module.attr": original}
_trace: Optional[Dict[str, collections.Counter]] = None

#: environment variable: a directory to write the per-patch call sites to at exit
TRACE_ENV = "PSFT_CPU_COMPAT_TRACE"


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Bare ints are CUDA ordinals in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


# ---------------------------------------------------------------------------- tracing
def _call_site() -> str:
    """The innermost frame outside torch and this module: the code that needed a patch."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and not name.endswith("compat/cpu.py") and "contextlib" not in name:
            for anchor in ("/megatron/", "/psft_megatron/", "/tests/"):
                if anchor in name:
                    name = name[name.index(anchor) + 1:]
                    break
            return f"{name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def _hit(patch: str) -> None:
    if _trace is not None:
        _trace[patch][_call_site()] += 1


def _write_trace(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    from psft_megatron.compat.releases import megatron_version

    data = {"megatron_core": str(megatron_version()), "argv": sys.argv,
            "patches": {name: dict(sites) for name, sites in (_trace or {}).items()}}
    with open(os.path.join(directory, f"cpu_compat-{os.getpid()}.json"), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


# ---------------------------------------------------------------------------- the mode
class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU (patches device_argument, pin_memory, tensor_cuda,
    tensor_type_name; each acts only while its flag is on)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        on = _mode_features
        if func is torch.Tensor.cuda and on["tensor_cuda"]:
            _hit("tensor_cuda")
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and on["tensor_type_name"]:
            name = func(args[0])
            if args[0].device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                _hit("tensor_type_name")
                return "torch.cuda." + name[len("torch."):]
            return name
        if on["device_argument"] and "device" in kwargs and _is_cuda_device(kwargs["device"]):
            _hit("device_argument")
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory") and on["pin_memory"]:
            _hit("pin_memory")
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


def _mode_patch(name: str):
    def apply() -> None:
        _mode_features[name] = True

    def revert() -> None:
        _mode_features[name] = False

    return apply, revert


# ---------------------------------------------------------------------------- torch.cuda
class _CpuEvent:
    """What ``torch.cuda.Event()`` and a CPU stream's ``record_event()`` give on CPU: work is
    synchronous, so the event has always happened."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class _CpuStream:
    """What ``torch.cuda.current_stream()`` returns on CPU: all work is synchronous, so waiting
    on it, or making it wait, is nothing."""

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


class _CpuStreamClass(_CpuStream):
    """``torch.cuda.Stream`` on CPU. A class, not a function: other libraries annotate with it
    (transformers writes ``torch.cuda.Stream | None`` at import time), and ``function | None``
    raises TypeError. Constructing it gives the one inert CPU stream."""

    def __new__(cls, *args, **kwargs):
        _hit("cuda_streams")
        return _CPU_STREAM


class _CpuEventClass(_CpuEvent):
    """``torch.cuda.Event`` on CPU, a class for the same reason as :class:`_CpuStreamClass`."""

    def __init__(self, *args, **kwargs):
        _hit("cuda_streams")
        super().__init__(*args, **kwargs)


def _traced(patch: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        _hit(patch)
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", patch)
    wrapper.__doc__ = f"psft_megatron.compat.cpu ({patch}): the CPU stand-in."
    return wrapper


def _cpu_get_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state.cpu() if new_state.device.type != "cpu" else new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _noop(*args, **kwargs) -> None:
    return None


def _attribute_patch(name: str, targets: Callable[[], Dict[str, Any]]):
    """A patch that sets attributes (``"module.path:attr" -> value``) and can restore them."""

    def resolve(path: str):
        module_name, attr = path.split(":")
        obj = __import__(module_name, fromlist=["_"])
        return obj, attr

    def apply() -> None:
        originals = _originals.setdefault(name, {})
        for path, value in targets().items():
            obj, attr = resolve(path)
            originals.setdefault(path, getattr(obj, attr))
            setattr(obj, attr, value)

    def revert() -> None:
        for path, value in _originals.pop(name, {}).items():
            obj, attr = resolve(path)
            setattr(obj, attr, value)

    return apply, revert


def _current_device_targets():
    return {"torch.cuda:current_device": _traced("current_device", lambda: _CPU)}


def _synchronize_targets():
    return {"torch.cuda:synchronize": _traced("synchronize", _noop)}


def _current_stream_targets():
    return {"torch.cuda:current_stream": _traced("current_stream", lambda device=None: _CPU_STREAM)}


def _cuda_streams_targets():
    return {"torch.cuda:Stream": _CpuStreamClass,
            "torch.cuda:stream": _traced("cuda_streams", lambda stream=None: contextlib.nullcontext()),
            "torch.cuda:Event": _CpuEventClass}


def _numpy_split_sizes(original):
    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            _hit("moe_split_sizes_as_numpy")
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return maybe_move_tensor_to_cpu


def _moe_split_sizes_targets():
    from megatron.core.transformer.moe import moe_utils

    return {"megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu":
            _numpy_split_sizes(moe_utils.maybe_move_tensor_to_cpu)}


def _padded_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    pad = tensor.new_zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)


def _uneven_gather(original):
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        """All-gather of ``[n_r, ...]`` rows with ``n_r = output_split_sizes[r]``: every rank's
        rows padded to ``max(n)``, gathered as equal tensors, padding cut off."""
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes=output_split_sizes,
                            use_global_buffer=use_global_buffer)
        _hit("gloo_uneven_first_dim")
        sizes = [int(n) for n in output_split_sizes]
        rows = max(sizes)
        parts = [input_.new_empty((rows,) + tuple(input_.shape[1:])) for _ in sizes]
        torch.distributed.all_gather(parts, _padded_rows(input_, rows), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

    return _gather_along_first_dim


def _uneven_reduce_scatter(original):
    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        """Reduce-scatter of ``[sum(n), ...]`` rows, rank r keeping its ``n_r`` rows: each
        rank's chunk padded to ``max(n)``, reduce-scattered as equal chunks, padding cut off."""
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes=input_split_sizes,
                            use_global_buffer=use_global_buffer)
        _hit("gloo_uneven_first_dim")
        sizes = [int(n) for n in input_split_sizes]
        rows = max(sizes)
        chunks = [_padded_rows(chunk, rows) for chunk in torch.split(input_, sizes, dim=0)]
        output = input_.new_empty((rows,) + tuple(input_.shape[1:]))
        torch.distributed.reduce_scatter_tensor(output, torch.cat(chunks, dim=0), group=group)
        return output[: sizes[group.rank()]]

    return _reduce_scatter_along_first_dim


def _uneven_first_dim_targets():
    from megatron.core.tensor_parallel import mappings

    return {"megatron.core.tensor_parallel.mappings:_gather_along_first_dim":
            _uneven_gather(mappings._gather_along_first_dim),
            "megatron.core.tensor_parallel.mappings:_reduce_scatter_along_first_dim":
            _uneven_reduce_scatter(mappings._reduce_scatter_along_first_dim)}


def _cuda_rng_targets():
    get = _traced("cuda_rng", _cpu_get_rng_state)
    return {"torch.cuda:get_rng_state": get, "torch.cuda.random:get_rng_state": get,
            "torch.cuda:manual_seed": _traced("cuda_rng", _cpu_manual_seed)}


def _megatron_rng_targets():
    return {"megatron.core.tensor_parallel.random:_set_cuda_rng_state":
            _traced("megatron_set_rng_state", _cpu_set_rng_state)}


# ---------------------------------------------------------------------------- the list
@dataclass(frozen=True)
class Patch(GatedChange):
    """One adaptation of megatron-core's CUDA usage to CPU (``name``, ``summary`` and
    ``megatron``, the releases that need it, as in :class:`GatedChange`).

    Attributes:
        sites: megatron-core call sites that need it (0.16.1 / 0.19.2 line numbers).
    """

    sites: str
    apply: Callable[[], None]
    revert: Callable[[], None]


# Sites: megatron-core call sites that need the patch, as traced (PSFT_CPU_COMPAT_TRACE) over
# the whole test suite, "0.16.1 line / 0.19.2 line" under megatron/core/.
PATCHES: List[Patch] = [
    Patch("device_argument", "device='cuda' (or an ordinal) in any torch call -> cpu", ">=0.16.1",
          "pipeline_parallel/schedules.py total_num_tokens in all three schedules (596, 983, 2138 / "
          "749, 1121, 2292); optimizer/clip_grads.py get_grad_norm_fp32 (103 / 108, 112), "
          "clip_grad_by_total_norm_fp32 (174 / 180); utils.py local_multi_tensor_l2_norm (1207 / 1332); "
          "optimizer/optimizer.py __init__ (481, 485, 907 / 698, 702, 1249) and, new in 0.19, "
          "has_grad_norm_group (315)",
          *_mode_patch("device_argument")),
    Patch("pin_memory", "pin_memory=True dropped", ">=0.16.1",
          "models/common/embeddings/rope_utils.py get_pos_emb_on_this_cp_rank (62 / 62; RoPE with CP)",
          *_mode_patch("pin_memory")),
    Patch("tensor_cuda", "Tensor.cuda() returns the tensor", ">=0.16.1",
          "rope_utils.py get_pos_emb_on_this_cp_rank (64 / 64); models/common/language_module/"
          "language_module.py setup_embeddings_and_output_layer (244 / 307; tied embeddings under PP); "
          "optimizer/distrib_optimizer.py get_parameter_state_dp_zero (1089 / 1374)",
          *_mode_patch("tensor_cuda")),
    Patch("tensor_type_name", "Tensor.type() of a CPU tensor reads 'torch.cuda.<T>'", ">=0.16.1",
          "optimizer/clip_grads.py clip_grad_by_total_norm_fp32 asserts 'torch.cuda.FloatTensor' "
          "(167 / 174); optimizer/distrib_optimizer.py _build_model_and_main_param_groups (361, 420 / "
          "401, 466) and __init__ (582 / 758)",
          *_mode_patch("tensor_type_name")),
    Patch("current_device", "torch.cuda.current_device() -> torch.device('cpu')", ">=0.16.1",
          "tensor_parallel/mappings.py _gather_along_first_dim, _reduce_scatter_along_first_dim, "
          "_gather_along_last_dim (141, 181, 91 / 145, 185, 95); tensor_parallel/layers.py backward "
          "(552 / 647; in autograd's thread); pipeline_parallel/p2p_communication.py receive buffers "
          "(313, 321 / 334, 342); distributed/param_and_grad_buffer.py __init__ (800, 806 / 1180, "
          "1186); rotary_pos_embedding.py get_emb (162 / 162); utils.py GlobalMemoryBuffer.get_tensor "
          "(631 / 715); dist_checkpointing/strategies/state_dict_saver.py (252 / 252); "
          "distrib_optimizer.py get_parameter_state_dp_zero (1077 / 1362)",
          *_attribute_patch("current_device", _current_device_targets)),
    Patch("synchronize", "torch.cuda.synchronize() is a no-op", ">=0.16.1",
          "pipeline_parallel/p2p_communication.py _communicate (398 / 419); dist_checkpointing/"
          "strategies/filesystem_async.py preload_tensors (230 / 248)",
          *_attribute_patch("synchronize", _synchronize_targets)),
    Patch("current_stream", "torch.cuda.current_stream() is an inert CPU stream", ">=0.16.1",
          "distributed/param_and_grad_buffer.py start_grad_sync (- / 632): from 0.19.0 every grad "
          "sync waits on the current stream for CUDA-graph events; 0.16-0.18 call it there only with "
          "several distributed-optimizer instances; transformer/moe/token_dispatcher.py "
          "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize (871 / 922) on every MoE forward",
          *_attribute_patch("current_stream", _current_stream_targets)),
    Patch("cuda_streams", "torch.cuda.Stream/stream/Event are inert CPU stand-ins", ">=0.16.1",
          "transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher.__init__ (445 / 469) and "
          "_maybe_dtoh_and_synchronize (874, 895 / 925, 946)",
          *_attribute_patch("cuda_streams", _cuda_streams_targets)),
    Patch("moe_split_sizes_as_numpy", "the alltoall dispatcher's split sizes become numpy on CPU too", ">=0.16.1",
          "transformer/moe/token_dispatcher.py _maybe_dtoh_and_synchronize (879-887 / 930-938), "
          "then token_dispatch's all_to_all (666 / 698)",
          *_attribute_patch("moe_split_sizes_as_numpy", _moe_split_sizes_targets)),
    Patch("gloo_uneven_first_dim", "uneven first-dim all-gather / reduce-scatter padded to equal sizes",
          ">=0.16.1",
          "tensor_parallel/mappings.py _gather_along_first_dim (150 / 154) and "
          "_reduce_scatter_along_first_dim (193 / 197), from the alltoall dispatcher with ETP > 1 "
          "(token_dispatcher.py 696, 779 / 739, 822)",
          *_attribute_patch("gloo_uneven_first_dim", _uneven_first_dim_targets)),
    Patch("cuda_rng", "torch.cuda.get_rng_state / manual_seed -> the CPU default generator", ">=0.16.1",
          "tensor_parallel/random.py CudaRNGStatesTracker.add (235, 237, 238 / 303, 305, 306), "
          "_get_cuda_rng_state (55 / 118; every fork), model_parallel_cuda_manual_seed (422 / 490)",
          *_attribute_patch("cuda_rng", _cuda_rng_targets)),
    Patch("megatron_set_rng_state", "megatron's _set_cuda_rng_state sets the CPU generator", ">=0.16.1",
          "tensor_parallel/random.py _set_cuda_rng_state, called by CudaRNGStatesTracker.add (240 / "
          "308) and fork (255, 277 / 323, 345): torch.cuda._lazy_call never runs it without CUDA",
          *_attribute_patch("megatron_set_rng_state", _megatron_rng_targets)),
]

_REGISTRY = Registry("cpu_compat patches", PATCHES)

#: patches whose failure needs several ranks to show (expert-parallel layouts): they are shown by
#: tests/test_moe_fixes.py's multi-process launch, the others by tests/test_cpu_compat.py
MULTI_RANK_PATCHES = ("moe_split_sizes_as_numpy", "gloo_uneven_first_dim")


def is_installed() -> bool:
    """True once :func:`install` has run in this process."""
    return _installed_mode is not None


def applied() -> List[str]:
    """The names of the patches in effect (installed, needed by this megatron-core, not off)."""
    return list(_REGISTRY.applied)


def install() -> None:
    """Install the CPU compatibility layer for the rest of the process (idempotent): every
    patch this megatron-core release needs, except those named in ``$PSFT_PATCHES_OFF``.

    Raises:
        RuntimeError: if CUDA is available - GPU runs must use megatron-core unchanged.
    """
    global _installed_mode, _trace
    with _lock:
        if _installed_mode is not None:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "psft_megatron.compat.cpu must not be installed when CUDA is available; "
                "GPU runs use megatron-core's CUDA paths unchanged."
            )
        trace_dir = os.environ.get(TRACE_ENV)
        if trace_dir:
            _trace = collections.defaultdict(collections.Counter)
            atexit.register(_write_trace, trace_dir)
        _REGISTRY.install()
        mode = _CudaToCpuMode()
        mode.__enter__()
        _installed_mode = mode


def disabled(*names: str):
    """Revert the named patches inside a ``with`` block (tests: show what a patch is for).

    Names not in effect are ignored, so a patch this release does not need can be "disabled"
    to show megatron-core working without it; unknown names raise ``KeyError``.
    """
    return _REGISTRY.disabled(*names)
