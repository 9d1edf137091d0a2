#!/usr/bin/env python
"""Benchmark: the loss path from hidden states - output layer + log-probs - time and peak memory.

Same inputs for every variant (``hidden [tokens, h]``, this rank's output weight
``[V/tp, h]``, labels), side by side in one run:

* ``megatron``   - output layer, then megatron's ``vocab_parallel_cross_entropy`` on the
  materialised logits (log-probs = -CE, no entropy);
* ``unfused``    - output layer, then ``psft_megatron.ops.vocab_parallel_logprobs`` (log-probs
  and entropy, as in training);
* ``fused``      - ``psft_megatron.ops.fused_linear_logprobs`` (log-probs and entropy, no
  logits tensor);
* ``fused+mg``   - the fused op under megatron's DDP: the weight carries an fp32 ``main_grad``
  (allocated with the inputs, as DDP's gradient buffer is), and the weight gradient is added
  into it chunk by chunk (no ``[V/tp, h]`` accumulator, see docs/logprobs.md);
* ``unfused/2``, ``fused/2`` - the same with half the rows masked (prompt tokens): the unfused
  path drops the masked rows before the output layer, the fused op never projects them;
* ``gemm``       - the output layer's forward alone (one ``[tokens, h] x [h, V/tp]`` GEMM): the
  unit of the time breakdown (fwd+bwd: unfused = 3 GEMMs + op, fused = 4 GEMMs + tiles).

Times are wall-clock (best of ``--repeats``) and, beside them, the process's CPU time (all its
threads, OpenMP waits passive; the slowest rank under TP), which moves less when other jobs
share the machine.
Phases: forward (inputs require grad), forward+backward (backward through the log-probs with
random upstream gradients, into ``hidden`` and ``weight``) and the forward-only pass
(``torch.no_grad``: the old-policy / reference pass). Peak extra memory is measured as in
``bench_logprobs.py`` (CUDA allocator peak; on CPU peak RSS with a fixed glibc mmap
threshold), minus what was allocated before the phase (inputs, weights).

The output layer is megatron's column-parallel GEMM: ``F.linear`` on CUDA (with an all-reduce
of the hidden gradient over TP, as ``ColumnParallelLinear`` does). On CPU, half-precision
GEMMs of torch run at 0.4-19 GFLOP/s on CPUs without bf16 matrix units (against ~100 for
fp32), so there the output layer is the same tiled fp32-accumulating GEMM that the fused op
uses (bf16 in, bf16 out, its CPU tiles, no extra full-size buffers): all variants pay
the same price per GEMM.

Run by hand (not part of the test suite)::

    python benchmarks/bench_fused_logprobs.py                   # CPU defaults (~1 hour on 2 cores)
    python benchmarks/bench_fused_logprobs.py --device cuda --repeats 5
    python benchmarks/bench_fused_logprobs.py --sizes 1024x8192 --hidden 512 --tp 1   # quick
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import common  # noqa: E402  (benchmarks/common.py)
from bench_logprobs import _MALLOC_ENV, DTYPES, MemProbe, _sync  # noqa: E402  (the logits benchmark's probes)

#: CPU: the fixed glibc mmap threshold of bench_logprobs.py (freed tensors leave RSS), and
#: OpenMP threads that sleep instead of spinning when they wait: their CPU time is then the work
#: they do, a measure that moves little when other jobs share the machine. Read at start-up,
#: hence the re-exec.
_ENV = dict(_MALLOC_ENV, OMP_WAIT_POLICY="PASSIVE")

VARIANTS = ("gemm", "megatron", "unfused", "fused", "fused+mg", "unfused/2", "fused/2")
PHASES = ("fwd", "fwd+bwd", "fwd-only")


# --------------------------------------------------------------------------------------------
# the output layer
# --------------------------------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient over TP backward (megatron's
    copy_to_tensor_model_parallel_region, the input side of ColumnParallelLinear)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _TiledHalfLinear(torch.autograd.Function):
    """CPU stand-in for a bf16 GEMM with fp32 accumulation: ``h @ W.T`` (and its two backward
    GEMMs) on fp32 tiles, results rounded to the input dtype. Same tile engine as the fused op."""

    @staticmethod
    def forward(ctx, h, w):
        from psft_megatron.ops.fused_linear_logprobs import _Tiles, default_fused_tiles

        rows, block = default_fused_tiles(h.device)
        n, vt = h.shape[0], w.shape[0]
        out = torch.empty((n, vt), dtype=h.dtype, device=h.device)
        tiles = _Tiles(h, w, rows, block, entropy_buf=False)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            hr = tiles.rows(h, None, a, b)
            for v0 in range(0, vt, block):
                v1 = min(vt, v0 + block)
                z, _, _ = tiles.logits(hr, tiles.block(w, v0, v1))
                out[a:b, v0:v1] = z
        ctx.save_for_backward(h, w)
        return out

    @staticmethod
    def backward(ctx, g):
        from psft_megatron.ops.fused_linear_logprobs import _Tiles, default_fused_tiles

        h, w = ctx.saved_tensors
        rows, block = default_fused_tiles(h.device)
        n, vt, hd = h.shape[0], w.shape[0], h.shape[1]
        tiles = _Tiles(h, w, rows, block, entropy_buf=False)
        f32 = dict(dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h)
        acc = torch.empty((rows, hd), **f32)
        for a in range(0, n, rows):  # dh = g @ W, rows outside
            b = min(n, a + rows)
            acc_r = acc[: b - a].zero_()
            for v0 in range(0, vt, block):
                v1 = min(vt, v0 + block)
                gt = tiles._view(tiles.g, b - a, v1 - v0).copy_(g[a:b, v0:v1])
                acc_r.addmm_(gt, tiles.block(w, v0, v1))
            dh[a:b] = acc_r
        dw = torch.empty_like(w)
        wacc = torch.empty((block, hd), **f32)
        for v0 in range(0, vt, block):  # dW = g^T @ h, vocabulary blocks outside
            v1 = min(vt, v0 + block)
            acc_v = wacc[: v1 - v0].zero_()
            for a in range(0, n, rows):
                b = min(n, a + rows)
                gt = tiles._view(tiles.g, b - a, v1 - v0).copy_(g[a:b, v0:v1])
                acc_v.addmm_(gt.t(), tiles.rows(h, None, a, b))
            dw[v0:v1] = acc_v
        return dh, dw


def output_layer(h, w, tp_group):
    """megatron's column-parallel output layer: ``[n, h] -> [n, V/tp]`` logits in h's dtype."""
    if tp_group is not None:
        h = _CopyToTP.apply(h, tp_group)
    if h.device.type == "cpu" and h.dtype != torch.float32:
        return _TiledHalfLinear.apply(h, w)
    return torch.nn.functional.linear(h, w)


# --------------------------------------------------------------------------------------------
# the variants: fn(h, w, y, mask) -> per-token log-probs [n] (fp32, differentiable)
# --------------------------------------------------------------------------------------------
def make_fn(variant: str, tp_group):
    from psft_megatron.ops import fused_linear_logprobs, vocab_parallel_logprobs

    if variant == "gemm":
        return lambda h, w, y, mask: output_layer(h, w, tp_group)
    if variant == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return lambda h, w, y, mask: -vocab_parallel_cross_entropy(output_layer(h, w, tp_group), y)
    if variant == "unfused":
        return lambda h, w, y, mask: vocab_parallel_logprobs(output_layer(h, w, tp_group), y, tp_group=tp_group,
                                                             return_entropy=True)[0]
    if variant in ("fused", "fused+mg"):
        return lambda h, w, y, mask: fused_linear_logprobs(h, w, y, tp_group=tp_group, return_entropy=True, rows_match_labels=True)[0]
    if variant == "unfused/2":

        def fn(h, w, y, mask):
            idx = torch.nonzero(mask).reshape(-1)
            logits = output_layer(h.index_select(0, idx), w, tp_group)
            lp = vocab_parallel_logprobs(logits, y.index_select(0, idx), tp_group=tp_group, return_entropy=True)[0]
            return torch.zeros(h.shape[0], dtype=lp.dtype, device=lp.device).index_copy(0, idx, lp)

        return fn
    if variant == "fused/2":
        return lambda h, w, y, mask: fused_linear_logprobs(h, w, y, tp_group=tp_group, mask=mask, rows_match_labels=True,
                                                           return_entropy=True)[0]
    raise ValueError(variant)


def make_inputs(tokens, vt, hidden, tp, rank, dtype, device, seed=0):
    """hidden [tokens, h] (the same on every TP rank), this rank's weight shard, labels, mask."""
    g = torch.Generator().manual_seed(seed)
    h = torch.empty(tokens, hidden, dtype=dtype, device=device)
    for a in range(0, tokens, 1024):  # in slices: no full-size fp32 spike
        b = min(tokens, a + 1024)
        h[a:b].copy_(torch.randn(b - a, hidden, generator=g))
    gw = torch.Generator().manual_seed(seed + 1 + rank)
    w = torch.empty(vt, hidden, dtype=dtype, device=device)
    for a in range(0, vt, 1024):
        b = min(vt, a + 1024)
        w[a:b].copy_(torch.randn(b - a, hidden, generator=gw) * (2.0 / hidden**0.5))
    y = torch.randint(0, vt * tp, (tokens,), generator=torch.Generator().manual_seed(seed + 2)).to(device)
    gout = torch.randn(tokens, generator=torch.Generator().manual_seed(seed + 3)).to(device)
    mask = torch.zeros(tokens, dtype=torch.bool)
    mask[torch.randperm(tokens, generator=torch.Generator().manual_seed(seed + 4))[: tokens // 2]] = True
    return h, w, y, gout, mask.to(device)


def run_case(variant, tokens, vt, hidden, tp, rank, dtype, device, repeats, tp_group, phases):
    fn = make_fn(variant, tp_group)
    h, w, y, gout, mask = make_inputs(tokens, vt, hidden, tp, rank, dtype, device)
    h.requires_grad_(True)
    w.requires_grad_(True)
    if variant == "fused+mg":  # DDP's fp32 gradient buffer: part of the inputs, not the loss path
        w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=device)
        w.grad_added_to_main_grad = False
    probe = MemProbe(device)
    res = {}
    for phase in phases:
        if variant == "gemm" and phase != "fwd":
            continue
        if tp > 1:
            dist.barrier(group=tp_group)
        probe.start()
        times, cpu_times = [], []
        for _ in range(repeats):
            if tp > 1:
                dist.barrier(group=tp_group)
            if variant == "fused+mg":
                w.grad_added_to_main_grad = False
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            if phase == "fwd-only":
                with torch.no_grad():
                    out = fn(h, w, y, mask)
            else:
                out = fn(h, w, y, mask)
                if phase == "fwd+bwd":
                    (out * gout).sum().backward()
            _sync(device)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            del out
            h.grad = w.grad = None
        res[phase] = {"time_s": min(times), "cpu_s": min(cpu_times), "peak_extra_mib": probe.peak_extra()}
    res["grad_mib"] = (h.numel() + w.numel()) * h.element_size() / 2**20
    if variant == "fused+mg" and device.type == "cpu":
        # the weight's gradient is an untouched placeholder (megatron's contract): never
        # resident on CPU, so only the hidden gradient is part of the peak
        res["grad_mib"] = h.numel() * h.element_size() / 2**20
    res["load_average"] = os.getloadavg()[0]  # 1-minute load of the machine at the end of the case
    res["cpu_peak_reset"] = probe.cpu_reset_ok
    del h, w, y, gout, mask
    gc.collect()
    return res


# --------------------------------------------------------------------------------------------
# one process per TP rank
# --------------------------------------------------------------------------------------------
def _worker(rank: int, args, tp: int, port: int, outdir: str) -> None:
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = max(1, (os.cpu_count() or 1) // tp)
    torch.set_num_threads(threads)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    dtype = DTYPES[args.dtype]
    # warm-up at a small size: lazy imports, allocator, kernels
    for variant in args.variants:
        run_case(variant, 256, 512, 64, tp, rank, dtype, device, 1, tp_group, PHASES)
    out = []
    for tokens, vt in args.sizes:
        for variant in args.variants:
            res = run_case(variant, tokens, vt, args.hidden, tp, rank, dtype, device, args.repeats, tp_group,
                           PHASES)
            res.update(variant=variant, tokens=tokens, vt=vt, hidden=args.hidden, tp=tp, rank=rank,
                       repeats=args.repeats, threads=threads)
            out.append(res)
            if rank == 0:
                cells = " | ".join(f"{p} {res[p]['time_s'] * 1e3:9.0f} ms {res[p]['peak_extra_mib']:7.0f} MiB"
                                   for p in PHASES if p in res)
                print(f"  tp={tp} {tokens}x{vt} h={args.hidden} {variant:9s} {cells} | load {res['load_average']:.1f}",
                      flush=True)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def run_tp(args, tp: int):
    return common.run_tp(_worker, args, tp, PHASES, ("time_s", "cpu_s", "peak_extra_mib"))


# --------------------------------------------------------------------------------------------
def markdown(results, args) -> str:
    lines = [
        f"machine: {common.machine_description(args.device)}; date: {datetime.date.today().isoformat()}; "
        f"torch {torch.__version__}; device {args.device}; dtype {args.dtype}; hidden {args.hidden}",
        "",
        "| tokens x V/tp | TP | variant | fwd ms | fwd MiB | fwd+bwd ms | fwd+bwd MiB | fwd+bwd MiB minus grads "
        "| fwd-only ms | fwd-only MiB | time vs unfused (fwd / fwd+bwd / fwd-only) "
        "| CPU time vs unfused (same) | memory vs megatron (fwd / fwd+bwd / fwd-only) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["tokens"], r["vt"], r["tp"], r["variant"]): r for r in results}

    def ratio(r, other, field):
        if other is None:
            return "-"
        cells = []
        for p in PHASES:
            if p in r and p in other and other[p][field] > 0:
                cells.append(f"{r[p][field] / other[p][field]:.2f}")
            else:
                cells.append("-")
        return " / ".join(cells)

    def cell(r, p, field, scale):
        return f"{r[p][field] * scale:.0f}" if p in r else "-"

    for r in results:
        key = (r["tokens"], r["vt"], r["tp"])
        base = "unfused/2" if r["variant"] == "fused/2" else "unfused"
        unf = by_key.get(key + (base,))
        meg = by_key.get(key + ("megatron",))
        minus = (f"{max(0.0, r['fwd+bwd']['peak_extra_mib'] - r['grad_mib']):.0f}" if "fwd+bwd" in r else "-")
        lines.append(
            f"| {r['tokens']} x {r['vt']} | {r['tp']} | {r['variant']} "
            f"| {cell(r, 'fwd', 'time_s', 1e3)} | {cell(r, 'fwd', 'peak_extra_mib', 1)} "
            f"| {cell(r, 'fwd+bwd', 'time_s', 1e3)} | {cell(r, 'fwd+bwd', 'peak_extra_mib', 1)} | {minus} "
            f"| {cell(r, 'fwd-only', 'time_s', 1e3)} | {cell(r, 'fwd-only', 'peak_extra_mib', 1)} "
            f"| {ratio(r, unf, 'time_s') if r['variant'] not in ('unfused', 'gemm') else '-'} "
            f"| {ratio(r, unf, 'cpu_s') if r['variant'] not in ('unfused', 'gemm') else '-'} "
            f"| {ratio(r, meg, 'peak_extra_mib') if r['variant'] != 'gemm' else '-'} |"
        )
    loads = [r["load_average"] for r in results]
    lines += ["", f"1-minute load average of the machine during the run: {min(loads):.1f} to {max(loads):.1f}."]
    grads = sorted({(r["tokens"], r["vt"], r["grad_mib"]) for r in results})
    lines += ["", "Gradients of hidden and weight (input dtype), part of every fwd+bwd peak: "
              + ", ".join(f"{t} x {v}: {g:.0f} MiB" for t, v, g in grads) + "."]
    if not all(r.get("cpu_peak_reset", True) for r in results):
        lines.append("WARNING: /proc/self/clear_refs was not writable: CPU peaks are lifetime peaks.")
    return "\n".join(lines)


def main(argv=None):
    if argv is None and "--no-malloc-env" not in sys.argv:
        common.reexec_with_env(_ENV)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--sizes", default="4096x32768,16384x38016", help="tokens x V/tp per rank, comma separated")
    p.add_argument("--hidden", type=int, default=3584, help="hidden size h (3584: Qwen2.5-7B)")
    p.add_argument("--tp", default="1,2", help="TP degrees, comma separated (CUDA: needs that many GPUs)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per phase (best is reported)")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--no-malloc-env", action="store_true",
                   help="CPU: keep glibc's adaptive mmap threshold and OpenMP's spinning waits")
    args = p.parse_args(argv)
    args.sizes = common.parse_sizes(args.sizes)
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    print(common.run_header("bench_fused_logprobs", args.device), flush=True)
    t0 = time.time()
    results = []
    for tp in common.tp_degrees(args.tp, args.device):
        results += run_tp(args, tp)
    common.finish(results, markdown(results, args), args.json, t0)


if __name__ == "__main__":
    main()
