"""Everything that adapts megatron-core, in one room.

- :mod:`~psft_megatron.compat.releases`: the differences between supported megatron-core releases
  (0.16.1 to 0.19.x): callers use its functions, never a version check.
- :mod:`~psft_megatron.compat.registry`: the registry of version-gated changes to megatron-core
  (release ranges, ``PSFT_PATCHES_OFF``, ``disabled()``), shared by the three modules below.
- :mod:`~psft_megatron.compat.cpu`: the CPU (gloo) layer, installed on machines without CUDA only.
- :mod:`~psft_megatron.compat.distopt_fixes`: distributed-optimizer checkpoint bugs (every run).
- :mod:`~psft_megatron.compat.moe_fixes`: Mixture-of-Experts bugs (every run).
- :mod:`~psft_megatron.compat.quiet_imports`: megatron-core's import-time warnings and internal
  deprecation logs, recorded and summarised in one line.
"""
