"""``PSFTLoss``: the objectives of ``losses.objectives.OBJECTIVES`` as megatron-core loss functions.

Contract (megatron-core 0.16, ``TransformerConfig.calculate_per_token_loss=True``): the loss
function returned by :meth:`PSFTLoss.loss_func` maps the last pipeline stage's output (the
vocab-parallel logits; with ``fused_output_layer`` the ``[b, s, 2]`` log-probs and entropies of
:meth:`PSFTLoss.model_forward`, ``[b, s, 3]`` with EAFT's top-k entropy) to ``(loss_sum, normaliser, metrics)``:

* ``loss_sum``: fp32 scalar, the SUM of the micro-batch's contributions. The schedule
  backpropagates it as is (times the loss scale); nothing is divided here.
* ``normaliser``: ``torch.int`` scalar. The schedule sums it over micro-batches,
  ``finalize_model_grads`` all-reduces it over the DP x CP group and multiplies every gradient
  by ``1 / total``. The optimised objective is therefore
  ``sum(loss_sum over micro-batches and DP x CP ranks) / sum(normaliser ...)``.
* ``metrics``: ``{name: fp32 tensor [sum, count]}`` (``[max, 1]`` for ``*_max``), summed over
  micro-batches and ranks by :func:`reduce_loss_metrics`.

With ``calculate_per_token_loss=False`` megatron would divide each micro-batch by its own
normaliser and by the number of micro-batches: not the global mean; do not use it.
The math of every aggregation mode is in ``docs/logprobs.md``, section "Aggregation".
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist

from psft_megatron.losses.config import LossConfig
from psft_megatron.losses.fused_output import ENTROPY, LOGPROB, TOPK_ENTROPY, FusedLogprobProcessor
from psft_megatron.losses.objectives import OBJECTIVES, TokenInputs
from psft_megatron.ops import vocab_parallel_logprobs, vocab_parallel_topk_entropy
from psft_megatron.distributed.groups import resolve_group

__all__ = ["PSFTLoss", "reduce_loss_metrics", "aggregate_loss"]

LossOutput = Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]


def _resolve_cp_group(cp_group):
    """``(group, rank, world)``; ``cp_group=None`` -> megatron's CP group if initialised."""
    return resolve_group(cp_group, "cp")


def _pair(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.stack([total.detach().float().reshape(()), count.detach().float().reshape(())])


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    agg_mode: str,
    *,
    seq_ids: Optional[torch.Tensor] = None,
    cp_group=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reduce a per-token loss ``[b, s]`` to megatron's ``(loss_sum, normaliser)`` (over 60 lines
    only by this docstring, which gives each mode's contract).

    Args:
        per_token: fp32 ``[b, s]`` per-token loss (masked positions may hold anything finite
            or not: they are selected away with ``where``, never multiplied by 0).
        mask: bool ``[b, s]``, True on the tokens that count.
        agg_mode: ``'token-mean'``, ``'seq-mean-token-mean'`` or ``'seq-mean-token-sum'``.
        seq_ids: optional int ``[b, s]``: index of the packed sequence each token belongs to
            WITHIN its row, in ``[0, s * cp_world)``, ``-1`` for padding (excluded). ``None``:
            each row is one sequence.
        cp_group: context-parallel group (``None``: megatron's if initialised); rows are
            sharded along ``s`` over it and per-sequence token counts are summed over it.

    Returns:
        ``loss_sum`` fp32 scalar (differentiable) and ``normaliser`` ``torch.int`` scalar:
        token-mean -> (sum of losses, number of tokens); seq-mean-* -> (sum over sequences of
        the sequence's [mean | sum] of this rank's share, number of non-empty sequences on CP
        rank 0 and 0 on other CP ranks).
    """
    if agg_mode == "token-mean":
        if seq_ids is not None:
            mask = mask & (seq_ids >= 0)
        loss_sum = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
        return loss_sum, mask.sum().to(torch.int)
    if agg_mode not in ("seq-mean-token-mean", "seq-mean-token-sum"):
        raise ValueError(f"agg_mode={agg_mode!r} is not one of token-mean, seq-mean-token-mean, seq-mean-token-sum")
    group, cp_rank, cp_world = _resolve_cp_group(cp_group)
    if per_token.dim() != 2:
        raise ValueError(f"sequence aggregation needs [b, s] tensors, got {tuple(per_token.shape)}")
    b, s = per_token.shape
    if seq_ids is None:
        k = 1
        index = torch.zeros((b, s), dtype=torch.long, device=per_token.device)
    else:
        if tuple(seq_ids.shape) != (b, s):
            raise ValueError(f"seq_ids shape {tuple(seq_ids.shape)} must equal {(b, s)}")
        k = s * cp_world  # a row of global length s*cp holds at most that many sequences
        mask = mask & (seq_ids >= 0)
        index = seq_ids.long().clamp_min(0)  # out-of-range ids (>= k) raise in scatter_add
    maskf = mask.to(torch.float32)
    counts = torch.zeros((b, k), dtype=torch.float32, device=per_token.device)
    counts.scatter_add_(1, index, maskf)
    if group is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)  # no autograd: constants
    vals = torch.where(mask, per_token, torch.zeros_like(per_token))
    seq_loss = torch.zeros((b, k), dtype=vals.dtype, device=vals.device).scatter_add(1, index, vals)
    if agg_mode == "seq-mean-token-mean":
        seq_loss = seq_loss / counts.clamp_min(1.0)  # 0/0 -> 0: empty sequences add nothing
    loss_sum = seq_loss.sum()
    n_seq = (counts > 0).sum()
    if cp_rank != 0:
        n_seq = torch.zeros_like(n_seq)  # each sequence counted once over the CP group
    return loss_sum, n_seq.to(torch.int)


def _metrics(loss_sum, normaliser, logp, entropy, result, mask, agg_mode: str) -> Dict[str, torch.Tensor]:
    """The micro-batch's metrics as fp32 ``[sum, count]`` pairs (``[max, 1]`` for maxima), see
    docs/logprobs.md, "Metrics": ``loss`` (the optimised value), ``nll``, ``entropy``, the
    objective's own values, ``num_tokens``; ``clip_frac`` is 0 for kinds that do not clip."""
    n_tok = mask.to(torch.float32).sum()
    zero = torch.zeros((), device=logp.device)

    def msum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x.detach().float(), zero).sum()

    # token-mean: the loss per token; the seq-mean modes: per sequence, as it is optimised
    metrics = {"loss": _pair(loss_sum, n_tok if agg_mode == "token-mean" else normaliser),
               "nll": _pair(msum(-logp), n_tok)}
    if entropy is not None:
        metrics["entropy"] = _pair(msum(entropy), n_tok)
    for name, values in result.means.items():
        metrics[name] = _pair(msum(values), n_tok)
    metrics.setdefault("clip_frac", _pair(zero, n_tok))
    for name, values in result.maxima.items():
        top = torch.where(mask, values.detach().float(), zero).amax() if values.numel() else zero
        metrics[name] = _pair(top, torch.ones((), device=logp.device))
    metrics["num_tokens"] = _pair(n_tok, torch.ones((), device=logp.device))
    return metrics


class PSFTLoss:
    """Loss-function factory for megatron-core's ``forward_backward_func``.

    Usage in a forward step (``calculate_per_token_loss=True``)::

        loss = PSFTLoss(LossConfig(kind="psft"))
        output = model(tokens, position_ids, attention_mask)        # logits [b, s, V/tp]
        return output, loss.loss_func(labels, loss_mask, old_logprobs=old_lp)

    and after the step ``reduce_loss_metrics(losses_reduced, group=dp_cp_group)``.

    With ``LossConfig(fused_output_layer=True)`` the model is run through :meth:`model_forward`
    (the output layer fused into the log-prob op, no logits tensor) and the loss functions take
    its ``[b, s, 2]`` output (log-prob, entropy) in place of the logits::

        output = loss.model_forward(model, tokens, position_ids, attention_mask,
                                    labels=labels, loss_mask=loss_mask)
        return output, loss.loss_func(labels, loss_mask, old_logprobs=old_lp)
    """

    def __init__(self, config: Union[LossConfig, Mapping[str, Any], None] = None):
        if config is None:
            config = LossConfig()
        elif not isinstance(config, LossConfig):
            config = LossConfig.from_dict(config)
        self.config = config

    # ----------------------------------------------------------------------------------------
    def model_forward(
        self,
        model,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        labels: torch.Tensor,
        loss_mask: Optional[torch.Tensor] = None,
        seq_ids: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        return_entropy: Optional[bool] = None,
        tp_group=None,
        **model_kwargs,
    ) -> torch.Tensor:
        """Run a megatron ``GPTModel`` (possibly wrapped in DDP / Float16Module) for this loss.

        Without ``fused_output_layer``: ``model(tokens, position_ids, attention_mask, ...)``, the
        logits ``[b, s, V/tp]`` on the last pipeline stage. With it: the output layer is fused
        into :func:`psft_megatron.ops.fused_linear_logprobs` (megatron's output-processor hook,
        ``psft_megatron.compat.releases``): the last stage returns fp32 ``[b, s, 2]`` - log p of
        ``labels`` and the entropy (0 unless ``return_entropy``, default ``compute_entropy``) -
        or ``[b, s, 3]`` when the loss kind requires "topk_entropy" (EAFT: the entropy of the
        top-``eaft_topk`` distribution last), and rows with ``loss_mask == 0`` (or
        ``seq_ids < 0``) are never projected (0 there).
        Other stages return their hidden states either way. ``model_kwargs`` go to the model
        call (e.g. ``fp32_output`` of Float16Module).
        """
        if packed_seq_params is not None:
            model_kwargs["packed_seq_params"] = packed_seq_params
        if not self.config.fused_output_layer:
            return model(tokens, position_ids, attention_mask, **model_kwargs)
        from psft_megatron.compat.releases import forward_with_output_processor

        mask = None
        if loss_mask is not None:
            mask = loss_mask != 0
            if seq_ids is not None:
                mask = mask & (seq_ids >= 0)
        want_h = self.config.compute_entropy if return_entropy is None else bool(return_entropy)
        processor = FusedLogprobProcessor(labels, mask, return_entropy=want_h, chunk_size=self.config.chunk_size,
                                          tp_group=tp_group, topk=self._topk())
        return forward_with_output_processor(model, tokens, position_ids, attention_mask,
                                             output_processor=processor, **model_kwargs)

    def _topk(self) -> Optional[int]:
        """``eaft_topk`` when the loss kind requires the top-k entropy, else None."""
        cfg = self.config
        return cfg.eaft_topk if "topk_entropy" in OBJECTIVES[cfg.kind].requires(cfg) else None

    def _logprobs_of(self, output: torch.Tensor, labels: torch.Tensor, *, tp_group, want_h: bool,
                     want_top: bool = False):
        """``(logp, entropy or None, top-k entropy or None)`` of ``labels`` from the model output:
        vocab-parallel logits, or the ``[b, s, 2|3]`` of :meth:`model_forward` with
        ``fused_output_layer``."""
        if self.config.fused_output_layer:
            channels = 2 if self._topk() is None else 3  # what model_forward returns for this config
            if tuple(output.shape) != tuple(labels.shape) + (channels,):
                raise ValueError(f"fused_output_layer: expected the [b, s, {channels}] output of "
                                 f"PSFTLoss.model_forward for labels {tuple(labels.shape)}, got {tuple(output.shape)}")
            return (output[..., LOGPROB], output[..., ENTROPY] if want_h else None,
                    output[..., TOPK_ENTROPY] if want_top else None)
        out = vocab_parallel_logprobs(output, labels, tp_group=tp_group, return_entropy=want_h,
                                      chunk_size=self.config.chunk_size)
        logp, ent = out if want_h else (out, None)
        top = None
        if want_top:
            top = vocab_parallel_topk_entropy(output, self.config.eaft_topk, tp_group=tp_group,
                                              chunk_size=self.config.chunk_size)
        return logp, ent, top

    # ----------------------------------------------------------------------------------------
    def loss_func(
        self,
        labels: torch.Tensor,
        loss_mask: torch.Tensor,
        old_logprobs: Optional[torch.Tensor] = None,
        ref: Optional[torch.Tensor] = None,
        *,
        seq_ids: Optional[torch.Tensor] = None,
        cp_group=None,
        tp_group=None,
    ) -> Callable[[torch.Tensor], LossOutput]:
        """Bind a micro-batch's targets; returns ``f(output_tensor) -> (loss_sum, normaliser, metrics)``.

        Args:
            labels: int64 ``[b, s]`` global vocabulary ids (this CP rank's shard).
            loss_mask: ``[b, s]`` 0/1 (any dtype; nonzero = trained token).
            old_logprobs: fp32 ``[b, s]`` log-probs of the labels under the old policy (psft).
                ``None``: old = current (ratio 1, SFT gradient).
            ref: for ``kind='sft_kl'`` and ``'asft'``: fp32 ``[b, s]`` reference log-probs (k1,
                k3) or the reference model's vocab-parallel logits ``[b, s, V/tp]`` ('full').
            seq_ids: optional int ``[b, s]`` packed-sequence index within each row (-1 = pad),
                see :func:`aggregate_loss`.
            cp_group, tp_group: process groups; ``None`` = megatron's (if initialised).
        """
        cfg = self.config
        if tuple(loss_mask.shape) != tuple(labels.shape):
            raise ValueError(
                f"loss_mask shape {tuple(loss_mask.shape)} must equal labels shape {tuple(labels.shape)}"
            )
        required = OBJECTIVES[cfg.kind].requires(cfg)
        ref_lp = ref if "ref" in required and "logits" not in required else None
        for name, t in (("old_logprobs", old_logprobs), ("ref", ref_lp)):
            if t is not None and tuple(t.shape) != tuple(labels.shape):
                raise ValueError(f"{name} shape {tuple(t.shape)} must equal labels shape {tuple(labels.shape)}")

        def _loss(output_tensor: torch.Tensor) -> LossOutput:
            return self.compute(
                output_tensor,
                labels,
                loss_mask,
                old_logprobs=old_logprobs,
                ref=ref,
                seq_ids=seq_ids,
                cp_group=cp_group,
                tp_group=tp_group,
            )

        return _loss

    # ----------------------------------------------------------------------------------------
    def compute(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        loss_mask: torch.Tensor,
        *,
        old_logprobs: Optional[torch.Tensor] = None,
        ref: Optional[torch.Tensor] = None,
        seq_ids: Optional[torch.Tensor] = None,
        cp_group=None,
        tp_group=None,
    ) -> LossOutput:
        """The body of :meth:`loss_func` (callable directly, e.g. in tests). ``logits``: the model
        output (``[b, s, 2]`` from :meth:`model_forward` with ``fused_output_layer``).

        The loss kind is looked up in :data:`psft_megatron.losses.objectives.OBJECTIVES`: its
        function gives the per-token loss, which :func:`aggregate_loss` reduces."""
        cfg = self.config
        self._check_output(logits, labels)
        required = OBJECTIVES[cfg.kind].requires(cfg)
        want_h = cfg.compute_entropy or "entropy" in required
        logp, entropy, top = self._logprobs_of(logits, labels, tp_group=tp_group, want_h=want_h,
                                               want_top="topk_entropy" in required)
        return self.compute_from_logprobs(logp, entropy, loss_mask, old_logprobs=old_logprobs, ref=ref,
                                          output=logits, seq_ids=seq_ids, cp_group=cp_group, tp_group=tp_group,
                                          topk_entropy=top)

    def compute_from_logprobs(
        self,
        logp: torch.Tensor,
        entropy: Optional[torch.Tensor],
        loss_mask: torch.Tensor,
        *,
        old_logprobs: Optional[torch.Tensor] = None,
        ref: Optional[torch.Tensor] = None,
        output: Optional[torch.Tensor] = None,
        seq_ids: Optional[torch.Tensor] = None,
        cp_group=None,
        tp_group=None,
        topk_entropy: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        """``(loss_sum, normaliser, metrics)`` from per-token values already computed: ``logp``
        fp32 ``[b, s]`` (differentiable), ``entropy`` ``[b, s]`` or None, ``topk_entropy``
        ``[b, s]`` (kinds that require it: EAFT) or None; ``output`` is the model output (needed
        only by kinds that require "logits"). See :meth:`loss_func`."""
        cfg = self.config
        objective = OBJECTIVES[cfg.kind]
        required = objective.requires(cfg)
        if "ref" in required and ref is None:  # checked here, not when binding: other stages bind no ref
            raise ValueError(f"loss.kind={cfg.kind!r} needs ref: reference log-probs [b, s] (k1/k3) or reference "
                             "logits [b, s, V/tp] (kl_estimator='full')")
        if "entropy" in required and entropy is None:
            raise ValueError(f"loss.kind={cfg.kind!r} needs the entropy of the current policy")
        if "topk_entropy" in required and topk_entropy is None:
            raise ValueError(f"loss.kind={cfg.kind!r} needs the top-{cfg.eaft_topk} entropy of the current policy")
        result = objective.fn(TokenInputs(logp=logp, entropy=entropy, old_logprobs=old_logprobs, ref=ref,
                                          output=output, config=cfg, tp_group=tp_group, topk_entropy=topk_entropy))
        mask = loss_mask != 0
        if seq_ids is not None:
            mask = mask & (seq_ids >= 0)
        loss_sum, normaliser = aggregate_loss(result.per_token, mask, cfg.agg_mode, seq_ids=seq_ids,
                                              cp_group=cp_group)
        return loss_sum, normaliser, _metrics(loss_sum, normaliser, logp, entropy, result, mask, cfg.agg_mode)

    def _check_output(self, output: torch.Tensor, labels: torch.Tensor) -> None:
        """The model output must be the logits ``[b, s, V/tp]`` (``[b, s, 2]`` when fused)."""
        if tuple(output.shape) == tuple(labels.shape):
            raise ValueError(
                f"PSFTLoss got a per-token output {tuple(output.shape)} (GPTModel called with labels= returns "
                "megatron's cross-entropy): it takes the logits [b, s, V/tp] of a call without labels; for "
                "model(..., labels=labels) use psft_megatron.plugin (enable_logprob_output, PluginLoss)")
        if tuple(output.shape[:-1]) != tuple(labels.shape):
            raise ValueError(f"logits shape {tuple(output.shape)} does not match labels shape "
                             f"{tuple(labels.shape)}; expected logits [b, s, V/tp]")

    # ----------------------------------------------------------------------------------------
    def logprob_func(
        self, labels: torch.Tensor, *, tp_group=None, return_entropy: Optional[bool] = None
    ) -> Callable[[torch.Tensor], LossOutput]:
        """A forward-only "loss" function collecting log-probs (old-policy / reference pass).

        Returns ``f(output_tensor) -> (zero, int 0, {'logprobs': [b, s] fp32,
        'entropy': [b, s] fp32 (if requested)})``, all detached; use it with
        ``forward_backward_func(..., forward_only=True)`` and read the dicts it returns.
        With ``fused_output_layer`` the output is :meth:`model_forward`'s (run it with the same
        ``return_entropy``); rows outside its ``loss_mask`` then hold 0.
        """
        want_h = self.config.compute_entropy if return_entropy is None else bool(return_entropy)

        def _collect(output_tensor: torch.Tensor) -> LossOutput:
            with torch.no_grad():
                logp, ent, _ = self._logprobs_of(output_tensor, labels, tp_group=tp_group, want_h=want_h)
            res = {"logprobs": logp.detach()}
            if ent is not None:
                res["entropy"] = ent.detach()
            zero = torch.zeros((), dtype=torch.float32, device=output_tensor.device)
            return zero, torch.zeros((), dtype=torch.int, device=output_tensor.device), res

        return _collect


# --------------------------------------------------------------------------------------------
def reduce_loss_metrics(
    metrics_list: Iterable[Mapping[str, torch.Tensor]], group=None
) -> Dict[str, float]:
    """Exact means of the metrics of one optimizer step.

    Args:
        metrics_list: one metrics dict per micro-batch (the third output of the loss function;
            megatron's ``forward_backward_func`` returns them as a list on the last stage).
        group: the process group to reduce over: the DP x CP group
            (``parallel_state.get_data_parallel_group(with_context_parallel=True)``), called on
            every rank of it (last pipeline stage). ``None``: no communication.

    Returns:
        ``{name: sum / count}`` with the ``[sum, count]`` pairs summed over micro-batches and
        ranks (0.0 when count is 0); keys ending in ``_max`` are reduced with MAX and return the
        max; keys starting with ``num_`` return the total (the summed first element), e.g.
        ``num_tokens`` is the number of loss tokens in the step.
    """
    metrics_list = list(metrics_list)
    keys = sorted({k for m in metrics_list for k in m})
    if not keys:
        return {}
    device = next(iter(metrics_list[0].values())).device
    sum_keys = [k for k in keys if not k.endswith("_max")]
    max_keys = [k for k in keys if k.endswith("_max")]

    def collect(key: str, reducer) -> torch.Tensor:
        vals = [m[key].detach().float().reshape(2).to(device) for m in metrics_list if key in m]
        return reducer(torch.stack(vals), dim=0)

    sums = (
        torch.stack([collect(k, torch.sum) for k in sum_keys])
        if sum_keys
        else torch.zeros((0, 2), device=device)
    )
    maxs = (
        torch.stack([collect(k, lambda x, dim: torch.amax(x, dim=dim)) for k in max_keys])
        if max_keys
        else torch.zeros((0, 2), device=device)
    )
    if group is not None and dist.is_available() and dist.is_initialized():
        if sum_keys:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        if max_keys:
            dist.all_reduce(maxs, op=dist.ReduceOp.MAX, group=group)
    out: Dict[str, float] = {}
    for k, (total, count) in zip(sum_keys, sums.tolist()):
        if k.startswith("num_"):
            out[k] = total
        else:
            out[k] = total / count if count > 0 else 0.0
    for k, (mx, count) in zip(max_keys, maxs.tolist()):
        out[k] = mx / count if count > 0 else 0.0
    return out
