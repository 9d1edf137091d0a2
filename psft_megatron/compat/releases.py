"""Differences between megatron-core releases, in one place.

Supported: megatron-core 0.16.1 to 0.19.x (``setup.py``). Each section below bridges one
difference; callers use the function, never a version check. A bridge picks its branch by
feature detection (the signature or attribute it needs) where that is possible, and by
:func:`megatron_version` otherwise. The version-gated patches of megatron-core itself
(:mod:`psft_megatron.compat.cpu`, :mod:`psft_megatron.compat.distopt_fixes`) use
:func:`version_in` to decide whether they apply.

To add a bridge: a new section with its public function(s), a comment naming the releases on
each side of the difference, and a test in ``tests/test_megatron_compat.py``.

Sections:

- version: :func:`megatron_version`, :func:`version_in`;
- context-parallel batch slicing: :func:`get_batch_on_this_cp_rank` (0.18 added a required
  ``is_hybrid_cp`` argument and no longer falls back to megatron's CP group);
- checkpoints: :func:`write_legacy_common_state` (0.19 stopped writing ``common.pt``, which
  0.16-0.18 need to load a checkpoint);
- GPTModel output processor: :func:`has_output_processor`,
  :func:`forward_with_output_processor` (a hook ``GPTModel.forward`` has from 0.18 on);
- MoE router losses recorded for logging: :func:`moe_router_losses`,
  :func:`clear_moe_router_losses` (0.19 moved them into ``moe_logging``'s tracker).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict

import torch

from psft_megatron.model.unwrap import unwrap


# ============================================================================================
# version
# ============================================================================================

@functools.lru_cache(maxsize=None)
def megatron_version():
    """The importable megatron-core's version (a ``packaging.version.Version``), read from
    ``megatron.core.package_info``: the code that runs, even where it shadows an installed
    distribution on ``PYTHONPATH``."""
    from megatron.core import package_info
    from packaging.version import Version

    return Version(package_info.__version__)


def version_in(spec: str, version=None) -> bool:
    """True if megatron-core's release (``version``, default :func:`megatron_version`) lies in
    the PEP 440 ``spec``, e.g. ``">=0.16.1,<0.19"``.

    Pre-release, dev and local tags are ignored: ``0.19.0rc1`` and ``0.19.0+nv25.10`` (NGC
    builds) count as 0.19.0, the release whose code they carry.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = megatron_version() if version is None else Version(str(version))
    return SpecifierSet(spec).contains(Version(version.base_version))


# ============================================================================================
# context-parallel batch slicing
# ============================================================================================
# megatron.core.utils.get_batch_on_this_cp_rank cuts every sequence into 2*CP chunks and keeps
# chunks r and 2*CP-1-r on CP rank r (causal load balancing).
#   0.16, 0.17: get_batch_on_this_cp_rank(batch, cp_group=None); None means megatron's CP group.
#   0.18, 0.19: get_batch_on_this_cp_rank(batch, is_hybrid_cp, cp_group=None, ...): is_hybrid_cp
#         is required, and a None cp_group now means torch.distributed's default group (the
#         whole world) instead of megatron's CP group, so the group is always passed here.

def _cp_slice_takes_hybrid_flag(func) -> bool:
    return "is_hybrid_cp" in inspect.signature(func).parameters


def get_batch_on_this_cp_rank(batch: Dict[str, Any], cp_group=None) -> Dict[str, Any]:
    """This context-parallel rank's share of ``batch`` (megatron's load-balanced slicing).

    Args:
        batch: tensors ``[b, s, ...]`` (an ``attention_mask`` ``[b, 1, s, s]``) or ``None``s,
            without ``cu_seqlens`` (packed THD batches are not sliced here).
        cp_group: the CP process group; default megatron's (``parallel_state``).

    Returns:
        the batch with every tensor cut along its sequence dimension (unchanged at CP = 1).
    """
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank as slice_batch

    if cp_group is None:
        cp_group = parallel_state.get_context_parallel_group()
    if _cp_slice_takes_hybrid_flag(slice_batch):
        return slice_batch(batch, is_hybrid_cp=False, cp_group=cp_group)
    return slice_batch(batch, cp_group=cp_group)


# ============================================================================================
# checkpoints: where the common (non-tensor) state is stored
# ============================================================================================
# dist_checkpointing.save (torch_dist) stores the common, non-tensor part of a checkpoint
# (iteration, config, the optimizer's param groups, ...)
#   0.16-0.18: in <checkpoint>/common.pt;
#   0.19:      inside the torch_dist files, as the ShardedObject "common_state" (no common.pt).
# 0.19 reads both forms (common.pt first); 0.16-0.18 read only common.pt and fail on a 0.19
# checkpoint ("Common file .../common.pt does not exist"). Tensors and ShardedObjects are
# stored alike by all four releases.

COMMON_STATE_FILE = "common.pt"


def write_legacy_common_state(ckpt_dir: str) -> bool:
    """After ``dist_checkpointing.save``: add ``common.pt`` where this release did not write it,
    so that every supported release loads the checkpoint. Collective (call on every rank).

    Returns:
        True if the file was written (0.19), False if the release had written it (0.16-0.18).
    """
    import os

    from megatron.core import dist_checkpointing

    path = os.path.join(ckpt_dir, COMMON_STATE_FILE)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    written = False
    if rank == 0 and not os.path.exists(path):
        common = dist_checkpointing.load_common_state_dict(ckpt_dir)
        tmp = path + ".tmp"
        torch.save(common, tmp)
        os.replace(tmp, path)
        written = True
    if torch.distributed.is_initialized():
        flag = [written]
        torch.distributed.broadcast_object_list(flag, src=0)
        written = flag[0]
    return written


# ============================================================================================
# GPTModel output processor (the output layer and the loss replaced by a callable)
# ============================================================================================
# megatron-core's GPTModel.forward takes ``output_processor=`` / ``output_processor_context=``
# from 0.18 on (0.17.1 has no such hook; 0.18.2 and 0.19.x have):
# on the last pipeline stage it hands the decoder's hidden states (after the final norm) and
# the output-layer helpers to the callable and returns what it returns, without running the
# output layer. 0.16 has no such hook; there GPTModel's own ``post_process`` switch is turned
# off for the call (GPTModel then returns the final hidden states, exactly where the hook would
# be called) and the callable is applied to them with the same keyword arguments.

def has_output_processor(model) -> bool:
    """Whether this megatron-core's ``GPTModel.forward`` takes ``output_processor`` natively."""
    return "output_processor" in inspect.signature(type(unwrap(model)).forward).parameters


def forward_with_output_processor(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                                  attention_mask, *, output_processor: Callable[..., Any],
                                  output_processor_context: Any = None, forward: Callable[..., Any] = None,
                                  **forward_kwargs):
    """``model(input_ids, position_ids, attention_mask, **forward_kwargs)`` with
    ``output_processor`` in place of the output layer and the loss on the last stage.

    Args:
        model: a GPTModel, possibly wrapped (DDP, Float16Module); wrappers' forward runs.
        output_processor: called on the last pipeline stage (``post_process``) as
            ``output_processor(hidden_states=[s, b, h], output_layer=ColumnParallelLinear,
            output_weight=tied weight or None, context=output_processor_context, config=...,
            labels, loss_mask, input_ids, position_ids, attention_mask, decoder_input,
            inference_context, packed_seq_params, runtime_gather_output,
            compute_language_model_loss, scale_logits)``; its result is the model's output.
        forward: what runs the model (default ``model`` itself); e.g. the GPTModel's own
            class ``forward``, bound, when called from inside an instance-level forward.
        forward_kwargs: other GPTModel.forward keywords (``packed_seq_params``, ...), and
            wrapper keywords (``fp32_output`` of Float16Module).

    Returns:
        The processor's result on the last stage, the hidden states on other stages. On 0.16,
        a Float16Module wrapper with ``fp32_output=True`` hands fp32 hidden states to the
        processor (0.19 hands them in the model's dtype); processors cast as they need.
    """
    gpt = unwrap(model)
    run = model if forward is None else forward
    if has_output_processor(model):
        return run(input_ids, position_ids, attention_mask, output_processor=output_processor,
                   output_processor_context=output_processor_context, **forward_kwargs)
    if not gpt.post_process:
        return run(input_ids, position_ids, attention_mask, **forward_kwargs)
    if getattr(gpt.config, "mtp_num_layers", None):
        raise NotImplementedError("an output processor with multi-token prediction needs megatron-core >= 0.19")
    output_weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    gpt.post_process = False  # GPTModel returns the final (normed) hidden states [s, b, h]
    try:
        hidden_states = run(input_ids, position_ids, attention_mask, **forward_kwargs)
    finally:
        gpt.post_process = True
    return output_processor(
        hidden_states=hidden_states, output_layer=gpt.output_layer, output_weight=output_weight,
        labels=None, loss_mask=None, input_ids=input_ids, position_ids=position_ids,
        attention_mask=attention_mask, decoder_input=None, inference_context=None,
        packed_seq_params=forward_kwargs.get("packed_seq_params"), runtime_gather_output=None,
        context=output_processor_context, compute_language_model_loss=gpt.compute_language_model_loss,
        scale_logits=None, config=gpt.config,
    )


# ============================================================================================
# MoE router losses recorded for logging
# ============================================================================================
# MoE routers record their aux loss (and z-loss) per layer, summed over micro-batches, for
# logging (the value before its coefficient):
# (picked by feature detection: whether moe_logging imports)
#   0.16:      moe_utils.get_moe_layer_wise_logging_tracker(): {name: {"values": [num_layers],
#              "reduce_group": group or None, ...}}; cleared by clear_aux_losses_tracker();
#   0.19:      moe_logging.get_moe_metrics_tracker().metrics: {name: MetricEntry(values,
#              reduce_group, ...)}; cleared by its clear().
# A metric recorded with a reduce group holds this rank's part of a sum over that group (the
# aux losses over TP x CP); one without it holds a value of this rank alone (the z-loss).

def moe_router_losses() -> Dict[str, Any]:
    """``{name: (values [num_layers] on this rank, summed_over_reduce_group)}`` recorded since
    the last :func:`clear_moe_router_losses` (names: ``load_balancing_loss``,
    ``seq_load_balancing_loss``, ``global_load_balancing_loss``, ``z_loss``)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # 0.16
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return {name: (entry["values"], entry.get("reduce_group") is not None)
                for name, entry in get_moe_layer_wise_logging_tracker().items() if "values" in entry}
    return {name: (entry.values, entry.reduce_group is not None)
            for name, entry in get_moe_metrics_tracker().metrics.items()}


def clear_moe_router_losses() -> None:
    """Zero what :func:`moe_router_losses` reports (once per optimizer step)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # 0.16
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        return
    get_moe_metrics_tracker().clear()
