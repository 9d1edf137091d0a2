"""MoE on gloo: each MoE fix (psft_megatron.compat.moe_fixes) and each multi-rank CPU patch
(psft_megatron.compat.cpu.MULTI_RANK_PATCHES) shows its bug with the fix off exactly on the
megatron-core releases it is declared for, and never with it on; the allgather dispatcher runs
at TP=2+SP, EP=2; the layer specs write the same checkpoint keys for MoE layers.

One 4-process launch (tests/parallel/moe_worker.py) runs every probe; see its docstring.
"""

import pytest

from psft_megatron.compat import cpu as cpu_compat, moe_fixes
from tests.parallel.moe_worker import launch_once

NAMES = [fix.name for fix in moe_fixes.FIXES] + list(cpu_compat.MULTI_RANK_PATCHES)


@pytest.mark.parametrize("name", NAMES)
def test_fix_is_needed_exactly_where_declared(name):
    result = launch_once()
    entry = result["fixes"][name]
    version = result["megatron_core"]
    print(f"megatron-core {version}, {name} (declared for {entry['range']}): "
          f"off -> {entry['off']['detail']}; on -> {entry['on']['detail']}")
    assert not entry["on"]["bug"], f"{name} on, megatron-core {version}: {entry['on']['detail']}"
    assert entry["applied"] == entry["needed"], entry
    if entry["needed"]:
        assert entry["off"]["bug"], (f"megatron-core {version} does not show the bug {name} is for "
                                     f"(declared {entry['range']}): drop it for this release")
    if not entry["needed"]:
        assert not entry["off"]["bug"], (f"megatron-core {version} has the bug {name} fixes, but the fix "
                                         f"is declared only for {entry['range']}: {entry['off']['detail']}")


def test_allgather_dispatcher_matches_reference():
    entry = launch_once()["allgather_ep2_tp2"]
    assert not entry["bug"], entry["detail"]


def test_layer_specs_write_the_same_moe_keys():
    keys = launch_once()["spec_keys"]
    first, *others = keys
    for spec in others:
        assert keys[spec] == keys[first], (spec, sorted(set(keys[spec]) ^ set(keys[first])))
    cpu = set(keys["cpu"])
    for key in ("decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.0.mlp.router.weight",
                "decoder.layers.0.mlp.experts.experts.linear_fc1.weight",
                "decoder.layers.0.mlp.experts.experts.linear_fc2.weight",
                "decoder.layers.0.mlp.shared_experts.linear_fc1.weight",
                "decoder.layers.0.mlp.shared_experts.linear_fc2.weight",
                "decoder.layers.0.mlp.shared_experts.gate_weight",
                "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"):  # layer 1 is dense
        assert key in cpu, key
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" not in cpu


def test_trainer_logs_moe_metrics():
    """configs/tiny_moe_cpu.yaml trained 3 steps at EP=2: the aux loss and the expert load of each
    step equal what follows from the routers' own logits in the training forwards of all ranks
    (tests/parallel/moe_worker.py: RouterRecorder), for every token routed to top-2 of 8 experts in
    each of the 2 MoE layers."""
    result = launch_once()["trainer"]
    assert len(result["history"]) == len(result["expected"]) == 3
    for step, expected in zip(result["history"], result["expected"]):
        for key, value in expected.items():
            assert step[key] == pytest.approx(value, rel=1e-5), (key, step, expected)
        assert step["moe_tokens_per_expert"] == pytest.approx(step["num_positions"] * 2 / 8, rel=1e-9), step
    # the check can fail: the routing is not balanced, and the layers differ
    loads = [step["moe_load_max_mean/layer_0"] for step in result["history"]]
    assert all(load > 1.0 for load in loads) and loads != [s["moe_load_max_mean/layer_1"] for s in result["history"]]
    assert {"moe_aux_loss", "moe_load_max_mean", "moe_load_max_mean/layer_1"} <= set(result["jsonl_keys"])


def test_moe_metrics_read_the_device_once_per_step():
    """Reduced on the device: one host read per step, not one or two per MoE layer."""
    assert launch_once()["trainer"]["host_reads"] == [1, 1, 1]


def test_mfu_counts_the_active_parameters():
    """tiny_moe_cpu at EP=2: every expert counted once (half of them live on other DP ranks), and
    a token's forward uses the dense parts and top-2 of the 8 experts of each MoE layer."""
    p = launch_once()["trainer"]["parameters"]
    assert p["total"] == p["expected_total"] and p["active"] == p["expected_active"] < p["total"], p
