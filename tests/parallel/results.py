"""What the parity workers report and how the tests judge it, shared by the dense
(tests/parallel/parity_worker.py) and MoE (tests/parallel/moe_parity_worker.py) suites.

A worker fills ``results = {"layouts": {name: entry}, "checkpoints": {name: entry}}``; an entry
holds ``max_abs_diff`` (or ``error`` and ``traceback``), and a checkpoint entry holds one
sub-entry per load (``max_abs_diff``, ``iteration``), ``<layout>_weights_only`` for the load
without optimizer state.
"""

from __future__ import annotations

import json
import os
import shutil
import sys


def error_entry(exc: BaseException, case: str = "") -> dict:
    """A failed layout or scenario as an entry: the test prints the error and the traceback.

    With several ranks, an exception is rank-local as often as not (an unpacking error on the
    last pipeline stage only): the other ranks wait in a collective for this one, and a worker
    that went on to its next case would hang the launch until the test's hang guard (half an
    hour) while every later test waits. So with several ranks the failing rank prints the case,
    its rank and the traceback, and ends the job at once: torchrun stops the other ranks and
    the test reports the log's tail. One process: the entry, and the worker goes on.
    """
    import traceback

    entry = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    abort_if_distributed(case, entry)
    return entry


def abort_if_distributed(case: str, entry: dict) -> None:
    """End a multi-rank worker after a failed ``case`` (see error_entry): print it, exit 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        print(f"[rank {dist.get_rank()}] case {case or '?'} failed; stopping the job (the other ranks "
              f"would wait for this one):\n{entry['error']}\n{entry['traceback']}", file=sys.stderr, flush=True)
        os._exit(1)


def load_diffs(entry: dict) -> dict:
    """``{load name: max_abs_diff}`` of a checkpoint entry's loads (for the progress line)."""
    return {k: v["max_abs_diff"] for k, v in entry.items() if isinstance(v, dict) and "max_abs_diff" in v}


def write_results(results: dict, out: str, workdir: str, rank: int) -> None:
    """Rank 0 writes ``results`` as JSON to ``out`` and removes ``workdir``; all ranks meet after."""
    import torch

    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        shutil.rmtree(workdir, ignore_errors=True)
    torch.distributed.barrier()


def check_planted(diff: float, plant: str, tolerance: float) -> None:
    """A planted bug must move the metrics well past the tolerance: the harness can fail."""
    assert diff > 10 * tolerance, f"planted bug {plant!r} went unnoticed: diff {diff:.3g}"


def check_loads(loads: dict, tolerance: float, iteration: int, context=None) -> None:
    """Every load resumes at ``iteration``; those with optimizer state continue within
    ``tolerance``, a weights-only load must differ (without the Adam state the continuation
    cannot match: the check can fail). ``context`` is added to failure messages."""
    assert loads, "no loads reported"
    for key, load in loads.items():
        assert load["iteration"] == iteration, (key, load)
        if key.endswith("_weights_only"):
            assert load["max_abs_diff"] > 10 * tolerance, (key, load)
        else:
            assert load["max_abs_diff"] <= tolerance, (key, load, context)
