"""The loss plug-in in megatron's own shapes, for training loops written elsewhere.

Megatron-LM, Megatron-Bridge and megatron-core's example loop share one contract: the forward
step calls ``model(tokens, position_ids, attention_mask, labels=labels)``, which returns a
per-token tensor ``[b, s]`` on the last pipeline stage, and returns it with
``partial(loss_func, loss_mask)``; the schedule calls ``loss_func(loss_mask, output_tensor)``
and, with ``TransformerConfig.calculate_per_token_loss``, expects ``(loss_sum, num_tokens,
{name: [sum, count]})``. This module fits every loss kind (PSFT, SFT, DFT, SFT-KL, ASFT, EAFT) into that contract:

* :func:`enable_logprob_output` - a switch on the model: with ``labels=`` it returns fp32
  log-probs of the labels ``[b, s]`` (``[b, s, c]`` with the entropy and EAFT's top-k
  entropy) instead of the cross-entropy, from the logits or with the output layer fused in (no logits tensor);
* :class:`PluginLoss` - the ``loss_func`` (megatron's 3-tuple contract) on that output;
* :func:`collect_old_logprobs` - the forward-only pass for a PSFT window's old policy (or an
  SFT-KL reference), through megatron's schedule: PP and VPP, eval mode;
* :func:`check_normaliser` - run at every training forward of an enabled model: refuses a
  config whose token-count normaliser megatron would never apply;
* :func:`reduce_metrics` - the step's metrics, exact over micro-batches and ranks.

Usage, shapes and the CPU layer for one's own loop: ``docs/plugin.md``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from psft_megatron.errors import ConfigError
from psft_megatron.losses.config import LossConfig
from psft_megatron.losses.fused_output import FusedLogprobProcessor, LogitsLogprobProcessor
from psft_megatron.losses.megatron_loss import PSFTLoss, reduce_loss_metrics
from psft_megatron.losses.objectives import OBJECTIVES
from psft_megatron.model.unwrap import unwrap

__all__ = ["enable_logprob_output", "disable_logprob_output", "PluginLoss", "collect_old_logprobs",
           "check_normaliser", "split_output", "reduce_metrics", "default_forward_step", "METRIC_SETS"]

#: the attribute that marks a model output as this module's log-probs (its channel names)
_OUTPUT_TAG = "psft_logprob_channels"
#: the attribute giving the k of an output's "topk_entropy" channel
_TOPK_TAG = "psft_topk"
#: the processors' channels, in their order (losses.fused_output: LOGPROB, ENTROPY, TOPK_ENTROPY)
_ALL_CHANNELS = ("logprob", "entropy", "topk_entropy")


# --------------------------------------------------------------------------------------------
# the normaliser check (a config megatron would leave unnormalised is refused)
# --------------------------------------------------------------------------------------------
def check_normaliser(config) -> None:
    """Refuse a ``TransformerConfig`` under which megatron would never apply the loss normaliser.

    With ``calculate_per_token_loss=True`` megatron's schedule backpropagates each micro-batch's
    ``loss_sum`` as is and divides the gradients by the step's token count (all micro-batches,
    DP x CP ranks) inside ``finalize_model_grads`` - which it calls, with that count, only when
    ``config.finalize_model_grads_func`` is set. Without it (megatron-core's example loop calls
    ``finalize_model_grads([model])`` by hand, with no count) the gradients are sums over
    tokens: SGD and gradient clipping then see a gradient hundreds of times too large.
    ``calculate_per_token_loss=False`` is always normalised (per micro-batch, by the schedule).

    Raises:
        ConfigError: one line naming both settings and the fix.
    """
    if getattr(config, "calculate_per_token_loss", False) and getattr(config, "finalize_model_grads_func", None) is None:
        raise ConfigError(
            "TransformerConfig.calculate_per_token_loss=True but config.finalize_model_grads_func is None: megatron "
            "would leave the gradients as sums over tokens (it divides by the token count only inside the "
            "finalize_model_grads_func the schedule calls); set config.finalize_model_grads_func = "
            "megatron.core.distributed.finalize_model_grads and drop any finalize_model_grads call of your own, or "
            "set calculate_per_token_loss=False (a mean per micro-batch)")


# --------------------------------------------------------------------------------------------
# the model switch
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    fused: bool
    return_entropy: bool
    chunk_size: Optional[int]
    topk: Optional[int] = None

    @property
    def channels(self) -> Tuple[str, ...]:
        return ("logprob",) + (("entropy",) if self.return_entropy else ()) + (("topk_entropy",) if self.topk else ())


def _chunks_of(model) -> List:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def enable_logprob_output(model, *, fused: bool = False, return_entropy: bool = False,
                          chunk_size: Optional[int] = None, topk_entropy: Optional[int] = None):
    """Make ``model(tokens, position_ids, attention_mask, labels=labels)`` return log-probs.

    Args:
        model: a megatron ``GPTModel``, possibly wrapped (DDP, Float16Module), or the list of
            a rank's virtual-pipeline chunks. Each chunk's GPTModel gets the switch; calling
            again changes its settings.
        fused: run the output layer inside :func:`psft_megatron.ops.fused_linear_logprobs` (no
            ``[tokens, V/tp]`` logits, rows whose ``loss_mask=`` is 0 never projected); else
            megatron's output layer makes the logits and
            :func:`psft_megatron.ops.vocab_parallel_logprobs` reads them (no fp32 copy of them).
        return_entropy: also return the entropy of each token's distribution (a metric).
        chunk_size: rows per chunk of the op (None: its default).
        topk_entropy: ``k``: also return the entropy of the renormalised top-k distribution
            (what ``loss.kind='eaft'`` needs, with ``k = eaft_topk``).

    With ``labels=`` (int ``[b, s]``, global vocabulary ids) the last pipeline stage returns
    fp32 ``[b, s]`` log p(label) - or ``[b, s, c]`` with the channels (log-prob, entropy,
    top-k entropy) that are switched on - in place of megatron's cross-entropy; ``loss_mask=`` (``[b, s]``) is optional and only
    lets the fused path skip rows. Labels outside ``[0, V)`` give 0. Without ``labels`` (and on
    other stages) the model runs as before. Every forward with gradients enabled in training
    mode first runs :func:`check_normaliser` on the model's config (every stage: all ranks stop
    together). Not with multi-token prediction or muP logit scaling. Returns ``model``.
    """
    settings = _Settings(bool(fused), bool(return_entropy), chunk_size, topk_entropy)
    for chunk in _chunks_of(model):
        gpt = unwrap(chunk)
        if getattr(gpt.config, "mtp_num_layers", None):
            raise NotImplementedError("enable_logprob_output: multi-token prediction is not supported")
        if "_psft_class_forward" not in gpt.__dict__:
            gpt._psft_class_forward = gpt.forward  # the class's forward, bound to this instance
            gpt.forward = functools.partial(_logprob_forward, gpt)
        gpt._psft_logprob_output = settings
    return model


def disable_logprob_output(model):
    """Undo :func:`enable_logprob_output`: ``labels=`` gives megatron's cross-entropy again."""
    for chunk in _chunks_of(model):
        gpt = unwrap(chunk)
        if "_psft_class_forward" in gpt.__dict__:
            gpt.forward = gpt.__dict__.pop("_psft_class_forward")
            del gpt._psft_logprob_output
    return model


def _logprob_forward(gpt, input_ids, position_ids, attention_mask, *args, labels=None, loss_mask=None, **kwargs):
    """The instance forward :func:`enable_logprob_output` installs (see there)."""
    from psft_megatron.compat.releases import forward_with_output_processor

    settings, forward = gpt._psft_logprob_output, gpt._psft_class_forward
    if torch.is_grad_enabled() and gpt.training:
        check_normaliser(gpt.config)
    if len(args) > 1:
        raise TypeError("with enable_logprob_output pass labels= as a keyword (megatron's forward steps do)")
    if args:
        kwargs["decoder_input"] = args[0]
    if labels is None or not gpt.post_process:
        return forward(input_ids, position_ids, attention_mask, labels=labels, loss_mask=loss_mask, **kwargs)
    common = dict(return_entropy=settings.return_entropy, chunk_size=settings.chunk_size, topk=settings.topk)
    if settings.fused:
        processor = FusedLogprobProcessor(labels, loss_mask, **common)
    else:
        processor = LogitsLogprobProcessor(labels, **common)
    out = forward_with_output_processor(gpt, input_ids, position_ids, attention_mask, forward=forward,
                                        output_processor=processor, **kwargs)
    index = [_ALL_CHANNELS.index(name) for name in settings.channels]
    if index != list(range(out.shape[-1])):
        out = out[..., index[0]] if len(index) == 1 else out[..., index]
    setattr(out, _OUTPUT_TAG, settings.channels)
    setattr(out, _TOPK_TAG, settings.topk)
    return out


def split_output(output_tensor: torch.Tensor, loss_mask: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(logp [b, s], entropy [b, s] or None)`` from an enabled model's output.

    Raises ValueError for anything else - megatron's cross-entropy (a model without the switch
    called with ``labels=``) or logits (called without ``labels=``) - saying what to change.
    """
    channels = getattr(output_tensor, _OUTPUT_TAG, None)
    if channels is None:
        shape = tuple(output_tensor.shape)
        if loss_mask is not None and shape == tuple(loss_mask.shape):
            what = "a per-token output that is not log-probs (megatron's cross-entropy?)"
        else:
            what = f"an output of shape {shape} (logits? the model was called without labels=)"
        raise ValueError(f"PluginLoss got {what}: call psft_megatron.plugin.enable_logprob_output(model) once and "
                         "model(tokens, position_ids, attention_mask, labels=labels) in the forward step")
    if len(channels) == 1:
        return output_tensor, None
    return output_tensor[..., 0], (output_tensor[..., channels.index("entropy")] if "entropy" in channels else None)


def _topk_channel(output_tensor: torch.Tensor, k: int) -> torch.Tensor:
    """The ``[b, s]`` top-``k`` entropy channel of an enabled model's output (ValueError naming
    the switch when it is missing or was made for another ``k``)."""
    channels = getattr(output_tensor, _OUTPUT_TAG, ())
    if "topk_entropy" not in channels or getattr(output_tensor, _TOPK_TAG, None) != k:
        raise ValueError(f"PluginLoss: loss.kind='eaft' needs the top-{k} entropy: "
                         f"enable_logprob_output(model, topk_entropy={k})")
    return output_tensor[..., channels.index("topk_entropy")]


# --------------------------------------------------------------------------------------------
# the loss function
# --------------------------------------------------------------------------------------------
#: which metrics a PluginLoss returns: "mean" - only [sum, count] pairs whose sum-over-micro-
#: batches-and-ranks ratio is the right value under ANY such reducer (Megatron-LM's and
#: Megatron-Bridge's train_step, reduce_metrics); "all" - also ratio_max ([max, 1]) and
#: num_tokens ([n, 1]), which only reduce_metrics reduces right (MAX, total)
METRIC_SETS = ("mean", "all")


class PluginLoss:
    """megatron's ``loss_func`` for the output of :func:`enable_logprob_output`.

    ``PluginLoss(config)(loss_mask, output_tensor, *, old_logprobs=None, ref_logprobs=None,
    seq_ids=None) -> (loss_sum, num_tokens, metrics)``; use it as
    ``partial(loss, loss_mask, old_logprobs=...)`` from a forward step.

    Args:
        config: a :class:`psft_megatron.losses.LossConfig` or its dict (default: PSFT).
            ``fused_output_layer`` is not used here (that is ``enable_logprob_output(fused=)``);
            ``kl_estimator='full'`` needs logits and is refused.
        metrics: "mean" (default) or "all", see :data:`METRIC_SETS`.

    Call arguments:
        loss_mask: ``[b, s]`` (nonzero = trained token; any dtype).
        output_tensor: the enabled model's output, fp32 ``[b, s]`` or ``[b, s, c]`` (EAFT: with
            the ``topk_entropy=eaft_topk`` channel).
        old_logprobs: fp32 ``[b, s]`` old-policy log-probs for PSFT (None: ratio exactly 1).
        ref_logprobs: fp32 ``[b, s]`` reference log-probs for SFT-KL and ASFT (k1, k3).
        seq_ids: int ``[b, s]`` packed-sequence index within each row (-1 = padding).
        cp_group: context-parallel group (None: megatron's).

    Returns megatron's 3-tuple: ``loss_sum`` fp32 scalar (the sum over this micro-batch's loss
    tokens, or over its sequences for the seq-mean modes), ``num_tokens`` int scalar (its
    normaliser: tokens, or sequences) and ``{name: fp32 [sum, count]}``. With
    ``calculate_per_token_loss=True`` megatron divides by the step's total ``num_tokens``
    (an exact token mean over micro-batches and DP x CP ranks); with False, each micro-batch by
    its own and by the number of micro-batches (megatron's per-micro-batch mean).
    """

    def __init__(self, config: Union[LossConfig, Mapping[str, Any], None] = None, *, metrics: str = "mean"):
        loss = PSFTLoss(config)
        if "logits" in OBJECTIVES[loss.config.kind].requires(loss.config):
            raise ValueError(f"PluginLoss: loss.kind={loss.config.kind!r} with kl_estimator="
                             f"{loss.config.kl_estimator!r} needs the logits; use k1 or k3")
        if metrics not in METRIC_SETS:
            raise ValueError(f"PluginLoss: metrics={metrics!r} is not one of {', '.join(METRIC_SETS)}")
        self.loss, self.config, self.metrics = loss, loss.config, metrics

    def __call__(self, loss_mask: torch.Tensor, output_tensor: torch.Tensor, *,
                 old_logprobs: Optional[torch.Tensor] = None, ref_logprobs: Optional[torch.Tensor] = None,
                 seq_ids: Optional[torch.Tensor] = None, cp_group=None):
        logp, entropy = split_output(output_tensor, loss_mask)
        for name, t in (("loss_mask", loss_mask), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                        ("seq_ids", seq_ids)):
            if t is not None and tuple(t.shape) != tuple(logp.shape):
                raise ValueError(f"PluginLoss: {name} shape {tuple(t.shape)} must equal the output's {tuple(logp.shape)}")
        required = OBJECTIVES[self.config.kind].requires(self.config)
        if "entropy" in required and entropy is None:
            raise ValueError(f"PluginLoss: loss.kind={self.config.kind!r} needs the entropy: "
                             "enable_logprob_output(model, return_entropy=True)")
        top = _topk_channel(output_tensor, self.config.eaft_topk) if "topk_entropy" in required else None
        loss_sum, num_tokens, metrics = self.loss.compute_from_logprobs(
            logp, entropy, loss_mask, old_logprobs=old_logprobs, ref=ref_logprobs, output=output_tensor,
            seq_ids=seq_ids, cp_group=cp_group, topk_entropy=top)
        if self.metrics == "mean":
            metrics = {k: v for k, v in metrics.items() if not (k.endswith("_max") or k.startswith("num_"))}
        return loss_sum, num_tokens, metrics


def reduce_metrics(metrics_list: Iterable[Mapping[str, torch.Tensor]], group=None) -> Dict[str, float]:
    """The step's metrics from the per-micro-batch dicts megatron's schedule returns (last stage):
    ``[sum, count]`` pairs summed over micro-batches and ``group`` (the DP x CP group), ``*_max``
    keys reduced with MAX, ``num_*`` keys as totals. See
    :func:`psft_megatron.losses.reduce_loss_metrics`."""
    return reduce_loss_metrics(metrics_list, group=group)


# --------------------------------------------------------------------------------------------
# the old policy's (or a reference's) log-probs
# --------------------------------------------------------------------------------------------
def default_forward_step(data_iterator, model, *, loss_func: Callable = None):
    """A forward step for micro-batch dicts with ``tokens``, ``position_ids``, ``labels`` and
    optionally ``attention_mask`` and ``loss_mask`` (``[b, s]``); returns
    ``(output, partial(loss_func, loss_mask))`` (``loss_func`` default: none needed by
    :func:`collect_old_logprobs`, which replaces it)."""
    micro = next(data_iterator)
    output = model(micro["tokens"], micro["position_ids"], micro.get("attention_mask"), labels=micro["labels"],
                   loss_mask=micro.get("loss_mask"))
    return output, (None if loss_func is None else functools.partial(loss_func, micro.get("loss_mask")))


@contextlib.contextmanager
def _evaluating(chunks):
    """Every chunk in eval mode inside; each one's own mode restored after."""
    modes = [chunk.training for chunk in chunks]
    try:
        for chunk in chunks:
            chunk.eval()
        yield
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


def collect_old_logprobs(model, data_iterator, num_microbatches: int, *, seq_length: int, micro_batch_size: int,
                         forward_step_func: Callable = default_forward_step,
                         decoder_seq_length: Optional[int] = None) -> Optional[List[torch.Tensor]]:
    """The log-probs of every micro-batch's labels under ``model``'s current weights.

    For a PSFT window (call it with the window-start weights, for the window's batches 2..K;
    batch 1 takes ``old_logprobs=None``: ratio exactly 1) and for an SFT-KL reference (a frozen
    copy of the initial model, also enabled).

    Args:
        model: the enabled model (:func:`enable_logprob_output`): a chunk or this rank's list
            of virtual-pipeline chunks, as given to megatron's schedule.
        data_iterator: an iterator of micro-batches (a list of them, one per chunk, with VPP),
            as the training schedule takes.
        num_microbatches, seq_length, micro_batch_size, decoder_seq_length: as for megatron's
            ``forward_backward_func``.
        forward_step_func: the forward step that trains the model (its loss function is
            replaced here), or any ``(data_iterator, model) -> (output, anything)`` calling the
            model with ``labels=``; default :func:`default_forward_step`.

    Returns:
        On the last pipeline stage, fp32 ``[b, s]`` log-probs per micro-batch, in order
        (detached; with ``loss_mask=`` and ``fused`` rows outside it are 0); None elsewhere.

    The pass is megatron's forward-only schedule under ``torch.no_grad()`` with every chunk in
    eval mode (restored after): no dropout. Trained with dropout > 0 (megatron's
    ``TransformerConfig`` default is 0.1; psft_megatron's ModelConfig sets 0, as verl's
    configs do), the training pass is noisier than this one and the ratio differs from 1 even
    before the first update; set ``hidden_dropout = attention_dropout = 0``.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = _chunks_of(model)

    def collect_step(data_iterator, chunk):
        output, _ = forward_step_func(data_iterator, chunk)

        def collect(output_tensor):
            logp, _entropy = split_output(output_tensor)
            zero = torch.zeros((), dtype=torch.float32, device=output_tensor.device)
            return zero, torch.zeros((), dtype=torch.int, device=output_tensor.device), {"logprobs": logp.detach()}

        return output, collect

    with _evaluating(chunks), torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=collect_step, data_iterator=data_iterator, model=model,
            num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
            decoder_seq_length=decoder_seq_length, forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return [item["logprobs"] for item in out]
