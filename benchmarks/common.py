"""What the benchmarks share: the machine line, a re-exec with a fixed environment, TP runs over
spawned ranks merged into one row per case, peak RSS, and the end of a run (table, JSON).

Every benchmark is run by hand (``python benchmarks/bench_*.py``); none is part of the suite.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import socket
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_description(device: str = "cpu") -> str:
    """``<CPU model>, <n> cores`` (or ``<GPU name> xN`` for ``device`` ``cuda``)."""
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            model = m.group(1).strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def run_header(name: str, device: str = "cpu") -> str:
    """One line naming the benchmark, its arguments, the machine, the date and the load."""
    return (f"{name}: {' '.join(sys.argv[1:]) or '(defaults)'}; machine: {machine_description(device)}; "
            f"date: {datetime.date.today().isoformat()}; 1-minute load {os.getloadavg()[0]:.1f}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reexec_with_env(env: Dict[str, str]) -> None:
    """Re-run this script with ``env`` added, unless it is there already (glibc and OpenMP
    read their settings at start-up)."""
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **env))


def parse_sizes(text: str):
    """``"4096x32768,16384x38016"`` -> [(4096, 32768), (16384, 38016)]."""
    sizes = []
    for part in text.split(","):
        t, v = part.lower().split("x")
        sizes.append((int(t), int(v)))
    return sizes


def tp_degrees(text: str, device: str) -> List[int]:
    """TP degrees from ``"1,2"``; on CUDA only those the GPUs allow."""
    tps = [int(t) for t in text.split(",")]
    if device == "cuda":
        import torch

        tps = [t for t in tps if t <= torch.cuda.device_count()] or [1]
    return tps


def run_tp(worker: Callable, args, tp: int, phases: Sequence[str], fields: Sequence[str]) -> List[dict]:
    """Run ``worker(rank, args, tp, port, outdir)`` on ``tp`` ranks (in this process for 1,
    spawned processes otherwise); each rank writes ``rank<r>.json`` (a list of rows, same order
    on every rank). Returns one row per case: rank 0's, with every ``phases`` entry's ``fields``
    the largest over the ranks (the slowest rank's time, the largest memory)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        port = free_port()
        if tp == 1:
            worker(0, args, 1, port, outdir)
        else:
            mp.spawn(worker, args=(args, tp, port, outdir), nprocs=tp, join=True)
        ranks = []
        for r in range(tp):
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    merged = []
    for rows in zip(*ranks):
        m = dict(rows[0])
        for phase in phases:
            if phase in m:
                m[phase] = {field: max(r[phase][field] for r in rows) for field in fields}
        merged.append(m)
    return merged


def finish(results, table: str, json_path: Optional[str], started: float) -> None:
    """The end of a run: the table, the total time, and the raw results as JSON if asked."""
    print()
    print(table)
    print(f"\n(total wall time {time.time() - started:.0f} s)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its waited-for children, in seconds."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident memory of this process (``children``: of its largest waited-for child)
    in MiB (Linux reports KiB)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / 1024
