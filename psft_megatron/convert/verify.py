"""``--verify``: one forward pass of the HF model and of our GPTModel in fp32, compared; on the
GPU when there is one (:func:`psft_megatron.distributed.runtime.device`), else on the CPU.

Both models are held in memory (fp32) here, unlike the conversion itself.
"""

from __future__ import annotations

from typing import Dict

import torch

from psft_megatron.model.config import ModelConfig


def sample_tokens(vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Deterministic random token ids [batch, seq_len]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, V] fp32 logits (on the host) of ``AutoModelForCausalLM`` (eager attention) from ``hf_dir``,
    computed on this process's device."""
    from transformers import AutoModelForCausalLM

    from psft_megatron.distributed.runtime import device

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.to(device()).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens.to(device())).logits.float().cpu()
    del model
    return logits


def megatron_logits(cfg: ModelConfig, ckpt_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, V] fp32 logits of our TP=1/PP=1 GPTModel (``cpu`` spec) loaded from ``ckpt_dir``; padding sliced off."""
    import dataclasses

    from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint
    from psft_megatron.convert.megatron_io import ensure_world_of_one
    from psft_megatron.model.builder import build_gpt_chunks
    from psft_megatron.distributed.runtime import ParallelConfig

    ensure_world_of_one()
    fp32 = dataclasses.replace(cfg, params_dtype="float32")
    (model,) = build_gpt_chunks(fp32, fp32.to_transformer_config(ParallelConfig()), "cpu")
    load_checkpoint(ckpt_dir, [model])
    model.eval()
    device = next(model.parameters()).device  # CUDA when there is a GPU (build_gpt_chunks)
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None).float()[..., : cfg.vocab_size].cpu()


def compare(hf: torch.Tensor, megatron: torch.Tensor) -> Dict[str, float]:
    """{"max_abs_diff": max |a - b|, "argmax_agreement": fraction of positions with the same argmax}."""
    return {
        "max_abs_diff": float((hf - megatron).abs().max()),
        "argmax_agreement": float((hf.argmax(-1) == megatron.argmax(-1)).float().mean()),
    }


def verify(cfg: ModelConfig, hf_dir: str, ckpt_dir: str, batch: int = 2, seq_len: int = 16) -> Dict[str, float]:
    """Forward both models on the same random tokens; returns :func:`compare`'s numbers."""
    tokens = sample_tokens(cfg.vocab_size, batch, seq_len)
    result = compare(hf_logits(hf_dir, tokens), megatron_logits(cfg, ckpt_dir, tokens))
    result.update(batch=batch, seq_len=seq_len)
    return result
