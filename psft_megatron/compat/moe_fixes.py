"""Fixes for megatron-core's Mixture-of-Experts layers that bite on every device.

Not CPU issues (those live in :mod:`psft_megatron.compat.cpu`): each of these breaks, or silently
changes, a GPU run too, so :func:`install` runs on every run (called by
:func:`psft_megatron.distributed.runtime.initialize`, like :mod:`psft_megatron.compat.distopt_fixes`). Each fix names
the megatron-core releases that have the bug (a PEP 440 range, checked with
:func:`psft_megatron.compat.releases.version_in`) and applies only there;
``tests/test_moe_fixes.py`` shows each bug with its fix off. Checked on 0.16.1 and 0.19.2;
0.17 and 0.18 were not available to check, and the ranges below assume the 0.19 code for them
only where it says so.

1. ``router_gemm_without_te`` (0.16.x-0.18.x): ``moe_utils`` binds ``te_general_gemm`` only
   inside ``try: import transformer_engine``, but ``RouterGatingLinearFunction`` (the router's
   GEMM with ``moe_router_dtype`` fp32/fp64) tests it unconditionally: ``NameError`` on every
   run without Transformer Engine - the CPU runs and a GPU run with the ``local`` spec alike,
   which is why this fix is here and not in the CPU layer (installed on CPU only). Fix: bind the
   name to None, as 0.19 does. (0.16.1 ``moe_utils.py`` lines 22-39 and 1192.)
2. ``aux_loss_scale_tp_cp`` (0.16.x-0.18.x; upstream NVIDIA/Megatron-LM issue 1652, fixed in
   0.19): with ``calculate_per_token_loss`` the router scales its aux loss (and z-loss) by its
   local token count, but with sequence parallelism (or CP) the local count is 1/(TP*CP) of the
   tokens the loss normaliser counts: the load-balancing gradient is TP*CP times too small,
   silently. Fix: scale by ``num_local_tokens * tp_cp_group.size()``, 0.19's formula.
3. ``experts_always_expert_parallel`` (0.16.1-0.19.x): expert weights are marked
   ``allreduce=False`` (reduced over the expert data-parallel group, kept in their own
   sub-optimizer) only when EP > 1 (0.16), or EP > 1 or ETP != TP (0.19). On 0.16 at EP = 1
   with ETP < TP their gradients go over the dense DP group and the partial sums of the TP ranks
   are never added (silently wrong expert gradients). On both, the optimizer has one
   sub-optimizer at EP = 1 (and ETP = TP) but two (dense + expert) at EP > 1, so optimizer state
   saved at EP = 2 does not load at EP = 1 (``KeyError`` naming ``chained_0``). Fix: every
   parameter of an ``MoELayer``'s experts is marked ``allreduce=False`` on every layout (megatron
   then reduces it over the expert DP group, which at EP = 1 and ETP = TP spans the same ranks as
   the dense DP group).

``PSFT_PATCHES_OFF=name`` (tests only) leaves a fix out at :func:`install`; :func:`disabled`
reverts fixes inside a ``with`` block.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

from psft_megatron.compat.registry import PATCHES_OFF_ENV, GatedChange, Registry

__all__ = ["FIXES", "PATCHES_OFF_ENV", "Fix", "applied", "disabled", "install", "mark_expert_parameters"]

_originals: Dict[str, Any] = {}  # fix name -> the original attribute


# ------------------------------------------------------------------ 1. router GEMM without TE
_MISSING = object()


def _moe_utils():
    from megatron.core.transformer.moe import moe_utils

    return moe_utils


def _apply_router_gemm() -> None:
    module = _moe_utils()
    _originals["router_gemm_without_te"] = getattr(module, "te_general_gemm", _MISSING)
    if _originals["router_gemm_without_te"] is _MISSING:
        module.te_general_gemm = None


def _revert_router_gemm() -> None:
    original = _originals.pop("router_gemm_without_te")
    if original is _MISSING and hasattr(_moe_utils(), "te_general_gemm"):
        del _moe_utils().te_general_gemm


# ------------------------------------------------------------------ 2. aux-loss scale under TP/CP
class _ScaledAutoScaler:
    """Stands in for ``MoEAuxLossAutoScaler`` inside one router call: the loss it attaches is
    multiplied by ``factor`` (the TP*CP size) before megatron's own scaler gets it."""

    def __init__(self, real, factor: int):
        self.real, self.factor = real, factor

    def apply(self, activation, loss):
        return self.real.apply(activation, loss * self.factor)


@contextlib.contextmanager
def _tp_cp_scaled(router):
    from megatron.core.transformer.moe import router as router_module

    real = router_module.MoEAuxLossAutoScaler
    factor = router.tp_cp_group.size()
    if not router.calculate_per_token_loss or factor == 1:
        yield
        return
    router_module.MoEAuxLossAutoScaler = _ScaledAutoScaler(real, factor)
    try:
        yield
    finally:
        router_module.MoEAuxLossAutoScaler = real


def _scaled_method(original: Callable) -> Callable:
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        with _tp_cp_scaled(self):
            return original(self, *args, **kwargs)

    return method


_SCALED_METHODS = ("attach_and_log_load_balancing_loss", "apply_z_loss")


def _router_class():
    from megatron.core.transformer.moe.router import TopKRouter

    return TopKRouter


def _apply_aux_scale() -> None:
    cls = _router_class()
    _originals["aux_loss_scale_tp_cp"] = {name: getattr(cls, name) for name in _SCALED_METHODS}
    for name in _SCALED_METHODS:
        setattr(cls, name, _scaled_method(getattr(cls, name)))


def _revert_aux_scale() -> None:
    cls = _router_class()
    for name, original in _originals.pop("aux_loss_scale_tp_cp").items():
        setattr(cls, name, original)


# ------------------------------------------------------------------ 3. experts always marked
def mark_expert_parameters(moe_layer) -> int:
    """Mark every parameter of ``moe_layer.experts`` as expert-parallel (``allreduce=False``);
    returns how many. Idempotent."""
    count = 0
    for param in moe_layer.experts.parameters():
        param.allreduce = False
        count += 1
    return count


def _moe_layer_class():
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return MoELayer


def _marking_init(original: Callable) -> Callable:
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        mark_expert_parameters(self)

    return __init__


def _apply_mark_experts() -> None:
    cls = _moe_layer_class()
    _originals["experts_always_expert_parallel"] = cls.__init__
    cls.__init__ = _marking_init(cls.__init__)


def _revert_mark_experts() -> None:
    _moe_layer_class().__init__ = _originals.pop("experts_always_expert_parallel")


# ------------------------------------------------------------------ the list
@dataclass(frozen=True)
class Fix(GatedChange):
    """One megatron-core MoE bug and its fix (``name``, ``summary`` and ``megatron``, the
    releases that have the bug, as in :class:`GatedChange`)."""

    apply: Callable[[], None]
    revert: Callable[[], None]


FIXES: List[Fix] = [
    Fix("router_gemm_without_te", "NameError te_general_gemm in the router's GEMM without Transformer Engine",
        ">=0.16.1,<0.19", _apply_router_gemm, _revert_router_gemm),
    Fix("aux_loss_scale_tp_cp", "per-token loss: aux/z-loss gradient 1/(TP*CP) too small under SP or CP",
        ">=0.16.1,<0.19", _apply_aux_scale, _revert_aux_scale),
    Fix("experts_always_expert_parallel", "experts reduced over the dense DP group at EP=1 with ETP<TP; "
        "optimizer structure differs between EP=1 and EP>1", ">=0.16.1", _apply_mark_experts,
        _revert_mark_experts),
]

_REGISTRY = Registry("moe fixes", FIXES)


def applied() -> List[str]:
    """The names of the fixes in effect."""
    return list(_REGISTRY.applied)


def install() -> None:
    """Apply the fixes this megatron-core release needs (idempotent), except those named in
    ``$PSFT_PATCHES_OFF``."""
    _REGISTRY.install()


def disabled(*names: str):
    """Revert the named fixes inside a ``with`` block (tests: show the bug a fix is for). Names
    not in effect are ignored; unknown names raise ``KeyError``."""
    return _REGISTRY.disabled(*names)
