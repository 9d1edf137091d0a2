"""The trainer end to end (tests/parallel/trainer_worker.py, one 4-process launch):
the same tiny PSFT run (K = 4) at TP=1, TP=2, TP=2+SP, PP=2, TP=2+PP=2 and CP=2 gives the
same per-step metrics within 1e-5 (fp32), also with the fused output layer (TP=2+SP, TP=2+PP=2,
CP=2); K = 1 trains exactly like SFT; the SFT warm-up
switches to PSFT at step W; ASFT (reference through the pipeline) and EAFT (fused) train like
at TP=1 and log their metrics."""

import pytest

from tests.parallel.launch import torchrun
from tests.parallel.trainer_worker import FUSED, LAYOUTS

TOLERANCE = 1e-5
_cache = {}


def results():
    if "r" not in _cache:
        _cache["r"] = torchrun("tests/parallel/trainer_worker.py", 4, [])
    return _cache["r"]


def history(name):
    entry = results()[name]
    assert "error" not in entry, f"{name}: {entry.get('error')}\n{entry.get('traceback')}"
    return entry["history"]


def series(name, key):
    return [h[key] for h in history(name)]


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "tp1"])
def test_psft_curve_is_layout_independent(name):
    for key in ("loss", "nll", "entropy", "clip_frac"):
        got, want = series(name, key), series("tp1", key)
        assert len(got) == len(want) == 8
        diff = max(abs(a - b) for a, b in zip(got, want))
        assert diff <= TOLERANCE, f"{name} {key}: {got} vs TP=1 {want} (diff {diff:.3g})"


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_output_layer_trains_like_the_unfused_path(name):
    # model.psft.fused_output_layer=true: training step, old-policy pass (and metrics) through
    # ops.fused_linear_logprobs; the curve must equal the unfused TP=1 run's
    for key in ("loss", "nll", "entropy", "clip_frac", "ratio_mean"):
        got, want = series(name, key), series("tp1", key)
        assert len(got) == len(want) == 8
        diff = max(abs(a - b) for a, b in zip(got, want))
        assert diff <= TOLERANCE, f"{name} {key}: {got} vs TP=1 unfused {want} (diff {diff:.3g})"


def test_old_policy_windows():
    loss, ratio = series("tp1", "loss"), series("tp1", "ratio_mean")
    # K = 4: the first batch of each window has ratio exactly 1; later ones move and clip.
    assert ratio[0] == 1.0 and ratio[4] == 1.0 and loss[0] == -1.0 and loss[4] == -1.0
    assert all(r > 1.0 for i, r in enumerate(ratio) if i % 4), ratio
    assert max(series("tp1", "clip_frac")) > 0.0


@pytest.mark.parametrize("name", ["tp2_pp2", "cp2"])
def test_old_logprobs_are_a_fresh_forward_of_the_window_start_weights(name):
    history(name)
    check = results()[name]["old_logprob_check"]
    assert check["batches"] >= 6, check  # 2 windows x 3 batches (x micro-batches) on the last stage
    assert check["max_diff"] <= 1e-6, check


def test_frozen_old_policy_stays_the_initial_model():
    """model.psft.freeze_old_policy: the old log-probs of every batch, late windows included, are
    the initial model's (an independent copy loaded from the initial checkpoint), not the
    window-start weights' a dynamic pi_old uses."""
    frozen, dynamic = history("frozen"), history("tp2_sp")
    windows = results()["frozen"]["frozen_check"]
    assert [w["step"] for w in windows] == [0, 4], windows  # windows start before steps 1 and 5
    for window in windows:
        assert window["micro_batches"] == 4 * 2, window  # K batches x 2 micro-batches on each DP rank
        assert window["vs_initial"] <= 1e-6, window
    assert windows[0]["vs_window_start"] <= 1e-6  # the first window starts from the initial model
    assert windows[1]["vs_window_start"] > 1e-2, windows[1]  # 4 steps later the weights have moved
    # the first batch of a later window: ratio 1 for a dynamic pi_old, not for the frozen one
    assert dynamic[4]["ratio_mean"] == 1.0 and abs(frozen[4]["ratio_mean"] - 1.0) > 1e-3, frozen[4]
    assert [h["loss"] for h in frozen[:4]] == pytest.approx([h["loss"] for h in dynamic[:4]], abs=TOLERANCE)


def test_k1_trains_exactly_like_sft():
    assert series("k1", "loss") == [-1.0] * 8  # ratio 1 on every batch
    got, want = series("k1", "nll"), series("sft", "nll")
    assert max(abs(a - b) for a, b in zip(got, want)) <= TOLERANCE, (got, want)


def test_warmup_switches_at_step_w():
    warm, sft = history("warmup3"), history("sft")
    assert [h["phase"] for h in warm] == [0.0] * 3 + [1.0] * 5
    assert [h["loss"] for h in warm[:3]] == pytest.approx([h["loss"] for h in sft[:3]], abs=TOLERANCE)
    assert warm[3]["loss"] == -1.0 and warm[7]["loss"] == -1.0  # windows start at W and W + K
    assert all(h["loss"] < -1.0 for h in warm[4:7])


@pytest.mark.parametrize("name", ["sft_kl_pp2", "sft_kl_tp2_pp2"])
def test_sft_kl_with_pipeline_parallelism_matches_tp1(name):
    """The frozen reference runs through the pipeline; its log-probs reach the last stage."""
    for key in ("loss", "nll", "kl"):
        got, want = series(name, key), series("sft_kl_tp1", key)
        assert len(got) == len(want) == 8
        diff = max(abs(a - b) for a, b in zip(got, want))
        assert diff <= TOLERANCE, f"{name} {key}: {got} vs TP=1 {want} (diff {diff:.3g})"
    assert max(series("sft_kl_tp1", "kl")) > 0.0  # the reference term is live


@pytest.mark.parametrize("name,want", [("asft_tp2_pp2", "asft_tp1"), ("eaft_fused_tp2_sp", "eaft_tp1")])
def test_asft_and_eaft_train_like_tp1_and_log_their_metrics(name, want):
    """model.psft.loss=asft: the frozen initial model's log-probs reach the last stage (the
    trainer's reference pass, run for every kind that requires "ref"); loss=eaft: the gate from
    the fused op's top-k at TP=2+SP. Both curves equal the TP=1 unfused run's."""
    own = "kl" if name.startswith("asft") else "eaft_weight"
    for key in ("loss", "nll", own):
        got, ref = series(name, key), series(want, key)
        assert len(got) == len(ref) == 4
        diff = max(abs(a - b) for a, b in zip(got, ref))
        assert diff <= TOLERANCE, f"{name} {key}: {got} vs {want} {ref} (diff {diff:.3g})"
    if own == "kl":  # step 1: the policy is the reference (KL 0); then it moves away
        assert series(name, "kl")[0] == pytest.approx(0.0, abs=1e-7) and min(series(name, "kl")[1:]) > 0.0
    else:
        assert all(0.0 < w < 1.0 for w in series(name, own)) and "topk_entropy" in history(name)[0]
