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
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.checkpointing import load_checkpoint, save_checkpoint  # noqa: E402
from psft_megatron.model import ModelConfig  # noqa: E402
from psft_megatron.model.builder import build_gpt_chunks  # noqa: E402
from psft_megatron.runtime import ParallelConfig, initialize, reinitialize_model_parallel  # noqa: E402

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
    from megatron.core.utils import get_batch_on_this_cp_rank

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


def forward_step(data_iterator, model):
    from functools import partial

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)
    return output, partial(ce_loss_func, batch["labels"], batch["loss_mask"])


# ----------------------------------------------------------------------------- reference
def reference_losses(model_cfg: ModelConfig, weights: Dict[str, torch.Tensor], batches) -> List[float]:
    """Single-process fp32 run in plain torch.

    Returns STEPS + 2 training losses (one per AdamW step) and, last, the eval loss on
    batch 0 after STEPS steps.
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

    def loss_of(batch):
        logits = model(batch["tokens"], batch["position_ids"], None)
        ce = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none"
        )
        mask = batch["loss_mask"].reshape(-1)
        return (ce * mask).sum() / mask.sum()

    losses = []
    for step in range(STEPS + 2):
        if step == STEPS:
            with torch.no_grad():
                eval_after_steps = loss_of(batches[0]).item()
        opt.zero_grad()
        loss = loss_of(batches[step])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
        opt.step()
        losses.append(loss.item())
    return losses + [eval_after_steps]


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


def global_loss(metrics: List[dict]) -> float:
    """Token-mean loss of one step, known on every rank (sum over micro-batches, DP x CP)."""
    from megatron.core import parallel_state

    owner = (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )
    total = torch.zeros(2, dtype=torch.float64)
    if owner:
        for item in metrics:
            total += item["lm loss"].double()
    torch.distributed.all_reduce(total)  # all TP-rank-0 last-stage ranks = all DP x CP shards
    return (total[0] / total[1]).item()


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


def run_steps(tm, batches, steps) -> List[float]:
    from psft_megatron.training.step import train_step

    losses = []
    for step in steps:
        micro = microbatches_for_this_rank(batches[step])
        iters = [iter(list(micro)) for _ in tm.chunks]
        result = train_step(
            forward_step, iters, tm.chunks, tm.optimizer, tm.scheduler,
            num_microbatches=MICRO_BATCHES, seq_length=SEQ_LEN, micro_batch_size=len(micro[0]["tokens"]),
        )
        losses.append(global_loss(result.metrics))
    return losses


def eval_loss(tm, batch) -> float:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = microbatches_for_this_rank(batch)
    iters = [iter(list(micro)) for _ in tm.chunks]
    metrics = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(iters) > 1 else iters[0],
        model=tm.chunks if len(tm.chunks) > 1 else tm.chunks[0], num_microbatches=MICRO_BATCHES,
        seq_length=SEQ_LEN, micro_batch_size=len(micro[0]["tokens"]), forward_only=True,
    )
    return global_loss(list(metrics or []))


def compare(got: List[float], want: List[float]) -> float:
    return max(abs(a - b) for a, b in zip(got, want)) if all(map(math.isfinite, got)) else float("inf")


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

    def prepare(model_name: str):
        """Full weights of a model (built at TP1/PP1, same seed on every rank) saved as a
        dist checkpoint, and its single-process reference losses."""
        if model_name not in prepared:
            model_cfg = MODELS[model_name]
            weights_dir = os.path.join(workdir, "weights_" + model_name)
            reinitialize_model_parallel(ParallelConfig(), SEED)
            (ref_model,) = build_gpt_chunks(model_cfg, model_cfg.to_transformer_config(ParallelConfig()), "cpu")
            weights = {k: v.clone() for k, v in ref_model.state_dict().items() if not k.endswith("_extra_state")}
            save_checkpoint(weights_dir, [ref_model])
            prepared[model_name] = (weights_dir, reference_losses(model_cfg, weights, batches))
        return prepared[model_name]

    results = {"world_size": torch.distributed.get_world_size(), "layouts": {}, "checkpoints": {}}
    only = set(args.only.split(",")) if args.only else None
    for layout in SUITES[args.suite]:
        if only and layout.name not in only:
            continue
        start = time.time()
        try:
            weights_dir, reference = prepare(layout.model)
            want = reference[:STEPS] + reference[-1:]
            tm = build_layout(layout, weights_dir)
            got = run_steps(tm, batches, range(STEPS))
            got.append(eval_loss(tm, batches[0]))
            entry = {"losses": got, "reference": want, "max_abs_diff": compare(got, want)}
        except Exception as exc:  # reported per layout; the test names the failure
            import traceback

            entry = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
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
            weights_dir, reference = prepare(saver.model)
            tm = build_layout(saver, weights_dir)
            run_steps(tm, batches, range(STEPS))
            save_checkpoint(ckpt_dir, tm.chunks, tm.optimizer, common={"iteration": STEPS})
            continued = run_steps(tm, batches, range(STEPS, STEPS + 2))
            entry["continued"] = continued
            entry["reference_continued"] = reference[STEPS : STEPS + 2]
            for loader in loaders:
                for with_optimizer in (True, False):
                    tm = build_layout(loader, None)
                    common = load_checkpoint(ckpt_dir, tm.chunks, tm.optimizer if with_optimizer else None)
                    got = run_steps(tm, batches, range(STEPS, STEPS + 2))
                    key = loader.name + ("" if with_optimizer else "_weights_only")
                    entry[key] = {"losses": got, "max_abs_diff": compare(got, continued),
                                  "iteration": common.get("iteration"), "layout": loader.parallel.describe()}
        except Exception as exc:
            import traceback

            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
        results["checkpoints"][name] = entry
        if rank == 0:
            print(f"[ckpt] {name}: {json.dumps({k: (v['max_abs_diff'] if isinstance(v, dict) else v) for k, v in entry.items() if k != 'traceback'})}", flush=True)

    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        shutil.rmtree(workdir, ignore_errors=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
