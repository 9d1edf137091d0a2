"""Fixes for megatron-core's DistributedOptimizer checkpoint load with torch Adam.

These are bugs in megatron-core, not CPU issues: they bite any run that uses the distributed
optimizer with ``torch.optim.Adam``/``AdamW`` (no apex, no Transformer Engine fused Adam), on
GPUs too. :func:`install` applies, once per process, the fixes the installed megatron-core
release needs (:data:`FIXES`, each with the releases that have the bug: a PEP 440 range checked
with :func:`psft_megatron.compat.releases.version_in`); it is called by
:func:`psft_megatron.distributed.runtime.initialize` on every run. Each bug was re-checked on 0.16.1 and
0.19.2 (``tests/test_distopt_fixes.py`` shows it with the fix off on the releases that have it);
none is fixed upstream as of 0.19.2, so every fix applies to the whole supported range.

1. ``init_state_before_load``: ``sharded_state_dict(is_loading=True)`` calls
   ``load_state_dict(state_dict())``, whose ``state_dict()`` asserts one shared Adam ``step``
   across the (still empty) optimizer state: ``AssertionError`` before anything is read.
   Fix: initialise the state first with megatron's own
   ``_init_optimizer_states_with_dummy_values``, lr temporarily 0 so that the dummy step
   leaves the parameters untouched. (0.16.1 ``state_dict`` line 642, 0.19.2 line 839.)
2. ``load_given_states_only``: ``_set_main_param_and_optimizer_states`` copies into every
   tensor of the destination state, but a ``fully_reshardable`` checkpoint gives no ``step``
   for torch Adam (``load_parameter_state_from_fully_reshardable`` skips it):
   ``KeyError: 'step'``. Fix: copy only the tensors given.
3. ``unshared_adam_step``: after ``load_state_dict`` every parameter's ``step`` is ONE shared
   tensor (``s["step"] = step`` for all states), which torch Adam increments once per
   parameter: bias correction silently wrong from the second step after a load.
   Fix: give each parameter its own copy.

Save the distributed optimizer with ``metadata={"distrib_optim_sharding_type":
"fully_reshardable"}`` (see :data:`DISTOPT_SAVE_METADATA`): it is the format that reshards to
another DP/TP/PP layout, and the same on 0.16 and 0.19, so checkpoints move between releases.
The default (``fully_sharded_model_space``) raises "ShardedTensor.flattened_range is not
supported" on both.

``PSFT_PATCHES_OFF=name`` (tests only) leaves a fix out at :func:`install`; :func:`disabled`
reverts fixes inside a ``with`` block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, List

from psft_megatron.compat.registry import PATCHES_OFF_ENV, GatedChange, Registry

#: metadata for ``DistributedOptimizer.sharded_state_dict`` so that the optimizer state can
#: be loaded at another DP (and TP/PP) layout.
DISTOPT_SAVE_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

__all__ = ["DISTOPT_SAVE_METADATA", "FIXES", "PATCHES_OFF_ENV", "Fix", "applied", "disabled", "install"]

_originals: Dict[str, Callable] = {}  # fix name -> the original DistributedOptimizer method


def _distopt_class():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return DistributedOptimizer


def _init_states_without_moving_params(opt) -> None:
    saved_lrs = [group["lr"] for group in opt.optimizer.param_groups]
    for group in opt.optimizer.param_groups:
        group["lr"] = 0.0
    try:
        opt._init_optimizer_states_with_dummy_values()
    finally:
        for group, lr in zip(opt.optimizer.param_groups, saved_lrs):
            group["lr"] = lr


def _fixed_sharded_state_dict(original):
    import torch

    @functools.wraps(original)
    def sharded_state_dict(self, *args, **kwargs):
        is_loading = kwargs.get("is_loading", args[1] if len(args) > 1 else False)
        if is_loading and isinstance(self.optimizer, torch.optim.Optimizer) and not self.optimizer.state:
            _init_states_without_moving_params(self)
        return original(self, *args, **kwargs)

    return sharded_state_dict


def _fixed_set_states(original):
    import torch

    @functools.wraps(original)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            if isinstance(value, torch.Tensor):  # non-tensor entries are skipped, as megatron does
                dst[key].copy_(value)

    return set_main_param_and_optimizer_states


def _fixed_load_state_dict(original):
    import torch

    @functools.wraps(original)
    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        for param_state in self.optimizer.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.detach().clone()
        return result

    return load_state_dict


@dataclass(frozen=True)
class Fix(GatedChange):
    """One megatron-core DistributedOptimizer bug and its fix (``name``, ``summary`` and
    ``megatron``, the releases that have the bug, as in :class:`GatedChange`; where upstream
    fixes it, the range ends at that release and the module docstring names it).

    Attributes:
        method: the ``DistributedOptimizer`` method the fix wraps.
        wrap: ``original method -> fixed method``.
    """

    method: str
    wrap: Callable[[Callable], Callable]

    def apply(self) -> None:
        cls = _distopt_class()
        original = getattr(cls, self.method)
        _originals[self.name] = original
        setattr(cls, self.method, self.wrap(original))

    def revert(self) -> None:
        setattr(_distopt_class(), self.method, _originals.pop(self.name))


FIXES: List[Fix] = [
    Fix("init_state_before_load", "sharded_state_dict(is_loading=True) asserts on the empty Adam state",
        ">=0.16.1", "sharded_state_dict", _fixed_sharded_state_dict),
    Fix("load_given_states_only", "fully_reshardable load: KeyError 'step' (copies keys it was not given)",
        ">=0.16.1", "_set_main_param_and_optimizer_states", _fixed_set_states),
    Fix("unshared_adam_step", "after a load all params share one Adam step tensor (wrong bias correction)",
        ">=0.16.1", "load_state_dict", _fixed_load_state_dict),
]

_REGISTRY = Registry("distopt fixes", FIXES)


def applied() -> List[str]:
    """The names of the fixes in effect."""
    return list(_REGISTRY.applied)


def install() -> None:
    """Apply the fixes this megatron-core release needs (idempotent), except those named in
    ``$PSFT_PATCHES_OFF``. See the module docstring."""
    _REGISTRY.install()


def disabled(*names: str):
    """Revert the named fixes inside a ``with`` block (tests: show the bug a fix is for). Names
    not in effect (not needed by this release) are ignored; unknown names raise ``KeyError``."""
    return _REGISTRY.disabled(*names)
