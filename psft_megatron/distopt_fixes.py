"""Fixes for megatron-core's DistributedOptimizer checkpoint load with torch Adam.

These are bugs in megatron-core 0.16.x, not CPU issues: they bite any run that uses the
distributed optimizer with ``torch.optim.Adam``/``AdamW`` (no apex, no Transformer Engine
fused Adam), on GPUs too. :func:`install` applies them once per process; it is called by
:func:`psft_megatron.runtime.initialize` on every run.

1. ``sharded_state_dict(is_loading=True)`` asserts one shared Adam ``step`` across the
   (still empty) optimizer state. Fix: initialise the state with dummy values first
   (megatron's own ``_init_optimizer_states_with_dummy_values``), with lr temporarily 0 so
   the dummy step leaves the parameters untouched.
2. ``_set_main_param_and_optimizer_states`` copies every key of the destination state,
   but the checkpoint gives no ``step`` for torch Adam -> ``KeyError: 'step'``. Fix: copy
   only the keys given.
3. After ``load_state_dict`` every parameter's ``step`` is ONE shared tensor, which torch
   Adam increments once per parameter: bias correction silently wrong from the second step
   after a load. Fix: give each parameter its own copy.

Save the distributed optimizer with ``metadata={"distrib_optim_sharding_type":
"fully_reshardable"}`` (see :data:`DISTOPT_SAVE_METADATA`); the default raises
"ShardedTensor.flattened_range is not supported".
"""

from __future__ import annotations

import functools

#: metadata for ``DistributedOptimizer.sharded_state_dict`` so that the optimizer state can
#: be loaded at another DP (and TP/PP) layout.
DISTOPT_SAVE_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

_installed = False


def _init_states_without_moving_params(opt) -> None:
    saved_lrs = [group["lr"] for group in opt.optimizer.param_groups]
    for group in opt.optimizer.param_groups:
        group["lr"] = 0.0
    try:
        opt._init_optimizer_states_with_dummy_values()
    finally:
        for group, lr in zip(opt.optimizer.param_groups, saved_lrs):
            group["lr"] = lr


def install() -> None:
    """Patch ``DistributedOptimizer`` (idempotent). See the module docstring."""
    global _installed
    if _installed:
        return
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original_sharded_state_dict = DistributedOptimizer.sharded_state_dict
    original_load_state_dict = DistributedOptimizer.load_state_dict
    original_set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    @functools.wraps(original_sharded_state_dict)
    def sharded_state_dict(self, *args, **kwargs):
        is_loading = kwargs.get("is_loading", args[1] if len(args) > 1 else False)
        if is_loading and isinstance(self.optimizer, torch.optim.Optimizer) and not self.optimizer.state:
            _init_states_without_moving_params(self)
        return original_sharded_state_dict(self, *args, **kwargs)

    @functools.wraps(original_set_states)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    @functools.wraps(original_load_state_dict)
    def load_state_dict(self, state_dict):
        result = original_load_state_dict(self, state_dict)
        for param_state in self.optimizer.state.values():
            step = param_state.get("step")
            if isinstance(step, torch.Tensor):
                param_state["step"] = step.detach().clone()
        return result

    DistributedOptimizer.sharded_state_dict = sharded_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    DistributedOptimizer.load_state_dict = load_state_dict
    _installed = True
