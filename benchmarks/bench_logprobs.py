#!/usr/bin/env python
"""Benchmark: per-token log-probs from vocab-parallel logits, time and peak extra memory.

Compares, for each size ``tokens x V/tp`` and TP degree:

* ``ours+H``  - psft_megatron.ops.vocab_parallel_logprobs(..., return_entropy=True)
  (log-probs AND entropy; backward through the log-probs, as in training where the entropy
  is a metric);
* ``ours``    - the same op, log-probs only;
* ``megatron``- megatron.core.tensor_parallel.vocab_parallel_cross_entropy (log-probs = -CE);
* ``torch``   - log_softmax(logits.float()).gather(labels) (TP=1 only: it is not vocab-parallel).

Phases: forward (inputs require grad, outputs dropped) and forward+backward.
Peak extra memory = peak during the phase minus the memory held before it (the logits,
labels and upstream gradients are allocated before the baseline):

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
* CPU: the process's peak RSS (``VmHWM``) after resetting it through
  ``/proc/self/clear_refs`` (Linux >= 4.0), minus ``VmRSS`` before the phase. Large tensors
  are mmap-backed and returned to the OS when freed, so this tracks live tensor memory.

TP > 1 runs one process per rank (torch.multiprocessing spawn, gloo on CPU / nccl on CUDA)
with ``torch`` threads = cores / tp; per-rank numbers are reported for the slowest rank
(time) and the largest (memory).

Run by hand (not part of the test suite), e.g.::

    python benchmarks/bench_logprobs.py                       # CPU defaults, ~3 minutes
    python benchmarks/bench_logprobs.py --device cuda --dtype bf16 --repeats 20
    python benchmarks/bench_logprobs.py --sizes 4096x32768 --tp 1 --variants ours+H,megatron
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (benchmarks/common.py)

VARIANTS = ("ours+H", "ours", "megatron", "torch")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# memory probes
# --------------------------------------------------------------------------------------------
def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) / 1024.0 if m else float("nan")


class MemProbe:
    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_reset_ok = True

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.base = _status_mib("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                self.cpu_reset_ok = False

    def peak_extra(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        return _status_mib("VmHWM") - self.base


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# the variants
# --------------------------------------------------------------------------------------------
def make_fn(variant: str, tp_group, chunk_size):
    if variant in ("ours+H", "ours"):
        from psft_megatron.ops import vocab_parallel_logprobs

        want_h = variant == "ours+H"

        def fn(x, y):
            out = vocab_parallel_logprobs(x, y, tp_group=tp_group, return_entropy=want_h, chunk_size=chunk_size)
            return out[0] if want_h else out  # entropy computed, used as a metric only

        return fn
    if variant == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        def fn(x, y):
            # megatron works on [s, b, V]-like inputs of any leading shape; -CE = log-prob
            return -vocab_parallel_cross_entropy(x, y)

        return fn
    if variant == "torch":

        def fn(x, y):
            return torch.log_softmax(x.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

        return fn
    raise ValueError(variant)


def make_inputs(tokens, vt, tp, rank, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed + rank)
    x = torch.empty(tokens, vt, dtype=dtype, device=device)
    step = max(1, (64 << 20) // (4 * vt))  # fill in slices: no full-size fp32 spike
    for a in range(0, tokens, step):
        b = min(tokens, a + step)
        x[a:b].copy_(torch.randn(b - a, vt, generator=g) * 3.0)
    y = torch.randint(0, vt * tp, (tokens,), generator=torch.Generator().manual_seed(seed)).to(device)
    gout = torch.randn(tokens, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    return x, y, gout


def run_case(variant, tokens, vt, tp, rank, dtype, device, repeats, tp_group, chunk_size):
    fn = make_fn(variant, tp_group, chunk_size)
    x, y, gout = make_inputs(tokens, vt, tp, rank, dtype, device)
    x.requires_grad_(True)
    probe = MemProbe(device)
    res = {}
    # warm-up (one forward+backward: allocator, lazy imports, kernels)
    lp = fn(x, y)
    (lp * gout).sum().backward()
    x.grad = None
    del lp
    for phase in ("fwd", "fwd+bwd"):
        if tp > 1:
            dist.barrier(group=tp_group)
        probe.start()
        times = []
        for _ in range(repeats):
            if tp > 1:
                dist.barrier(group=tp_group)
            _sync(device)
            t0 = time.perf_counter()
            lp = fn(x, y)
            if phase == "fwd+bwd":
                (lp * gout).sum().backward()
            _sync(device)
            times.append(time.perf_counter() - t0)
            del lp
            x.grad = None
        res[phase] = {"time_s": min(times), "peak_extra_mib": probe.peak_extra()}
    res["grad_mib"] = tokens * vt * x.element_size() / 2**20
    res["cpu_peak_reset"] = probe.cpu_reset_ok
    del x, y, gout
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
    variants = args.variants
    tp_group = None
    if "megatron" in variants:
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        tp_group = parallel_state.get_tensor_model_parallel_group()  # the same group for all
    elif tp > 1:
        tp_group = dist.new_group(list(range(tp)))
    if tp == 1:
        tp_group = None  # single rank: no collectives
    out = []
    dtype = DTYPES[args.dtype]
    for tokens, vt in args.sizes:
        reps = args.repeats if args.repeats else (3 if tokens * vt <= (1 << 28) else 1)
        for variant in variants:
            if variant == "torch" and tp > 1:
                continue
            res = run_case(variant, tokens, vt, tp, rank, dtype, device, reps, tp_group, args.chunk_size)
            res.update(variant=variant, tokens=tokens, vt=vt, tp=tp, rank=rank, repeats=reps, threads=threads)
            out.append(res)
            if rank == 0:
                print(
                    f"  tp={tp} {tokens}x{vt} {variant:9s} fwd {res['fwd']['time_s']*1e3:8.1f} ms "
                    f"{res['fwd']['peak_extra_mib']:8.0f} MiB | fwd+bwd {res['fwd+bwd']['time_s']*1e3:8.1f} ms "
                    f"{res['fwd+bwd']['peak_extra_mib']:8.0f} MiB",
                    flush=True,
                )
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def run_tp(args, tp: int):
    return common.run_tp(_worker, args, tp, ("fwd", "fwd+bwd"), ("time_s", "peak_extra_mib"))


# --------------------------------------------------------------------------------------------
def markdown(results, args) -> str:
    lines = [
        f"machine: {common.machine_description(args.device)}; "
        f"date: {datetime.date.today().isoformat()}; torch {torch.__version__}; "
        f"device {args.device}; dtype {args.dtype}",
        "",
        "| tokens x V/tp | TP | variant | fwd ms | fwd peak extra MiB | fwd+bwd ms | fwd+bwd peak extra MiB "
        "| same, minus the gradient | time vs megatron (fwd / fwd+bwd) | memory vs megatron (fwd / fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["tokens"], r["vt"], r["tp"], r["variant"]): r for r in results}
    for r in results:
        meg = by_key.get((r["tokens"], r["vt"], r["tp"], "megatron"))

        def ratio(phase, field):
            if meg is None or meg[phase][field] <= 0:
                return "-"
            return f"{r[phase][field] / meg[phase][field]:.2f}"

        lines.append(
            f"| {r['tokens']} x {r['vt']} | {r['tp']} | {r['variant']} "
            f"| {r['fwd']['time_s'] * 1e3:.0f} | {r['fwd']['peak_extra_mib']:.0f} "
            f"| {r['fwd+bwd']['time_s'] * 1e3:.0f} | {r['fwd+bwd']['peak_extra_mib']:.0f} "
            f"| {max(0.0, r['fwd+bwd']['peak_extra_mib'] - r['grad_mib']):.0f} "
            f"| {ratio('fwd', 'time_s')} / {ratio('fwd+bwd', 'time_s')} "
            f"| {ratio('fwd', 'peak_extra_mib')} / {ratio('fwd+bwd', 'peak_extra_mib')} |"
        )
    grads = sorted({(r["tokens"], r["vt"], r["grad_mib"]) for r in results})
    lines.append("")
    lines.append(
        "The fwd+bwd peak includes the logits' gradient itself (input dtype): "
        + ", ".join(f"{t} x {v}: {g:.0f} MiB" for t, v, g in grads)
        + "."
    )
    if not all(r.get("cpu_peak_reset", True) for r in results):
        lines.append("WARNING: /proc/self/clear_refs was not writable: CPU peaks are lifetime peaks.")
    return "\n".join(lines)


#: glibc adapts its mmap threshold (up to 32 MiB) to the sizes freed: freed tensors below it
#: stay resident and hide later allocations from RSS. A fixed 1 MiB threshold makes every
#: tensor above 1 MiB an mmap that is returned to the OS on free (glibc reads it at start-up,
#: hence the re-exec). It applies to every variant alike.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


def main(argv=None):
    if argv is None and "--no-malloc-env" not in sys.argv:
        common.reexec_with_env(_MALLOC_ENV)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16")
    p.add_argument("--sizes", default="4096x32768,16384x38016", help="tokens x V/tp, comma separated")
    p.add_argument("--tp", default="1,2", help="TP degrees, comma separated (CUDA: needs that many GPUs)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument(
        "--repeats", type=int, default=0,
        help="timed repeats per phase (best is reported); 0 = 3 for sizes <= 2^28 elements, else 1",
    )
    p.add_argument("--chunk-size", type=int, default=None, help="our op's chunk size (default: automatic)")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument(
        "--no-malloc-env", action="store_true",
        help="CPU: do not re-exec with a fixed glibc mmap threshold (peaks then miss reused memory)",
    )
    args = p.parse_args(argv)
    args.dtype = args.dtype or "bf16"
    args.sizes = common.parse_sizes(args.sizes)
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    print(common.run_header("bench_logprobs", args.device), flush=True)
    t0 = time.time()
    results = []
    for tp in common.tp_degrees(args.tp, args.device):
        results += run_tp(args, tp)
    common.finish(results, markdown(results, args), args.json, t0)


if __name__ == "__main__":
    main()
