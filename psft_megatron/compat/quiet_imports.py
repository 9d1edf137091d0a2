"""What a run prints while it starts, and what it keeps quiet.

megatron-core warns on import, once per process and module, that Transformer Engine and apex
are missing (five ``UserWarning`` lines per rank on a CPU box). :func:`quiet_megatron_import`
imports the megatron modules the trainer uses with those warnings recorded, and global rank 0
prints one line instead. It also drops megatron-core's log lines about its own internal APIs
that this package calls on purpose and a user cannot act on (:data:`INTERNAL_DEPRECATIONS`,
megatron-core 0.19: one per model build or checkpoint load, on every rank), and the warnings
raised on every run whatever the config says: megatron's own defaults, torch's deprecation of
the collective names megatron-core calls, and (CPU runs only) megatron-core's GPU advice to set
``CUDA_DEVICE_MAX_CONNECTIONS`` with sequence parallelism.
"""

from __future__ import annotations

import logging
import warnings

#: (logger, message prefix) of megatron-core log records about its internals, dropped
INTERNAL_DEPRECATIONS = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    ("megatron.core.dist_checkpointing.strategies.common", "load_common is deprecated"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
)


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_megatron_logs() -> None:
    """Drop the :data:`INTERNAL_DEPRECATIONS` records (idempotent)."""
    for name, prefix in INTERNAL_DEPRECATIONS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))

#: fragments of megatron-core's import-time warnings about optional packages
_MISSING_PACKAGE_WARNINGS = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                             "Transformer Engine is not installed", "apex is not installed")


#: warnings raised on every run, whatever the config says (regex prefixes; nothing a user can
#: change): megatron-core's about its own defaults on every model build; torch's deprecation of
#: the collective names megatron-core calls; megatron-core 0.19's import of its experimental
#: MIMO models inside get_megatron_optimizer; torch's note when megatron-core 0.19 reads a
#: checkpoint's common state without the process group (on purpose: rank 0 alone)
_DEFAULT_NOISE = ("full scope is deprecated",
                  r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
                  "MimoModelConfig is experimental",
                  "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in "
                  "a single process")
#: megatron-core's advice for GPUs, meaningless on a CPU run (gloo has no CUDA streams)
_CPU_NOISE = ("When using sequence parallelism it is recommended to set the environment variable "
              "CUDA_DEVICE_MAX_CONNECTIONS",)


def quiet_megatron_import(announce: bool = True) -> list:
    """Import megatron-core's model, optimizer and DDP modules with their missing-package
    warnings collapsed into one line (printed when ``announce``, i.e. on global rank 0).
    Other warnings pass through. Returns the collapsed messages (distinct, in order)."""
    quiet_megatron_logs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import megatron.core.distributed  # noqa: F401
        import megatron.core.models.gpt  # noqa: F401
        import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
        import megatron.core.optimizer  # noqa: F401
        import megatron.core.pipeline_parallel  # noqa: F401
    import torch

    noise = _DEFAULT_NOISE + (() if torch.cuda.is_available() else _CPU_NOISE)
    for message in noise:  # raised by megatron's own defaults, whatever the config says
        warnings.filterwarnings("ignore", message=message)
    collapsed = []
    for item in caught:
        message = str(item.message)
        if any(fragment in message for fragment in _MISSING_PACKAGE_WARNINGS):
            if message not in collapsed:
                collapsed.append(message)
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    if collapsed and announce:
        print("note: megatron-core runs without Transformer Engine and apex here (its torch fallbacks); "
              "on GPUs install them for speed: pip install -e '.[te]'", flush=True)
    return collapsed
