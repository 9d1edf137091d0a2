#!/usr/bin/env python
"""Time and peak RSS of the HF <-> Megatron converters on a generated ~1B-parameter model.

    python benchmarks/bench_convert.py [--workdir DIR] [--layers 16] [--shard-size 1GB] [--json out.json]

1. Generates a random Llama-3.2-1B-shaped HF model (hidden 2048, 16 layers, 32 heads / 8 KV
   heads, ffn 8192, vocab 128256, tied embeddings, llama3 RoPE scaling; 1.24 B parameters,
   bf16) as sharded safetensors, streaming (no model object is built).
2. Runs ``tools/convert_hf_to_megatron.py`` and ``tools/convert_megatron_to_hf.py`` each in its
   own process and records wall time and peak RSS (``VmHWM`` of that process), next to
   the peak RSS of a process that only imports the same libraries and brings up the
   megatron runtime (the fixed cost) and to the model / largest shard / largest layer sizes.
3. Checks the round trip HF -> Megatron -> HF bit-exact, tensor by tensor.

glibc's mmap threshold is fixed at 1 MiB in the children (``MALLOC_MMAP_THRESHOLD_``) so that
freed tensors leave RSS, as in the other benchmarks. Run by hand; needs ~8 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

CHILD = r"""
import json, runpy, sys, time
tool, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [tool] + args
start, rc = time.time(), 0
if tool == "--imports-only":
    import torch, megatron.core, transformers, safetensors  # noqa
    from psft_megatron.convert import megatron_io, hf_to_megatron, megatron_to_hf  # noqa
    megatron_io.ensure_world_of_one()
else:
    try:
        runpy.run_path(tool, run_name="__main__")
    except SystemExit as e:
        rc = e.code or 0
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]  # KiB, this exec only
json.dump({"rc": rc, "seconds": time.time() - start, "peak_rss_mib": hwm / 1024}, open(out, "w"))
"""


def llama_1b_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "dtype": "bfloat16",
    }


def generate(hf_dir: str, config: dict, shard_bytes: int) -> dict:
    """Random bf16 weights written shard by shard; returns sizes."""
    import torch

    from psft_megatron.convert import mapping
    from psft_megatron.convert.hf_config import model_config_from_hf
    from psft_megatron.convert.hf_io import ShardedSafetensorsWriter

    cfg, _ = model_config_from_hf(config)
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    gen = torch.Generator().manual_seed(0)
    writer = ShardedSafetensorsWriter(hf_dir, shard_bytes)
    params, layer_bytes = 0, {}
    for name, shape in mapping.hf_shapes(cfg).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        params += t.numel()
        key = name.split(".")[2] if name.startswith("model.layers.") else name
        layer_bytes[key] = layer_bytes.get(key, 0) + t.numel() * 2
        writer.add(name, t)
    files = writer.close()
    sizes = [os.path.getsize(os.path.join(hf_dir, f)) for f in files]
    per_layer = max(v for k, v in layer_bytes.items() if k.isdigit())
    return {"params": params, "model_bytes": sum(sizes), "largest_shard_bytes": max(sizes), "shards": len(files),
            "largest_layer_bytes": per_layer, "embedding_bytes": layer_bytes[mapping.HF_EMBEDDING]}


def run_child(tool: str, args, workdir: str) -> dict:
    out = os.path.join(workdir, "child.json")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1024 * 1024), OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO)
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, tool, out, *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0 or not os.path.exists(out):
        raise SystemExit(f"{tool} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    if result["rc"]:
        raise SystemExit(f"{tool} exited {result['rc']}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    result["process_wall_s"] = wall
    return result


def compare(src: str, dst: str) -> int:
    """Number of tensors differing (dtype or bits) between two HF dirs, read one tensor at a time."""
    import torch

    from psft_megatron.convert.hf_io import SafetensorsReader

    a, b = SafetensorsReader(src), SafetensorsReader(dst)
    if set(a.names()) != set(b.names()):
        return -1
    bad = 0
    for name in a.names():
        x, y = a.get(name), b.get(name)
        bad += not (x.dtype == y.dtype and torch.equal(x, y))
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shard-size", default="1GB", help="shard size of the generated and the exported model")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from tools.convert_megatron_to_hf import parse_size

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    hf_dir, ckpt, back = (os.path.join(workdir, x) for x in ("hf", "megatron", "hf_back"))
    for d in (hf_dir, ckpt, back):
        shutil.rmtree(d, ignore_errors=True)
    t = time.time()
    sizes = generate(hf_dir, llama_1b_config(args.layers), parse_size(args.shard_size))
    sizes["generate_s"] = time.time() - t
    base = run_child("--imports-only", [], workdir)
    imp = run_child(os.path.join(REPO, "tools/convert_hf_to_megatron.py"),
                    ["--hf-dir", hf_dir, "--out", ckpt, "--json", os.path.join(workdir, "imp.json")], workdir)
    imp["convert_s"] = json.load(open(os.path.join(workdir, "imp.json")))["seconds"]
    exp = run_child(os.path.join(REPO, "tools/convert_megatron_to_hf.py"),
                    ["--ckpt", ckpt, "--out", back, "--max-shard-size", args.shard_size,
                     "--json", os.path.join(workdir, "exp.json")], workdir)
    exp["convert_s"] = json.load(open(os.path.join(workdir, "exp.json")))["seconds"]
    differing = compare(hf_dir, back)
    mib = 1024 ** 2
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"), "sizes": sizes, "baseline": base, "hf_to_megatron": imp,
              "megatron_to_hf": exp, "round_trip_differing_tensors": differing}
    print(json.dumps(result, indent=2))
    print()
    print(f"model: {sizes['params'] / 1e9:.2f} B params, bf16 {sizes['model_bytes'] / mib:.0f} MiB in "
          f"{sizes['shards']} shards (largest {sizes['largest_shard_bytes'] / mib:.0f} MiB); largest layer "
          f"{sizes['largest_layer_bytes'] / mib:.0f} MiB; embedding {sizes['embedding_bytes'] / mib:.0f} MiB")
    print("| direction | convert s | process wall s | peak RSS MiB | peak RSS - imports MiB | peak RSS / model size |")
    print("|---|---|---|---|---|---|")
    print(f"| imports + runtime only | - | {base['process_wall_s']:.1f} | {base['peak_rss_mib']:.0f} | 0 | - |")
    for label, r in (("HF -> Megatron", imp), ("Megatron -> HF", exp)):
        print(f"| {label} | {r['convert_s']:.1f} | {r['process_wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_mib'] - base['peak_rss_mib']:.0f} | {r['peak_rss_mib'] * mib / sizes['model_bytes']:.2f} |")
    print(f"round trip: {differing} tensors differ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
