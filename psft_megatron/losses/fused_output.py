"""The output layer fused into the log-prob op, as a GPTModel output processor.

:class:`FusedLogprobProcessor` has the signature of megatron-core's GPTModel output-processor
hook (``psft_megatron.compat.releases.forward_with_output_processor`` provides it on every
supported release): it receives the decoder's final hidden states and the output layer, and
returns the per-token log-probs of the labels and the entropies, computed by
:func:`psft_megatron.ops.fused_linear_logprobs` without any logits tensor.

Output: fp32 ``[b, s, 2]`` - ``[..., 0]`` log p(label), ``[..., 1]`` entropy (0 when not
computed) - for the micro-batch's ``labels [b, s]`` (this CP rank's share); ``[b, s, 3]`` with
``topk=k``: ``[..., 2]`` the entropy of the renormalised top-k distribution (EAFT's gate,
:mod:`psft_megatron.ops.topk_entropy`). Rows whose mask is 0 (prompt, padding) are never
projected: every value is 0 there.
"""

from __future__ import annotations

from typing import Optional

import torch

from psft_megatron.ops.fused_linear_logprobs import RowSelection, fused_linear_logprobs
from psft_megatron.ops.topk_entropy import vocab_parallel_topk_entropy
from psft_megatron.ops.vocab_parallel_logprobs import vocab_parallel_logprobs

__all__ = ["FusedLogprobProcessor", "LogitsLogprobProcessor", "LOGPROB", "ENTROPY", "TOPK_ENTROPY"]

#: positions in the last dimension of the processor's output
LOGPROB, ENTROPY, TOPK_ENTROPY = 0, 1, 2


def _channels(logp: torch.Tensor, ent: Optional[torch.Tensor], top: Optional[torch.Tensor]) -> torch.Tensor:
    """``[..., 2]`` (log-prob, entropy or 0) or ``[..., 3]`` with the top-k entropy."""
    cols = [logp, torch.zeros_like(logp) if ent is None else ent] + ([] if top is None else [top])
    return torch.stack(cols, dim=-1)


class FusedLogprobProcessor:
    """Output processor: hidden states ``[s, b, h]`` -> fp32 ``[b, s, 2]`` (log p, entropy).

    Args:
        labels: int ``[b, s]`` global vocabulary ids (``s`` = the full local sequence; under
            sequence parallelism the hidden states hold ``s / tp`` of it).
        mask: optional ``[b, s]``; rows with ``mask == 0`` are not projected. The rows are
            selected here, when the processor is made before the model's forward: on CUDA their
            count reaches the host without waiting for the decoder (``ops.RowSelection``).
        return_entropy: compute the entropy (else channel 1 is 0).
        chunk_size: rows per chunk of the op (``None``: its default).
        tp_group: the TP group (``None``: the output layer's).
        topk: ``k``: a third channel, the top-k entropy (``None``: two channels).
    """

    def __init__(self, labels: torch.Tensor, mask: Optional[torch.Tensor] = None, *, return_entropy: bool = True,
                 chunk_size: Optional[int] = None, tp_group=None, topk: Optional[int] = None):
        if mask is not None and tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal labels shape {tuple(labels.shape)}")
        self.labels = labels
        self.rows = None if mask is None else RowSelection(mask)
        self.return_entropy = bool(return_entropy)
        self.chunk_size = chunk_size
        self.tp_group = tp_group
        self.topk = topk

    def __call__(self, *, hidden_states: torch.Tensor, output_layer, output_weight=None, config=None,
                 **unused) -> torch.Tensor:
        if getattr(output_layer, "bias", None) is not None:
            raise NotImplementedError("the fused output layer supports output layers without bias")
        if config is not None and getattr(config, "use_mup", False):
            raise NotImplementedError("the fused output layer does not apply muP's logit scaling")
        weight = output_weight if output_weight is not None else output_layer.weight
        sequence_parallel = bool(getattr(output_layer, "sequence_parallel", False))
        group = self.tp_group if self.tp_group is not None else getattr(output_layer, "tp_group", None)
        if hidden_states.shape[1] != self.labels.shape[0]:
            raise ValueError(f"labels [b={self.labels.shape[0]}, s] do not match hidden states [s, b={hidden_states.shape[1]}, h]")
        if hidden_states.dtype != weight.dtype:  # e.g. fp32 hidden states from Float16Module(fp32_output)
            hidden_states = hidden_states.to(weight.dtype)
        out = fused_linear_logprobs(hidden_states, weight, self.labels, tp_group=group, sequence_parallel=sequence_parallel,
                                    mask=self.rows, return_entropy=self.return_entropy, chunk_size=self.chunk_size,
                                    topk_entropy=self.topk)
        out = list(out) if isinstance(out, tuple) else [out]
        logp = out.pop(0)
        ent = out.pop(0) if self.return_entropy else None
        return _channels(logp, ent, out.pop(0) if self.topk else None)


class LogitsLogprobProcessor:
    """Output processor: hidden states ``[s, b, h]`` -> the output layer's logits ``[s, b, V/tp]``
    -> fp32 ``[b, s, 2]`` (log p of ``labels [b, s]``, entropy or 0), the same values as
    :class:`FusedLogprobProcessor` with the logits materialised (megatron's output layer runs as
    it would; :func:`psft_megatron.ops.vocab_parallel_logprobs` never copies them whole); with
    ``topk=k`` a third channel, the top-k entropy
    (:func:`psft_megatron.ops.vocab_parallel_topk_entropy`)."""

    def __init__(self, labels: torch.Tensor, *, return_entropy: bool = True, chunk_size: Optional[int] = None,
                 tp_group=None, topk: Optional[int] = None):
        self.labels = labels
        self.return_entropy = bool(return_entropy)
        self.chunk_size = chunk_size
        self.tp_group = tp_group
        self.topk = topk

    def __call__(self, *, hidden_states: torch.Tensor, output_layer, output_weight=None, config=None,
                 **unused) -> torch.Tensor:
        if config is not None and getattr(config, "use_mup", False):
            raise NotImplementedError("log-prob output does not apply muP's logit scaling")
        if hidden_states.shape[1] != self.labels.shape[0]:
            raise ValueError(f"labels [b={self.labels.shape[0]}, s] do not match hidden states [s, b={hidden_states.shape[1]}, h]")
        logits, _ = output_layer(hidden_states, weight=output_weight)  # [s, b, V/tp]
        group = self.tp_group if self.tp_group is not None else getattr(output_layer, "tp_group", None)
        out = vocab_parallel_logprobs(logits, self.labels.t(), tp_group=group,
                                      return_entropy=self.return_entropy, chunk_size=self.chunk_size)
        logp, ent = out if self.return_entropy else (out, None)
        top = None
        if self.topk:
            top = vocab_parallel_topk_entropy(logits, self.topk, tp_group=group, chunk_size=self.chunk_size)
        return _channels(logp, ent, top).transpose(0, 1).contiguous()
