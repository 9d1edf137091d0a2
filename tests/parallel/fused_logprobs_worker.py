"""Fused output layer + log-probs at parallel layouts, in ONE torchrun launch of 4 processes.

    torchrun --nproc_per_node 4 tests/parallel/fused_logprobs_worker.py --out /tmp/f.json

Part 1, the op (``psft_megatron.ops.fused_linear_logprobs``): TP=2 (two groups side by side)
and TP=4, with and without sequence parallelism, masks, several row chunks and vocabulary
blocks per rank. Every rank compares its values, its hidden gradient and its weight-shard
gradient with a float64 single-process reference built from the full weights.

Part 2, the megatron model (fp32, ``PSFTLoss`` with ``fused_output_layer`` on and off, same
weights and batches): TP=1, TP=2, TP=2+SP, TP=4+SP, CP=2, CP=2+TP=2+SP, packed rows (THD) at
TP=2+SP, PP=2 and TP=2+PP=2+SP with tied embeddings, PP=2+VPP=2. Per layout: the per-token
log-probs and entropies of the loss tokens, the gradient of the hidden states entering the
output layer, the output-weight (or tied embedding) gradient and every other parameter's
gradient after megatron's finalize_model_grads, fused vs unfused.

Writes ``{"op": {case: {...max abs diffs}}, "model": {layout: {...}}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.ops import fused_linear_logprobs  # noqa: E402


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
            lp, ent = fused_linear_logprobs(hx, wx, y, tp_group=groups[tp], sequence_parallel=sp, mask=mask,
                                            return_entropy=True, chunk_size=rows, vocab_block_size=block)
            ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
            r_lp, r_ent, r_dh, r_dw = _reference(h, w, y, mask, g_lp, g_ent)
            r_dh = r_dh[r * nl:(r + 1) * nl] if sp else r_dh
            out[name] = {
                "logp": (lp.double() - r_lp).abs().max().item(),
                "entropy": (ent.double() - r_ent).abs().max().item(),
                "grad_hidden": _max_rel(hx.grad, r_dh),
                "grad_weight": _max_rel(wx.grad, r_dw[r * vt:(r + 1) * vt]),
                "chunks": -(-int(n if mask is None else (mask != 0).sum()) // rows),
                "dtype": str(dtype).replace("torch.", ""),
            }
        except Exception as exc:  # reported per case
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
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
    from psft_megatron.runtime import ParallelConfig, initialize

    initialize(ParallelConfig(), seed=1234)
    start = time.time()
    results = {"op": _gather_max(op_cases(only))}
    results["op_seconds"] = round(time.time() - start, 2)
    if dist.get_rank() == 0:
        for part in ("op",):
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
