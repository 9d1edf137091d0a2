"""Tests of psft_megatron.ops.fused_linear_logprobs: the output layer fused into the log-prob op.

Single process: values and gradients (hidden and weight) against a float64 full-vocabulary
reference ``log_softmax(h @ W^T)`` and against the unfused op on materialised logits, with
masks, tiles that do not divide the rows or the vocabulary, both backward orders, bf16.
Parallel layouts run in ONE 4-process torchrun launch (tests/parallel/fused_logprobs_worker.py):
the op at TP=2/4 with and without SP against the float64 reference, and the megatron model at
TP=1/2, TP=2/4+SP, CP=2, CP=2+TP=2+SP, packed rows, tied embeddings (PP=1 and PP=2),
PP=2+VPP=2, fused vs unfused (training step and forward-only pass).
"""

from __future__ import annotations

import functools

import pytest
import torch

from psft_megatron.ops import fused_linear_logprobs as fused_op
from psft_megatron.ops import vocab_parallel_logprobs

# the flat-row form: row i is labels[i] (the [s, b, h] form is tested on its own below)
fused_linear_logprobs = functools.partial(fused_op, rows_match_labels=True)

FP32_TOL = 1e-5  # values: absolute (nats); gradients: relative to the largest entry


def make(n, hdim, v, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hdim, generator=g) * scale).to(dtype)
    w = (torch.randn(v, hdim, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    g_lp = torch.randn(n, generator=g)
    g_ent = torch.randn(n, generator=g)
    return h, w, y, g_lp, g_ent


def reference(h, w, y, mask, g_lp, g_ent):
    """float64 log p(y), entropy and the gradients of sum(g_lp logp + g_ent H) w.r.t. h and W.
    The logits are rounded to the input dtype first, as the output layer's would be."""
    hr = h.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    z = hr @ wr.t()
    if h.dtype != torch.float32:
        z = z + (z.detach().to(h.dtype).double() - z.detach())  # rounded values, exact gradient
    logsm = torch.log_softmax(z, -1)
    v = w.shape[0]
    valid = (y >= 0) & (y < v)
    keep = torch.ones_like(valid) if mask is None else mask != 0
    zero = torch.zeros((), dtype=torch.float64)
    lp = torch.where(valid & keep, logsm.gather(1, y.clamp(0, v - 1)[:, None])[:, 0], zero)
    ent = torch.where(keep, -(logsm.exp() * logsm).sum(-1), zero)
    loss = (lp * g_lp.double()).sum() + (0 if g_ent is None else (ent * g_ent.double()).sum())
    loss.backward()
    return lp.detach(), ent.detach(), hr.grad, wr.grad


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def run(h, w, y, g_lp, g_ent, **kw):
    hx = h.clone().requires_grad_(True)
    wx = w.clone().requires_grad_(True)
    lp, ent = fused_linear_logprobs(hx, wx, y, return_entropy=True, **kw)
    loss = (lp * g_lp).sum() + (0 if g_ent is None else (ent * g_ent).sum())
    loss.backward()
    return lp, ent, hx.grad, wx.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("tiles", [(7, 13), (64, 4096), (5, 300)])
def test_values_and_grads_match_float64(dtype, masked, tiles):
    n, hdim, v = 41, 24, 300  # neither 7 nor 5 divides 41; 13 does not divide 300
    h, w, y, g_lp, g_ent = make(n, hdim, v, dtype, seed=1)
    y[3] = -100  # no target
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(2)) > 0.4).float() if masked else None
    lp, ent, dh, dw = run(h, w, y, g_lp, g_ent, mask=mask, chunk_size=tiles[0], vocab_block_size=tiles[1])
    r_lp, r_ent, r_dh, r_dw = reference(h, w, y, mask, g_lp, g_ent)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (n,)
    assert (lp.double() - r_lp).abs().max() <= FP32_TOL and (ent.double() - r_ent).abs().max() <= FP32_TOL
    assert dh.dtype == dtype and dw.dtype == dtype
    grad_tol = FP32_TOL if dtype == torch.float32 else 1e-2  # bf16 output rounding
    assert rel(dh, r_dh) <= grad_tol and rel(dw, r_dw) <= grad_tol, (rel(dh, r_dh), rel(dw, r_dw))
    if masked:  # masked rows: zero outputs, zero gradient
        off = mask == 0
        assert lp[off].abs().max() == 0 and ent[off].abs().max() == 0 and dh[off].abs().max() == 0


def ref_topk_entropy(z: torch.Tensor, k: int) -> torch.Tensor:
    """float64 entropy of the softmax over each row's k largest logits (a full sort)."""
    top = torch.sort(z.double(), dim=-1, descending=True).values[..., :k]
    lq = torch.log_softmax(top, -1)
    return -(lq.exp() * lq).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,tiles", [(20, (7, 13)), (20, (64, 4096)), (300, (5, 64))])
def test_topk_entropy_over_tiles_matches_float64(dtype, k, tiles):
    """The running top-k merged over vocabulary blocks (13 < k: each block has fewer than k
    logits) equals the top-k of the whole row; masked rows give 0; logp, entropy and the
    gradients are those of the call without it (the top-k entropy has no gradient)."""
    n, hdim, v = 41, 24, 300
    h, w, y, g_lp, g_ent = make(n, hdim, v, dtype, seed=5)
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(6)) > 0.4).float()
    hx, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent, top = fused_linear_logprobs(hx, wx, y, mask=mask, return_entropy=True, topk_entropy=k,
                                         chunk_size=tiles[0], vocab_block_size=tiles[1])
    assert not top.requires_grad and top.dtype == torch.float32
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    z = h.double() @ w.double().t()
    if dtype != torch.float32:
        z = z.to(dtype).double()  # the logits rounded as the output layer's
    want = torch.where(mask != 0, ref_topk_entropy(z, k), torch.zeros((), dtype=torch.float64))
    assert (top.double() - want).abs().max() <= FP32_TOL
    r_lp, r_ent, r_dh, r_dw = reference(h, w, y, mask, g_lp, g_ent)
    grad_tol = FP32_TOL if dtype == torch.float32 else 1e-2
    assert (lp.double() - r_lp).abs().max() <= FP32_TOL and rel(hx.grad, r_dh) <= grad_tol and rel(wx.grad, r_dw) <= grad_tol
    only = fused_linear_logprobs(h, w, y, mask=mask, topk_entropy=k, chunk_size=tiles[0], vocab_block_size=tiles[1])
    assert len(only) == 2 and torch.equal(only[1], top)  # (logp, top-k entropy) without the entropy
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        fused_linear_logprobs(h, w, y, topk_entropy=v + 1)


def test_equals_the_unfused_op_on_materialised_logits():
    h, w, y, g_lp, g_ent = make(50, 32, 210, torch.float32, seed=3, scale=2.0)
    hx, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp_u, ent_u = vocab_parallel_logprobs(torch.nn.functional.linear(hx, wx), y, return_entropy=True)
    ((lp_u * g_lp).sum() + (ent_u * g_ent).sum()).backward()
    lp, ent, dh, dw = run(h, w, y, g_lp, g_ent, chunk_size=16, vocab_block_size=64)
    assert (lp - lp_u).abs().max() <= 1e-5 and (ent - ent_u).abs().max() <= 1e-5
    assert rel(dh, hx.grad) <= 1e-5 and rel(dw, wx.grad) <= 1e-5


@pytest.mark.parametrize("n,v", [(60, 40), (20, 90)])  # rows > vocab: dW accumulated whole; else dh
@pytest.mark.parametrize("which", ["both", "hidden", "weight"])
def test_backward_orders_and_partial_grads(n, v, which):
    h, w, y, g_lp, _ = make(n, 16, v, torch.float32, seed=4)
    hx = h.clone().requires_grad_(which in ("both", "hidden"))
    wx = w.clone().requires_grad_(which in ("both", "weight"))
    lp = fused_linear_logprobs(hx, wx, y, chunk_size=7, vocab_block_size=11)
    (lp * g_lp).sum().backward()
    _, _, r_dh, r_dw = reference(h, w, y, None, g_lp, None)
    if which != "weight":
        assert rel(hx.grad, r_dh) <= FP32_TOL
    if which != "hidden":
        assert rel(wx.grad, r_dw) <= FP32_TOL
    assert (hx.grad is None) == (which == "weight") and (wx.grad is None) == (which == "hidden")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_weight_gradient_into_ddp_main_grad(dtype, tied):
    """Under megatron's DDP (fp32 ``main_grad`` + ``grad_added_to_main_grad``) the weight
    gradient is added into main_grad, on top of earlier micro-batches, and backward hands
    autograd a placeholder (zeros when ``zero_out_wgrad``: a tied embedding on one stage)."""
    n, v = 60, 40  # more rows than vocabulary: the plain path would take the other order
    h, w, y, g_lp, g_ent = make(n, 16, v, dtype, seed=4)
    mask = (torch.arange(n) % 3 != 0).float()
    hx, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    earlier = torch.randn(v, 16, generator=torch.Generator().manual_seed(9))
    wx.main_grad = earlier.clone()
    wx.grad_added_to_main_grad = False
    if tied:
        wx.zero_out_wgrad = True
    lp, ent = fused_linear_logprobs(hx, wx, y, mask=mask, return_entropy=True, chunk_size=7, vocab_block_size=11)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    _, _, r_dh, r_dw = reference(h, w, y, mask, g_lp, g_ent)
    tol = FP32_TOL if dtype == torch.float32 else 1e-2
    assert wx.grad_added_to_main_grad is True
    assert rel(wx.main_grad - earlier, r_dw) <= (FP32_TOL if dtype == torch.float32 else 2e-3)
    assert rel(hx.grad, r_dh) <= tol
    assert wx.grad.shape == w.shape and wx.grad.dtype == dtype
    if tied:
        assert wx.grad.abs().max() == 0
    # a bf16 main_grad (grad_reduce_in_fp32 off) is not used: the gradient comes back as usual
    wb = w.clone().requires_grad_(True)
    wb.main_grad = torch.zeros(v, 16, dtype=torch.bfloat16)
    wb.grad_added_to_main_grad = False
    (fused_linear_logprobs(h, wb, y, chunk_size=7) * g_lp).sum().backward()
    assert wb.grad_added_to_main_grad is False and wb.main_grad.abs().max() == 0
    assert rel(wb.grad, reference(h, w, y, None, g_lp, None)[3]) <= tol


def test_entropy_only_gradient_and_no_grad_pass():
    h, w, y, _, g_ent = make(30, 16, 100, torch.float32, seed=5)
    hx, wx = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    _, ent = fused_linear_logprobs(hx, wx, y, return_entropy=True, chunk_size=8, vocab_block_size=32)
    (ent * g_ent).sum().backward()
    _, _, r_dh, r_dw = reference(h, w, y, None, torch.zeros(30), g_ent)
    assert rel(hx.grad, r_dh) <= FP32_TOL and rel(wx.grad, r_dw) <= FP32_TOL
    with torch.no_grad():
        lp = fused_linear_logprobs(hx, wx, y, chunk_size=8)
    assert not lp.requires_grad
    assert (lp.double() - reference(h, w, y, None, torch.zeros(30), None)[0]).abs().max() <= FP32_TOL


def test_fp16_and_large_logits_are_finite():
    h, w, y, g_lp, g_ent = make(12, 8, 64, torch.float16, seed=6)
    lp, ent, dh, dw = run(h, w, y, g_lp, g_ent, chunk_size=5, vocab_block_size=20)
    r_lp, r_ent, r_dh, r_dw = reference(h, w, y, None, g_lp, g_ent)
    assert (lp.double() - r_lp).abs().max() <= FP32_TOL and rel(dh, r_dh) <= 2e-3 and rel(dw, r_dw) <= 2e-3
    h, w, y, g_lp, g_ent = make(12, 8, 64, torch.float32, seed=7, scale=2e3)  # logits ~1e4
    lp, ent, dh, dw = run(h, w, y, g_lp, g_ent, chunk_size=5, vocab_block_size=20)
    assert all(torch.isfinite(t).all() for t in (lp, ent, dh, dw))
    r_lp = reference(h, w, y, None, g_lp, g_ent)[0]
    assert ((lp.double() - r_lp).abs() <= 1e-6 * r_lp.abs().clamp_min(1.0)).all()


def test_all_rows_masked_and_validation():
    h, w, y, g_lp, g_ent = make(6, 8, 30, torch.float32, seed=8)
    lp, ent, dh, dw = run(h, w, y, g_lp, g_ent, mask=torch.zeros(6))
    assert lp.abs().max() == 0 and ent.abs().max() == 0 and dh.abs().max() == 0 and dw.abs().max() == 0
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_logprobs(h, w.double(), y)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_logprobs(h[:, :4], w, y)
    with pytest.raises(ValueError, match="rows"):
        fused_linear_logprobs(h, w, y[:5])
    with pytest.raises(ValueError, match="mask"):
        fused_linear_logprobs(h, w, y, mask=torch.ones(5))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_logprobs(h, w, y, chunk_size=0)


# --------------------------------------------------------------------------------------------
# parallel layouts: ONE torchrun launch (4 processes) for the op and the model
# --------------------------------------------------------------------------------------------
def parallel_results() -> dict:
    from tests.parallel.launch import torchrun_once

    return torchrun_once("tests/parallel/fused_logprobs_worker.py", 4)


def _op_case_names():
    from tests.parallel.fused_logprobs_worker import OP_CASES

    return [case[0] for case in OP_CASES]


@pytest.mark.parametrize("name", _op_case_names())
def test_op_at_tp_and_sp_matches_float64(name):
    entry = parallel_results()["op"][name]
    assert "error" not in entry, f"{name}: {entry.get('error')}\n{entry.get('traceback')}"
    assert entry["chunks"] >= 2, entry  # several TP exchanges of statistics per call
    assert entry["logp"] <= FP32_TOL and entry["entropy"] <= FP32_TOL, entry
    assert entry["topk_entropy"] <= FP32_TOL, entry  # EAFT's gate: the global top-k over the TP ranks
    grad_tol = FP32_TOL if entry["dtype"] == "float32" else 1e-2
    assert entry["grad_hidden"] <= grad_tol and entry["grad_weight"] <= grad_tol, entry


def _model_layout_names():
    from tests.parallel.fused_logprobs_worker import MODEL_LAYOUTS

    return [layout[0] for layout in MODEL_LAYOUTS]


@pytest.mark.parametrize("name", _model_layout_names())
def test_model_fused_equals_unfused(name):
    """megatron GPT at the layout: fused vs unfused log-probs, entropies, hidden-state gradients,
    output-weight (tied embedding) and parameter gradients, and the forward-only pass."""
    entry = parallel_results()["model"][name]
    assert "error" not in entry, f"{name}: {entry.get('error')}\n{entry.get('traceback')}"
    assert entry["tokens"] > 0 and entry["hidden_grads_compared"] >= 2, entry
    assert entry["output_layer_calls_fused"] == 0 and entry["output_layer_calls_unfused"] > 0, entry  # no logits
    for key in ("logp", "entropy", "forward_only_logp"):
        assert entry[key] <= FP32_TOL, (key, entry)
    for key in ("grad_hidden", "grad_output_weight", "grad_params"):
        assert entry[key] <= FP32_TOL, (key, entry)


# --------------------------------------------------------------------------------------------
# the output-processor bridge (psft_megatron.compat.releases), on stand-in models
# --------------------------------------------------------------------------------------------
class _StubOutputLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(10, 4))
        self.bias = None

    def forward(self, *args, **kwargs):  # pragma: no cover - must never run
        raise AssertionError("the output layer ran")


class _StubGPT016(torch.nn.Module):
    """GPTModel.forward of 0.16 in miniature: hidden states, then the output layer if post_process."""

    def __init__(self, post_process=True, tied=False):
        super().__init__()
        self.post_process, self.share_embeddings_and_output_weights = post_process, tied
        self.output_layer = _StubOutputLayer()
        self.embedding_weight = torch.nn.Parameter(torch.randn(10, 4))
        self.config = type("Cfg", (), {"mtp_num_layers": None})()

    def shared_embedding_or_output_weight(self):
        return self.embedding_weight

    def compute_language_model_loss(self, labels, logits):  # pragma: no cover
        raise AssertionError

    def forward(self, input_ids, position_ids, attention_mask, packed_seq_params=None):
        hidden = torch.ones(input_ids.shape[1], input_ids.shape[0], 4)  # [s, b, h]
        return self.output_layer(hidden) if self.post_process else hidden


class _Wrapper(torch.nn.Module):  # DDP / Float16Module: forward delegates to .module
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_bridge_on_a_release_without_the_hook():
    from psft_megatron.compat.releases import forward_with_output_processor, has_output_processor

    seen = {}

    def processor(**kw):
        seen.update(kw)
        return "processed"

    tokens = torch.zeros(2, 3, dtype=torch.long)
    for tied in (False, True):
        gpt = _StubGPT016(tied=tied)
        model = _Wrapper(gpt)
        assert not has_output_processor(model)
        out = forward_with_output_processor(model, tokens, tokens, None, output_processor=processor,
                                            output_processor_context="ctx", packed_seq_params="psp")
        assert out == "processed" and gpt.post_process  # restored
        assert seen["hidden_states"].shape == (3, 2, 4) and seen["output_layer"] is gpt.output_layer
        assert seen["output_weight"] is (gpt.embedding_weight if tied else None)
        assert seen["context"] == "ctx" and seen["packed_seq_params"] == "psp"
    # not the last stage: the hidden states, no processor
    out = forward_with_output_processor(_Wrapper(_StubGPT016(post_process=False)), tokens, tokens, None,
                                        output_processor=processor)
    assert out.shape == (3, 2, 4)


def test_bridge_uses_the_native_hook_when_present():
    from psft_megatron.compat.releases import forward_with_output_processor, has_output_processor

    class GPT019(_StubGPT016):
        def forward(self, input_ids, position_ids, attention_mask, packed_seq_params=None, *,
                    output_processor=None, output_processor_context=None):
            hidden = torch.ones(input_ids.shape[1], input_ids.shape[0], 4)
            return output_processor(hidden_states=hidden, output_layer=self.output_layer, output_weight=None,
                                    context=output_processor_context)

    model = _Wrapper(GPT019())
    assert has_output_processor(model)
    out = forward_with_output_processor(model, torch.zeros(2, 3, dtype=torch.long), None, None,
                                        output_processor=lambda **kw: kw["context"], output_processor_context=7)
    assert out == 7


def test_processor_layout_matches_the_op_on_rows():
    """[s, b, h] hidden states and [b, s] labels/mask -> [b, s, 2], rows in megatron's order."""
    from psft_megatron.losses.fused_output import FusedLogprobProcessor

    s, b, hd, v = 5, 3, 8, 40
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(s, b, hd, generator=g)
    layer = _StubOutputLayer()
    layer.weight = torch.nn.Parameter(torch.randn(v, hd, generator=g))
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.3
    out = FusedLogprobProcessor(labels, mask)(hidden_states=hidden, output_layer=layer)
    assert out.shape == (b, s, 2) and out.dtype == torch.float32
    logsm = torch.log_softmax(hidden.transpose(0, 1) @ layer.weight.detach().t(), -1)  # [b, s, V]
    ref_lp = logsm.gather(-1, labels[..., None])[..., 0]
    ref_h = -(logsm.exp() * logsm).sum(-1)
    zero = torch.zeros(())
    assert (out[..., 0] - torch.where(mask, ref_lp, zero)).abs().max() <= FP32_TOL
    assert (out[..., 1] - torch.where(mask, ref_h, zero)).abs().max() <= FP32_TOL


def test_loss_functions_take_the_fused_output():
    """PSFTLoss(fused_output_layer=True): loss_func / logprob_func read [b, s, 2] and give what
    the unfused loss gives on the logits; bad shapes and kl_estimator='full' are refused."""
    from psft_megatron.losses import LossConfig, PSFTLoss
    from psft_megatron.losses.fused_output import FusedLogprobProcessor

    b, s, hd, v = 2, 6, 8, 30
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(s, b, hd, generator=g)
    layer = _StubOutputLayer()
    layer.weight = torch.nn.Parameter(torch.randn(v, hd, generator=g))
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    old = -3.0 - torch.rand(b, s, generator=g)
    plain, fused = PSFTLoss(LossConfig()), PSFTLoss(LossConfig(fused_output_layer=True))
    logits = (hidden.transpose(0, 1) @ layer.weight.t()).detach().requires_grad_(True)
    want = plain.loss_func(labels, mask, old_logprobs=old)(logits)
    out = FusedLogprobProcessor(labels, mask)(hidden_states=hidden, output_layer=layer)
    got = fused.loss_func(labels, mask, old_logprobs=old)(out)
    assert abs(got[0].item() - want[0].item()) <= FP32_TOL and int(got[1]) == int(want[1])
    for key in ("nll", "entropy", "clip_frac", "ratio_mean"):
        assert (got[2][key] - want[2][key]).abs().max() <= FP32_TOL, key
    got[0].backward()
    want[0].backward()
    assert rel(layer.weight.grad, (logits.grad.reshape(-1, v).t() @ hidden.transpose(0, 1).reshape(-1, hd))) <= FP32_TOL
    lp = fused.logprob_func(labels, return_entropy=False)(out.detach())[2]["logprobs"]
    assert (lp - torch.where(mask != 0, plain.logprob_func(labels)(logits)[2]["logprobs"], torch.zeros(()))
            ).abs().max() <= FP32_TOL
    with pytest.raises(ValueError, match="fused_output_layer"):
        fused.loss_func(labels, mask)(logits)
    with pytest.raises(ValueError, match="fused_output_layer"):
        LossConfig(kind="sft_kl", kl_estimator="full", fused_output_layer=True)


def test_config_key():
    import os

    from psft_megatron.config import load_run_config
    from psft_megatron.config.loader import ConfigError
    from tests.parallel.launch import REPO

    configs = os.path.join(REPO, "configs")
    cfg, _ = load_run_config(configs, "tiny_cpu", ["model.psft.fused_output_layer=true"])
    assert cfg.model.psft.fused_output_layer is True
    assert load_run_config(configs, "tiny_cpu", [])[0].model.psft.fused_output_layer is False
    with pytest.raises(ConfigError, match="model.psft.fused_output_layer must be true or false"):
        load_run_config(configs, "tiny_cpu", ["model.psft.fused_output_layer=3"])
