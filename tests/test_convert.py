"""HF <-> Megatron converters end to end, on tiny random HF models of every family.

Two launches (tests/parallel/convert_worker.py): ``prepare`` in a plain python process (a
world of one: build the HF models with transformers, convert with the tools, TP=1 logits,
export, round trip, planted QKV bug) and ``layouts`` under torchrun with 4 gloo processes
(TP=1, TP=2, TP=4, PP=2, TP=2+PP=2, PP=2+VPP=2 logits; export of a checkpoint saved at TP=2+PP=2).
Logits are compared with the HF model's in fp32: max |diff| <= 1e-4.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.parallel.convert_worker import FAMILIES, LAYOUTS, TOLERANCE
from tests.parallel.launch import REPO, hang_guard, torchrun, worker_env

_cache = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("convert"))


def prepared(workdir) -> dict:
    if "prepare" not in _cache:
        out = os.path.join(workdir, "prepare.json")
        env = worker_env()
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tests/parallel/convert_worker.py"), "prepare",
                               "--workdir", workdir, "--out", out], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=hang_guard(600))
        if proc.returncode != 0 or not os.path.exists(out):
            raise AssertionError(f"prepare failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
        with open(out) as f:
            _cache["prepare"] = json.load(f)
    return _cache["prepare"]


def layouts(workdir) -> dict:
    prepared(workdir)
    if "layouts" not in _cache:
        _cache["layouts"] = torchrun("tests/parallel/convert_worker.py", 4, ["layouts", "--workdir", workdir])
    return _cache["layouts"]


def _entry(result, key):
    entry = result[key]
    assert "error" not in entry, f"{key}: {entry.get('error')}\n{entry.get('traceback', '')}"
    return entry


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tp1_logits_match_hf(workdir, family):
    entry = _entry(prepared(workdir), family)
    assert entry["tp1"]["max_abs_diff"] <= TOLERANCE, entry["tp1"]
    assert entry["tp1"]["argmax_agreement"] == 1.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_exact(workdir, family):
    entry = _entry(prepared(workdir), family)
    trip = entry["round_trip"]
    assert trip["missing"] == [] and trip["extra"] == [] and trip["different"] == [], trip
    assert trip["num_tensors"] > 30
    # transformers loads the export with no missing / unexpected keys and no warnings about them
    assert entry["load_info"] == {"missing_keys": [], "unexpected_keys": [], "warnings": []}, entry["load_info"]
    assert entry["exported_logits"]["max_abs_diff"] == 0.0
    files = entry["side_files"]
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"} <= set(files)
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded (small --max-shard-size)


def test_tied_lm_head_only_when_the_source_had_it(workdir):
    result = prepared(workdir)
    assert result["qwen2_tied"]["round_trip"]["num_tensors"] + 1 == result["qwen2_tied_lm_head"]["round_trip"]["num_tensors"]


def test_verify_option_reports_logit_diff(workdir):
    result = prepared(workdir)
    for family, key in (("llama", "import"), ("qwen3", "export")):
        numbers = result[family][key]["verify"]
        assert numbers["max_abs_diff"] <= TOLERANCE and numbers["argmax_agreement"] == 1.0, numbers


def test_import_summary(workdir):
    summary = prepared(workdir)["llama"]["import"]
    assert summary["architecture"] == "LlamaForCausalLM"
    assert summary["padded_vocab"] == 256 and summary["make_vocab_size_divisible_by"] == 128


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_export_without_template_uses_model_config_and_training_tokenizer(workdir, family):
    entry = _entry(prepared(workdir), "export_without_template")[family]
    assert entry["exported_logits"]["max_abs_diff"] == 0.0, entry  # generated config.json means the same model
    trip = entry["round_trip"]
    assert trip["missing"] == [] and trip["extra"] == [] and trip["different"] == [], trip
    assert entry["load_info"] == {"missing_keys": [], "unexpected_keys": [], "warnings": []}, entry["load_info"]
    assert entry["architecture"] == [FAMILIES[family][0].replace("Config", "ForCausalLM")]
    assert entry["tokenizer_vocab"] == 7


def test_planted_qkv_order_bug_is_caught(workdir):
    entry = _entry(prepared(workdir), "planted_qkv_order")
    assert entry["tp1"]["max_abs_diff"] > 100 * TOLERANCE, entry


LAYOUT_CASES = [(family, layout) for layout in LAYOUTS for family in FAMILIES]


@pytest.mark.parametrize("family,layout", LAYOUT_CASES, ids=[f"{f}-{l}" for f, l in LAYOUT_CASES])
def test_logits_match_hf_at_layout(workdir, family, layout):
    entry = _entry(layouts(workdir), f"{family}/{layout}")
    assert entry["ranks_checked"] >= 1, entry
    assert entry["max_abs_diff"] <= TOLERANCE, entry


def test_export_of_checkpoint_saved_at_tp2_pp2_is_bit_exact(workdir):
    entry = _entry(layouts(workdir), "export_from_tp2_pp2")
    assert entry["missing"] == [] and entry["extra"] == [] and entry["different"] == [], entry
