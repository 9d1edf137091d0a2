"""Parallel-parity worker: many megatron layouts in ONE torchrun launch, results as JSON.

Run by tests/test_parallel_parity.py (and by hand)::

    torchrun --nproc_per_node 2 tests/parallel/parity_worker.py --suite two --out /tmp/r.json

Every layout trains the same tiny fp32 model (4 layers, hidden 64, 4 heads, 2 KV groups,
head_dim 32 != 64/4, QKV bias, QK RMSNorm, vocab 250 padded to 256) from the same full
weights on the same global batches, and its losses are compared with a single-process
reference computed in plain torch (one model, the whole global batch, torch AdamW with
megatron's weight-decay grouping and grad clipping). Checkpoint scenarios save at one
layout and load at another, then continue training and compare the continuation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from psft_megatron.model import ModelConfig  # noqa: E402
from psft_megatron.model.builder import build_gpt_chunks  # noqa: E402
from psft_megatron.distributed.runtime import ParallelConfig, initialize, reinitialize_model_parallel  # noqa: E402
from tests.parallel.results import error_entry, load_diffs, write_results  # noqa: E402

STEPS = 3
MICRO_BATCHES = 2
GLOBAL_BATCH = 8
SEQ_LEN = 16
SEED = 1234
LR = 1e-3
WEIGHT_DECAY = 0.1
CLIP_GRAD = 1.0
TOLERANCE = 1e-5

TINY_MODEL = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=32,
    ffn_hidden_size=128,
    vocab_size=250,
    make_vocab_size_divisible_by=32,  # 256 at TP 1, 2 and 4: the same full weights fit all
    max_position_embeddings=64,
    rotary_base=10000.0,
    add_qkv_bias=True,
    qk_layernorm=True,
    init_method_std=0.05,
)

# Llama-3.2-like: tied embeddings (the embedding-group grad all-reduce under PP), Llama-3
# RoPE scaling, plain MHA width, no biases, no QK-norm.
TINY_TIED = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=250,
    make_vocab_size_divisible_by=32,
    max_position_embeddings=64,
    rotary_base=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0},
    tie_word_embeddings=True,
    init_method_std=0.05,
)

MODELS = {"qwen_like": TINY_MODEL, "llama_tied": TINY_TIED}


@dataclass
class Layout:
    """A parallel layout to compare with the reference."""

    name: str
    parallel: ParallelConfig
    distopt: bool = False
    overlap_grad_reduce: bool = False
    plant: Optional[str] = None  # a deliberate bug; the comparison must then FAIL
    model: str = "qwen_like"  # key of MODELS
    loss: Optional[dict] = None  # LossConfig values for PSFTLoss; None = megatron's CE


# PSFT with a small clip so that the one-sided clip binds within 3 steps (pi_old = initial
# weights for the whole run): the zero-gradient branch is exercised, clip_frac > 0.
PSFT = dict(kind="psft", clip_eps_high=0.02)
PSFT_SEQ = dict(PSFT, agg_mode="seq-mean-token-mean")
# ASFT and EAFT against a float64 reference written here: ASFT with the k3 estimate (reference =
# the initial weights' log-probs) and with the authors' exact KL(pi_ref || pi) over the vocabulary
# (the initial weights' logits, sliced to this TP rank's vocabulary); EAFT with the default gate
# through the fused output layer (its top-k merged over tiles and TP ranks) and with another k
# and exponent from the logits.
ASFT = dict(kind="asft", asft_kl_coef=0.5)
ASFT_FULL = dict(kind="asft", kl_estimator="full")
EAFT_FUSED = dict(kind="eaft", fused_output_layer=True, chunk_size=5)
EAFT_ALPHA = dict(kind="eaft", eaft_topk=8, eaft_alpha=0.5)


def P(tp=1, pp=1, vpp=None, cp=1, sp=False) -> ParallelConfig:
    return ParallelConfig(tp, pp, vpp, cp, sp)


SUITES = {
    # 2 processes
    "two": [
        Layout("tp2", P(tp=2)),
        Layout("tp2_sp", P(tp=2, sp=True)),
        Layout("pp2", P(pp=2)),
        Layout("pp2_vpp2", P(pp=2, vpp=2)),
        Layout("cp2", P(cp=2)),
        Layout("dp2_distopt", P(), distopt=True),
        Layout("dp2_distopt_overlap", P(), distopt=True, overlap_grad_reduce=True),
        Layout("pp2_tied_llama3rope", P(pp=2), model="llama_tied"),
        Layout("psft_tp2_sp", P(tp=2, sp=True), loss=PSFT),
        Layout("psft_seqmean_cp2", P(cp=2), loss=PSFT_SEQ),
        Layout("psft_seqmean_dp2_distopt", P(), distopt=True, loss=PSFT_SEQ),
        Layout("psft_pp2_vpp2", P(pp=2, vpp=2), loss=PSFT),
        Layout("asft_tp2_full_kl", P(tp=2), loss=ASFT_FULL),
        Layout("asft_pp2", P(pp=2), loss=ASFT),
        Layout("eaft_tp2_sp_fused", P(tp=2, sp=True), loss=EAFT_FUSED),
        Layout("eaft_pp2", P(pp=2), loss=EAFT_ALPHA),
        Layout("planted_tp2_sp_norm_unmarked", P(tp=2, sp=True), plant="sp_norm_unmarked"),
    ],
    # 4 processes
    "four": [
        Layout("tp2_pp2", P(tp=2, pp=2)),
        Layout("cp2_tp2_sp", P(tp=2, cp=2, sp=True)),
        Layout("tp2_sp_pp2_vpp2", P(tp=2, pp=2, vpp=2, sp=True)),
        Layout("tp4_sp", P(tp=4, sp=True)),
        Layout("tp2_dp2_distopt", P(tp=2), distopt=True),
        Layout("tp2_sp_pp2_tied_llama3rope", P(tp=2, pp=2, sp=True), model="llama_tied"),
        Layout("psft_cp2_tp2_sp", P(tp=2, cp=2, sp=True), loss=PSFT),
        Layout("psft_seqmean_cp2_tp2_sp", P(tp=2, cp=2, sp=True), loss=PSFT_SEQ),
        Layout("psft_tp4_sp", P(tp=4, sp=True), loss=PSFT),
    ],
}

# Checkpoint scenarios: (name, save layout, [load layouts], optimizer state loaded?)
CKPT_SUITES = {
    "two": [
        ("distopt_dp2_to_tp2_dp1", Layout("save", P(), distopt=True), [Layout("load_tp2", P(tp=2), distopt=True)]),
    ],
    "four": [
        (
            "tp2_sp_pp2_to_tp1_and_pp2",
            Layout("save", P(tp=2, pp=2, sp=True)),
            [Layout("load_tp1_pp1", P()), Layout("load_pp2", P(pp=2)), Layout("load_pp2_vpp2", P(pp=2, vpp=2))],
        ),
    ],
}


# ----------------------------------------------------------------------------- data
def make_global_batches(num_batches: int) -> List[Dict[str, torch.Tensor]]:
    """Deterministic global batches: tokens/labels/loss_mask/position_ids, each [G, S]."""
    gen = torch.Generator().manual_seed(SEED + 1)
    batches = []
    for _ in range(num_batches):
        seq = torch.randint(0, TINY_MODEL.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=gen)
        mask = torch.ones(GLOBAL_BATCH, SEQ_LEN)
        for row in range(GLOBAL_BATCH):  # a prompt (no loss) of varying length per row
            prompt = int(torch.randint(1, SEQ_LEN // 2, (1,), generator=gen))
            mask[row, :prompt] = 0.0
        batches.append(
            {
                "tokens": seq[:, :-1].contiguous(),
                "labels": seq[:, 1:].contiguous(),
                "loss_mask": mask,
                "position_ids": torch.arange(SEQ_LEN).expand(GLOBAL_BATCH, SEQ_LEN).contiguous(),
            }
        )
    return batches


def microbatches_for_this_rank(batch: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """This DP rank's share of a global batch, cut into MICRO_BATCHES, CP-sliced."""
    from megatron.core import parallel_state

    from psft_megatron.compat.releases import get_batch_on_this_cp_rank

    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // dp
    mbs = per_rank // MICRO_BATCHES
    out = []
    for m in range(MICRO_BATCHES):
        start = dp_rank * per_rank + m * mbs
        micro = {k: v[start : start + mbs].clone() for k, v in batch.items()}
        out.append(get_batch_on_this_cp_rank(micro))
    return out


# ----------------------------------------------------------------------------- loss
def ce_loss_func(labels, loss_mask, output_tensor):
    """Token-sum CE with megatron's per-token-loss contract: (sum, num_tokens, metrics)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    losses = vocab_parallel_cross_entropy(output_tensor.float().clone(), labels)
    loss_sum = (losses * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), loss_mask.sum()])}


def _ref_for(batch, loss: dict):
    """The micro-batch's reference for ASFT: the initial weights' log-probs (k1/k3) or their
    logits sliced to this TP rank's vocabulary shard ('full'); None for other kinds."""
    if loss.get("kind") != "asft":
        return None
    if loss.get("kl_estimator") != "full":
        return batch["old_logprobs"]
    from megatron.core import parallel_state

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    vt = batch["ref_logits"].shape[-1] // tp
    return batch["ref_logits"][..., rank * vt:(rank + 1) * vt]


def make_forward_step(loss: Optional[dict]):
    """megatron forward_step: megatron's CE (loss None) or our PSFTLoss plug-in (through
    ``PSFTLoss.model_forward`` with ``fused_output_layer``)."""
    from functools import partial

    from psft_megatron.losses import PSFTLoss

    plugin = PSFTLoss(loss) if loss is not None else None

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if plugin is not None and plugin.config.fused_output_layer:
            output = plugin.model_forward(model, batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                                          loss_mask=batch["loss_mask"])
        else:
            output = model(batch["tokens"], batch["position_ids"], None)
        if plugin is None:
            return output, partial(ce_loss_func, batch["labels"], batch["loss_mask"])
        return output, plugin.loss_func(batch["labels"], batch["loss_mask"], old_logprobs=batch["old_logprobs"],
                                        ref=_ref_for(batch, loss))

    return forward_step


# ----------------------------------------------------------------------------- reference
def reference_metrics(model_cfg: ModelConfig, weights: Dict[str, torch.Tensor], batches, loss: Optional[dict]) -> Dict[str, List[float]]:
    """Single-process fp32 run in plain torch.

    Returns ``{metric: values}``: STEPS + 2 training values (one per AdamW step) and, last,
    the eval value on batch 0 after STEPS steps. Metrics: "loss" (CE, or the PSFT objective
    with its aggregation), and for PSFT "entropy" and "clip_frac" (token means); for ASFT and
    EAFT the objective in float64 from the fp32 logits (:func:`float64_objective`).
    The formulas are written out here in plain torch, independently of psft_megatron.losses.
    """
    reinitialize_model_parallel(ParallelConfig(), SEED)
    config = model_cfg.to_transformer_config(ParallelConfig())
    (model,) = build_gpt_chunks(model_cfg, config, "cpu")
    model.load_state_dict(weights)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.999), eps=1e-8,
    )

    def metrics_of(batch):
        logits = model(batch["tokens"], batch["position_ids"], None).float()
        mask = batch["loss_mask"]
        token_mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
        if loss is not None and loss["kind"] in ("asft", "eaft"):
            return float64_objective(logits, batch, loss, token_mean)
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)  # [G, S]
        if loss is None:
            return {"loss": token_mean(-logp)}
        eps_high, eps_low = loss.get("clip_eps_high", 0.28), loss.get("clip_eps_low", 0.2)
        ratio = torch.exp(torch.clamp(logp - batch["old_logprobs"], -20.0, 20.0))
        per_token = -torch.minimum(ratio, torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
        if loss.get("agg_mode", "token-mean") == "token-mean":
            objective = token_mean(per_token)
        else:  # seq-mean-token-mean: every row is one sequence with >= 1 loss token
            objective = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return {"loss": objective, "entropy": token_mean(entropy).detach(),
                "clip_frac": token_mean((ratio > 1 + eps_high).float()).detach()}

    history: Dict[str, List[float]] = {}
    for step in range(STEPS + 2):
        if step == STEPS:
            with torch.no_grad():
                eval_after_steps = {k: v.item() for k, v in metrics_of(batches[0]).items()}
        opt.zero_grad()
        metrics = metrics_of(batches[step])
        metrics["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
        opt.step()
        for key, value in metrics.items():
            history.setdefault(key, []).append(value.item())
    for key, value in eval_after_steps.items():
        history[key].append(value)
    return history


def float64_objective(logits: torch.Tensor, batch, loss: dict, token_mean) -> Dict[str, torch.Tensor]:
    """ASFT and EAFT from the papers' formulas in float64 (token-mean), written here
    independently of psft_megatron.losses: ``loss`` (differentiable), ``entropy`` and the
    objective's own metric (ASFT: the KL term's mean; EAFT: the gate's mean)."""
    z = logits.double()
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if loss["kind"] == "asft":  # DFT + lambda KL
        if loss.get("kl_estimator") == "full":  # KL(pi_ref || pi) = sum_j q_j (log q_j - log p_j)
            log_q = torch.log_softmax(batch["ref_logits"].double(), dim=-1)
            kl = (log_q.exp() * (log_q - logp_all)).sum(-1)
        else:  # k3 on the label token, delta = ref - logp
            delta = batch["old_logprobs"].double() - logp
            kl = (delta.exp() - delta - 1.0).clamp(-10.0, 10.0)
        per_token = -logp.detach().exp() * logp + loss.get("asft_kl_coef", 0.1) * kl
        extra = {"kl": token_mean(kl).detach()}
    else:  # EAFT: -sg((H_topk / log k) ** alpha) logp, H_topk of the k largest logits renormalised
        k, alpha = loss.get("eaft_topk", 20), loss.get("eaft_alpha", 1.0)
        top = torch.log_softmax(torch.sort(z.detach(), dim=-1, descending=True).values[..., :k], dim=-1)
        gate = (-(top.exp() * top).sum(-1) / math.log(k)) ** alpha
        per_token = -gate * logp
        extra = {"eaft_weight": token_mean(gate)}
    return dict(loss=token_mean(per_token), entropy=token_mean(entropy).detach(), **extra)


def initial_outputs(model_cfg: ModelConfig, weights: Dict[str, torch.Tensor], batches):
    """pi_old for the PSFT layouts (the reference for ASFT): log-probs of the labels ``[G, S]``
    and the logits ``[G, S, V]`` under the initial weights, per batch."""
    reinitialize_model_parallel(ParallelConfig(), SEED)
    (model,) = build_gpt_chunks(model_cfg, model_cfg.to_transformer_config(ParallelConfig()), "cpu")
    model.load_state_dict(weights)
    out = []
    with torch.no_grad():
        for b in batches:
            logits = model(b["tokens"], b["position_ids"], None).float()
            out.append((torch.log_softmax(logits, -1).gather(-1, b["labels"].unsqueeze(-1)).squeeze(-1), logits))
    return out


# ----------------------------------------------------------------------------- layouts
def plant_bug(chunks, plant: Optional[str]) -> None:
    if plant is None:
        return
    if plant == "sp_norm_unmarked":
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                if "layernorm" in name and "q_layernorm" not in name and "k_layernorm" not in name:
                    param.sequence_parallel = False
        return
    raise ValueError(f"unknown planted bug {plant!r}")


def step_metrics(metrics: List[dict], keys: List[str]) -> Dict[str, float]:
    """One step's metrics (means over micro-batches, DP and CP), known on every rank.

    The last pipeline stage reduces them with psft_megatron.losses.reduce_loss_metrics over
    its DP x CP group; one of its ranks then shares them with the whole world.
    """
    from megatron.core import parallel_state

    from psft_megatron.losses import reduce_loss_metrics

    values = torch.zeros(len(keys), dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        renamed = [{("loss" if k == "lm loss" else k): v for k, v in m.items()} for m in metrics]
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        reduced = reduce_loss_metrics(renamed, group=group)
        if parallel_state.get_tensor_model_parallel_rank() == 0 and torch.distributed.get_rank(group) == 0:
            values = torch.tensor([reduced[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(values)
    return dict(zip(keys, values.tolist()))


def build_layout(layout: Layout, weights_dir: str):
    from megatron.core.optimizer import OptimizerConfig

    from psft_megatron.training.setup import setup_model_and_optimizer

    reinitialize_model_parallel(layout.parallel, SEED)

    def load_weights(chunks):
        load_checkpoint(weights_dir, chunks)
        plant_bug(chunks, layout.plant)

    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=LR, weight_decay=WEIGHT_DECAY, adam_beta1=0.9, adam_beta2=0.999,
        adam_eps=1e-8, clip_grad=CLIP_GRAD,
    )
    return setup_model_and_optimizer(
        MODELS[layout.model], layout.parallel, opt_cfg, layer_spec="cpu",
        use_distributed_optimizer=layout.distopt, overlap_grad_reduce=layout.overlap_grad_reduce,
        after_build=load_weights if weights_dir else None,
    )


def metric_keys(loss: Optional[dict]) -> List[str]:
    if loss is None:
        return ["loss"]
    return ["loss", "entropy", {"asft": "kl", "eaft": "eaft_weight"}.get(loss["kind"], "clip_frac")]


def run_steps(tm, batches, steps, loss: Optional[dict] = None) -> Dict[str, List[float]]:
    from psft_megatron.training.step import train_step

    history: Dict[str, List[float]] = {}
    for step in steps:
        micro = microbatches_for_this_rank(batches[step])
        iters = [iter(list(micro)) for _ in tm.chunks]
        result = train_step(
            make_forward_step(loss), iters, tm.chunks, tm.optimizer, tm.scheduler,
            num_microbatches=MICRO_BATCHES, seq_length=SEQ_LEN, micro_batch_size=len(micro[0]["tokens"]),
        )
        for key, value in step_metrics(result.metrics, metric_keys(loss)).items():
            history.setdefault(key, []).append(value)
    return history


def eval_metrics(tm, batch, loss: Optional[dict] = None) -> Dict[str, float]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = microbatches_for_this_rank(batch)
    iters = [iter(list(micro)) for _ in tm.chunks]
    metrics = get_forward_backward_func()(
        forward_step_func=make_forward_step(loss), data_iterator=iters if len(iters) > 1 else iters[0],
        model=tm.chunks if len(tm.chunks) > 1 else tm.chunks[0], num_microbatches=MICRO_BATCHES,
        seq_length=SEQ_LEN, micro_batch_size=len(micro[0]["tokens"]), forward_only=True,
    )
    return step_metrics(list(metrics or []), metric_keys(loss))


def compare(got: Dict[str, List[float]], want: Dict[str, List[float]]) -> float:
    """Largest absolute difference over every metric and step (inf if anything is not finite)."""
    diffs = [abs(a - b) for key in got for a, b in zip(got[key], want[key])]
    return max(diffs) if all(map(math.isfinite, diffs)) else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None, help="comma-separated layout names")
    args = parser.parse_args()

    torch.set_num_threads(1)
    initialize(ParallelConfig(), seed=SEED)
    rank = torch.distributed.get_rank()
    workdir = tempfile.mkdtemp(prefix="psft_parity_") if rank == 0 else None
    holder = [workdir]
    torch.distributed.broadcast_object_list(holder, src=0)
    workdir = holder[0]
    batches = make_global_batches(STEPS + 2)
    prepared = {}

    def prepare(model_name: str, loss: Optional[dict] = None):
        """Full weights of a model (built at TP1/PP1, same seed on every rank) saved as a
        dist checkpoint, the batches with pi_old log-probs, and the single-process reference
        metrics for ``loss``."""
        if model_name not in prepared:
            model_cfg = MODELS[model_name]
            weights_dir = os.path.join(workdir, "weights_" + model_name)
            reinitialize_model_parallel(ParallelConfig(), SEED)
            (ref_model,) = build_gpt_chunks(model_cfg, model_cfg.to_transformer_config(ParallelConfig()), "cpu")
            weights = {k: v.clone() for k, v in ref_model.state_dict().items() if not k.endswith("_extra_state")}
            save_checkpoint(weights_dir, [ref_model])
            model_batches = [dict(b, old_logprobs=lp, ref_logits=logits)
                             for b, (lp, logits) in zip(batches, initial_outputs(model_cfg, weights, batches))]
            prepared[model_name] = (weights_dir, weights, model_batches, {})
        weights_dir, weights, model_batches, references = prepared[model_name]
        key = json.dumps(loss, sort_keys=True)
        if key not in references:
            references[key] = reference_metrics(MODELS[model_name], weights, model_batches, loss)
        return weights_dir, model_batches, references[key]

    results = {"world_size": torch.distributed.get_world_size(), "layouts": {}, "checkpoints": {}}
    only = set(args.only.split(",")) if args.only else None
    for layout in SUITES[args.suite]:
        if only and layout.name not in only:
            continue
        start = time.time()
        try:
            weights_dir, model_batches, reference = prepare(layout.model, layout.loss)
            want = {k: v[:STEPS] + v[-1:] for k, v in reference.items()}
            tm = build_layout(layout, weights_dir)
            got = run_steps(tm, model_batches, range(STEPS), layout.loss)
            for key, value in eval_metrics(tm, model_batches[0], layout.loss).items():
                got[key].append(value)
            entry = {"metrics": got, "reference": want, "max_abs_diff": compare(got, want)}
        except Exception as exc:  # reported per layout; the test names the failure
            entry = error_entry(exc, layout.name)
        entry.update(layout=layout.parallel.describe(), distopt=layout.distopt, plant=layout.plant,
                     seconds=round(time.time() - start, 2))
        results["layouts"][layout.name] = entry
        if rank == 0:
            print(f"[parity] {layout.name:32s} {json.dumps({k: entry.get(k) for k in ('max_abs_diff', 'error', 'seconds')})}", flush=True)

    for name, saver, loaders in CKPT_SUITES[args.suite]:
        if only and name not in only:
            continue
        entry = {}
        try:
            ckpt_dir = os.path.join(workdir, name)
            weights_dir, ckpt_batches, reference = prepare(saver.model)
            tm = build_layout(saver, weights_dir)
            run_steps(tm, ckpt_batches, range(STEPS))
            save_checkpoint(ckpt_dir, tm.chunks, tm.optimizer, common={"iteration": STEPS})
            continued = run_steps(tm, ckpt_batches, range(STEPS, STEPS + 2))
            entry["continued"] = continued
            entry["reference_continued"] = reference["loss"][STEPS : STEPS + 2]
            for loader in loaders:
                for with_optimizer in (True, False):
                    tm = build_layout(loader, None)
                    common = load_checkpoint(ckpt_dir, tm.chunks, tm.optimizer if with_optimizer else None)
                    got = run_steps(tm, ckpt_batches, range(STEPS, STEPS + 2))
                    key = loader.name + ("" if with_optimizer else "_weights_only")
                    entry[key] = {"metrics": got, "max_abs_diff": compare(got, continued),
                                  "iteration": common.get("iteration"), "layout": loader.parallel.describe()}
        except Exception as exc:
            entry.update(error_entry(exc, name))
        results["checkpoints"][name] = entry
        if rank == 0:
            print(f"[ckpt] {name}: {json.dumps(dict(load_diffs(entry), error=entry.get('error')))}", flush=True)

    write_results(results, args.out, workdir, rank)


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
