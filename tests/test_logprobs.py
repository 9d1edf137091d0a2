"""Tests of psft_megatron.ops: vocab-parallel log-probs, entropy, full-vocabulary KL (both
directions) and the entropy of the top-k distribution (EAFT's gate).

Every value and gradient is compared with a float64 full-vocabulary reference
(log_softmax + gather; entropy and KL from the softmax; top-k from a full sort). Tensor parallelism runs in ONE
gloo spawn per world size (2 and 4) that checks all TP cases and reports back.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist

from psft_megatron.ops import default_chunk_size, vocab_parallel_kl, vocab_parallel_logprobs, vocab_parallel_topk_entropy
from tests.parallel.launch import cpu_spawn


# --------------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------------
def ref_logprobs(logits: torch.Tensor, labels: torch.Tensor):
    """float64 logp (0 for labels outside [0, V)) and entropy of the full distribution."""
    z = logits.double()
    logsm = torch.log_softmax(z, dim=-1)
    v = z.shape[-1]
    valid = (labels >= 0) & (labels < v)
    lp = logsm.gather(-1, labels.clamp(0, v - 1).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    ent = -(logsm.exp() * logsm).sum(-1)
    return lp, ent


def ref_kl(logits: torch.Tensor, ref_logits: torch.Tensor):
    lp = torch.log_softmax(logits.double(), dim=-1)
    lq = torch.log_softmax(ref_logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def ref_reverse_kl(logits: torch.Tensor, ref_logits: torch.Tensor):
    """float64 KL(q || p) = sum_j q_j (log q_j - log p_j), p = softmax(logits), q = softmax(ref)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    lq = torch.log_softmax(ref_logits.double(), dim=-1)
    return (lq.exp() * (lq - lp)).sum(-1)


def ref_topk_entropy(logits: torch.Tensor, k: int):
    """float64 entropy of the softmax over each row's k largest logits (a full descending sort)."""
    top = torch.sort(logits.double(), dim=-1, descending=True).values[..., :k]
    lq = torch.log_softmax(top, dim=-1)
    return -(lq.exp() * lq).sum(-1)


def ref_grads(logits, labels, g_lp, g_ent):
    z = logits.detach().double().requires_grad_(True)
    lp, ent = ref_logprobs(z, labels)
    loss = (lp * g_lp.double()).sum()
    if g_ent is not None:
        loss = loss + (ent * g_ent.double()).sum()
    loss.backward()
    return lp.detach(), ent.detach(), z.grad


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = ""):
    """|a - e| <= rtol * max(|e|, 1) elementwise (values), for float64 comparisons."""
    a = actual.double()
    e = expected.double()
    err = (a - e).abs()
    bound = rtol * e.abs().clamp_min(1.0)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: max error {err.max().item():.3e} exceeds rtol {rtol} (ratio {worst:.2f})"


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = ""):
    """Gradient check scaled by the largest reference entry: |a - e| <= rtol * max|e|."""
    a = actual.double()
    e = expected.double()
    scale = e.abs().max().clamp_min(1e-30)
    err = (a - e).abs().max()
    assert torch.isfinite(a).all(), f"{what}: non-finite gradient"
    assert err <= rtol * scale, f"{what}: max grad error {err.item():.3e} > {rtol} * {scale.item():.3e}"


FP32_RTOL = 1e-6
BF16_GRAD_RTOL = 1e-2  # the gradient is rounded to bf16 (8 bits of mantissa)


def make_case(shape, v, dtype, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, shape, generator=g)
    g_lp = torch.randn(*shape, generator=g)
    g_ent = torch.randn(*shape, generator=g)
    return logits, labels, g_lp, g_ent


# --------------------------------------------------------------------------------------------
# single rank
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bs", "sb", "sb_view"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_values_and_grads_match_float64_reference(dtype, layout, chunk_size):
    b, s, v = 3, 10, 300  # 30 tokens: chunk 7 does not divide them
    logits, labels, g_lp, g_ent = make_case((b, s), v, dtype, seed=1)
    if layout == "sb":
        logits, labels, g_lp, g_ent = make_case((s, b), v, dtype, seed=2)
    elif layout == "sb_view":  # a non-contiguous [s, b, V] view of a [b, s, V] tensor
        logits, labels, g_lp, g_ent = (t.transpose(0, 1) for t in (logits, labels, g_lp, g_ent))
    x = logits.detach().clone().requires_grad_(True) if layout != "sb_view" else logits.requires_grad_(True)
    before = x.detach().clone()

    lp, ent = vocab_parallel_logprobs(x, labels, return_entropy=True, chunk_size=chunk_size)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == labels.shape and ent.shape == labels.shape
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()

    r_lp, r_ent, r_grad = ref_grads(before, labels, g_lp, g_ent)
    # forward runs in fp32 from the exact input values: fp32 accuracy for bf16 inputs too
    assert_rel(lp, r_lp, FP32_RTOL, "logp")
    assert_rel(ent, r_ent, FP32_RTOL, "entropy")
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert_grad_close(x.grad, r_grad, FP32_RTOL if dtype == torch.float32 else BF16_GRAD_RTOL, "grad")
    assert torch.equal(x.detach(), before), "input logits were modified"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logp_only_and_entropy_only_gradients(dtype):
    logits, labels, g_lp, g_ent = make_case((4, 9), 128, dtype, seed=3)
    # logp only (return_entropy=False)
    x = logits.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(x, labels, chunk_size=5)
    (lp * g_lp).sum().backward()
    r_lp, _, r_grad = ref_grads(logits, labels, g_lp, None)
    assert_rel(lp, r_lp, FP32_RTOL, "logp")
    assert_grad_close(x.grad, r_grad, FP32_RTOL if dtype == torch.float32 else BF16_GRAD_RTOL, "grad lp")
    # entropy only (logp unused)
    x = logits.clone().requires_grad_(True)
    _, ent = vocab_parallel_logprobs(x, labels, return_entropy=True, chunk_size=5)
    (ent * g_ent).sum().backward()
    z = logits.double().requires_grad_(True)
    (ref_logprobs(z, labels)[1] * g_ent.double()).sum().backward()
    assert_grad_close(x.grad, z.grad, FP32_RTOL if dtype == torch.float32 else BF16_GRAD_RTOL, "grad H")


def test_fp16_input():
    logits, labels, g_lp, g_ent = make_case((5, 6), 200, torch.float16, seed=4, scale=2.0)
    x = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(x, labels, return_entropy=True)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    r_lp, r_ent, r_grad = ref_grads(logits, labels, g_lp, g_ent)
    assert_rel(lp, r_lp, FP32_RTOL, "logp")
    assert_rel(ent, r_ent, FP32_RTOL, "entropy")
    assert x.grad.dtype == torch.float16
    assert_grad_close(x.grad, r_grad, 2e-3, "grad")


def test_larger_vocab_default_chunk():
    logits, labels, g_lp, g_ent = make_case((64,), 8192, torch.float32, seed=5, scale=3.0)
    x = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(x, labels, return_entropy=True)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    r_lp, r_ent, r_grad = ref_grads(logits, labels, g_lp, g_ent)
    assert_rel(lp, r_lp, FP32_RTOL, "logp")
    assert_rel(ent, r_ent, FP32_RTOL, "entropy")
    assert_grad_close(x.grad, r_grad, FP32_RTOL, "grad")


def test_default_chunk_size_bounds_fp32_temporary():
    assert default_chunk_size(10, 1000) == 10
    cs = default_chunk_size(1 << 20, 32768, "cuda")
    assert cs * 32768 * 4 <= 128 * 1024 * 1024 and cs >= 1
    cs = default_chunk_size(1 << 20, 32768, "cpu")
    assert cs * 32768 * 4 <= 4 * 1024 * 1024 and cs >= 1
    assert default_chunk_size(5, 1 << 30) == 1 and default_chunk_size(0, 10) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_are_finite(dtype):
    logits = torch.tensor(
        [[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, -1e4, -1e4], [1e4, 1e4, -1e4, 1e4]], dtype=dtype
    )
    labels = torch.tensor([1, 2, 3])
    x = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(x, labels, return_entropy=True, chunk_size=2)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(x.grad).all()
    r_lp, r_ent, r_grad = ref_grads(logits, labels, torch.ones(3), torch.ones(3))
    assert_rel(lp, r_lp, FP32_RTOL, "logp")
    assert_rel(ent, r_ent, FP32_RTOL, "entropy")
    assert_grad_close(x.grad, r_grad, 1e-6 if dtype == torch.float32 else BF16_GRAD_RTOL, "grad")
    # random large-magnitude logits (spread of ~1e4)
    logits, labels, g_lp, g_ent = make_case((6, 5), 64, torch.float32, seed=6, scale=5e3)
    x = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(x, labels, return_entropy=True, chunk_size=4)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    r_lp, r_ent, r_grad = ref_grads(logits, labels, g_lp, g_ent)
    assert torch.isfinite(x.grad).all()
    assert_rel(lp, r_lp, FP32_RTOL, "logp large")
    assert_rel(ent, r_ent, 1e-4, "entropy large")  # H ~ 0 at this spread: absolute error ~1e-7


def test_out_of_range_labels_have_zero_logp_and_no_logp_gradient():
    logits, labels, g_lp, g_ent = make_case((2, 5), 50, torch.float32, seed=7)
    labels[0, 1] = -100
    labels[1, 3] = 50  # == V: out of range too
    x = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs(x, labels, return_entropy=True)
    assert lp[0, 1].item() == 0.0 and lp[1, 3].item() == 0.0
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    r_lp, r_ent, r_grad = ref_grads(logits, labels, g_lp, g_ent)  # the reference zeroes them too
    assert_rel(lp, r_lp, FP32_RTOL, "logp")
    assert_grad_close(x.grad, r_grad, FP32_RTOL, "grad")


def test_no_grad_and_validation():
    logits, labels, _, _ = make_case((3, 4), 20, torch.float32, seed=8)
    with torch.no_grad():
        lp = vocab_parallel_logprobs(logits, labels)
    assert_rel(lp, ref_logprobs(logits, labels)[0], FP32_RTOL, "no_grad")
    with pytest.raises(ValueError, match="labels shape"):
        vocab_parallel_logprobs(logits, labels[:, :2])
    with pytest.raises(TypeError):
        vocab_parallel_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprobs(logits, labels, chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_kl_single_rank(dtype):
    logits, _, g, _ = make_case((4, 7), 90, dtype, seed=9)
    ref, _, _, _ = make_case((4, 7), 90, dtype, seed=10, scale=2.0)
    x = logits.clone().requires_grad_(True)
    ref_before = ref.clone()
    kl = vocab_parallel_kl(x, ref, chunk_size=5)
    (kl * g).sum().backward()
    z = logits.double().requires_grad_(True)
    r = ref_kl(z, ref)
    (r * g.double()).sum().backward()
    assert_rel(kl, r.detach(), 1e-5, "kl")
    assert_grad_close(x.grad, z.grad, 1e-5 if dtype == torch.float32 else BF16_GRAD_RTOL, "kl grad")
    assert torch.equal(x.detach(), logits) and torch.equal(ref, ref_before)
    # KL of a distribution with itself is 0, with zero gradient
    y = logits.clone().requires_grad_(True)
    kl0 = vocab_parallel_kl(y, logits)
    kl0.sum().backward()
    assert kl0.abs().max().item() < 1e-5 and y.grad.abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reverse_kl_single_rank(dtype):
    """reverse=True: KL(q || p) (ASFT's direction), gradient p - q w.r.t. the policy logits."""
    logits, _, g, _ = make_case((4, 7), 90, dtype, seed=19)
    ref, _, _, _ = make_case((4, 7), 90, dtype, seed=20, scale=2.0)
    x = logits.clone().requires_grad_(True)
    kl = vocab_parallel_kl(x, ref, chunk_size=5, reverse=True)
    (kl * g).sum().backward()
    z = logits.double().requires_grad_(True)
    r = ref_reverse_kl(z, ref)
    (r * g.double()).sum().backward()
    assert_rel(kl, r.detach(), 1e-5, "reverse kl")
    assert (r.detach() - ref_kl(logits, ref)).abs().max() > 0.1  # the two directions differ here
    assert_grad_close(x.grad, z.grad, 1e-5 if dtype == torch.float32 else BF16_GRAD_RTOL, "reverse kl grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,chunk_size", [(2, None), (20, 7), (300, 4)])
def test_topk_entropy_matches_float64_reference(dtype, k, chunk_size):
    logits, _, _, _ = make_case((3, 10), 300, dtype, seed=21, scale=3.0)
    logits[0, 0, 5:9] = logits[0, 0, 4]  # ties at the top
    x = logits.clone().requires_grad_(True)
    h = vocab_parallel_topk_entropy(x, k, chunk_size=chunk_size)
    assert h.dtype == torch.float32 and h.shape == (3, 10) and not h.requires_grad  # EAFT's gate: a constant
    # the values are read from the input dtype: fp32 accuracy for bf16 logits too
    assert_rel(h, ref_topk_entropy(logits, k), FP32_RTOL, f"top-{k} entropy")
    assert (h >= 0).all() and (h <= math.log(k) + 1e-6).all()
    if k == 300:  # k = V: the entropy of the whole distribution
        assert_rel(h, ref_logprobs(logits, torch.zeros(3, 10, dtype=torch.long))[1], FP32_RTOL, "k = V")
    assert torch.equal(x.detach(), logits)


def test_topk_entropy_refuses_k_outside_2_to_v():
    logits = torch.randn(2, 5, 30)
    for k, what in ((31, "exceeds the vocabulary"), (1, "must be an int >= 2"), (2.0, "must be an int")):
        with pytest.raises(ValueError, match=what):
            vocab_parallel_topk_entropy(logits, k)


# --------------------------------------------------------------------------------------------
# tensor parallelism: ONE spawn per world size, all cases inside
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    try:
        group = dist.new_group(list(range(world)))
        cases = [
            # name, leading shape, V total, dtype, chunk, scale
            ("bs_fp32", (3, 7), 64 * world, torch.float32, None, 4.0),
            ("sb_fp32_chunk5", (7, 3), 48 * world, torch.float32, 5, 4.0),
            ("bs_bf16_chunk4", (2, 9), 40 * world, torch.bfloat16, 4, 3.0),
            ("huge_fp32", (4, 3), 16 * world, torch.float32, 3, 5e3),
        ]
        for name, shape, v, dtype, chunk, scale in cases:
            logits, labels, g_lp, g_ent = make_case(shape, v, dtype, seed=100 + v, scale=scale)
            vt = v // world
            # labels spread over every rank's shard (and one out-of-range label)
            n = labels.numel()
            flat = labels.view(-1)
            for i in range(n):
                owner = i % world
                flat[i] = owner * vt + int(flat[i]) % vt
            flat[n // 2] = -1
            shard = logits[..., rank * vt : (rank + 1) * vt].clone().requires_grad_(True)
            before = shard.detach().clone()
            lp, ent = vocab_parallel_logprobs(
                shard, labels, tp_group=group, return_entropy=True, chunk_size=chunk
            )
            ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
            r_lp, r_ent, r_grad = ref_grads(logits, labels, g_lp, g_ent)
            r_grad_shard = r_grad[..., rank * vt : (rank + 1) * vt]
            grad_rtol = FP32_RTOL if dtype == torch.float32 else BF16_GRAD_RTOL
            ent_rtol = 1e-4 if name.startswith("huge") else FP32_RTOL
            assert_rel(lp, r_lp, FP32_RTOL, f"{name} logp rank {rank}")
            assert_rel(ent, r_ent, ent_rtol, f"{name} entropy rank {rank}")
            assert_grad_close(shard.grad, r_grad_shard, grad_rtol, f"{name} grad rank {rank}")
            assert torch.equal(shard.detach(), before), f"{name}: input modified"

            # logp only: the non-owner ranks' gradient is -p * g_lp (no one-hot)
            shard2 = before.clone().requires_grad_(True)
            lp2 = vocab_parallel_logprobs(shard2, labels, tp_group=group, chunk_size=chunk)
            (lp2 * g_lp).sum().backward()
            _, _, r_grad2 = ref_grads(logits, labels, g_lp, None)
            assert_rel(lp2, r_lp, FP32_RTOL, f"{name} logp-only rank {rank}")
            assert_grad_close(
                shard2.grad, r_grad2[..., rank * vt : (rank + 1) * vt], grad_rtol,
                f"{name} logp-only grad rank {rank}",
            )
            results[name] = "ok"

        # full-vocabulary KL under TP, both directions: KL(p || q) and KL(q || p)
        logits, _, g, _ = make_case((3, 5), 32 * world, torch.float32, seed=7, scale=3.0)
        ref, _, _, _ = make_case((3, 5), 32 * world, torch.float32, seed=8, scale=2.0)
        vt = 32
        for reverse, reference, name in ((False, ref_kl, "full_kl"), (True, ref_reverse_kl, "reverse_kl")):
            shard = logits[..., rank * vt : (rank + 1) * vt].clone().requires_grad_(True)
            kl = vocab_parallel_kl(shard, ref[..., rank * vt : (rank + 1) * vt], tp_group=group, chunk_size=4,
                                   reverse=reverse)
            (kl * g).sum().backward()
            z = logits.double().requires_grad_(True)
            r = reference(z, ref)
            (r * g.double()).sum().backward()
            assert_rel(kl, r.detach(), 1e-5, f"{name} rank {rank}")
            assert_grad_close(shard.grad, z.grad[..., rank * vt : (rank + 1) * vt], 1e-5, f"{name} grad rank {rank}")
            results[name] = "ok"

        # top-k entropy: the global top-k from every rank's local top-k; k > V/tp too (each rank
        # then has fewer than k candidates), and ties across ranks
        for k, vt, dtype in ((20, 32, torch.float32), (20, 16, torch.bfloat16), (16 * world, 16, torch.float32)):
            logits, _, _, _ = make_case((3, 5), vt * world, dtype, seed=30 + k, scale=3.0)
            logits[0, 0, :] = logits[0, 0, 0]  # a row of ties over every rank's shard
            h = vocab_parallel_topk_entropy(logits[..., rank * vt : (rank + 1) * vt], k, tp_group=group, chunk_size=4)
            assert_rel(h, ref_topk_entropy(logits, k), FP32_RTOL, f"top-{k} entropy, V/tp={vt}, rank {rank}")
        results["topk_entropy"] = "ok"

        if world == 2:
            # tp_group=None resolves to megatron's TP group once parallel_state is initialised
            from megatron.core import parallel_state

            parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
            try:
                logits, labels, g_lp, _ = make_case((4, 3), 24 * world, torch.float32, seed=11)
                vt = 24
                shard = logits[..., rank * vt : (rank + 1) * vt].clone().requires_grad_(True)
                lp = vocab_parallel_logprobs(shard, labels)
                (lp * g_lp).sum().backward()
                r_lp, _, r_grad = ref_grads(logits, labels, g_lp, None)
                assert_rel(lp, r_lp, FP32_RTOL, f"megatron default group logp rank {rank}")
                assert_grad_close(
                    shard.grad, r_grad[..., rank * vt : (rank + 1) * vt], FP32_RTOL,
                    f"megatron default group grad rank {rank}",
                )
                results["megatron_default_group"] = "ok"
            finally:
                parallel_state.destroy_model_parallel()
    except AssertionError as exc:
        results["error"] = str(exc)
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_full_vocab(world):
    with tempfile.TemporaryDirectory() as outdir:
        cpu_spawn(_tp_worker, (world, _free_port(), outdir), world)
        for rank in range(world):
            with open(os.path.join(outdir, f"rank{rank}.json")) as f:
                res = json.load(f)
            assert "error" not in res, f"world {world}: {res['error']}"
            assert res.get("full_kl") == "ok" and len(res) == (8 if world == 2 else 7), res
            assert res.get("reverse_kl") == "ok" and res.get("topk_entropy") == "ok", res
