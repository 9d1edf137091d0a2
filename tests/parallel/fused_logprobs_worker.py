"""Fused output layer + log-probs at parallel layouts, in ONE torchrun launch of 4 processes.

    torchrun --nproc_per_node 4 tests/parallel/fused_logprobs_worker.py --out /tmp/f.json

Part 1, the op (``psft_megatron.ops.fused_linear_logprobs``): TP=2 (two groups side by side)
and TP=4, with and without sequence parallelism, masks, several row chunks and vocabulary
blocks per rank, and the top-k entropy (EAFT's gate) exchanged with the statistics. Every rank compares its values, its hidden gradient and its weight-shard
gradient with a float64 single-process reference built from the full weights.

Part 2, the megatron model (fp32, ``PSFTLoss`` with ``fused_output_layer`` on and off, same
weights and batches): TP=1, TP=2, TP=2+SP, TP=4+SP, CP=2, CP=2+TP=2+SP, packed rows (THD) at
TP=2+SP, PP=2 and TP=2+PP=2+SP with tied embeddings, PP=2+VPP=2. Per layout: the per-token
log-probs and entropies of the loss tokens, the gradient of the hidden states entering the
output layer, the output-weight (or tied embedding) gradient and every other parameter's
gradient after megatron's finalize_model_grads, fused vs unfused; and the forward-only pass
(``attach_logprobs``, as the old-policy and SFT-KL reference passes) on unwrapped chunks.

Writes ``{"op": {case: {...max abs diffs}}, "model": {layout: {...}}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.ops import fused_linear_logprobs  # noqa: E402
from tests.parallel.results import error_entry  # noqa: E402


# ----------------------------------------------------------------------------- part 1: the op
def _reference(h, w, y, mask, g_lp, g_ent):
    """float64 logp, entropy and gradients (w.r.t. the full h and W) of sum(g_lp lp + g_ent H)."""
    hr = h.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    z = hr @ wr.t()
    if h.dtype != torch.float32:
        z = z + (z.detach().to(h.dtype).double() - z.detach())
    logsm = torch.log_softmax(z, -1)
    v = w.shape[0]
    keep = torch.ones_like(y, dtype=torch.bool) if mask is None else mask != 0
    valid = (y >= 0) & (y < v) & keep
    zero = torch.zeros((), dtype=torch.float64)
    lp = torch.where(valid, logsm.gather(1, y.clamp(0, v - 1)[:, None])[:, 0], zero)
    ent = torch.where(keep, -(logsm.exp() * logsm).sum(-1), zero)
    ((lp * g_lp.double()).sum() + (ent * g_ent.double()).sum()).backward()
    return lp.detach(), ent.detach(), hr.grad, wr.grad


def _reference_topk(h, w, mask, k):
    """float64 entropy of each row's renormalised top-k distribution (0 on masked rows)."""
    z = h.double() @ w.double().t()
    if h.dtype != torch.float32:
        z = z.to(h.dtype).double()
    lq = torch.log_softmax(torch.sort(z, dim=-1, descending=True).values[:, :k], -1)
    ent = -(lq.exp() * lq).sum(-1)
    return ent if mask is None else torch.where(mask != 0, ent, torch.zeros((), dtype=torch.float64))


def _max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


OP_CASES = [
    # name, tp, sequence_parallel, dtype, masked, rows per chunk, vocab block
    ("tp2", 2, False, torch.float32, False, 6, 40),
    ("tp2_masked", 2, False, torch.float32, True, 5, 64),
    ("tp2_sp", 2, True, torch.float32, False, 7, 25),
    ("tp2_sp_masked", 2, True, torch.float32, True, 4, 33),
    ("tp4", 4, False, torch.float32, True, 9, 17),
    ("tp4_sp", 4, True, torch.float32, False, 6, 50),
    ("tp4_sp_masked", 4, True, torch.float32, True, 5, 32),
    ("tp2_sp_bf16", 2, True, torch.bfloat16, True, 6, 40),
]


def op_cases(only=None):
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {4: dist.new_group(list(range(4)))}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    groups[2] = pairs[rank // 2]
    out = {}
    n, hdim, v = 48, 24, 256
    for name, tp, sp, dtype, masked, rows, block in OP_CASES:
        if only and name not in only:
            continue
        try:
            gen = torch.Generator().manual_seed(7 + len(out))  # the same data on every rank
            h = torch.randn(n, hdim, generator=gen).to(dtype)
            w = (torch.randn(v, hdim, generator=gen) * 0.5).to(dtype)
            y = torch.randint(0, v, (n,), generator=gen)
            y[5] = -100
            mask = (torch.rand(n, generator=gen) > 0.3).float() if masked else None
            g_lp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
            r = rank % tp
            vt, nl = v // tp, n // tp
            hx = (h[r * nl:(r + 1) * nl] if sp else h).clone().requires_grad_(True)
            wx = w[r * vt:(r + 1) * vt].clone().requires_grad_(True)
            k = 20 if tp == 2 else 80  # at TP=4 each rank holds 64 < k logits: the top-k spans ranks
            lp, ent, top = fused_linear_logprobs(hx, wx, y, tp_group=groups[tp], sequence_parallel=sp, mask=mask,
                                                 rows_match_labels=True, return_entropy=True, chunk_size=rows,
                                                 vocab_block_size=block, topk_entropy=k)
            ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
            r_lp, r_ent, r_dh, r_dw = _reference(h, w, y, mask, g_lp, g_ent)
            r_dh = r_dh[r * nl:(r + 1) * nl] if sp else r_dh
            out[name] = {
                "logp": (lp.double() - r_lp).abs().max().item(),
                "entropy": (ent.double() - r_ent).abs().max().item(),
                "topk_entropy": (top.double() - _reference_topk(h, w, mask, k)).abs().max().item(),
                "grad_hidden": _max_rel(hx.grad, r_dh),
                "grad_weight": _max_rel(wx.grad, r_dw[r * vt:(r + 1) * vt]),
                "chunks": -(-int(n if mask is None else (mask != 0).sum()) // rows),
                "dtype": str(dtype).replace("torch.", ""),
            }
        except Exception as exc:  # reported per case (several ranks: the job stops, results.error_entry)
            out[name] = error_entry(exc, name)
    return out


# ----------------------------------------------------------------------------- part 2: the model
#: rows per chunk of the fused op: several chunks (and TP exchanges) per micro-batch
CHUNK = 7
# name, parallel layout, model (tests/parallel/parity_worker.MODELS), packed rows
MODEL_LAYOUTS = [
    ("tp1", dict(), "qwen_like", False),
    ("tp2", dict(tp=2), "qwen_like", False),
    ("tp2_sp", dict(tp=2, sp=True), "qwen_like", False),
    ("tp4_sp", dict(tp=4, sp=True), "qwen_like", False),
    ("cp2", dict(cp=2), "qwen_like", False),
    ("cp2_tp2_sp", dict(tp=2, cp=2, sp=True), "qwen_like", False),
    ("packed_tp2_sp", dict(tp=2, sp=True), "qwen_like", True),
    ("tp2_sp_tied", dict(tp=2, sp=True), "llama_tied", False),
    ("pp2_tied", dict(pp=2), "llama_tied", False),
    ("tp2_sp_pp2_tied", dict(tp=2, pp=2, sp=True), "llama_tied", False),
    ("pp2_vpp2", dict(pp=2, vpp=2), "qwen_like", False),
]


def _packed_micro_batches(seed: int, row_length: int):
    """Two packed rows ([1, row_length], THD) of random samples with prompts (loss mask 0)."""
    import numpy as np

    from psft_megatron.data.collate import collate_packed

    rng = np.random.default_rng(seed)
    micros = []
    for _ in range(2):
        samples, used = [], 0
        while True:
            n = int(rng.integers(5, 12))
            if used + n - 1 > row_length - 2:
                break
            ids = rng.integers(0, 250, n).astype(np.int64)
            mask = np.ones(n, dtype=np.uint8)
            mask[: int(rng.integers(1, n - 2))] = 0
            samples.append((ids, mask))
            used += n - 1
        micros.append(collate_packed(samples, row_length, pad_id=0))
    return micros


def _run_once(tm, micros, fused: bool, agg_mode: str, seq_len: int):
    """One forward/backward over ``micros`` with PSFTLoss (fused or not); returns the captured
    per-token values, hidden-state gradients, output-layer calls and parameter gradients."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from psft_megatron.model.unwrap import unwrap
    from psft_megatron.losses import LossConfig, PSFTLoss

    loss = PSFTLoss(LossConfig(kind="psft", clip_eps_high=0.02, agg_mode=agg_mode, fused_output_layer=fused,
                               chunk_size=CHUNK))
    cap = {"logp": [], "entropy": [], "dh": [], "output_layer_calls": 0}
    hooks = []
    for chunk in tm.chunks:
        gpt = unwrap(chunk)

        def grab(module, args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: cap["dh"].append(g.detach().clone()))

        hooks.append(gpt.decoder.register_forward_hook(grab))
        if gpt.post_process:
            hooks.append(gpt.output_layer.register_forward_hook(
                lambda *a: cap.__setitem__("output_layer_calls", cap["output_layer_calls"] + 1)))

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        seq_ids = micro.get("seq_ids") if micro.get("packed_seq_params") is not None else None
        old = micro["old_logprobs"]
        out = loss.model_forward(model, micro["tokens"], micro["position_ids"], None, labels=micro["labels"],
                                 loss_mask=micro["loss_mask"], seq_ids=seq_ids,
                                 packed_seq_params=micro.get("packed_seq_params"))
        inner = loss.loss_func(micro["labels"], micro["loss_mask"], old_logprobs=old, seq_ids=seq_ids)

        def loss_fn(output):
            lp, ent, _ = loss._logprobs_of(output, micro["labels"], tp_group=None, want_h=True)
            keep = micro["loss_mask"] != 0
            if seq_ids is not None:
                keep = keep & (seq_ids >= 0)
            cap["logp"].append(lp.detach()[keep])
            cap["entropy"].append(ent.detach()[keep])
            return inner(output)

        return out, loss_fn

    for chunk in tm.chunks:
        chunk.zero_grad_buffer()
    try:
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter(micros) for _ in tm.chunks] if len(tm.chunks) > 1
            else iter(micros), model=tm.chunks if len(tm.chunks) > 1 else tm.chunks[0],
            num_microbatches=len(micros), seq_length=seq_len, micro_batch_size=int(micros[0]["tokens"].shape[0]),
            forward_only=False)
    finally:
        for h in hooks:
            h.remove()
    cap["grads"] = {f"{i}.{n}": p.main_grad.detach().clone() for i, chunk in enumerate(tm.chunks)
                    for n, p in unwrap(chunk).named_parameters() if p.requires_grad}
    return cap


def model_layouts(only=None):
    from megatron.core import parallel_state

    from psft_megatron.checkpointing.dist_checkpoint import save_checkpoint
    from psft_megatron.model.builder import build_gpt_chunks
    from psft_megatron.distributed.runtime import ParallelConfig, reinitialize_model_parallel
    from tests.parallel.parity_worker import (MICRO_BATCHES, MODELS, SEED, SEQ_LEN, Layout, build_layout,
                                              make_global_batches, microbatches_for_this_rank)

    rank = dist.get_rank()
    holder = [tempfile.mkdtemp(prefix="psft_fused_") if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    workdir = holder[0]
    weights = {}
    batch = make_global_batches(1)[0]
    gen = torch.Generator().manual_seed(SEED + 7)
    batch["old_logprobs"] = -4.0 - torch.rand(batch["labels"].shape, generator=gen)  # ratios above the clip
    out = {}
    for name, par, model_name, packed in MODEL_LAYOUTS:
        if only and name not in only:
            continue
        start = time.time()
        try:
            if model_name not in weights:
                reinitialize_model_parallel(ParallelConfig(), SEED)
                cfg = MODELS[model_name]
                (ref,) = build_gpt_chunks(cfg, cfg.to_transformer_config(ParallelConfig()), "cpu")
                weights[model_name] = os.path.join(workdir, model_name)
                save_checkpoint(weights[model_name], [ref])
            parallel = ParallelConfig(par.get("tp", 1), par.get("pp", 1), par.get("vpp"), par.get("cp", 1),
                                      par.get("sp", False))
            tm = build_layout(Layout(name, parallel, model=model_name), weights[model_name])
            if packed:
                dp_rank = parallel_state.get_data_parallel_rank()
                micros = _packed_micro_batches(SEED + dp_rank, 2 * SEQ_LEN)
                for m in micros:
                    m["old_logprobs"] = -4.0 - torch.rand(m["labels"].shape, generator=gen)
                seq_len, agg = 2 * SEQ_LEN, "seq-mean-token-mean"
            else:
                micros = microbatches_for_this_rank(batch)
                seq_len, agg = SEQ_LEN, "token-mean"
            assert len(micros) == MICRO_BATCHES
            ref_run = _run_once(tm, micros, False, agg, seq_len)
            fused_run = _run_once(tm, micros, True, agg, seq_len)
            last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

            def cat(run, key):
                return torch.cat([t.reshape(-1) for t in run[key]]) if run[key] else torch.zeros(0)

            entry = {"layout": parallel.describe(), "packed": packed, "model": model_name}
            if last:
                for key in ("logp", "entropy"):
                    a, b = cat(fused_run, key), cat(ref_run, key)
                    entry[key] = (a - b).abs().max().item()
                    entry["tokens"] = float(a.numel())
                entry["output_layer_calls_fused"] = float(fused_run["output_layer_calls"])
                entry["output_layer_calls_unfused"] = float(ref_run["output_layer_calls"])
            entry["grad_hidden"] = max((_max_rel(a, b) for a, b in zip(fused_run["dh"], ref_run["dh"])), default=0.0)
            entry["hidden_grads_compared"] = float(len(ref_run["dh"]))
            tied_or_out = [k for k in ref_run["grads"] if "output_layer.weight" in k or "word_embeddings" in k]
            entry["grad_output_weight"] = max((_max_rel(fused_run["grads"][k], ref_run["grads"][k])
                                               for k in tied_or_out), default=0.0)
            entry["grad_params"] = max(_max_rel(fused_run["grads"][k], ref_run["grads"][k]) for k in ref_run["grads"])
            # the forward-only pass (old policy, SFT-KL reference) on unwrapped chunks, as the
            # trainer's frozen copies: fused vs unfused log-probs of the loss tokens
            from psft_megatron.model.unwrap import unwrap
            from psft_megatron.losses import LossConfig, PSFTLoss
            from psft_megatron.training.forward import attach_logprobs

            fwd_only = []
            for fused in (False, True):
                copies = [dict(m) for m in micros]
                attach_logprobs([unwrap(c) for c in tm.chunks], copies, PSFTLoss(LossConfig(fused_output_layer=fused, chunk_size=CHUNK)),
                                "lp", seq_length=seq_len)
                keep = [(m["loss_mask"] != 0) & ((m["seq_ids"] >= 0) if packed else True) for m in copies]
                fwd_only.append(torch.cat([m["lp"][k].reshape(-1) for m, k in zip(copies, keep) if "lp" in m]
                                          or [torch.zeros(0)]))
            if last:
                entry["forward_only_logp"] = (fwd_only[1] - fwd_only[0]).abs().max().item()
            entry["seconds"] = round(time.time() - start, 2)
            out[name] = entry
        except Exception as exc:
            out[name] = error_entry(exc, name)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def _gather_max(results):
    """Worst value of every numeric field over all ranks (errors kept from any rank)."""
    allres = [None] * dist.get_world_size()
    dist.all_gather_object(allres, results)
    merged = {}
    for res in allres:
        for name, entry in res.items():
            m = merged.setdefault(name, {})
            for k, val in entry.items():
                if isinstance(val, float):
                    m[k] = max(m.get(k, 0.0), val)
                elif k not in m:
                    m[k] = val
    return merged


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None, help="comma-separated case / layout names")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    torch.set_num_threads(1)
    from psft_megatron.distributed.runtime import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1234)
    start = time.time()
    results = {"op": _gather_max(op_cases(only))}
    results["op_seconds"] = round(time.time() - start, 2)
    results["model"] = _gather_max(model_layouts(only))
    if dist.get_rank() == 0:
        for part in ("op", "model"):
            for name, entry in results[part].items():
                print(f"[fused {part}] {name:28s} {json.dumps({k: v for k, v in entry.items() if k != 'traceback'})}",
                      flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
