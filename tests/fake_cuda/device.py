"""The Python half of the fake-CUDA lane: a CUDA device without a GPU, with real values.

Every tensor "on the GPU" is a :class:`FakeCudaTensor`: its C++ device is ``cuda:N`` (so
autograd, ``tensor.device``, ``tensor.is_cuda`` and ``tensor.type()`` are CUDA's), and its
values live in a CPU tensor (``.elem``) on which every operation really runs. What a real GPU
refuses, the lane refuses:

- an operation that mixes a ``cuda`` tensor with a CPU tensor of one or more dimensions
  (0-dim CPU tensors are scalars, as on CUDA; copies and index tensors may cross devices), or
  tensors of two different CUDA devices, raises :class:`DeviceMismatchError`;
- a collective given a tensor that is not on this rank's CUDA device raises
  :class:`CollectiveDeviceError`: the run is treated as NCCL (groups created with
  ``backend="gloo"`` are the exception and want CPU tensors), and the real work is done by gloo
  on the values.

Creation and movement work as on CUDA: factory functions with ``device="cuda"`` (or
``torch.cuda.current_device()``), ``Tensor.to("cuda")``, ``Tensor.cuda()``, ``copy_``,
``module.cuda()``, pinned host memory (``pin_memory()``/``is_pinned()``, from the native shim).
``torch.cuda`` answers as a machine with one GPU per local rank (streams and events inert, the
CUDA RNG a separate CPU generator state). Recorded for tests: host-to-device copies (pinned?
non-blocking?), device-to-host reads (host syncs), collectives by name.

Use: ``tests.fake_cuda.native.load()`` before importing torch, then :func:`install`. Kernel
fusion compilers (torch.compile, TorchScript fusers) are switched off: they would generate GPU
code; what the lane checks is placement, not kernels.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
import traceback
import types
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

aten = torch.ops.aten


class DeviceMismatchError(RuntimeError):
    """An operation mixed tensors of different devices, as CUDA would refuse."""


class CollectiveDeviceError(RuntimeError):
    """A collective was given a tensor that is not on this rank's CUDA device."""


_state = types.SimpleNamespace(
    installed=False,
    index=0,  # this process's CUDA device index (LOCAL_RANK)
    rng_state=None,  # the fake CUDA generator's state (a CPU ByteTensor)
    h2d=[],  # host-to-device copies: dicts (shape, dtype, pinned, non_blocking, where)
    d2h=collections.Counter(),  # device-to-host reads by op name
    d2h_where=collections.Counter(),  # device-to-host reads by call site
    collectives=collections.Counter(),
    events=collections.Counter(),  # CUDA events: timed ones recorded, elapsed times read
    gloo_groups=set(),  # process groups created with backend="gloo" (CPU collectives)
)


def _where() -> str:
    """The innermost frame outside torch and this module (for error messages)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if "/torch/" not in name and not name.endswith("fake_cuda/device.py"):
            return f"{os.path.relpath(name)}:{frame.lineno} ({frame.name})"
    return "?"


# ---------------------------------------------------------------------------- the tensor
class FakeCudaTensor(torch.Tensor):
    """A tensor on ``cuda:<index>`` whose values are the CPU tensor ``elem``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: Optional[int] = None, requires_grad: bool = False):
        if type(elem) is not torch.Tensor or elem.device.type != "cpu":
            raise TypeError(f"FakeCudaTensor wraps plain CPU tensors, got {type(elem).__name__} on {elem.device}")
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=torch.device("cuda", _state.index if index is None else index),
            requires_grad=requires_grad)
        out.elem = elem
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"FakeCudaTensor({self.elem!r}, device='{self.device}')"

    def __reduce_ex__(self, protocol):
        # pickled as a CUDA tensor is: restored onto the same CUDA device
        return (_rebuild, (self.elem, self.device.index, self.requires_grad))

    @classmethod
    def __torch_dispatch__(cls, func, types_, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _rebuild(elem, index, requires_grad):
    return FakeCudaTensor(elem, index, requires_grad)


def to_fake(t: torch.Tensor, index: Optional[int] = None) -> FakeCudaTensor:
    """Wrap a CPU tensor (the lane's H2D copy without the copy)."""
    return FakeCudaTensor(t.detach(), index, requires_grad=t.requires_grad)


#: ops whose tensor arguments may live on different devices on CUDA
_CROSS_DEVICE = {
    aten.copy_.default, aten._to_copy.default, aten._copy_from.default, aten._copy_from_and_resize.default,
    aten._foreach_copy_.default, aten.index.Tensor, aten.index_put_.default, aten._index_put_impl_.default,
    aten.index_put.default, aten.lift_fresh_copy.default,
}
#: ops that read device values on the host (a host sync on a GPU)
_D2H = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default, aten.is_nonzero.default}


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _cuda_index(device: Any) -> int:
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return _state.index if device.index is None else device.index


def _check_devices(func, flat: List[Any]) -> Optional[int]:
    """Raise DeviceMismatchError as CUDA would; return the CUDA index of the operands."""
    index = None
    for t in flat:
        if isinstance(t, FakeCudaTensor):
            if index is not None and t.device.index != index:
                raise DeviceMismatchError(f"{func}: tensors on cuda:{index} and {t.device} mixed, at {_where()}")
            index = t.device.index
    if func in _CROSS_DEVICE:
        return index
    for t in flat:
        if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor) and t.device.type == "cpu" and t.dim() > 0:
            raise DeviceMismatchError(
                f"{func}: a cpu tensor {tuple(t.shape)} {t.dtype} meets cuda:{index} tensors "
                f"(expected all tensors to be on the same device), at {_where()}")
    return index


def _cuda_only(func) -> bool:
    """An op with a CUDA kernel and none for the CPU: a CUDA build of torch picks such fused
    kernels for CUDA tensors (``rms_norm`` -> ``_fused_rms_norm``); a CPU build never does."""
    name = func.name()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return has(name, "CUDA") and not has(name, "CPU") and not has(name, "CompositeExplicitAutograd") \
        and not has(name, "CompositeImplicitAutograd")


def _dispatch(func, args, kwargs):
    flat, spec = tree_flatten((args, kwargs))
    index = _check_devices(func, flat)
    if _cuda_only(func):  # run its decomposition: its parts come back here as ordinary ops
        from torch._decomp import decomposition_table

        if func not in decomposition_table:
            raise NotImplementedError(f"fake CUDA: {func} has only a CUDA kernel and no decomposition, at {_where()}")
        return decomposition_table[func](*args, **kwargs)
    to_host = False
    if "device" in kwargs and kwargs["device"] is not None:
        if _is_cuda(kwargs["device"]):
            index = _cuda_index(kwargs["device"])
            kwargs = dict(kwargs, device=torch.device("cpu"))
            flat, spec = tree_flatten((args, kwargs))
        else:
            to_host = True
    if func in _D2H or (func is aten.copy_.default and not isinstance(args[0], FakeCudaTensor)):
        _note_d2h(str(func.overloadpacket.__name__))
    if func is aten.copy_.default and isinstance(args[0], FakeCudaTensor) and not isinstance(args[1], FakeCudaTensor) \
            and isinstance(args[1], torch.Tensor) and args[1].dim() > 0:
        _record_h2d(args[1], bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False)))
    if to_host:
        _note_d2h("to_cpu")
    if func is aten._to_copy.default and not isinstance(args[0], FakeCudaTensor) and not to_host:
        _record_h2d(args[0], bool(kwargs.get("non_blocking", False)))
    inner = [t.elem if isinstance(t, FakeCudaTensor) else t for t in flat]
    a, kw = tree_unflatten(inner, spec)
    if torch.Tag.nondeterministic_seeded in func.tags:
        with _cuda_rng():
            out = func(*a, **kw)
    else:
        out = func(*a, **kw)
    if to_host:
        return out
    wrappers = {id(t.elem): t for t in flat if isinstance(t, FakeCudaTensor)}
    plain = {id(t) for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, FakeCudaTensor)}

    def wrap(o):
        if not isinstance(o, torch.Tensor):
            return o
        if id(o) in wrappers:
            return wrappers[id(o)]  # in-place ops return their input
        if id(o) in plain:
            return o  # a host tensor written in place (device-to-host copy_)
        return FakeCudaTensor(o, index)

    return tree_map(wrap, out)


def _note_d2h(kind: str, n: int = 1) -> None:
    _state.d2h[kind] += n
    _state.d2h_where[f"{kind} at {_where()}"] += n


def _record_h2d(src: torch.Tensor, non_blocking: bool) -> None:
    _state.h2d.append({"shape": tuple(src.shape), "dtype": str(src.dtype), "pinned": bool(src.is_pinned()),
                       "non_blocking": bool(non_blocking), "where": _where()})


# ---------------------------------------------------------------------------- creation, movement
class _FakeCudaDispatchMode(TorchDispatchMode):
    """Sees every aten op: ops on CUDA tensors and ops creating CUDA tensors (factories with
    ``device=cuda``, ``_to_copy`` of host tensors - ``.to("cuda")``, ``.cuda()`` - and the
    factories composite ops run on ``tensor.options()``) go to :func:`_dispatch`."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if (device is not None and _is_cuda(device)) or any(
                isinstance(t, FakeCudaTensor) for t in tree_flatten((args, kwargs))[0]):
            return _dispatch(func, args, kwargs)
        return func(*args, **kwargs)


class _FakeCudaFunctionMode(TorchFunctionMode):
    """What happens above aten: ``.data =`` between host and CUDA tensors, ``data_ptr`` and
    ``tolist`` of CUDA tensors."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DATA_SET and isinstance(args[1], FakeCudaTensor):
            if not isinstance(args[0], FakeCudaTensor):
                return _adopt(args[0], args[1])
            func(*args, **kwargs)  # the C++ tensor takes the new metadata; the values follow
            args[0].elem = args[1].elem
            return None
        if func is torch.Tensor.data_ptr and isinstance(args[0], FakeCudaTensor):
            return args[0].elem.data_ptr()
        if func in (torch.tensor, torch.as_tensor) and args and isinstance(args[0], (list, tuple)):
            flat = tree_flatten(args[0])[0]
            if any(isinstance(t, FakeCudaTensor) for t in flat):  # torch.tensor([cuda scalars]): one read each
                _note_d2h("tensor_from_list", sum(isinstance(t, FakeCudaTensor) for t in flat))
                args = (tree_map(lambda t: t.elem if isinstance(t, FakeCudaTensor) else t, args[0]),) + tuple(args[1:])
                return func(*args, **kwargs)
        if func is torch.Tensor.tolist and isinstance(args[0], FakeCudaTensor):
            _note_d2h("tolist")
            return args[0].elem.tolist()
        if func is torch.nn.functional.scaled_dot_product_attention and isinstance(args[0], FakeCudaTensor):
            return _sdpa_math(*args, **kwargs)
        return func(*args, **kwargs)


def _sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA on CUDA tensors, written out (matmul, softmax, dropout). A CUDA build of torch picks
    the SDPA kernel with cuDNN/flash queries that need the CUDA library (a CPU build skips
    them); written out, every part runs here on the values like any other op.
    query [..., hq, sq, d], key/value [..., hk, sk, d] (hq a multiple of hk with enable_gqa)."""
    if enable_gqa and query.shape[-3] != key.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        sq, sk = scores.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).tril(diagonal=sk - sq)
        scores = scores.masked_fill(~keep, float("-inf"))
    elif attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.matmul(probs, value)


_DATA_SET = torch.Tensor.data.__set__


def _adopt(target: torch.Tensor, value: FakeCudaTensor) -> None:
    """``target.data = value`` for a host tensor ``target`` (``module.cuda()`` does this): the
    object keeps its identity and attributes and becomes a CUDA tensor, as on a GPU."""
    attrs = dict(target.__dict__)
    if isinstance(target, torch.nn.Parameter):
        new = torch.nn.Parameter(value.detach(), requires_grad=target.requires_grad)
    else:
        new = value.detach().requires_grad_(target.requires_grad)
    torch.utils.swap_tensors(target, new)
    target.__dict__.update({k: v for k, v in attrs.items() if k not in ("elem",)})


# ---------------------------------------------------------------------------- torch.cuda
@contextlib.contextmanager
def _cuda_rng():
    """Run random CPU ops with the fake CUDA generator's state (kept apart from the host RNG)."""
    host = torch.get_rng_state()
    torch.set_rng_state(_state.rng_state)
    try:
        yield
    finally:
        _state.rng_state = torch.get_rng_state()
        torch.set_rng_state(host)


def _cuda_get_rng_state(*args, **kwargs) -> torch.Tensor:
    return _state.rng_state.clone()


def _cuda_set_rng_state(new_state, *args, **kwargs) -> None:
    _state.rng_state = (new_state.elem if isinstance(new_state, FakeCudaTensor) else new_state).clone()


def _cuda_manual_seed(seed, *args, **kwargs) -> None:
    _state.rng_state = torch.Generator().manual_seed(int(seed)).get_state()


class _Stream:
    """Inert CUDA stream: work is synchronous here."""

    def __init__(self, *args, **kwargs):
        self.device = torch.device("cuda", _state.index)

    def wait_stream(self, other): pass
    def wait_event(self, event): pass
    def synchronize(self): pass
    def query(self): return True
    def record_event(self, event=None): return event or _Event()
    def __enter__(self): return self
    def __exit__(self, *exc): return False


class _Event:
    """A CUDA event: work is synchronous here, so recording one takes the host clock (timed
    events, ``enable_timing=True``, are counted, as are elapsed-time reads)."""

    def __init__(self, enable_timing=False, *args, **kwargs):
        self.timing, self.when = enable_timing, None

    def record(self, stream=None):
        self.when = time.perf_counter()
        _state.events["timed_recorded" if self.timing else "recorded"] += 1

    def wait(self, stream=None): pass
    def synchronize(self): pass
    def query(self): return True

    def elapsed_time(self, other):
        if not (self.timing and other.timing) or self.when is None or other.when is None:
            raise RuntimeError("elapsed_time needs two recorded events created with enable_timing=True")
        _state.events["elapsed_read"] += 1
        return (other.when - self.when) * 1000.0


def _device_properties(*args, **kwargs):
    return types.SimpleNamespace(name="Fake CUDA (CPU-backed)", major=9, minor=0, total_memory=80 * 2**30,
                                 multi_processor_count=132, gcnArchName="")


def _noop(*args, **kwargs):
    return None


def _set_device(device) -> None:
    index = _cuda_index(device)
    if index != _state.index:
        raise DeviceMismatchError(f"torch.cuda.set_device({device}) in the process of cuda:{_state.index} "
                                  f"(LOCAL_RANK); the lane gives each rank its own device")


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    stream = _Stream()
    values = dict(
        is_available=lambda: True, device_count=lambda: 1 + _state.index, current_device=lambda: _state.index,
        set_device=_set_device, is_initialized=lambda: True, _lazy_init=_noop, init=_noop, synchronize=_noop,
        empty_cache=_noop, ipc_collect=_noop, get_device_name=lambda *a, **k: "Fake CUDA (CPU-backed)",
        get_device_capability=lambda *a, **k: (9, 0), get_device_properties=_device_properties,
        memory_allocated=lambda *a, **k: 0, max_memory_allocated=lambda *a, **k: 0,
        memory_reserved=lambda *a, **k: 0, max_memory_reserved=lambda *a, **k: 0,
        reset_peak_memory_stats=_noop, reset_max_memory_allocated=_noop, memory_stats=lambda *a, **k: {},
        mem_get_info=lambda *a, **k: (80 * 2**30, 80 * 2**30), Stream=_Stream, Event=_Event,
        stream=lambda s=None: contextlib.nullcontext(s), current_stream=lambda *a, **k: stream,
        default_stream=lambda *a, **k: stream, set_stream=_noop,
        get_rng_state=_cuda_get_rng_state, set_rng_state=_cuda_set_rng_state, manual_seed=_cuda_manual_seed,
        manual_seed_all=_cuda_manual_seed,
    )
    for name, value in values.items():
        setattr(cuda, name, value)
    record_stream = torch.Tensor.record_stream

    def _record_stream(tensor, stream):  # the caching allocator's bookkeeping: nothing to do here
        if not isinstance(stream, _Stream):
            record_stream(tensor, stream)

    torch.Tensor.record_stream = _record_stream
    cuda.random.get_rng_state = _cuda_get_rng_state
    cuda.random.set_rng_state = _cuda_set_rng_state
    cuda.nvtx.range_push = _noop
    cuda.nvtx.range_pop = _noop
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _patch_megatron_rng() -> None:
    try:
        from megatron.core.tensor_parallel import random as mp_random
    except ImportError:
        return
    mp_random._get_cuda_rng_state = _cuda_get_rng_state
    mp_random._set_cuda_rng_state = _cuda_set_rng_state


# ---------------------------------------------------------------------------- collectives
_TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
                       "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "reduce", "all_to_all",
                       "all_to_all_single", "send", "recv", "isend", "irecv", "gather", "scatter")


def _group_of(name: str, args, kwargs):
    if "group" in kwargs:
        return kwargs["group"]
    return None


def _inner(t, name: str, gloo: bool):
    if isinstance(t, FakeCudaTensor):
        if gloo:
            raise CollectiveDeviceError(f"torch.distributed.{name} on a gloo group got a cuda tensor "
                                        f"{tuple(t.shape)}, at {_where()}")
        if t.device.index != _state.index:
            raise CollectiveDeviceError(f"torch.distributed.{name} got a tensor on {t.device}; this rank's device "
                                        f"is cuda:{_state.index}, at {_where()}")
        return t.elem
    if isinstance(t, torch.Tensor) and not gloo:
        raise CollectiveDeviceError(
            f"torch.distributed.{name} got a {t.device} tensor {tuple(t.shape)} {t.dtype}; NCCL needs it on "
            f"cuda:{_state.index}, at {_where()}")
    return t


def _wrap_collective(name: str, original):
    def collective(*args, **kwargs):
        group = _group_of(name, args, kwargs)
        gloo = group is not None and group in _state.gloo_groups
        args = tree_map(lambda t: _inner(t, name, gloo), list(args))
        kwargs = tree_map(lambda t: _inner(t, name, gloo), kwargs)
        _state.collectives[name] += 1
        return original(*args, **kwargs)

    collective.__name__ = name
    collective.__wrapped__ = original
    return collective


def _patch_collectives() -> None:
    for name in _TENSOR_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _wrap_collective(name, getattr(dist, name)))
    original_batch, original_p2p_op = dist.batch_isend_irecv, dist.P2POp

    class P2POp(original_p2p_op):
        """torch's P2POp, accepting the wrapped isend/irecv (it checks the functions' identity)."""

        def __new__(cls, op, *args, **kwargs):
            return original_p2p_op.__new__(cls, getattr(op, "__wrapped__", op), *args, **kwargs)

        def __init__(self, op, *args, **kwargs):
            super().__init__(getattr(op, "__wrapped__", op), *args, **kwargs)

    dist.P2POp = P2POp

    def batch_isend_irecv(p2p_op_list):
        ops = []
        for op in p2p_op_list:
            gloo = op.group is not None and op.group in _state.gloo_groups
            ops.append(original_p2p_op(op.op, _inner(op.tensor, "batch_isend_irecv", gloo), op.peer, op.group,
                                       op.tag))
        _state.collectives["batch_isend_irecv"] += 1
        return original_batch(ops)

    dist.batch_isend_irecv = batch_isend_irecv
    original_new_group = dist.new_group

    def new_group(*args, **kwargs):
        group = original_new_group(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if backend is not None and "gloo" in str(backend).lower():
            _state.gloo_groups.add(group)
        return group

    dist.new_group = new_group


# ---------------------------------------------------------------------------- entry points
def install(local_rank: Optional[int] = None) -> None:
    """Turn this process into a fake-CUDA one (idempotent). Call after
    ``tests.fake_cuda.native.load()`` and before megatron sets anything up."""
    if _state.installed:
        return
    from tests.fake_cuda import native

    _state.index = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    native.load().psft_fake_cuda_register_guard(_state.index)
    _state.rng_state = torch.Generator().manual_seed(0).get_state()
    os.environ.setdefault("PSFT_DIST_BACKEND", "gloo")  # gloo carries the values; checks treat it as NCCL
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    torch._dynamo.config.disable = True
    torch._C._jit_set_texpr_fuser_enabled(False)
    torch._C._jit_override_can_fuse_on_gpu(False)
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_collectives()
    torch.autograd.set_multithreading_enabled(False).__enter__()  # backward on this thread
    torch._C._set_only_lift_cpu_tensors(True)  # torch.tensor(..., device='cuda'): built on the host, then copied
    _FakeCudaFunctionMode().__enter__()
    _FakeCudaDispatchMode().__enter__()
    _state.installed = True


def records() -> Dict[str, Any]:
    """What the lane saw so far: H2D copies, D2H reads, collectives."""
    return {"h2d": list(_state.h2d), "d2h": dict(_state.d2h), "d2h_where": dict(_state.d2h_where),
            "collectives": dict(_state.collectives), "events": dict(_state.events)}


def reset_records() -> None:
    _state.h2d.clear()
    _state.d2h.clear()
    _state.d2h_where.clear()
    _state.collectives.clear()
    _state.events.clear()


def on_device(t: Any) -> bool:
    """True for a tensor on this rank's (fake) CUDA device."""
    return isinstance(t, FakeCudaTensor) and t.device.index == _state.index
