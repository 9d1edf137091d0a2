"""GPU: the benchmarks of the loss and of the optimizer step run on CUDA and report every variant
(small sizes here; the full runs and their numbers are in docs/benchmarks.md). Checked on their
JSON output, not on words in their tables."""

import json
import math
import subprocess
import sys

from tests.parallel.launch import REPO


def _run(cmd, timeout=900):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def _positive(seconds) -> bool:
    return math.isfinite(seconds) and seconds > 0


def test_logprob_benchmark_runs_on_cuda(tmp_path):
    out = tmp_path / "bench.json"
    _run([sys.executable, "benchmarks/bench_logprobs.py", "--device", "cuda", "--sizes", "1024x8192", "--tp", "1",
          "--json", str(out)])
    rows = json.loads(out.read_text())
    assert sorted(r["variant"] for r in rows) == sorted(["ours+H", "ours", "megatron", "torch"]), rows
    for row in rows:
        assert (row["tokens"], row["vt"], row["tp"]) == (1024, 8192, 1), row
        assert _positive(row["fwd"]["time_s"]) and _positive(row["fwd+bwd"]["time_s"]), row


def test_step_benchmark_runs_on_cuda(tmp_path):
    out = tmp_path / "bench.json"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
          "benchmarks/bench_step.py", "--rounds", "1", "--steps", "8", "--precision", "bf16",
          "--log-dir", str(tmp_path / "runs"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["device"] == "cuda:0" and result["layer_spec"] in ("te", "local"), result
    assert set(result["variants"]) == {"sft", "psft_k4", "psft_k8"}, result
    for name, variant in result["variants"].items():
        assert variant["steps"] == 8 and len(variant["rounds"]) == 1, (name, variant)
        assert all(_positive(wall) and _positive(cpu) for wall, cpu in variant["rounds"]), (name, variant)
