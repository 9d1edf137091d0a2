"""Vocab-parallel per-token ops: log-probs, entropy, full-vocabulary KL (see docs/logprobs.md)."""

from psft_megatron.ops.vocab_parallel_logprobs import (
    default_chunk_size,
    vocab_parallel_kl,
    vocab_parallel_logprobs,
)

__all__ = ["vocab_parallel_logprobs", "vocab_parallel_kl", "default_chunk_size"]
