"""GPU: the fused output layer + log-prob op on CUDA against a float64 reference (values, both
gradients) at its default CUDA tile sizes, over several row chunks and vocabulary blocks with
remainders, in fp32 and bf16 (bf16 GEMMs with fp32 products), with and without a row mask; and
its benchmark runs on CUDA and reports every variant."""

import json
import math
import subprocess
import sys

import pytest
import torch

from psft_megatron.ops import fused_linear_logprobs
from psft_megatron.ops.fused_linear_logprobs import default_fused_tiles
from tests.gpu.tolerances import assert_accurate
from tests.parallel.launch import REPO

# more than two tiles of the CUDA defaults (1024 rows x 8192 vocabulary entries) each way, and
# neither a multiple of them: full tiles and remainders
ROWS, VOCAB, HIDDEN = 2100, 17000, 64


def _inputs(dtype, masked):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(ROWS, HIDDEN, generator=g).to(dtype)
    w = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, VOCAB, (ROWS,), generator=g)
    mask = (torch.rand(ROWS, generator=g) > 0.5) if masked else None
    return h, w, y, mask, torch.randn(ROWS, generator=g)


def _plain(h, w, y, mask, g_lp, dtype=None):
    """Log-probs, entropies and the gradients of sum(g_lp * logp) through materialised logits:
    ``dtype`` None keeps the inputs' (the unfused half-precision path: logits in that dtype,
    softmax in fp32, gradients back in it); torch.float64 gives the reference."""
    hx, wx = (t.to(dtype or t.dtype).requires_grad_() for t in (h, w))
    logp_all = torch.log_softmax((hx @ wx.T).to(dtype or torch.float32), dim=-1)
    lp, ent = logp_all.gather(-1, y[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)
    if mask is not None:  # masked rows: 0 and no gradient
        lp, ent = lp * mask, ent * mask
    (lp * g_lp.to(lp.dtype)).sum().backward()
    return [lp.detach(), ent.detach(), hx.grad, wx.grad]


def check_fused_op(device, dtype, masked) -> dict:
    """The op on ``device`` at its default tiles against float64 (tests/gpu/tolerances.py):
    relative errors of the log-probs, entropies and both gradients."""
    rows, block = default_fused_tiles(device)
    assert ROWS > 2 * rows and VOCAB > 2 * block and ROWS % rows and VOCAB % block, (rows, block)
    h, w, y, mask, g_lp = (None if t is None else t.to(device) for t in _inputs(dtype, masked))
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fused_linear_logprobs(hx, wx, y, mask=mask, return_entropy=True, rows_match_labels=True)
    (lp * g_lp).sum().backward()
    assert lp.dtype == ent.dtype == torch.float32 and hx.grad.dtype == wx.grad.dtype == dtype
    want = _plain(h, w, y, mask, g_lp, torch.float64)
    plain = _plain(h, w, y, mask, g_lp) if dtype != torch.float32 else [None] * 4
    names = ("logp", "entropy", "hidden grad", "weight grad")
    return {name: assert_accurate(got, ref, f"{device} {dtype} masked={masked} {name}", base)
            for name, got, ref, base in zip(names, (lp, ent, hx.grad, wx.grad), want, plain)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_op_on_cuda_matches_float64(dtype, masked):
    print(check_fused_op("cuda", dtype, masked))


def test_fused_benchmark_runs_on_cuda(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_fused_logprobs.py", "--device", "cuda", "--sizes",
                           "1024x8192", "--hidden", "512", "--tp", "1", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = json.loads(out.read_text())
    variants = [r["variant"] for r in rows]
    for name in ("megatron", "unfused", "fused"):  # the comparison the benchmark is for
        assert variants.count(name) == 1, variants
    for row in rows:
        assert (row["tokens"], row["vt"], row["hidden"], row["tp"]) == (1024, 8192, 512, 1), row
        for phase in ("fwd", "fwd+bwd"):
            if phase in row:
                assert math.isfinite(row[phase]["time_s"]) and row[phase]["time_s"] > 0, row
    assert all("fwd+bwd" in r for r in rows if r["variant"] in ("megatron", "unfused", "fused")), rows
