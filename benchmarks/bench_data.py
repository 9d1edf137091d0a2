#!/usr/bin/env python
"""Data-pipeline throughput: tokenised samples/s and tokens/s, cold cache vs warm cache.

    python benchmarks/bench_data.py [--samples 10000] [--tokenizer hf|spm] [--json out.json]

Generates ``--samples`` arithmetic/copy samples (half ``messages`` multi-turn, half
prompt/response, responses of a few dozen to a few hundred words) into a temporary JSONL,
then times:

- cold: read + schema + chat template + tokenise + write the memory-mapped cache;
- warm: open the cache (memory-mapped) -- the path a restart or a second rank takes;
- build: the length policy + packing over the cached samples;
- collate: packed micro-batches per second.

The tokenizer is the bundled tiny one (examples/data/tiny_tokenizer, byte-level BPE with a
ChatML template) or the bundled SentencePiece model; a real 150k-vocab tokenizer is slower per
token in the Rust encoder, so treat these numbers as the pipeline's overhead on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

from psft_megatron.data import DataConfig, SFTDataset, TokenizerConfig, build_tokenizer  # noqa: E402
from psft_megatron.data.dataset import load_or_tokenize  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river",
         "stone", "bird", "fish", "apple", "lemon", "cloud", "rain", "7", "12", "+", "=", "so", "then"]


def generate(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            resp = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 300)))
            prompt = "Solve: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            if i % 2:
                rec = {"messages": [{"role": "system", "content": "Think step by step."},
                                    {"role": "user", "content": prompt}, {"role": "assistant", "content": resp}]}
            else:
                rec = {"prompt": prompt, "response": resp}
            f.write(json.dumps(rec) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--tokenizer", choices=("hf", "spm"), default="hf")
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    if args.tokenizer == "hf":
        tok_cfg = TokenizerConfig(library="huggingface", model=os.path.join(REPO, "examples/data/tiny_tokenizer"))
    else:
        tok_cfg = TokenizerConfig(library="sentencepiece", model=os.path.join(REPO, "examples/data/tiny_spm/tiny.model"))
    tok = build_tokenizer(tok_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.jsonl")
        generate(data, args.samples)
        cfg = DataConfig(file_names=[data], cache_dir=os.path.join(tmp, "cache"), max_seq_length=args.max_seq_length,
                         packing=True)
        t0 = time.perf_counter()
        store, info = load_or_tokenize(cfg, tok, tok_cfg)
        cold = time.perf_counter() - t0
        assert not info["cache_hit"]
        t0 = time.perf_counter()
        store, info = load_or_tokenize(cfg, tok, tok_cfg)
        warm = time.perf_counter() - t0
        assert info["cache_hit"]
        t0 = time.perf_counter()
        ds = SFTDataset(store, cfg, pad_id=tok.pad_id if tok.pad_id is not None else tok.eos_id)
        build = time.perf_counter() - t0
        ds.collate([0])  # first call imports megatron's PackedSeqParams
        t0 = time.perf_counter()
        n_rows = min(len(ds), 500)
        for r in range(n_rows):
            ds.collate([r])
        collate = time.perf_counter() - t0
        tokens = int(store.offsets[-1])
        res = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "tokenizer": args.tokenizer, "samples": len(store), "tokens": tokens,
            "cold_s": round(cold, 3), "cold_samples_per_s": round(len(store) / cold),
            "cold_tokens_per_s": round(tokens / cold),
            "warm_s": round(warm, 4), "warm_samples_per_s": round(len(store) / warm),
            "warm_tokens_per_s": round(tokens / warm),
            "build_s": round(build, 3), "packed_rows": len(ds), "packing_efficiency": ds.report()["packing"]["efficiency"],
            "collate_rows_per_s": round(n_rows / collate),
        }
    for k, v in res.items():
        print(f"{k:>22}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
