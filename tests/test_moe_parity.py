"""MoE parallel parity: every layout equals an independent plain-torch reference within 1e-5.

The reference (tests/parallel/moe_parity_worker.py) is written in plain torch on the state-dict
tensors - attention, router, top-k, experts, megatron's aux-loss formula and its gradient
scaling, AdamW - not megatron's own single-process run. Compared per optimizer step: the
objective (SFT, PSFT with pi_old re-synced every K=4 steps, SFT-KL), entropy, clip fraction /
KL, the aux loss, the busiest expert's load, the gradient norm; and an eval pass after 3 steps.

Layouts: EP2 (+ distributed optimizer), TP2+SP with ETP1 and ETP2, TP2+SP+EP2 (ETP 1 and 2),
CP2+EP2, EP2xDP2, PP2+EP2, with the alltoall and allgather token dispatchers. A checkpoint
saved at EP2 with the distributed optimizer loads at EP1, EP4 and TP2+SP+EP2 with its Adam state
and continues like the reference; loaded without the Adam state it must not. Two planted bugs
(the aux-loss gradient not scaled by TP*CP; expert gradients reduced over the dense DP group)
must make their layouts fail - proof that the harness can fail.

One torchrun launch per world size (2 and 4 processes) runs all its layouts.
"""

import subprocess

import pytest

from tests.parallel.launch import torchrun
from tests.parallel.moe_parity_worker import CKPT_SUITES, SUITES, TOLERANCE, WEIGHTS_ONLY
from tests.parallel.results import check_loads, check_planted

_cache = {}


def suite_result(suite: str) -> dict:
    """The launch's result, once per session; a failed launch is reported by every test of the
    suite without launching again. The time limit is generous for a loaded machine: the two
    launches take about 2 minutes together on 2 idle cores."""
    if suite not in _cache:
        try:
            _cache[suite] = torchrun("tests/parallel/moe_parity_worker.py", {"two": 2, "four": 4}[suite],
                                     ["--suite", suite], timeout=1800)
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            _cache[suite] = f"the {suite!r} launch failed: {exc}"
    if isinstance(_cache[suite], str):
        raise AssertionError(_cache[suite])
    return _cache[suite]


LAYOUTS = [(suite, layout.name, layout.plant) for suite, layouts in SUITES.items() for layout in layouts]


def _check_entry(name: str, entry: dict) -> None:
    assert "error" not in entry, f"{name}: {entry.get('error')}\n{entry.get('traceback')}"
    assert "grad_norm" in entry["metrics"] and "aux" in entry["metrics"], entry["metrics"].keys()


@pytest.mark.parametrize("suite,name,plant", LAYOUTS, ids=[name for _, name, _ in LAYOUTS])
def test_moe_layout_matches_reference(suite, name, plant):
    entry = suite_result(suite)["layouts"][name]
    _check_entry(name, entry)
    diff = entry["max_abs_diff"]
    if plant is None:
        # router logits agree across layouts to ~1e-6; a top-k choice closer than that to a tie could
        # flip at another layout (seed or model changed?): not a parity failure
        assert min(entry["reference"]["router_margin"]) > TOLERANCE, entry["reference"]["router_margin"]
        assert diff <= TOLERANCE, (
            f"{name} ({entry['layout']}, {entry['dispatcher']}): metrics {entry['metrics']} differ from "
            f"{entry['reference']} by {diff:.3g}"
        )
        assert min(entry["metrics"]["aux"]) > 0.5, entry["metrics"]["aux"]  # E * sum f_i P_i: 1 when balanced
        if "clip_frac" in entry["metrics"]:  # the PSFT clip must bind, or its branch is untested
            assert max(entry["metrics"]["clip_frac"]) > 0.1, entry["metrics"]
        if "kl" in entry["metrics"]:  # the KL term must be live after the first step
            assert entry["metrics"]["kl"][-1] > 1e-4, entry["metrics"]
    else:
        check_planted(diff, plant, TOLERANCE)


CKPTS = [(suite, scenario[0]) for suite, scenarios in CKPT_SUITES.items() for scenario in scenarios]


@pytest.mark.parametrize("suite,name", CKPTS, ids=[name for _, name in CKPTS])
def test_moe_checkpoint_reshards_with_optimizer_state(suite, name):
    entry = suite_result(suite)["checkpoints"][name]
    assert "error" not in entry, f"{name}: {entry.get('error')}\n{entry.get('traceback')}"
    assert entry["save"]["max_abs_diff"] <= TOLERANCE, entry["save"]
    assert entry["save"]["continued_diff"] <= TOLERANCE, entry["save"]  # the saver itself, no checkpoint
    scenario = next(s for s in CKPT_SUITES[suite] if s[0] == name)
    expected = {loader.name for loader in scenario[2]} | {WEIGHTS_ONLY + "_weights_only"}
    loads = {k: v for k, v in entry.items() if k in expected}
    assert set(loads) == expected, sorted(entry)
    check_loads(loads, TOLERANCE, iteration=3, context=entry["reference_continued"])


@pytest.mark.parametrize("suite,name", CKPTS, ids=[name for _, name in CKPTS])
def test_moe_checkpoint_passes_the_strict_key_check(suite, name):
    # an MoE model's ChainedOptimizer stores "chained_<i>.optimizer..." keys: optimizer state,
    # not unexpected weights (psft_megatron.checkpointing.dist_checkpoint._is_model_key)
    entry = suite_result(suite)["checkpoints"][name]
    assert "error" not in entry, f"{name}: {entry.get('error')}"
    refused = {k: v["strict_error"] for k, v in entry.items() if isinstance(v, dict) and v.get("strict_error")}
    assert not refused, refused
