"""Vocab-parallel per-token ops: log-probs, entropy, full-vocabulary KL, the entropy of the
top-k distribution, and the same log-probs with the output layer fused in (no logits tensor);
see docs/logprobs.md."""

from psft_megatron.ops.fused_linear_logprobs import RowSelection, default_fused_tiles, fused_linear_logprobs
from psft_megatron.ops.topk_entropy import vocab_parallel_topk_entropy
from psft_megatron.ops.vocab_parallel_logprobs import (
    default_chunk_size,
    vocab_parallel_kl,
    vocab_parallel_logprobs,
)

__all__ = [
    "vocab_parallel_logprobs",
    "vocab_parallel_kl",
    "vocab_parallel_topk_entropy",
    "default_chunk_size",
    "fused_linear_logprobs",
    "default_fused_tiles",
    "RowSelection",
]
