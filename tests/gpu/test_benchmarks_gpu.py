"""GPU: the benchmarks of the loss and of the optimizer step run on CUDA (small sizes here; the
full runs and their numbers are in docs/benchmarks.md)."""

import subprocess
import sys

from tests.parallel.launch import REPO


def _run(cmd, timeout=900):
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_logprob_benchmark_runs_on_cuda():
    out = _run([sys.executable, "benchmarks/bench_logprobs.py", "--device", "cuda", "--sizes", "1024x8192",
                "--tp", "1"])
    assert "ours" in out and "megatron" in out


def test_step_benchmark_runs_on_cuda():
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                "benchmarks/bench_step.py", "--rounds", "1", "--steps", "8", "--precision", "bf16"])
    assert "psft_k4" in out and "psft_k8" in out
