"""PSFT vs SFT optimizer-step time, side by side in one run (same model, data and layout).

    torchrun --nproc_per_node 1 benchmarks/bench_step.py                 # CPU, one process
    torchrun --nproc_per_node 2 benchmarks/bench_step.py --tp 2          # CPU, TP=2 + SP over gloo
    torchrun --nproc_per_node 8 benchmarks/bench_step.py --hidden 2048 --layers 8 --seq 4096 --synthetic 4000  # GPU
    torchrun --nproc_per_node 1 benchmarks/bench_step.py --precision bf16 --fp8 hybrid        # GPU, FP8 (TE)

PSFT with K steps per old-policy window costs K-1 extra forward-only passes per window; with a
forward at ~1/3 of forward+backward the expected ratio is 1 + (K-1)/(3K) (verl-style passes cost
K/(3K)). Target: PSFT / SFT <= 1 + (K-1)/(3K) + 0.05 for K = 4 and 8. Variants run interleaved
(round-robin, several rounds) so machine noise hits them alike; per-round ratios to SFT are
reported as medians, for wall time and for CPU time summed over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from psft_megatron.config import load_run_config  # noqa: E402
from psft_megatron.training.trainer import Trainer  # noqa: E402


def build(args, loss_overrides):
    overrides = [
        f"trainer.max_steps={args.steps}", "trainer.val_check_interval=0", "trainer.progress_bar=false",
        "trainer.devices=null", f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={4 * args.hidden}", f"model.num_attention_heads={max(4, args.hidden // 64)}",
        f"model.num_query_groups={max(2, args.hidden // 256)}", f"model.tensor_model_parallel_size={args.tp}",
        f"model.sequence_parallel={'true' if args.tp > 1 else 'false'}",
        f"model.data.train_ds.max_seq_length={args.seq}", "model.data.train_ds.packing=true",
        f"model.max_position_embeddings={args.seq}", f"model.global_batch_size={args.global_batch}",
        "exp_manager.create_tensorboard_logger=false", f"exp_manager.explicit_log_dir={args.log_dir}",
        "trainer.precision=" + args.precision, f"model.layer_spec={args.layer_spec or 'null'}",
    ] + (["model.fp8=" + args.fp8, "model.fp8_recipe=" + args.fp8_recipe] if args.fp8 else []) + loss_overrides
    if args.synthetic:
        overrides.append(f"model.data.train_ds.file_names=[{synthetic_data(args)}]")
    cfg, raw = load_run_config(os.path.join(os.path.dirname(__file__), "..", "configs"), "tiny_cpu", overrides)
    trainer = Trainer(cfg, raw)
    trainer.setup()
    return trainer


def synthetic_data(args) -> str:
    """``args.synthetic`` generated chat samples (30-300 words each; benchmarks/bench_data.py's
    generator) in a JSONL file of this rank: the bundled tiny set fills only a few long rows."""
    from benchmarks.bench_data import generate

    os.makedirs(args.log_dir, exist_ok=True)
    path = os.path.join(args.log_dir, f"synthetic_{args.synthetic}_rank{os.environ.get('RANK', '0')}.jsonl")
    if not os.path.exists(path):
        generate(path, args.synthetic)
    return path


def timed_round(trainer) -> tuple:
    """(wall seconds per step, CPU seconds per step summed over ranks) of one round."""
    from psft_megatron.distributed.runtime import all_reduce_values

    trainer.step = 0
    torch.distributed.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    (cpu,) = all_reduce_values([time.process_time() - cpu_start])  # on the device, as NCCL needs
    torch.distributed.barrier()
    return (time.perf_counter() - start) / trainer.step, cpu / trainer.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per round (multiple of 8)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--precision", default="32")
    parser.add_argument("--log-dir", default="/tmp/psft_bench_step")
    parser.add_argument("--synthetic", type=int, default=0,
                        help="train on this many generated samples instead of the bundled tiny set (long --seq)")
    parser.add_argument("--layer-spec", default=None, choices=["te", "local", "cpu"],
                        help="default: the machine's (te with CUDA + TE, local with CUDA, else cpu)")
    parser.add_argument("--fp8", default=None, choices=["e4m3", "hybrid"], help="FP8 format (needs TE and an FP8 GPU)")
    parser.add_argument("--fp8-recipe", default="delayed", choices=["delayed", "tensorwise", "blockwise", "mxfp8"])
    parser.add_argument("--json", default=None, help="also write the per-round times (rank 0) to this file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    variants = {"sft": ["model.psft.loss=sft"],
                "psft_k4": ["model.psft.loss=psft", "model.psft.old_policy_interval=4"],
                "psft_k8": ["model.psft.loss=psft", "model.psft.old_policy_interval=8"]}
    trainers = {name: build(args, o) for name, o in variants.items()}
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            times[name].append(timed_round(trainer))
    if torch.distributed.get_rank() == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\n{device}, world {torch.distributed.get_world_size()}, TP={args.tp}, layers {args.layers}, "
              f"hidden {args.hidden}, seq {args.seq}, global batch {args.global_batch}, precision {args.precision}, "
              f"layer spec {trainers['sft'].tm.layer_spec}, FP8 {trainers['sft'].fp8.describe()}, "
              f"{args.rounds} rounds x {args.steps} steps, load average {load:.1f}, {time.strftime('%Y-%m-%d')}")
        print("Ratios are medians of per-round ratios to the SFT round just before (wall) and of CPU time "
              "summed over ranks (robust to other tenants on a shared CPU).")
        print("| variant | wall s/step (median) | wall vs SFT | CPU s/step (median) | CPU vs SFT | target |")
        print("|---|---|---|---|---|---|")
        for name in variants:
            k = {"sft": 1, "psft_k4": 4, "psft_k8": 8}[name]
            target = 1 + (k - 1) / (3 * k) + 0.05 if k > 1 else 1.0
            wall = statistics.median(t[0] for t in times[name])
            cpu = statistics.median(t[1] for t in times[name])
            wall_ratio = statistics.median(a[0] / b[0] for a, b in zip(times[name], times["sft"]))
            cpu_ratio = statistics.median(a[1] / b[1] for a, b in zip(times[name], times["sft"]))
            print(f"| {name} | {wall:.4f} | {wall_ratio:.3f} | {cpu:.4f} | {cpu_ratio:.3f} | "
                  f"{'<= %.3f' % target if k > 1 else '-'} |")
        if args.json:
            write_json(args.json, trainers, times)
    for trainer in trainers.values():
        trainer.close()


def write_json(path: str, trainers: dict, times: dict) -> None:
    """Per variant: optimizer steps trained, and (wall s/step, CPU s/step summed over ranks) per
    round; the device, layer spec and FP8 setting the runs used."""
    sft = trainers["sft"]
    out = {"device": str(sft.info.device), "layer_spec": sft.tm.layer_spec, "fp8": sft.fp8.describe(),
           "variants": {name: {"steps": trainer.step, "rounds": [list(t) for t in times[name]]}
                        for name, trainer in trainers.items()}}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
