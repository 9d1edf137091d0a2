"""MoE parallel parity against an independent plain-torch reference, many layouts per launch.

Run by tests/test_moe_parity.py (and by hand)::

    torchrun --nproc_per_node 2 tests/parallel/moe_parity_worker.py --suite two --out /tmp/r.json

Every layout trains the same tiny fp32 Qwen3-MoE-like model (2 layers, hidden 64, 4 heads in 2
KV groups of head_dim 32, QK RMSNorm, every MLP an MoE block of 8 SwiGLU experts of width 32,
top-2 with softmax over the chosen logits - Qwen3's ``norm_topk_prob`` -, fp32 router, aux loss
with coefficient 0.1) from the same full weights on the same global batches. Its metrics are
compared per step with a reference written here in plain torch on the state-dict tensors -
none of megatron's MoE, attention or optimizer code runs in it:

- the forward: embedding, RMSNorm, GQA attention with QK-norm and RoPE, causal softmax, the
  router (logits -> top-k -> softmax over the k), per-expert SwiGLU, the output layer;
- megatron's per-layer aux loss (``switch_load_balancing_loss_func``): per micro-batch of T
  tokens, ``E / (k T^2) * sum_i (sum_t softmax(logits)_ti) * (tokens routed to i)``;
- its gradient as megatron applies it under ``calculate_per_token_loss``: the router attaches
  ``coeff * aux * T_local * TP * CP`` (``MoEAuxLossAutoScaler``, scale 1) and
  ``finalize_model_grads`` divides every gradient by the step's loss tokens N, so the objective
  optimised is ``(sum of per-token losses + coeff * T * sum_{micro-batches, layers} aux) / N``;
- torch AdamW with megatron's weight-decay grouping (no decay on 1-D parameters) and global-norm
  clipping.

The micro-batch size is the same at every layout (the aux loss is a per-micro-batch quantity),
so the number of micro-batches is GLOBAL_BATCH / (MICRO_BATCH * DP).

Metrics per step: the objective (token mean), entropy, clip fraction (PSFT) or KL (SFT-KL), the
aux loss before its coefficient (mean over micro-batches and layers, from megatron's tracker via
:class:`psft_megatron.training.moe_metrics.MoEMetrics`), the busiest expert's load over the mean
(worst layer), the gradient norm before clipping; then an eval pass on batch 0 after STEPS
steps. Routing is discrete: the reference also reports how far its top-k choices are from a tie
(``router_margin``, which must stay above the tolerance). PSFT runs 5 steps with pi_old
re-synced every K=4 steps (the initial weights for steps 0-3, the weights after 4 steps for
step 4), each side from its own weights. Adam's eps is 1e-6 on both sides (see ADAM_EPS).

Checkpoint scenario (4 processes): EP2xDP2 + distributed optimizer trains 3 steps (itself
compared with the reference), saves weights and Adam state and continues 2 steps; EP1, EP4 and
TP2+SP+EP2 load it with the optimizer state and continue 2 steps, compared with the reference's
steps 3-4 (and with the saver's own continuation); a weights-only load must differ. Loads go
through the trainer's strict key check first (:func:`load_state` records what it refuses).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from psft_megatron.model import ModelConfig  # noqa: E402
from psft_megatron.model.builder import build_gpt_chunks  # noqa: E402
from psft_megatron.distributed.runtime import ParallelConfig, initialize, reinitialize_model_parallel  # noqa: E402
from tests.parallel.parity_worker import TOLERANCE, compare, step_metrics  # noqa: E402,F401
from tests.parallel.results import error_entry, load_diffs, write_results  # noqa: E402

STEPS = 3  # training steps before the eval pass (and the checkpoint)
PSFT_STEPS = 5  # PSFT layouts: one step past the re-sync of pi_old
WINDOW = 4  # K: pi_old re-synced every WINDOW optimizer steps
CONTINUE = 2  # steps after a checkpoint load
GLOBAL_BATCH = 8
MICRO_BATCH = 2
SEQ_LEN = 16
SEED = 4321  # its top-k choices stay >= 6e-5 (in router logit) from a tie: router_margin
LR = 1e-3
WEIGHT_DECAY = 0.1
CLIP_GRAD = 1.0
# Adam's eps, both sides. Not megatron's 1e-8: an update g / (|g| + eps) is most sensitive to the
# gradient's absolute float32 rounding (~1e-9 here, cancellations in the clipped gradient) where
# |g| ~ eps, by up to lr * error / (4 eps) per step; at 1e-8 single weights then move ~3e-5 apart
# within 2 steps and the 5-step metrics by ~3e-5 - megatron's own 1-process run included.
ADAM_EPS = 1e-6
AUX_COEFF = 0.1

MODEL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=32,  # != 64 / 4, as in Qwen3
    ffn_hidden_size=96,  # unused: every layer is an MoE layer
    vocab_size=250,
    make_vocab_size_divisible_by=32,  # 256 at TP 1, 2 and 4
    max_position_embeddings=64,
    rotary_base=10000.0,
    qk_layernorm=True,
    init_method_std=0.05,
    num_experts=8,
    moe_router_topk=2,
    moe_ffn_hidden_size=32,
    moe_norm_topk_prob=True,
    moe_aux_loss_type="aux_loss",
    moe_aux_loss_coeff=AUX_COEFF,
    moe_router_dtype="fp32",
)

SFT = dict(kind="sft")
# clip small enough to bind within the window (clip_frac > 0.1)
PSFT = dict(kind="psft", clip_eps_high=0.02)
SFT_KL = dict(kind="sft_kl", kl_coef=1.0, kl_estimator="k3")


@dataclass
class Layout:
    """A parallel layout to compare with the reference."""

    name: str
    parallel: ParallelConfig
    dispatcher: str = "alltoall"
    distopt: bool = False
    loss: dict = dataclasses.field(default_factory=lambda: dict(SFT))
    plant: Optional[str] = None  # a deliberate bug; the comparison must then FAIL

    @property
    def steps(self) -> int:
        return PSFT_STEPS if self.loss["kind"] == "psft" else STEPS


def P(tp=1, pp=1, cp=1, ep=1, etp=None) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
                          sequence_parallel=tp > 1, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)


SUITES = {
    # 2 processes
    "two": [
        Layout("ep2", P(ep=2)),
        Layout("ep2_distopt_allgather", P(ep=2), dispatcher="allgather", distopt=True),
        Layout("tp2_sp_etp1", P(tp=2, etp=1)),
        Layout("tp2_sp_etp2_allgather", P(tp=2, etp=2), dispatcher="allgather"),
        Layout("cp2_ep2", P(cp=2, ep=2)),
        Layout("psft_k4_tp2_sp_ep2_etp1", P(tp=2, ep=2, etp=1), loss=PSFT),
        Layout("sft_kl_ep2_allgather", P(ep=2), dispatcher="allgather", loss=SFT_KL),
        Layout("planted_tp2_sp_ep2_aux_grad_unscaled", P(tp=2, ep=2, etp=1), plant="aux_grad_unscaled"),
    ],
    # 4 processes (the checkpoint scenario below adds EP2xDP2 + distributed optimizer)
    "four": [
        Layout("ep2_dp2", P(ep=2)),
        Layout("pp2_ep2", P(pp=2, ep=2)),
        Layout("cp2_ep2_dp2_allgather", P(cp=2, ep=2), dispatcher="allgather"),
        Layout("tp2_sp_ep2_etp2", P(tp=2, ep=2, etp=2)),
        Layout("psft_k4_pp2_ep2_allgather", P(pp=2, ep=2), dispatcher="allgather", loss=PSFT),
        Layout("planted_ep2_dp2_experts_over_dense_dp", P(ep=2), plant="experts_over_dense_dp"),
    ],
}

# Checkpoint scenarios: (name, save layout - itself compared with the reference -, [load layouts]);
# every load with the Adam state, WEIGHTS_ONLY also without
CKPT_SUITES = {
    "two": [],
    "four": [
        (
            "ep2_dp2_distopt_to_ep1_ep4_tp2ep2",
            Layout("save_ep2_dp2_distopt_allgather", P(ep=2), dispatcher="allgather", distopt=True),
            [Layout("load_ep1", P(), distopt=True), Layout("load_ep4", P(ep=4), distopt=True),
             Layout("load_tp2_sp_ep2_etp1_allgather", P(tp=2, ep=2, etp=1), dispatcher="allgather", distopt=True)],
        ),
    ],
}
WEIGHTS_ONLY = "load_ep4"  # the loader also run without the optimizer state (must differ)


# ----------------------------------------------------------------------------- data
def make_global_batches(num_batches: int) -> List[Dict[str, torch.Tensor]]:
    """Deterministic global batches: tokens/labels/loss_mask/position_ids, each [G, S]."""
    gen = torch.Generator().manual_seed(SEED + 1)
    batches = []
    for _ in range(num_batches):
        seq = torch.randint(0, MODEL.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen)
        mask = torch.ones(GLOBAL_BATCH, SEQ_LEN)
        for row in range(GLOBAL_BATCH):  # a prompt (no loss) of varying length per row
            mask[row, : int(torch.randint(1, SEQ_LEN // 2, (1,), generator=gen))] = 0.0
        batches.append({"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(), "loss_mask": mask,
                        "position_ids": torch.arange(SEQ_LEN).expand(GLOBAL_BATCH, SEQ_LEN).contiguous()})
    return batches


def microbatches_for_this_rank(batch: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """This DP rank's rows of a global batch in micro-batches of MICRO_BATCH rows, CP-sliced.
    Global micro-batch j is rows [j * MICRO_BATCH, (j + 1) * MICRO_BATCH) at every layout."""
    from megatron.core import parallel_state

    from psft_megatron.compat.releases import get_batch_on_this_cp_rank

    dp = parallel_state.get_data_parallel_world_size()
    per_rank = GLOBAL_BATCH // dp
    first = parallel_state.get_data_parallel_rank() * per_rank
    return [get_batch_on_this_cp_rank({k: v[start : start + MICRO_BATCH].clone() for k, v in batch.items()})
            for start in range(first, first + per_rank, MICRO_BATCH)]


# ----------------------------------------------------------------------------- reference
def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., d] / rms over d, times weight [d]."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + MODEL.norm_epsilon) * weight


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE on x [b, s, n, d] at positions 0..s-1 (halves rotated together)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (MODEL.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), inv_freq)  # [s, d/2]
    angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]  # [1, s, 1, d]
    first, second = x.chunk(2, dim=-1)
    return x * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()


def attention(W: Dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Causal GQA self-attention with QK RMSNorm and RoPE; x [b, s, h] (normed) -> [b, s, h].

    megatron's fused QKV rows are grouped per KV group g: [q of the group's heads, k_g, v_g]."""
    b, s, _ = x.shape
    heads, groups, d = MODEL.num_attention_heads, MODEL.num_query_groups, MODEL.kv_channels
    per_group = heads // groups
    qkv = (x @ W[prefix + "linear_qkv.weight"].T).view(b, s, groups, (per_group + 2) * d)
    q, k, v = qkv.split([per_group * d, d, d], dim=-1)
    q = rotary(rms_norm(q.reshape(b, s, heads, d), W[prefix + "q_layernorm.weight"]))
    k = rotary(rms_norm(k, W[prefix + "k_layernorm.weight"]))
    k, v = k.repeat_interleave(per_group, dim=2), v.repeat_interleave(per_group, dim=2)  # [b, s, heads, d]
    scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    out = torch.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, s, heads * d)
    return out @ W[prefix + "linear_proj.weight"].T


def swiglu_expert(W: Dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """One expert: x [t, h] -> fc2(silu(gate) * up), fc1 rows = [gate; up]; -> [t, h]."""
    gate, up = (x @ W[prefix + "linear_fc1.weight"].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ W[prefix + "linear_fc2.weight"].T


def moe_block(W: Dict[str, torch.Tensor], prefix: str, x: torch.Tensor):
    """Routed MoE MLP on x [b, s, h] (normed), b a multiple of MICRO_BATCH.

    Returns (y [b, s, h], aux [b / MICRO_BATCH] - megatron's load-balancing loss of each
    micro-batch before its coefficient -, counts [E] tokens routed to each expert, margin: the
    smallest gap between a token's k-th and (k+1)-th router logit - a routing decision that
    rounding at another layout could flip if it were ~1e-6)."""
    b, s, h = x.shape
    experts, topk = MODEL.num_experts, MODEL.moe_router_topk
    tokens = x.reshape(b * s, h)
    logits = tokens.float() @ W[prefix + "router.weight"].float().T  # [T, E]
    top_logits, top_index = logits.topk(topk, dim=-1)
    margin = (top_logits[:, -1] - logits.topk(topk + 1, dim=-1).values[:, -1]).min().detach()
    gates = torch.softmax(top_logits, dim=-1)  # [T, k]: softmax over the chosen logits
    out = torch.zeros_like(tokens)
    for e in range(experts):
        rows, slot = (top_index == e).nonzero(as_tuple=True)
        if rows.numel():
            y = swiglu_expert(W, f"{prefix}experts.local_experts.{e}.", tokens[rows])
            out = out.index_add(0, rows, y * gates[rows, slot].unsqueeze(-1))
    chosen = F.one_hot(top_index, experts).sum(1).float()  # [T, E] 0/1
    scores = torch.softmax(logits, dim=-1).view(b // MICRO_BATCH, MICRO_BATCH * s, experts)
    routed = chosen.view_as(scores).sum(1)  # [M, E] tokens per expert per micro-batch
    tokens_mb = MICRO_BATCH * s
    aux = (scores.sum(1) * routed).sum(-1) * experts / (topk * tokens_mb * tokens_mb)  # [M]
    return out.view(b, s, h), aux, chosen.sum(0), margin


def reference_forward(W: Dict[str, torch.Tensor], tokens: torch.Tensor):
    """tokens [b, s] -> (logits [b, s, V_padded], aux [layers, b / MICRO_BATCH], counts [layers, E],
    the smallest router margin of all layers)."""
    x = W["embedding.word_embeddings.weight"][tokens]
    auxes, counts, margins = [], [], []
    for layer in range(MODEL.num_layers):
        p = f"decoder.layers.{layer}."
        x = x + attention(W, p + "self_attention.", rms_norm(x, W[p + "input_layernorm.weight"]))
        y, aux, count, margin = moe_block(W, p + "mlp.", rms_norm(x, W[p + "pre_mlp_layernorm.weight"]))
        x = x + y
        auxes.append(aux)
        counts.append(count)
        margins.append(margin)
    x = rms_norm(x, W["decoder.final_layernorm.weight"])
    return x @ W["output_layer.weight"].T, torch.stack(auxes), torch.stack(counts), min(margins)


def label_logprobs(W: Dict[str, torch.Tensor], batch) -> torch.Tensor:
    """log p(label) [b, s] under weights W (no gradient)."""
    with torch.no_grad():
        logits = reference_forward(W, batch["tokens"])[0]
        return torch.log_softmax(logits, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)


def per_token_loss(loss: dict, logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor):
    """(per-token loss [b, s], extra metric name, its per-token value) of the objective."""
    if loss["kind"] == "sft":
        return -logp, None, None
    if loss["kind"] == "psft":  # advantage 1: -min(r, clip(r, 1 - eps_low, 1 + eps_high))
        high = loss["clip_eps_high"]
        ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
        return -torch.minimum(ratio, torch.clamp(ratio, 1 - 0.2, 1 + high)), "clip_frac", (ratio > 1 + high).float()
    delta = ref - logp  # sft_kl, k3: exp(d) - d - 1, clamped to [-10, 10]
    kl = torch.clamp(torch.exp(delta) - delta - 1, -10.0, 10.0)
    return -logp + loss["kl_coef"] * kl, "kl", kl


def reference_step_metrics(W, batch, loss: dict, old: torch.Tensor):
    """(objective to differentiate, {metric: tensor}) of one global batch under W."""
    logits, aux, counts, margin = reference_forward(W, batch["tokens"])
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)  # [G, S]
    mask = batch["loss_mask"]
    num_tokens = mask.sum()
    per_token, extra, extra_values = per_token_loss(loss, logp, old, batch["ref_logprobs"])
    main = (per_token * mask).sum()
    # megatron: coeff * aux * (T_local * TP * CP = the micro-batch's T) per layer and micro-batch, all / N
    objective = (main + AUX_COEFF * MICRO_BATCH * SEQ_LEN * aux.sum()) / num_tokens
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    metrics = {"loss": main / num_tokens, "entropy": (entropy * mask).sum() / num_tokens,
               "aux": aux.mean(), "load_max_mean": (counts.max(-1).values / counts.mean(-1)).max(),
               "router_margin": margin}
    if extra:
        metrics[extra] = (extra_values * mask).sum() / num_tokens
    return objective, {k: v.detach() for k, v in metrics.items()}


def reference_run(weights: Dict[str, torch.Tensor], batches, loss: dict, steps: int) -> Dict[str, List[float]]:
    """``steps`` AdamW steps in plain torch; pi_old re-synced every WINDOW steps (PSFT).

    Returns ``{metric: [value per step]}`` and ``eval_<metric>``: [value on batch 0 after
    STEPS steps] for the loss metrics; ``router_margin`` (not compared) is the step's smallest
    gap between a k-th and a (k+1)-th router logit."""
    W = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    decay = [p for p in W.values() if p.ndim > 1]
    no_decay = [p for p in W.values() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=ADAM_EPS)
    history: Dict[str, List[float]] = {}

    def record(prefix: str, metrics: Dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            history.setdefault(prefix + key, []).append(float(value))

    for step in range(steps + 1):
        if step == STEPS:
            with torch.no_grad():
                _, metrics = reference_step_metrics(W, batches[0], loss, batches[0]["old_logprobs"])
            record("eval_", {k: v for k, v in metrics.items() if k not in ("aux", "load_max_mean", "router_margin")})
        if step == steps:
            break
        batch = batches[step]
        old = batch["old_logprobs"] if step < WINDOW else label_logprobs(W, batch)  # re-synced at step WINDOW
        opt.zero_grad()
        objective, metrics = reference_step_metrics(W, batch, loss, old)
        objective.backward()
        for param in W.values():  # an expert no token chose still takes its (zero-gradient) Adam step
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(list(W.values()), CLIP_GRAD)
        opt.step()
        record("", metrics)
    return history


def initial_weights() -> Dict[str, torch.Tensor]:
    """Full weights built at TP=EP=1 (the same on every rank), norm weights perturbed so that a
    norm applied in the wrong place shows."""
    reinitialize_model_parallel(ParallelConfig(), SEED)
    (model,) = build_gpt_chunks(MODEL, MODEL.to_transformer_config(ParallelConfig()), "cpu")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    gen = torch.Generator().manual_seed(SEED + 2)
    for key, value in weights.items():
        if key.endswith("layernorm.weight"):
            value.add_(0.2 * torch.randn(value.shape, generator=gen))
    return weights


def save_weights(weights: Dict[str, torch.Tensor], weights_dir: str) -> None:
    """A dist checkpoint of ``weights`` (every rank calls it)."""
    reinitialize_model_parallel(ParallelConfig(), SEED)
    (model,) = build_gpt_chunks(MODEL, MODEL.to_transformer_config(ParallelConfig()), "cpu")
    model.load_state_dict(weights, strict=False)
    save_checkpoint(weights_dir, [model])


def prepare_references(weights, batches, kinds: List[dict], steps: Dict[str, int]):
    """On rank 0: pi_old / reference log-probs under the initial weights (on every batch) and the
    reference history of each loss kind; broadcast to all ranks."""
    payload = [None]
    if torch.distributed.get_rank() == 0:
        initial = [label_logprobs(weights, b) for b in batches]
        ready = [dict(b, old_logprobs=lp, ref_logprobs=lp) for b, lp in zip(batches, initial)]
        histories = {loss["kind"]: reference_run(weights, ready, loss, steps[loss["kind"]]) for loss in kinds}
        payload = [(initial, histories)]
    torch.distributed.broadcast_object_list(payload, src=0)
    initial, histories = payload[0]
    return [dict(b, old_logprobs=lp, ref_logprobs=lp) for b, lp in zip(batches, initial)], histories


# ----------------------------------------------------------------------------- layouts
class _AuxGradUnscaled:
    """Stands in for megatron's ``MoEAuxLossAutoScaler``: the aux loss whose gradient it attaches
    is divided by TP*CP - the upstream bug of megatron-core 0.16 (issue 1652) put back."""

    real = None

    @classmethod
    def apply(cls, activation, loss):
        from megatron.core import parallel_state

        tp_cp = parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_context_parallel_world_size()
        return cls.real.apply(activation, loss / tp_cp)


@contextlib.contextmanager
def planted(plant: Optional[str]):
    """The runtime part of a planted bug (``aux_grad_unscaled``); others act in :func:`plant_bug`."""
    if plant != "aux_grad_unscaled":
        yield
        return
    from megatron.core.transformer.moe import router as router_module

    _AuxGradUnscaled.real = router_module.MoEAuxLossAutoScaler
    router_module.MoEAuxLossAutoScaler = _AuxGradUnscaled
    try:
        yield
    finally:
        router_module.MoEAuxLossAutoScaler = _AuxGradUnscaled.real


def plant_bug(chunks, plant: Optional[str]) -> None:
    """``experts_over_dense_dp``: expert weights marked like dense ones (``allreduce=True``), so
    that DDP reduces their gradients over the dense DP group - ranks holding other experts."""
    if plant != "experts_over_dense_dp":
        return
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if ".mlp.experts." in name:
                param.allreduce = True


def build_layout(layout: Layout, weights_dir: Optional[str]):
    from megatron.core.optimizer import OptimizerConfig

    from psft_megatron.training.setup import setup_model_and_optimizer

    reinitialize_model_parallel(layout.parallel, SEED)

    def load_weights(chunks):
        load_checkpoint(weights_dir, chunks)
        plant_bug(chunks, layout.plant)

    opt_cfg = OptimizerConfig(optimizer="adam", lr=LR, weight_decay=WEIGHT_DECAY, adam_beta1=0.9, adam_beta2=0.999,
                              adam_eps=ADAM_EPS, clip_grad=CLIP_GRAD)
    model_cfg = dataclasses.replace(MODEL, moe_token_dispatcher_type=layout.dispatcher)
    return setup_model_and_optimizer(model_cfg, layout.parallel, opt_cfg, layer_spec="cpu",
                                     use_distributed_optimizer=layout.distopt,
                                     after_build=load_weights if weights_dir else None)


def make_forward_step(plugin):
    """megatron forward_step with our PSFTLoss plug-in (old / reference log-probs from the batch)."""

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        output = model(micro["tokens"], micro["position_ids"], None)
        return output, plugin.loss_func(micro["labels"], micro["loss_mask"], old_logprobs=micro.get("old_logprobs"),
                                        ref=micro.get("ref_logprobs"))

    return forward_step


def loss_keys(loss: dict) -> List[str]:
    return ["loss", "entropy"] + {"psft": ["clip_frac"], "sft_kl": ["kl"]}.get(loss["kind"], [])


def micro_inputs(batch, loss: dict) -> List[Dict[str, torch.Tensor]]:
    """This rank's micro-batches with the log-probs the loss kind takes."""
    keep = {"psft": "old_logprobs", "sft_kl": "ref_logprobs"}.get(loss["kind"])
    slim = {k: v for k, v in batch.items() if k not in ("old_logprobs", "ref_logprobs") or k == keep}
    return microbatches_for_this_rank(slim)


def eval_metrics(tm, batch, loss: dict) -> Dict[str, float]:
    """Forward-only pass on ``batch`` (modules in eval mode): the loss metrics."""
    from psft_megatron.losses import PSFTLoss
    from psft_megatron.training.forward import forward_only

    micro = micro_inputs(batch, loss)
    out = forward_only(tm.chunks, micro, make_forward_step(PSFTLoss(loss)), seq_length=SEQ_LEN)
    return step_metrics(out, loss_keys(loss))


def run_steps(tm, batches, steps, loss: dict, plant: Optional[str] = None) -> Dict[str, List[float]]:
    """Train ``steps`` (global step indices) at this layout; metrics as :func:`reference_run`
    (the eval pass after step STEPS - 1 when it is among ``steps``)."""
    from psft_megatron.losses import PSFTLoss
    from psft_megatron.compat.releases import clear_moe_router_losses
    from psft_megatron.training.forward import attach_logprobs
    from psft_megatron.training.moe_metrics import MoEMetrics
    from psft_megatron.training.step import train_step

    plugin = PSFTLoss(loss)
    history: Dict[str, List[float]] = {}
    moe = MoEMetrics(tm.chunks, tm.config)
    clear_moe_router_losses()
    try:
        for step in steps:
            micro = micro_inputs(batches[step], loss)
            if loss["kind"] == "psft" and step >= WINDOW:  # pi_old re-synced from this layout's weights
                attach_logprobs(tm.chunks, micro, plugin, "old_logprobs", seq_length=SEQ_LEN)
            with planted(plant):
                result = train_step(make_forward_step(plugin), [iter(list(micro)) for _ in tm.chunks], tm.chunks,
                                    tm.optimizer, tm.scheduler, num_microbatches=len(micro), seq_length=SEQ_LEN,
                                    micro_batch_size=MICRO_BATCH)
            values = step_metrics(result.metrics, loss_keys(loss))
            routed = moe.step_metrics(len(micro))
            values.update(aux=routed["moe_aux_loss"], load_max_mean=routed["moe_load_max_mean"],
                          grad_norm=result.grad_norm)
            for key, value in values.items():
                history.setdefault(key, []).append(value)
            if step == STEPS - 1:
                for key, value in eval_metrics(tm, batches[0], loss).items():
                    history["eval_" + key] = [value]
    finally:
        moe.close()
    return history


def compare_histories(got: Dict[str, List[float]], want: Dict[str, List[float]], first_step: int = 0) -> float:
    """Largest absolute difference over every metric ``got`` has, ``want`` taken from
    ``first_step`` on for per-step metrics (inf if anything is missing or not finite)."""
    diffs = []
    for key, values in got.items():
        expected = want.get(key, [])
        expected = expected if key.startswith("eval_") else expected[first_step : first_step + len(values)]
        if len(expected) != len(values):
            return float("inf")
        diffs += [abs(a - b) for a, b in zip(values, expected)]
    return max(diffs) if diffs and all(map(math.isfinite, diffs)) else float("inf")


def run_layout(layout: Layout, weights_dir: str, batches, histories) -> dict:
    start = time.time()
    try:
        want = histories[layout.loss["kind"]]
        tm = build_layout(layout, weights_dir)
        got = run_steps(tm, batches, range(layout.steps), layout.loss, layout.plant)
        entry = {"metrics": got, "reference": want, "max_abs_diff": compare_histories(got, want)}
        del tm
    except Exception as exc:  # reported per layout; the test names the failure
        entry = error_entry(exc, layout.name)
    entry.update(layout=layout.parallel.describe(), dispatcher=layout.dispatcher, distopt=layout.distopt,
                 loss=layout.loss["kind"], plant=layout.plant, seconds=round(time.time() - start, 2))
    gc.collect()
    return entry


def load_state(ckpt_dir: str, tm, with_optimizer: bool):
    """``load_checkpoint`` as the trainer calls it (strict key check); if only that check refuses
    the checkpoint for its expert/dense sub-optimizer state (keys ``chained_N.optimizer...``,
    which the check does not recognise as optimizer state), load again without it so that the
    resharded values are still compared. Returns (common values, the strict error or None)."""
    from psft_megatron.errors import CheckpointError

    optimizer = tm.optimizer if with_optimizer else None
    try:
        return load_checkpoint(ckpt_dir, tm.chunks, optimizer), None
    except CheckpointError as exc:
        if "chained_" not in str(exc):
            raise
        return load_checkpoint(ckpt_dir, tm.chunks, optimizer, strict=False), str(exc)


def run_checkpoint(saver: Layout, loaders: List[Layout], workdir: str, weights_dir: str, batches, histories) -> dict:
    """Save after STEPS steps at ``saver`` (weights + optimizer), load at each loader, continue."""
    want = histories["sft"]
    entry: dict = {}
    try:
        ckpt_dir = os.path.join(workdir, "ckpt_" + saver.name)
        tm = build_layout(saver, weights_dir)
        got = run_steps(tm, batches, range(STEPS), saver.loss)
        entry["save"] = {"metrics": got, "max_abs_diff": compare_histories(got, want), "iteration": STEPS,
                         "layout": saver.parallel.describe()}
        save_checkpoint(ckpt_dir, tm.chunks, tm.optimizer, common={"iteration": STEPS})
        continued = run_steps(tm, batches, range(STEPS, STEPS + CONTINUE), saver.loss)
        entry["save"].update(continued=continued,
                             continued_diff=compare_histories(continued, want, first_step=STEPS))
        del tm
        for loader in loaders:
            for with_optimizer in (True, False) if loader.name == WEIGHTS_ONLY else (True,):
                tm = build_layout(loader, None)
                common, strict_error = load_state(ckpt_dir, tm, with_optimizer)
                got = run_steps(tm, batches, range(STEPS, STEPS + CONTINUE), loader.loss)
                key = loader.name + ("" if with_optimizer else "_weights_only")
                entry[key] = {"metrics": got, "max_abs_diff": compare_histories(got, want, first_step=STEPS),
                              "diff_to_saver": compare_histories(got, continued),
                              "iteration": common.get("iteration"), "layout": loader.parallel.describe(),
                              "dispatcher": loader.dispatcher, "strict_error": strict_error}
                del tm
                gc.collect()
    except Exception as exc:
        entry.update(error_entry(exc, "checkpoint"))
    entry["reference_continued"] = {k: v[STEPS : STEPS + CONTINUE] for k, v in want.items()
                                    if not k.startswith("eval_")}
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None, help="comma-separated layout / scenario names")
    args = parser.parse_args()

    started = time.time()
    torch.set_num_threads(1)
    initialize(ParallelConfig(), seed=SEED)
    rank = torch.distributed.get_rank()
    holder = [tempfile.mkdtemp(prefix="psft_moe_parity_") if rank == 0 else None]
    torch.distributed.broadcast_object_list(holder, src=0)
    workdir = holder[0]
    only = set(args.only.split(",")) if args.only else None
    layouts = [lay for lay in SUITES[args.suite] if not only or lay.name in only]
    scenarios = [s for s in CKPT_SUITES[args.suite] if not only or s[0] in only]

    weights = initial_weights()
    weights_dir = os.path.join(workdir, "weights")
    save_weights(weights, weights_dir)
    kinds = {lay.loss["kind"]: lay.loss for lay in layouts}
    steps = {kind: max([lay.steps for lay in layouts if lay.loss["kind"] == kind] + [0]) for kind in kinds}
    if scenarios:
        kinds.setdefault("sft", SFT)
        steps["sft"] = max(steps.get("sft", 0), STEPS + CONTINUE)
    t0 = time.time()
    batches, histories = prepare_references(weights, make_global_batches(max(steps.values()) + 1), list(kinds.values()),
                                            steps)
    results = {"world_size": torch.distributed.get_world_size(), "layouts": {}, "checkpoints": {},
               "reference_seconds": round(time.time() - t0, 2)}

    for layout in layouts:
        entry = run_layout(layout, weights_dir, batches, histories)
        results["layouts"][layout.name] = entry
        if rank == 0:
            print(f"[moe-parity] {layout.name:40s} "
                  f"{json.dumps({k: entry.get(k) for k in ('max_abs_diff', 'error', 'seconds')})}", flush=True)

    for name, saver, loaders in scenarios:
        start = time.time()
        entry = run_checkpoint(saver, loaders, workdir, weights_dir, batches, histories)
        entry["seconds"] = round(time.time() - start, 2)
        results["checkpoints"][name] = entry
        if rank == 0:
            summary = dict(load_diffs(entry), error=entry.get("error"), seconds=entry["seconds"])
            print(f"[moe-ckpt] {name}: {json.dumps(summary)}", flush=True)

    results["seconds"] = round(time.time() - started, 2)
    write_results(results, args.out, workdir, rank)


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
