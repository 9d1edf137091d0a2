"""GPU: the fused output layer + log-prob op on CUDA equals the CPU run (values, both gradients),
including the half-precision path (bf16 GEMMs with fp32 products), and its benchmark runs."""

import subprocess
import sys

import pytest
import torch

from psft_megatron.ops import fused_linear_logprobs
from tests.parallel.launch import REPO


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_op_on_cuda_matches_cpu(dtype, masked):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(700, 64, generator=g).to(dtype)
    w = (torch.randn(3000, 64, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, 3000, (700,), generator=g)
    mask = (torch.rand(700, generator=g) > 0.5) if masked else None
    g_lp = torch.randn(700, generator=g)
    out = {}
    for device in ("cpu", "cuda"):
        hx, wx = h.to(device).requires_grad_(), w.to(device).requires_grad_()
        lp, ent = fused_linear_logprobs(hx, wx, y.to(device), mask=None if mask is None else mask.to(device),
                                        return_entropy=True, chunk_size=256, vocab_block_size=1024)
        (lp * g_lp.to(device)).sum().backward()
        out[device] = [t.detach().float().cpu() for t in (lp, ent, hx.grad, wx.grad)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for cpu, gpu in zip(out["cpu"][:2], out["cuda"][:2]):
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 2e-2)
    for cpu, gpu in zip(out["cpu"][2:], out["cuda"][2:]):
        torch.testing.assert_close(gpu, cpu, **tol)


def test_fused_benchmark_runs_on_cuda():
    proc = subprocess.run([sys.executable, "benchmarks/bench_fused_logprobs.py", "--device", "cuda", "--sizes",
                           "1024x8192", "--hidden", "512", "--tp", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "fused" in proc.stdout and "megatron" in proc.stdout
