"""Model: ``ModelConfig`` (architecture) and the megatron ``GPTModel`` builder."""

from psft_megatron.model.config import ModelConfig

__all__ = ["ModelConfig"]
