"""Checkpoints: what is written, how a run finds and trusts one, and what a restore reads.

- :mod:`~psft_megatron.checkpointing.dist_checkpoint`: megatron distributed checkpoints
  (torch_dist) of model chunks and optimizer state; damaged-checkpoint checks (once per start,
  rank 0 deciding); strict loads.
- :mod:`~psft_megatron.checkpointing.integrity`: ``checksums.json``, written at save, verified
  by every reader.
- :mod:`~psft_megatron.checkpointing.manager`: ``iter_NNNNNNN`` directories, atomic saves,
  ``latest``, rotation and the resume point.
- :mod:`~psft_megatron.checkpointing.save_guard`: a failure on any rank during a save ends it on
  every rank within seconds.
- :mod:`~psft_megatron.checkpointing.run_dir`: the run directory: one run's, checked at start-up
  (another run there, paths, a shared filesystem), the run id.
- :mod:`~psft_megatron.checkpointing.model_record`: ``model.yaml``, the model a checkpoint holds.
- :mod:`~psft_megatron.checkpointing.restore`: ``model.restore_from_path`` (weights only).

The names of the former module ``psft_megatron.checkpointing`` (``save_checkpoint``,
``load_checkpoint``, ...) still resolve here for one release, with a DeprecationWarning; import
them from :mod:`~psft_megatron.checkpointing.dist_checkpoint`.
"""

import importlib
import warnings


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module("psft_megatron.checkpointing.dist_checkpoint")
    if not hasattr(module, name):
        raise AttributeError(f"module 'psft_megatron.checkpointing' has no attribute '{name}'")
    warnings.warn(f"psft_megatron.checkpointing.{name} moved to psft_megatron.checkpointing.dist_checkpoint."
                  f"{name}; the old path will be removed in the next release", DeprecationWarning, stacklevel=2)
    value = globals()[name] = getattr(module, name)  # warned once per name
    return value
