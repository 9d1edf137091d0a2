"""A reproducible small-scale study: PSFT vs SFT vs DFT vs SFT-KL on SmolLM2-135M-Instruct, on CPU.

Stages (each leaves a state file; a rerun skips finished ones): data generation (``data``),
GGUF -> HF -> megatron (``gguf_export``), training runs through ``pretrain_psft.py`` and
checkpoint export (``runs``), evaluation with transformers (``evaluate``, ``metrics``), table and
curves (``plot``), driven by ``python tools/run_study.py [--quick]`` (``driver``).
"""
