"""Differences between megatron-core releases, in one place.

Each section below bridges one difference; callers use the function, never a version check.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch


# ============================================================================================
# GPTModel output processor (the output layer and the loss replaced by a callable)
# ============================================================================================
# megatron-core 0.19's GPTModel.forward takes ``output_processor=`` / ``output_processor_context=``:
# on the last pipeline stage it hands the decoder's hidden states (after the final norm) and
# the output-layer helpers to the callable and returns what it returns, without running the
# output layer. 0.16 has no such hook; there GPTModel's own ``post_process`` switch is turned
# off for the call (GPTModel then returns the final hidden states, exactly where the hook would
# be called) and the callable is applied to them with the same keyword arguments.

def _gpt_model(model):
    """The GPTModel inside megatron's wrappers (DDP, Float16Module)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def has_output_processor(model) -> bool:
    """Whether this megatron-core's ``GPTModel.forward`` takes ``output_processor`` natively."""
    return "output_processor" in inspect.signature(type(_gpt_model(model)).forward).parameters


def forward_with_output_processor(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                                  attention_mask, *, output_processor: Callable[..., Any],
                                  output_processor_context: Any = None, **forward_kwargs):
    """``model(input_ids, position_ids, attention_mask, **forward_kwargs)`` with
    ``output_processor`` in place of the output layer and the loss on the last stage.

    Args:
        model: a GPTModel, possibly wrapped (DDP, Float16Module); wrappers' forward runs.
        output_processor: called on the last pipeline stage (``post_process``) as
            ``output_processor(hidden_states=[s, b, h], output_layer=ColumnParallelLinear,
            output_weight=tied weight or None, context=output_processor_context, config=...,
            labels, loss_mask, input_ids, position_ids, attention_mask, decoder_input,
            inference_context, packed_seq_params, runtime_gather_output,
            compute_language_model_loss, scale_logits)``; its result is the model's output.
        forward_kwargs: other GPTModel.forward keywords (``packed_seq_params``, ...), and
            wrapper keywords (``fp32_output`` of Float16Module).

    Returns:
        The processor's result on the last stage, the hidden states on other stages. On 0.16,
        a Float16Module wrapper with ``fp32_output=True`` hands fp32 hidden states to the
        processor (0.19 hands them in the model's dtype); processors cast as they need.
    """
    gpt = _gpt_model(model)
    if has_output_processor(model):
        return model(input_ids, position_ids, attention_mask, output_processor=output_processor,
                     output_processor_context=output_processor_context, **forward_kwargs)
    if not gpt.post_process:
        return model(input_ids, position_ids, attention_mask, **forward_kwargs)
    if getattr(gpt.config, "mtp_num_layers", None):
        raise NotImplementedError("an output processor with multi-token prediction needs megatron-core >= 0.19")
    output_weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    gpt.post_process = False  # GPTModel returns the final (normed) hidden states [s, b, h]
    try:
        hidden_states = model(input_ids, position_ids, attention_mask, **forward_kwargs)
    finally:
        gpt.post_process = True
    return output_processor(
        hidden_states=hidden_states, output_layer=gpt.output_layer, output_weight=output_weight,
        labels=None, loss_mask=None, input_ids=input_ids, position_ids=position_ids,
        attention_mask=attention_mask, decoder_input=None, inference_context=None,
        packed_seq_params=forward_kwargs.get("packed_seq_params"), runtime_gather_output=None,
        context=output_processor_context, compute_language_model_loss=gpt.compute_language_model_loss,
        scale_logits=None, config=gpt.config,
    )
