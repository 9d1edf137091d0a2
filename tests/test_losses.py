"""Tests of psft_megatron.losses: objectives, LossConfig, aggregation, metrics, megatron contract."""

from __future__ import annotations

import math
import os
import socket
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from psft_megatron.losses import (
    K3_CLAMP,
    LossConfig,
    PSFTLoss,
    asft_objective,
    dft_objective,
    eaft_objective,
    eaft_weight,
    importance_ratio,
    kl_k1,
    kl_k3,
    psft_objective,
    reduce_loss_metrics,
    sft_kl_objective,
    sft_objective,
)
from tests.parallel.launch import cpu_spawn


# --------------------------------------------------------------------------------------------
# per-token objectives
# --------------------------------------------------------------------------------------------
def test_objectives_match_hand_formulas():
    logp = torch.tensor([-0.1, -1.0, -2.5, -7.0])
    old = torch.tensor([-0.3, -0.5, -2.5, -9.0])
    ref = torch.tensor([-0.2, -3.0, -2.0, -1.0])
    assert torch.equal(sft_objective(logp), torch.tensor([0.1, 1.0, 2.5, 7.0]))
    for i in range(4):
        lp, o, rf = logp[i].item(), old[i].item(), ref[i].item()
        assert dft_objective(logp)[i].item() == pytest.approx(-math.exp(lp) * lp, rel=1e-6)
        r = math.exp(lp - o)
        assert psft_objective(logp, old)[i].item() == pytest.approx(-min(r, min(max(r, 0.8), 1.28)), rel=1e-6)
        assert psft_objective(logp, old, clip_eps_high=0.1)[i].item() == pytest.approx(
            -min(r, min(max(r, 0.8), 1.1)), rel=1e-6
        )
        assert kl_k1(logp, ref)[i].item() == pytest.approx(lp - rf, rel=1e-6)
        d = rf - lp
        k3 = max(-10.0, min(10.0, math.exp(d) - d - 1.0))
        assert kl_k3(logp, ref)[i].item() == pytest.approx(k3, rel=1e-6)
        assert sft_kl_objective(logp, ref, kl_coef=0.5, kl_estimator="k3")[i].item() == pytest.approx(
            -lp + 0.5 * k3, rel=1e-6
        )
        assert sft_kl_objective(logp, ref, kl_coef=0.3, kl_estimator="k1")[i].item() == pytest.approx(
            -lp + 0.3 * (lp - rf), rel=1e-6
        )
    # the clip: r = e^0.5 = 1.65 > 1.28 -> value -1.28; r = e^-2 (< 0.8) -> -r (lower clip never binds)
    assert psft_objective(torch.tensor([0.0]), torch.tensor([-0.5])).item() == pytest.approx(-1.28)
    assert psft_objective(torch.tensor([-2.0]), torch.tensor([0.0])).item() == pytest.approx(-math.exp(-2.0))
    # log-ratio clamp at +-20
    assert importance_ratio(torch.tensor([0.0]), torch.tensor([-50.0])).item() == pytest.approx(math.exp(20.0))
    with pytest.raises(ValueError):
        sft_kl_objective(logp, None, kl_estimator="k3")


def test_dft_gradient_is_probability_weighted():
    logp = torch.tensor([-0.1, -1.0, -3.0], requires_grad=True)
    dft_objective(logp).sum().backward()
    assert torch.allclose(logp.grad, -torch.exp(logp.detach()), rtol=1e-7, atol=0)


def test_psft_gradient_exactly_zero_above_clip_and_minus_r_elsewhere():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(200, generator=g) * 5).requires_grad_(True)
    old = logp.detach() + (torch.rand(200, generator=g) - 0.5) * 2.0  # log r in [-1, 1]
    psft_objective(logp, old, clip_eps_high=0.28).sum().backward()
    r = torch.exp(torch.clamp(logp.detach() - old, -20, 20))
    above = r > 1.28
    assert above.any() and (~above).any()
    assert torch.equal(logp.grad[above], torch.zeros(int(above.sum())))
    assert torch.equal(logp.grad[~above], -r[~above])
    # the lower clip never binds: tokens with r < 0.8 still get -r
    low = r < 0.8
    assert low.any() and torch.equal(logp.grad[low], -r[low])


def test_k3_clamp_value_and_zero_gradient():
    logp = torch.tensor([-20.0, -1.0, 0.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.5, -30.0])
    k = kl_k3(logp, ref)
    # delta = 19 -> e^19 - 20 huge -> clamped to 10; delta = -30 -> e^-30 + 29 -> 10
    assert k[0].item() == K3_CLAMP and k[2].item() == K3_CLAMP
    k.sum().backward()
    assert logp.grad[0].item() == 0.0 and logp.grad[2].item() == 0.0
    assert logp.grad[1].item() == pytest.approx(1.0 - math.exp(-0.5), rel=1e-6)


def test_asft_and_eaft_match_hand_formulas_and_gradients():
    logp = torch.tensor([-0.1, -1.0, -2.5, -7.0], requires_grad=True)
    kl = torch.tensor([0.3, 0.0, 1.2, 4.0], requires_grad=True)
    # ASFT: DFT's loss plus coef * KL; d/dlogp = -p, d/dKL = coef
    asft_objective(logp, kl, kl_coef=0.1).sum().backward()
    p = torch.exp(logp.detach())
    torch.testing.assert_close(asft_objective(logp, kl, kl_coef=0.1).detach(), -p * logp.detach() + 0.1 * kl.detach())
    torch.testing.assert_close(logp.grad, -p, rtol=1e-7, atol=0)
    torch.testing.assert_close(kl.grad, torch.full((4,), 0.1), rtol=1e-7, atol=0)
    # EAFT: -w logp with w = (H_k / log k) ** alpha, a constant of the backward
    lp = torch.tensor([-0.1, -1.0, -2.5, -7.0], requires_grad=True)
    h = torch.tensor([0.0, 0.5, math.log(20.0), 2.0], requires_grad=True)  # differentiable on purpose
    for alpha in (1.0, 0.5, 0.0):
        w = [(hv / math.log(20.0)) ** alpha for hv in h.detach().tolist()]
        assert eaft_weight(h, 20, alpha).tolist() == pytest.approx(w, rel=1e-6)
        assert eaft_objective(lp, h, k=20, alpha=alpha).tolist() == pytest.approx(
            [-wi * li for wi, li in zip(w, lp.detach().tolist())], rel=1e-6)
    eaft_objective(lp, h, k=20, alpha=1.0).sum().backward()
    assert lp.grad.tolist() == pytest.approx([-hv / math.log(20.0) for hv in h.detach().tolist()], rel=1e-6)
    assert h.grad is None  # the gate is detached: no gradient reaches the entropy
    assert eaft_weight(torch.tensor([3.1]), 20).item() == 1.0  # H_k > log k by rounding: clamped


# --------------------------------------------------------------------------------------------
# LossConfig
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key,value",
    [
        ("kind", "foo"),
        ("kl_estimator", "k2"),
        ("agg_mode", "seq-mean"),
        ("clip_eps_low", 1.0),
        ("clip_eps_low", -0.1),
        ("clip_eps_high", -0.01),
        ("clip_eps_high", float("nan")),
        ("log_ratio_clamp", 0.0),
        ("kl_coef", -1.0),
        ("kl_coef", "0.5"),
        ("asft_kl_coef", -0.1),
        ("eaft_topk", 1),
        ("eaft_topk", 2.5),
        ("eaft_topk", True),
        ("eaft_alpha", -1.0),
        ("chunk_size", 0),
        ("chunk_size", 1.5),
        ("compute_entropy", "yes"),
    ],
)
def test_loss_config_validation_names_the_key(key, value):
    with pytest.raises(ValueError, match=rf"loss\.{key}="):
        LossConfig(**{key: value})


def test_loss_config_messages_and_from_dict():
    with pytest.raises(ValueError, match="loss.kind='foo' is not one of sft, psft, dft, sft_kl, asft, eaft"):
        LossConfig(kind="foo")
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum"):
        LossConfig(agg_mode="x")
    cfg = LossConfig.from_dict({"kind": "dft", "agg_mode": "seq-mean-token-sum", "chunk_size": 64})
    assert cfg.kind == "dft" and cfg.agg_mode == "seq-mean-token-sum" and cfg.chunk_size == 64
    assert LossConfig.from_dict(None) == LossConfig()
    defaults = LossConfig()
    assert (defaults.kind, defaults.clip_eps_low, defaults.clip_eps_high, defaults.kl_estimator) == (
        "psft", 0.2, 0.28, "k3"
    )
    # the papers' defaults: ASFT's KL coefficient 0.1, EAFT's k = 20 and exponent 1
    assert (defaults.asft_kl_coef, defaults.eaft_topk, defaults.eaft_alpha) == (0.1, 20, 1.0)
    with pytest.raises(ValueError, match=r"loss\.clip_eps_hgh.*loss\.typo"):
        LossConfig.from_dict({"typo": 1, "clip_eps_hgh": 0.3})
    assert PSFTLoss({"kind": "sft"}).config.kind == "sft"


# --------------------------------------------------------------------------------------------
# a batch with masking, an empty sequence and packed sequences
# --------------------------------------------------------------------------------------------
B, S, V = 4, 12, 37


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g) * 2.0
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.25).float()
    mask[3] = 0.0  # a row (sequence) without loss tokens: excluded from seq means
    mask[0, :3] = 0.0
    # old log-probs around the current ones: ratios on both sides of 1 + eps_high
    lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    old = lp + (torch.rand(B, S, generator=g) - 0.5) * 1.2
    ref_lp = lp + (torch.rand(B, S, generator=g) - 0.5) * 3.0
    ref_logits = logits + torch.randn(B, S, V, generator=g)
    seq_ids = torch.tensor(
        [
            [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, -1],
            [0] * 12,
            [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, -1, -1],
            [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
        ]
    )
    mask[2, 2:4] = 0.0  # packed sequence (2, 1) has no loss token
    return dict(logits=logits, labels=labels, mask=mask, old=old, ref_lp=ref_lp, ref_logits=ref_logits, seq_ids=seq_ids)


def ref_objective_value(per_token, mask, mode, seq_ids=None):
    """Independent loop reference of the optimised scalar."""
    seqs = {}
    for i in range(per_token.shape[0]):
        for j in range(per_token.shape[1]):
            if mask[i, j] == 0 or (seq_ids is not None and seq_ids[i, j] < 0):
                continue
            key = (i, 0 if seq_ids is None else int(seq_ids[i, j]))
            seqs.setdefault(key, []).append(per_token[i, j])  # 0-dim tensors: differentiable
    if mode == "token-mean":
        vals = [v for vs in seqs.values() for v in vs]
        return sum(vals) / len(vals)
    if mode == "seq-mean-token-mean":
        return sum(sum(vs) / len(vs) for vs in seqs.values()) / len(seqs)
    return sum(sum(vs) for vs in seqs.values()) / len(seqs)


KIND_CASES = [
    ("sft", {}),
    ("dft", {}),
    ("psft", {}),
    ("sft_kl", {"kl_estimator": "k1"}),
    ("sft_kl", {"kl_estimator": "k3"}),
    ("sft_kl", {"kl_estimator": "full"}),
    ("asft", {"kl_estimator": "k3"}),
    ("asft", {"kl_estimator": "full", "asft_kl_coef": 0.3}),
    ("eaft", {}),
    ("eaft", {"eaft_topk": 5, "eaft_alpha": 0.5}),
]
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


def loss_args(batch, kind, extra, rows=slice(None), cols=None):
    """Arguments of loss_func for a sub-batch (rows = micro-batch / DP split, cols = CP shard)."""
    idx = (rows, slice(None)) if cols is None else (rows, cols)
    ref = None
    if kind in ("sft_kl", "asft"):
        ref = batch["ref_logits"][idx] if extra.get("kl_estimator") == "full" else batch["ref_lp"][idx]
    return dict(
        labels=batch["labels"][idx],
        loss_mask=batch["mask"][idx],
        old_logprobs=batch["old"][idx] if kind == "psft" else None,
        ref=ref,
    )


def per_token_reference(batch, kind, extra, logits=None):
    """Per-token losses from float64 log-softmax (autograd), independent of the op."""
    z = (batch["logits"] if logits is None else logits).double()
    logsm = torch.log_softmax(z, -1)
    lp = logsm.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    if kind == "sft":
        return -lp
    if kind == "dft":
        return -lp.detach().exp() * lp
    if kind == "psft":
        r = torch.exp(lp - batch["old"].double())
        return -torch.minimum(r, r.clamp(0.8, 1.28))
    if kind == "eaft":  # the gate from a full sort of the logits, detached
        k, alpha = extra.get("eaft_topk", 20), extra.get("eaft_alpha", 1.0)
        top = torch.log_softmax(torch.sort(z.detach(), -1, descending=True).values[..., :k], -1)
        gate = (-(top.exp() * top).sum(-1) / math.log(k)) ** alpha
        return -gate * lp
    est = extra["kl_estimator"]
    if est == "k1":
        kl = lp - batch["ref_lp"].double()
    elif est == "k3":
        d = batch["ref_lp"].double() - lp
        kl = (d.exp() - d - 1).clamp(-10, 10)
    elif kind == "asft":  # the ASFT authors' KL(pi_ref || pi) over the vocabulary
        lq = torch.log_softmax(batch["ref_logits"].double(), -1)
        kl = (lq.exp() * (lq - logsm)).sum(-1)
    else:
        lq = torch.log_softmax(batch["ref_logits"].double(), -1)
        kl = (logsm.exp() * (logsm - lq)).sum(-1)
    if kind == "asft":
        return -lp.detach().exp() * lp + extra.get("asft_kl_coef", 0.1) * kl
    return -lp + 0.5 * kl


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind,extra", KIND_CASES)
def test_micro_batch_and_dp_splits_equal_single_batch(kind, extra, mode, packed):
    batch = make_batch()
    loss = PSFTLoss(LossConfig(kind=kind, agg_mode=mode, chunk_size=5, **extra))
    seq_ids = batch["seq_ids"] if packed else None

    # single batch
    x = batch["logits"].clone().requires_grad_(True)
    ls, norm, _ = loss.loss_func(**loss_args(batch, kind, extra), seq_ids=seq_ids)(x)
    assert norm.dtype == torch.int and norm.dim() == 0
    value = ls / norm
    value.backward()
    z64 = batch["logits"].double().requires_grad_(True)
    expected = ref_objective_value(per_token_reference(batch, kind, extra, z64), batch["mask"], mode, seq_ids)
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(x.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)
    if mode == "token-mean":
        assert norm.item() == int((batch["mask"] * (seq_ids >= 0 if packed else 1)).sum())

    # 3 pieces of rows = micro-batches and DP ranks: only sums cross the pieces
    y = batch["logits"].clone().requires_grad_(True)
    total_ls, total_norm = 0.0, 0
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        sub_ids = seq_ids[rows] if packed else None
        ls_k, n_k, _ = loss.loss_func(**loss_args(batch, kind, extra, rows), seq_ids=sub_ids)(y[rows])
        total_ls = total_ls + ls_k
        total_norm += int(n_k)
    assert total_norm == int(norm)
    (total_ls / total_norm).backward()
    assert (total_ls / total_norm).item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-7)


def test_psft_gradient_through_logits_and_old_none_equals_sft():
    batch = make_batch(1)
    args = loss_args(batch, "psft", {})
    x = batch["logits"].clone().requires_grad_(True)
    ls, n, _ = PSFTLoss(LossConfig(kind="psft")).loss_func(**args)(x)
    ls.backward()
    # expected: -sum mask * w * grad(logp), w = r where r <= 1.28 else 0
    y = batch["logits"].clone().requires_grad_(True)
    lp = torch.log_softmax(y, -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    r = torch.exp(lp.detach() - batch["old"])
    w = torch.where(r > 1.28, torch.zeros_like(r), r) * batch["mask"]
    assert (r > 1.28).any() and (r <= 1.28).any()
    (-(w * lp).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)

    # old_logprobs=None: exactly the SFT gradient
    grads = {}
    for kind in ("sft", "psft"):
        z = batch["logits"].clone().requires_grad_(True)
        ls, n, _ = PSFTLoss(LossConfig(kind=kind)).loss_func(batch["labels"], batch["mask"])(z)
        ls.backward()
        grads[kind] = (ls.detach(), z.grad)
    assert torch.equal(grads["psft"][1], grads["sft"][1])
    assert grads["psft"][0].item() == pytest.approx(-float(batch["mask"].sum()))


def test_masked_positions_with_non_finite_inputs_do_not_leak():
    batch = make_batch(2)
    old = batch["old"].clone()
    old[batch["mask"] == 0] = float("nan")
    x = batch["logits"].clone().requires_grad_(True)
    ls, n, met = PSFTLoss(LossConfig(kind="psft")).loss_func(batch["labels"], batch["mask"], old)(x)
    ls.backward()
    assert torch.isfinite(ls) and torch.isfinite(x.grad).all()


def test_validation_errors():
    batch = make_batch()
    # binding without ref is allowed (pipeline stages other than the last never compute the loss)
    bound = PSFTLoss(LossConfig(kind="sft_kl")).loss_func(batch["labels"], batch["mask"])
    with pytest.raises(ValueError, match="needs ref"):
        bound(batch["logits"])
    with pytest.raises(ValueError, match="loss_mask shape"):
        PSFTLoss().loss_func(batch["labels"], batch["mask"][:, :3])
    with pytest.raises(ValueError, match="old_logprobs shape"):
        PSFTLoss().loss_func(batch["labels"], batch["mask"], batch["old"][:, :3])


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def test_metrics_reduce_to_exact_means_over_micro_batches():
    batch = make_batch(3)
    for mode in MODES:
        loss = PSFTLoss(LossConfig(kind="psft", agg_mode=mode))
        _, norm, single = loss.loss_func(**loss_args(batch, "psft", {}))(batch["logits"])
        parts = []
        for rows in (slice(0, 2), slice(2, 4)):
            parts.append(loss.loss_func(**loss_args(batch, "psft", {}, rows))(batch["logits"][rows])[2])
        red = reduce_loss_metrics(parts)
        one = reduce_loss_metrics([single])
        assert set(red) == {
            "loss", "nll", "entropy", "clip_frac", "ratio_mean", "ratio_max", "approx_kl", "num_tokens"
        }
        for k in red:
            assert red[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
        # against hand formulas
        m = batch["mask"].bool()
        logsm = torch.log_softmax(batch["logits"].double(), -1)
        lp = logsm.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
        ent = -(logsm.exp() * logsm).sum(-1)
        r = torch.exp(lp - batch["old"].double())
        assert red["nll"] == pytest.approx(float(-lp[m].mean()), rel=1e-5)
        assert red["entropy"] == pytest.approx(float(ent[m].mean()), rel=1e-5)
        assert red["clip_frac"] == pytest.approx(float((r[m] > 1.28).double().mean()), rel=1e-6)
        assert red["ratio_mean"] == pytest.approx(float(r[m].mean()), rel=1e-5)
        assert red["ratio_max"] == pytest.approx(float(r[m].max()), rel=1e-5)
        assert red["approx_kl"] == pytest.approx(float((batch["old"].double() - lp)[m].mean()), rel=1e-4)
        assert red["num_tokens"] == float(m.sum())
        per_tok = per_token_reference(batch, "psft", {})
        assert red["loss"] == pytest.approx(float(ref_objective_value(per_tok, batch["mask"], mode)), rel=1e-5)
    # key sets of other kinds
    for kind, extra, keys in [
        ("sft", {}, {"kl"}),
        ("sft_kl", {"kl_estimator": "k3"}, {"ratio_mean"}),
    ]:
        met = PSFTLoss(LossConfig(kind=kind, **extra)).loss_func(**loss_args(batch, kind, extra))(batch["logits"])[2]
        assert "clip_frac" in met and float(met["clip_frac"][0]) == 0.0
        assert not (keys & set(met))
        assert all(t.dtype == torch.float32 and t.shape == (2,) for t in met.values())
    met = PSFTLoss(LossConfig(kind="dft", compute_entropy=False)).loss_func(batch["labels"], batch["mask"])(
        batch["logits"]
    )[2]
    assert "entropy" not in met
    assert reduce_loss_metrics([]) == {}


def test_asft_and_eaft_metrics_are_their_token_means():
    batch = make_batch(6)
    m = batch["mask"].bool()
    logsm = torch.log_softmax(batch["logits"].double(), -1)
    top = torch.log_softmax(torch.sort(batch["logits"].double(), -1, descending=True).values[..., :20], -1)
    h_top = -(top.exp() * top).sum(-1)
    red = reduce_loss_metrics([PSFTLoss(LossConfig(kind="eaft")).loss_func(**loss_args(batch, "eaft", {}))(
        batch["logits"])[2]])
    assert red["topk_entropy"] == pytest.approx(float(h_top[m].mean()), rel=1e-5)
    assert red["eaft_weight"] == pytest.approx(float((h_top / math.log(20))[m].mean()), rel=1e-5)
    extra = {"kl_estimator": "full"}
    red = reduce_loss_metrics([PSFTLoss(LossConfig(kind="asft", **extra)).loss_func(
        **loss_args(batch, "asft", extra))(batch["logits"])[2]])
    lq = torch.log_softmax(batch["ref_logits"].double(), -1)
    assert red["kl"] == pytest.approx(float((lq.exp() * (lq - logsm)).sum(-1)[m].mean()), rel=1e-5)
    assert "eaft_weight" not in red and red["clip_frac"] == 0.0


def test_logprob_func_collects_detached_logprobs():
    batch = make_batch(4)
    x = batch["logits"].clone().requires_grad_(True)
    zero, n, out = PSFTLoss().logprob_func(batch["labels"])(x)
    lp = torch.log_softmax(batch["logits"].double(), -1).gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out["logprobs"].double(), lp, rtol=1e-6, atol=1e-6)
    assert not out["logprobs"].requires_grad and "entropy" in out
    assert zero.item() == 0.0 and n.dtype == torch.int


def test_megatron_forward_step_calc_loss_contract():
    schedules = pytest.importorskip("megatron.core.pipeline_parallel.schedules")
    batch = make_batch(5)
    x = batch["logits"].clone().requires_grad_(True)
    cfg = SimpleNamespace(calculate_per_token_loss=True, timers=None)
    store = []
    fn = PSFTLoss(LossConfig(kind="psft")).loss_func(**loss_args(batch, "psft", {}))
    out, num_tokens = schedules.forward_step_calc_loss(
        SimpleNamespace(), x, fn, cfg, None, False, 4, store, cp_group_size=1, is_last_stage=True
    )
    assert num_tokens.dtype == torch.int and int(num_tokens) == int(batch["mask"].sum())
    assert out.requires_grad and out.dim() == 0 and len(store) == 1 and "loss" in store[0]
    out.backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# context parallelism: one gloo spawn of 2 ranks running every (kind, mode, packed) case
# --------------------------------------------------------------------------------------------
def _cp_cols(rank: int, cp: int) -> torch.Tensor:
    """megatron's load-balanced CP layout: rank r holds chunks r and 2cp-1-r of the sequence."""
    c = S // (2 * cp)
    idx = list(range(rank * c, (rank + 1) * c)) + list(range((2 * cp - 1 - rank) * c, (2 * cp - rank) * c))
    return torch.tensor(idx)


def _cp_worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        batch = make_batch()
        cols = _cp_cols(rank, world)
        results = {}
        for kind, extra in KIND_CASES:
            for mode in MODES:
                for packed in (False, True):
                    loss = PSFTLoss(LossConfig(kind=kind, agg_mode=mode, chunk_size=3, **extra))
                    x = batch["logits"].clone().requires_grad_(True)
                    total, norm, mets = 0.0, 0, []
                    for rows in (slice(0, 2), slice(2, 4)):  # two micro-batches
                        args = loss_args(batch, kind, extra, rows, cols)
                        ids = batch["seq_ids"][rows][:, cols] if packed else None
                        ls, n, met = loss.loss_func(**args, seq_ids=ids, cp_group=group)(x[rows][:, cols])
                        total = total + ls
                        norm += int(n)
                        mets.append(met)
                    total.backward()
                    red = reduce_loss_metrics(mets, group=group)
                    results[(kind, tuple(sorted(extra.items())), mode, packed)] = (
                        float(total), norm, x.grad[:, cols].clone(), red
                    )
        # cp_group=None resolves to megatron's CP group once parallel_state is initialised
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(context_parallel_size=world)
        try:
            loss = PSFTLoss(LossConfig(kind="sft", agg_mode="seq-mean-token-mean"))
            args = loss_args(batch, "sft", {}, slice(None), cols)
            ls, n, _ = loss.loss_func(**args, seq_ids=batch["seq_ids"][:, cols])(batch["logits"][:, cols])
            results["megatron_default_group"] = (float(ls), int(n))
        finally:
            parallel_state.destroy_model_parallel()
        torch.save({"cols": cols, "results": results}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_context_parallel_shards_equal_single_batch():
    world = 2
    with tempfile.TemporaryDirectory() as outdir:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cpu_spawn(_cp_worker, (world, port, outdir), world)
        per_rank = [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]
    batch = make_batch()
    ls, n, _ = PSFTLoss(LossConfig(kind="sft", agg_mode="seq-mean-token-mean")).loss_func(
        batch["labels"], batch["mask"], seq_ids=batch["seq_ids"]
    )(batch["logits"])
    default = [p["results"]["megatron_default_group"] for p in per_rank]
    assert sum(d[1] for d in default) == int(n) and default[1][1] == 0
    assert sum(d[0] for d in default) / int(n) == pytest.approx(float(ls) / int(n), rel=1e-6)
    for kind, extra in KIND_CASES:
        for mode in MODES:
            for packed in (False, True):
                key = (kind, tuple(sorted(extra.items())), mode, packed)
                seq_ids = batch["seq_ids"] if packed else None
                loss = PSFTLoss(LossConfig(kind=kind, agg_mode=mode, **extra))
                x = batch["logits"].clone().requires_grad_(True)
                ls, norm, met = loss.loss_func(**loss_args(batch, kind, extra), seq_ids=seq_ids)(x)
                (ls / norm).backward()
                total = sum(p["results"][key][0] for p in per_rank)
                total_norm = sum(p["results"][key][1] for p in per_rank)
                assert total_norm == int(norm), key
                assert total / total_norm == pytest.approx((ls / norm).item(), rel=1e-5, abs=1e-7), key
                grad = torch.zeros_like(x)
                for p in per_rank:
                    grad[:, p["cols"]] = p["results"][key][2] / total_norm
                torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-7, msg=str(key))
                # metrics reduced over the CP group equal the single-batch metrics
                single = reduce_loss_metrics([met])
                for p in per_rank:
                    red = p["results"][key][3]
                    assert set(red) == set(single), key
                    for k in single:
                        assert red[k] == pytest.approx(single[k], rel=1e-5, abs=1e-6), (key, k)
