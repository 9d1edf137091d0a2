"""The loss plug-in in megatron's shapes (psft_megatron.plugin): the traps of using it in a loop
written elsewhere, each with a test, and the examples at TP=2 and PP=2.

Single process: the normaliser check, the fused op's row order, the output a loss is handed,
metrics under Megatron-LM's train_step reduction, the objective table, the out_dtype fallback,
clip_eps_low, the documented CPU-loop lines, EAFT's top-k channel and ASFT's reference. One 2-process launch
(tests/parallel/plugin_worker.py): both examples at TP=2 and PP=2, parity with the trainer
(calculate_per_token_loss on and off), collect_old_logprobs at PP=2 / PP=2+VPP=2 with dropout,
the ratio at a window start, the refusal on every rank.
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest
import torch

from psft_megatron import plugin
from psft_megatron.errors import ConfigError
from psft_megatron.losses import LossConfig, PSFTLoss
from psft_megatron.ops import RowSelection, fused_linear_logprobs
from tests.parallel.launch import REPO

TOL = 1e-5


def tagged(t: torch.Tensor, entropy: bool = False) -> torch.Tensor:
    """What an enabled model returns: the tensor, marked with its channels."""
    setattr(t, plugin._OUTPUT_TAG, ("logprob", "entropy") if entropy else ("logprob",))
    return t


def batch(b=3, s=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, s, generator=g) * 3
    old = logp - 0.3 * torch.randn(b, s, generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    return logp, old, mask


# ----------------------------------------------------------------------------- trap 1
def test_trap1_normaliser_megatron_would_not_apply_is_refused():
    bad = SimpleNamespace(calculate_per_token_loss=True, finalize_model_grads_func=None)
    with pytest.raises(ConfigError) as err:
        plugin.check_normaliser(bad)
    line = err.value.line()
    assert "\n" not in line and "finalize_model_grads_func" in line and "calculate_per_token_loss" in line
    plugin.check_normaliser(SimpleNamespace(calculate_per_token_loss=True, finalize_model_grads_func=print))
    plugin.check_normaliser(SimpleNamespace(calculate_per_token_loss=False, finalize_model_grads_func=None))


# ----------------------------------------------------------------------------- trap 2
def test_trap2_fused_op_takes_the_models_layout_and_refuses_unknown_row_order():
    s, b, h, v = 5, 3, 8, 40
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(s, b, h, generator=g)  # GPTModel's [s, b, h]
    weight = torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (b, s), generator=g)  # [b, s]
    mask = torch.rand(b, s, generator=g) > 0.3
    lp, ent = fused_linear_logprobs(hidden, weight, labels, mask=mask, return_entropy=True, chunk_size=4,
                                    vocab_block_size=16)
    logsm = torch.log_softmax(hidden.transpose(0, 1) @ weight.t(), -1)  # [b, s, V]
    zero = torch.zeros(())
    assert lp.shape == (b, s)
    assert (lp - torch.where(mask, logsm.gather(-1, labels[..., None])[..., 0], zero)).abs().max() <= TOL
    assert (ent - torch.where(mask, -(logsm.exp() * logsm).sum(-1), zero)).abs().max() <= TOL
    # the call: hidden rows flattened [s, b], labels flattened [b, s] - refused, not permuted
    with pytest.raises(ValueError, match="row order is unknown"):
        fused_linear_logprobs(hidden.reshape(-1, h), weight, labels.reshape(-1))
    with pytest.raises(ValueError, match="row order is unknown"):
        fused_linear_logprobs(hidden.reshape(-1, h), weight, labels, rows_match_labels=True)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_logprobs(hidden, weight, labels.t())
    # a selection made earlier (as the processor does before the forward) gives the same values
    lp2 = fused_linear_logprobs(hidden, weight, labels, mask=RowSelection(mask), chunk_size=4, vocab_block_size=16)
    assert torch.equal(lp2, lp)
    with pytest.raises(ValueError, match="mask shape"):
        fused_linear_logprobs(hidden, weight, labels, mask=RowSelection(mask.t()))


# ----------------------------------------------------------------------------- trap 3
def test_trap3_loss_takes_the_per_token_output_and_names_the_fix_otherwise():
    logp, old, mask = batch()
    x = logp.clone().requires_grad_(True)
    loss_sum, n, metrics = plugin.PluginLoss(LossConfig(kind="sft"))(mask, tagged(x))
    assert int(n) == int(mask.sum()) and loss_sum.item() == pytest.approx(-(logp * mask).sum().item(), rel=1e-6)
    loss_sum.backward()
    assert torch.equal(x.grad, -mask)
    both = tagged(torch.stack([logp, torch.rand_like(logp)], -1), entropy=True)
    assert "entropy" in plugin.PluginLoss()(mask, both, old_logprobs=old)[2]
    # megatron's cross-entropy (the switch not enabled) and logits are refused, naming the fix
    with pytest.raises(ValueError, match="enable_logprob_output"):
        plugin.PluginLoss()(mask, -logp)
    with pytest.raises(ValueError, match="enable_logprob_output"):
        plugin.PluginLoss()(mask, torch.randn(3, 7, 11))
    with pytest.raises(ValueError, match="old_logprobs shape"):
        plugin.PluginLoss()(mask, tagged(logp), old_logprobs=old[:, :3])
    with pytest.raises(ValueError, match="psft_megatron.plugin"):  # PSFTLoss handed the per-token output
        PSFTLoss().loss_func(torch.zeros(3, 7, dtype=torch.long), mask)(-logp)


# ----------------------------------------------------------------------------- trap 5
def test_trap5_the_cpu_layer_and_finalize_requirement_are_documented_and_run():
    """docs/plugin.md's own-loop lines are in examples/plugin_mcore_loop.py, whose main() the
    2-process launch runs (TP=2): the documented lines work."""
    with open(os.path.join(REPO, "docs", "plugin.md")) as f:
        doc = f.read()
    with open(os.path.join(REPO, "examples", "plugin_mcore_loop.py")) as f:
        example = f.read()
    for needed in ('init_process_group("gloo")', "cpu.install()", "config.finalize_model_grads_func = finalize_model_grads",
                   "enable_logprob_output(", "PluginLoss(", "collect_old_logprobs("):
        assert needed in doc and needed in example, needed


def test_docs_snippet_is_the_examples_code():
    """The 10-20 lines of docs/plugin.md for NVIDIA's example loop appear, line by line, in the
    examples that run in the 2-process launch."""
    with open(os.path.join(REPO, "docs", "plugin.md")) as f:
        doc = f.read()
    block = re.search(r"<!-- snippet: nvidia-loop -->\n```python\n(.*?)```", doc, re.S).group(1)
    lines = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert 10 <= len(block.splitlines()) <= 20
    sources = ""
    for name in ("plugin_mcore_loop.py", "plugin_bridge_forward_step.py"):
        with open(os.path.join(REPO, "examples", name)) as f:
            sources += f.read()
    flat = re.sub(r"\s+", " ", sources)
    missing = [ln for ln in lines if re.sub(r"\s+", " ", ln.split("  #")[0].strip()) not in flat]
    assert not missing, missing


# ----------------------------------------------------------------------------- trap 6
def test_trap6_dropout_is_off_by_default_and_the_old_pass_says_eval_mode():
    from psft_megatron.distributed.runtime import ParallelConfig
    from psft_megatron.model import ModelConfig

    tc = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, ffn_hidden_size=16,
                     vocab_size=16).to_transformer_config(ParallelConfig())
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0
    assert "eval mode" in plugin.collect_old_logprobs.__doc__
    logp, _, mask = batch()
    metrics = plugin.PluginLoss(metrics="all")(mask, tagged(logp.clone()))[2]  # old=None: ratio exactly 1
    assert metrics["ratio_mean"][0] == metrics["ratio_mean"][1] and metrics["ratio_max"][0] == 1.0


# ----------------------------------------------------------------------------- trap 7
def megatron_lm_reduction(dicts):
    """Megatron-LM's (and Megatron-Bridge's) train_step reduction, one process: a 2-element
    value is summed over micro-batches (then over DP) and divided; a 1-element one averaged."""
    out = {}
    for key in dicts[0]:
        vals = [d[key].reshape(-1) for d in dicts]
        if vals[0].numel() == 2:
            total = torch.stack(vals).sum(0)
            out[key] = (total[0] / total[1]).item()
        else:
            out[key] = torch.cat(vals).mean().item()
    return out


def test_trap7_metrics_reduce_right_under_megatron_lms_train_step():
    micro = [batch(2, 5 + i, seed=i) for i in range(3)]  # different token counts and maxima
    for kind in ("psft", "sft", "dft"):
        loss = plugin.PluginLoss(LossConfig(kind=kind))
        dicts = [loss(mask, tagged(lp), old_logprobs=old)[2] for lp, old, mask in micro]
        theirs, ours = megatron_lm_reduction(dicts), plugin.reduce_metrics(dicts)
        assert theirs.keys() == ours.keys()
        for key in ours:
            assert theirs[key] == pytest.approx(ours[key], rel=1e-6, abs=1e-7), (kind, key)
    # metrics="all" adds the max and the total, which only reduce_metrics reduces right
    loss = plugin.PluginLoss(LossConfig(kind="psft"), metrics="all")
    dicts = [loss(mask, tagged(lp), old_logprobs=old)[2] for lp, old, mask in micro]
    ours = plugin.reduce_metrics(dicts)
    ratios = [torch.exp(lp - old)[mask != 0].max().item() for lp, old, mask in micro]
    assert ours["ratio_max"] == pytest.approx(max(ratios), rel=1e-6)
    assert ours["num_tokens"] == sum(float(mask.sum()) for _, _, mask in micro)
    assert megatron_lm_reduction(dicts)["ratio_max"] != pytest.approx(max(ratios))  # theirs: a mean of maxima


# ----------------------------------------------------------------------------- the objective table
def test_a_new_loss_kind_is_one_registry_entry():
    from psft_megatron.losses import objectives

    def half_sft(x):
        return objectives.ObjectiveResult(-0.5 * x.logp, means={"half": torch.ones_like(x.logp)})

    objectives.register_objective("half_sft", half_sft, summary="-logp / 2")
    try:
        import psft_megatron.losses.config as config_module

        config_module.LOSS_KINDS = tuple(objectives.OBJECTIVES)  # as at import time
        logp, _, mask = batch()
        loss_sum, n, metrics = plugin.PluginLoss(LossConfig(kind="half_sft"))(mask, tagged(logp))
        assert loss_sum.item() == pytest.approx(-0.5 * (logp * mask).sum().item(), rel=1e-6)
        assert metrics["half"].tolist() == [float(n), float(n)]
        with pytest.raises(ValueError, match="already registered"):
            objectives.register_objective("half_sft", half_sft, summary="")
    finally:
        del objectives.OBJECTIVES["half_sft"]
        config_module.LOSS_KINDS = tuple(objectives.OBJECTIVES)
    with pytest.raises(ValueError, match="half_sft"):
        LossConfig(kind="half_sft")
    with pytest.raises(ValueError, match="needs the logits"):
        plugin.PluginLoss(LossConfig(kind="sft_kl", kl_estimator="full"))


class _TinyHead(torch.nn.Module):
    """megatron's output layer in miniature: ``(h @ W^T, None)``, no bias, no TP."""

    def __init__(self, v, h, gen):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(v, h, generator=gen))
        self.bias = None

    def forward(self, hidden, weight=None):
        return hidden @ (self.weight if weight is None else weight).t(), None


class _TinyGPT(torch.nn.Module):
    """GPTModel's contract on one process: embedding -> [s, b, h] hidden states -> output layer."""

    def __init__(self, v=40, h=8, seed=3):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embedding = torch.nn.Parameter(torch.randn(v, h, generator=gen))
        self.output_layer = _TinyHead(v, h, gen)
        self.post_process, self.share_embeddings_and_output_weights = True, False
        self.config = SimpleNamespace(mtp_num_layers=None)

    def compute_language_model_loss(self, labels, logits):  # pragma: no cover - never with the switch
        raise AssertionError("the cross-entropy ran")

    def forward(self, input_ids, position_ids, attention_mask, labels=None, loss_mask=None, packed_seq_params=None):
        hidden = self.embedding[input_ids].transpose(0, 1)  # [s, b, h]
        return self.output_layer(hidden)[0] if self.post_process else hidden


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
def test_eaft_and_asft_through_the_plugin_equal_psftloss_on_the_logits(fused, entropy):
    """enable_logprob_output(topk_entropy=k) adds the top-k entropy channel (from the logits, or
    merged over the fused op's tiles); PluginLoss(eaft) / PluginLoss(asft, k3) then give the
    value and the gradients PSFTLoss gives on the logits; a missing or other-k channel is refused."""
    g = torch.Generator().manual_seed(4)
    b, s, v = 3, 7, 40
    tokens = torch.randint(0, v, (b, s), generator=g)
    labels = torch.randint(0, v, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    ref = -3.0 * torch.rand(b, s, generator=g)
    cases = [(LossConfig(kind="eaft", eaft_topk=5, eaft_alpha=0.5), {}),
             (LossConfig(kind="asft", asft_kl_coef=0.3), {"ref_logprobs": ref})]
    for cfg, extra in cases:
        model = _TinyGPT()
        plugin.enable_logprob_output(model, fused=fused, return_entropy=entropy, topk_entropy=5)
        out = model(tokens, None, None, labels=labels, loss_mask=mask)
        assert out.shape == (b, s, 3 if entropy else 2)
        loss_sum, n, metrics = plugin.PluginLoss(cfg)(mask, out, **extra)
        loss_sum.backward()
        want_model = _TinyGPT()
        logits = want_model.embedding[tokens] @ want_model.output_layer.weight.t()  # [b, s, V]
        want, n_want, want_metrics = PSFTLoss(cfg).loss_func(labels, mask, ref=extra.get("ref_logprobs"))(logits)
        want.backward()
        assert loss_sum.item() == pytest.approx(want.item(), rel=1e-5) and int(n) == int(n_want)
        for key in ("eaft_weight", "topk_entropy", "kl"):
            if key in want_metrics:
                assert (metrics[key] - want_metrics[key]).abs().max() <= TOL, key
        for got_p, want_p in ((model.embedding, want_model.embedding),
                              (model.output_layer.weight, want_model.output_layer.weight)):
            assert (got_p.grad - want_p.grad).abs().max() <= TOL * want_p.grad.abs().max()
    model = plugin.enable_logprob_output(_TinyGPT(), fused=fused, topk_entropy=4)
    out = model(tokens, None, None, labels=labels, loss_mask=mask)
    with pytest.raises(ValueError, match="topk_entropy=5"):  # made for k = 4
        plugin.PluginLoss(LossConfig(kind="eaft", eaft_topk=5))(mask, out)
    with pytest.raises(ValueError, match="topk_entropy=20"):  # no top-k channel at all
        plugin.PluginLoss(LossConfig(kind="eaft"))(mask, tagged(labels.float()))


def test_clip_eps_low_changes_nothing_with_advantage_one():
    logp, old, mask = batch()
    results = []
    for eps_low in (0.0, 0.2, 0.9):
        x = logp.clone().requires_grad_(True)
        loss_sum, _, metrics = plugin.PluginLoss(LossConfig(kind="psft", clip_eps_low=eps_low), metrics="all")(
            mask, tagged(x), old_logprobs=old)
        loss_sum.backward()
        results.append((loss_sum.item(), x.grad, {k: v.tolist() for k, v in metrics.items()}))
    assert (torch.exp(logp - old)[mask != 0] < 0.8).any()  # ratios below every lower clip tried
    for value, grad, metrics in results[1:]:
        assert value == results[0][0] and torch.equal(grad, results[0][1]) and metrics == results[0][2]


# ----------------------------------------------------------------------------- the out_dtype fast path
def test_out_dtype_fallback_only_for_an_unsupported_out_dtype(monkeypatch):
    import importlib

    module = importlib.import_module("psft_megatron.ops.fused_linear_logprobs")

    a, b = torch.randn(4, 3, dtype=torch.bfloat16), torch.randn(3, 5, dtype=torch.bfloat16)
    real_mm = torch.mm

    def oom(*args, **kwargs):
        if "out_dtype" in kwargs:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(module, "_MM_OUT_DTYPE_OK", {})
    monkeypatch.setattr(torch, "mm", oom)
    with pytest.raises(torch.OutOfMemoryError):
        module._mm_fp32(a, b)
    assert module._MM_OUT_DTYPE_OK.get("cpu", True) is True  # still on
    monkeypatch.setattr(torch, "mm", real_mm)
    out = module._mm_fp32(a, b)  # CPU: no out_dtype kernel -> fp32 operands, fast path off
    assert out.dtype == torch.float32 and module._MM_OUT_DTYPE_OK["cpu"] is False
    assert torch.equal(out, a.float() @ b.float())


# ----------------------------------------------------------------------------- one 2-process launch
def launched():
    from tests.parallel.launch import torchrun_once

    return torchrun_once("tests/parallel/plugin_worker.py", 2, timeout=900)


def part(name):
    res = launched()[name]
    assert "error" not in res, f"{res.get('error')}\n{res.get('traceback')}"
    return res


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_examples_run_at_tp2_and_pp2(layout):
    res = part("examples")
    mcore, bridge = res[f"mcore_{layout}"], res[f"bridge_{layout}"]
    assert len(mcore) == 5 and all(m["loss"] == m["loss"] for m in mcore)
    for step in (0, 4):  # window starts: old_logprobs=None, ratio exactly 1
        assert mcore[step]["ratio_mean"] == 1.0 and mcore[step]["clip_frac"] == 0.0
    assert max(m["clip_frac"] for m in mcore) > 0.1  # PSFT's clip binds inside a window
    for ours, theirs in zip(mcore, bridge):  # the Bridge-contract step trains the same numbers
        assert abs(ours["loss"] - theirs["loss"]) <= TOL


@pytest.mark.parametrize("name", ["tp2_per_token_on", "tp2_per_token_off", "pp2_per_token_on", "pp2_per_token_off"])
def test_plugin_loop_equals_the_trainer(name):
    res = part("parity")[name]
    assert res["steps"] == 5 and len(res["trainer_loss"]) == 5
    diffs = [abs(a - b) for a, b in zip(res["trainer_loss"], res["plugin_loss"])]
    assert max(diffs) <= TOL, (res["trainer_loss"], res["plugin_loss"])
    assert res["grad_max_abs_diff"] <= TOL * max(1.0, res["grad_max_abs"]), res
    assert res["grad_max_abs"] > 1e-3


def test_per_token_switch_changes_the_gradients():
    """The off mode is not the on mode renamed: megatron's per-micro-batch mean differs."""
    res = part("parity")
    on, off = res["tp2_per_token_on"], res["tp2_per_token_off"]
    assert max(abs(a - b) for a, b in zip(on["trainer_loss"][1:], off["trainer_loss"][1:])) > 1e-4


@pytest.mark.parametrize("name", ["pp2", "pp2_vpp2_fused", "tp2_fused"])
def test_trap4_collect_old_logprobs_at_pp_and_vpp_with_dropout(name):
    res = part("collect")[name]
    assert res["max_abs_diff"] <= TOL, res
    assert res["train_mode_restored"] is True
    if name.startswith("pp2"):
        assert res["none_off_last_stage"] is True


def test_trap6_ratio_at_a_window_start_with_dropout():
    res = part("collect")["ratio_at_window_start_dropout"]
    assert res["none"] == [1.0, 1.0]  # old_logprobs=None: exactly 1 under dropout too
    assert res["eval_pass"][0] != 1.0  # the eval-mode old pass against a dropout forward


def test_trap1_refused_on_every_rank_before_any_step():
    assert "finalize_model_grads_func is None" in part("collect")["refusal"]
