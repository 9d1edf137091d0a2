"""psft-megatron: trust-region supervised fine-tuning (PSFT, SFT, DFT, SFT-KL) on Megatron-Core.

Importing this package is cheap and needs neither CUDA, Transformer Engine, apex nor NeMo;
the heavy parts (megatron-core, the model builder) are imported from their submodules:

- :mod:`psft_megatron.distributed` - torch.distributed + megatron parallel_state initialisation.
- :mod:`psft_megatron.compat` - everything that adapts megatron-core (releases, the CPU layer, fixes).
- :mod:`psft_megatron.checkpointing` - distributed checkpoints, their manager, model records, restores.
- :mod:`psft_megatron.model` - ``ModelConfig`` and the GPTModel builder.
- :mod:`psft_megatron.ops` - vocab-parallel log-probs and entropy.
- :mod:`psft_megatron.losses` - the SFT / PSFT / DFT / SFT-KL objectives (megatron loss contract).
"""

__version__ = "0.1.0"
