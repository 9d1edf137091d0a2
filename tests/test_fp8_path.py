"""The FP8 / layer-spec path on CPU, one 2-process launch (tests/parallel/fp8_path_worker.py):
megatron's FP8 region around the decoder only, the old-policy pass inside the same region
without touching training state, FP8 sequence alignment, frozen copies, and checkpoints with
and without FP8 metadata across specs and layouts."""

import collections

import pytest

from tests.parallel.launch import torchrun

DECODER_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@pytest.fixture(scope="module")
def result():
    return torchrun("tests/parallel/fp8_path_worker.py", 2, [])


def _ok(result, name):
    run = result[name]
    assert "error" not in run, f"{name}: {run.get('error')}\n{run.get('traceback', '')}\n{result['log'][-4000:]}"
    return run


@pytest.mark.parametrize("name,recipe,fmt,history,algo", [("trainer_delayed", "delayed", "hybrid", 16, "max"),
                                                          ("trainer_tensorwise", "tensorwise", "e4m3", 1, "most_recent")])
def test_old_policy_pass_runs_in_the_training_fp8_region(result, name, recipe, fmt, history, algo):
    run = _ok(result, name)
    phases = collections.Counter(e["phase"] for e in run["entries"])
    # 5 steps at K=4: windows at steps 1 and 5, 3 + 3 old-policy batches of 2 micro-batches
    assert run["old_passes"] == 2 and phases["old"] > 0 and phases["train"] > 0
    expected = dict(fp8=fmt, fp8_recipe=recipe, fp8_margin=0, fp8_amax_history_len=history,
                    fp8_amax_compute_algo=algo, fp8_param=False)
    for entry in run["entries"]:
        assert entry["model"] == "live" and entry["fields"] == expected, entry
        assert entry["grad_enabled"] == (entry["phase"] == "train"), entry  # the old policy: no autograd
    # delayed: one region per micro-batch forward; other recipes: one per layer (megatron's choice)
    per_forward = 1 if recipe == "delayed" else 2  # 2 layers in tiny_cpu
    assert phases["old"] == 2 * 3 * 2 * per_forward and phases["train"] == 5 * 2 * per_forward


@pytest.mark.parametrize("name", ["trainer_delayed", "trainer_tensorwise"])
def test_only_the_decoder_runs_in_fp8_and_logits_stay_outside(result, name):
    seen = _ok(result, name)["seen"]
    for phase in ("train", "old"):
        for kind in DECODER_LINEARS:
            assert seen[f"{phase}:{kind}"] == [True], (phase, kind)
        assert seen[f"{phase}:word_embeddings"] == [False]
        assert seen[f"{phase}:output_layer"] == [False]  # logits (and the loss after them) not in FP8


@pytest.mark.parametrize("name", ["trainer_delayed", "trainer_tensorwise", "no_fp8"])
def test_old_policy_pass_leaves_training_state_bitwise_unchanged(result, name):
    run = _ok(result, name)
    assert run["old_passes"] == 2
    assert run["state_diffs"] == []


def test_fp8_pads_every_ranks_share_to_the_gemm_alignment(result):
    # TP=2 + SP: each rank holds s / 2 tokens, a multiple of 16 for FP8
    assert all(s % 32 == 0 for s in _ok(result, "trainer_delayed")["seq_lengths"])
    lengths = _ok(result, "no_fp8")["seq_lengths"]
    assert all(s % 2 == 0 for s in lengths) and any(s % 32 for s in lengths)  # the check can fail


def test_fp8_padding_and_settings_leave_the_math_unchanged(result):
    # The recorder stands in for TE's autocast and computes nothing, so what differs between
    # these runs is what an FP8 run changes outside the region: every sequence padded to the FP8
    # GEMM alignment (other shapes than the bf16 run's) and the FP8 fields of TransformerConfig.
    # Neither may change a loss: padded positions carry no target and are attended by nothing.
    base = _ok(result, "no_fp8")
    for name in ("trainer_delayed", "trainer_tensorwise"):
        run = _ok(result, name)
        assert run["seq_lengths"] != base["seq_lengths"], (run["seq_lengths"], base["seq_lengths"])
        assert len(run["history"]) == len(base["history"]) == 5
        for key in ("loss", "nll"):
            diff = max(abs(a[key] - b[key]) for a, b in zip(run["history"], base["history"]))
            assert diff < 1e-5, (name, key, run["history"], base["history"])


def test_frozen_reference_copy_fp8(result):
    delayed, tensorwise = _ok(result, "sft_kl_delayed"), _ok(result, "sft_kl_tensorwise")
    # delayed scaling would never update a no-grad copy's scales: the reference runs in bf16
    assert delayed["frozen_fp8"] is None and all(e["model"] == "live" for e in delayed["entries"])
    # stateless recipes: the reference runs in the training recipe's FP8 region
    assert tensorwise["frozen_fp8"] == "hybrid"
    frozen = [e for e in tensorwise["entries"] if e["model"] == "frozen"]
    assert frozen and all(not e["grad_enabled"] and e["fields"]["fp8_recipe"] == "tensorwise" for e in frozen)
    assert delayed["frozen_fp8_param"] is False and tensorwise["frozen_fp8_param"] is False


def test_local_spec_on_cpu_is_the_cpu_spec_but_its_attention_and_uses_apex_norms_with_apex(result):
    specs = _ok(result, "specs")
    assert dict(specs["local_here"], attention=None) == dict(specs["cpu"], attention=None)
    assert specs["cpu"]["norm"] == "ParallelRMSNorm" and specs["cpu"]["attention"] == "SDPACoreAttention"
    assert specs["local_here"]["attention"] == specs["local_apex"]["attention"] == "LocalCoreAttention"
    assert specs["local_apex"]["norm"] == specs["local_apex"]["input_norm"] == "ApexRMSNorm"
    assert specs["cpu_apex"] == specs["cpu"]  # the reference never uses apex
    assert specs["local_apex"]["qkv"] == "ColumnParallelLinear"  # megatron's own linears


def test_checkpoints_with_and_without_fp8_metadata_load_into_each_other(result):
    ckpt = _ok(result, "checkpoints")
    for name in ("meta_tp2->meta", "meta_tp2->plain", "plain_tp2->meta", "plain_tp2->plain"):
        assert ckpt[name]["max_logit_diff"] < 1e-6, (name, ckpt[name])  # saved at TP=2, loaded at TP=1
    # FP8 metadata restored exactly (another layout), ignored by a model without it
    assert ckpt["meta_tp2->meta"]["meta"] == ckpt["saved_meta"]
    assert ckpt["meta_tp2->meta"]["loaded_from"] == ["state", "state"]
    assert ckpt["meta_tp2->meta"]["missing"] == [] and ckpt["meta_tp2->plain"]["missing"] == []
    # a checkpoint without it: fresh state (set_extra_state(None)), reported per module
    assert ckpt["plain_tp2->meta"]["loaded_from"] == ["none", "none"]
    assert ckpt["plain_tp2->meta"]["meta"] == [[0.0] * 4, [0.0] * 4]
    assert ckpt["plain_tp2->meta"]["missing"] == [
        "decoder.layers.self_attention.core_attention._extra_state/shard_0_2",
        "decoder.layers.self_attention.core_attention._extra_state/shard_1_2"]
