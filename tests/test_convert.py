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
    # the fixtures' word-level tokenizer has no chat template: its EOS (<eos>, id 1) ends a turn and
    # comes first (the Llama source's config.json adds transformers' default eos 2 after it)
    eos = entry["export"]["stop_ids"]["eos_token_id"]
    assert eos == ([1, 2] if family == "llama" else 1), entry["export"]["stop_ids"]


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
    entry = _entry(_entry(prepared(workdir), "export_without_template"), family)
    assert entry["exported_logits"]["max_abs_diff"] == 0.0, entry  # generated config.json means the same model
    trip = entry["round_trip"]
    assert trip["missing"] == [] and trip["extra"] == [] and trip["different"] == [], trip
    assert entry["load_info"] == {"missing_keys": [], "unexpected_keys": [], "warnings": []}, entry["load_info"]
    assert entry["architecture"] == [FAMILIES[family][0].replace("Config", "ForCausalLM")]
    assert entry["tokenizer_vocab"] == 7


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_export_of_a_checkpoint_without_model_yaml_asks_for_the_training_yaml(workdir, family):
    entry = _entry(_entry(prepared(workdir), "export_without_template"), family)["without_model_yaml"]
    lines = entry["stderr"].strip().splitlines()
    assert entry["code"] == 2 and len(lines) == 1, entry
    assert lines[0].startswith("conversion error: ") and lines[0].endswith(
        "/iter_0000010: no model.yaml (a checkpoint written by an older version); pass the training YAML with "
        "--config (its model: section describes the architecture)"), lines


def test_export_from_a_checkpoints_directory_passes_over_a_damaged_latest(workdir):
    """CheckpointManager.resume_point picks the checkpoint: `latest` names iter_0000020, whose data
    file is cut short, so iter_0000010 is exported (bit-exact, above) with a note naming why."""
    log = _entry(_entry(prepared(workdir), "export_without_template"), "llama")["log"]
    note = next((line for line in log.splitlines() if line.startswith("note: ")), log)
    assert "iter_0000020/__0_0.distcp: " in note and note.endswith(
        "exporting the newest intact checkpoint, " + os.path.join(workdir, "llama", "checkpoints", "iter_0000010")), note


def test_export_generates_until_the_end_of_turn_token(workdir):
    """HF generate() on an export of a ChatML model stops at <|im_end|>; the source (no stop ids
    in its config.json or generation_config.json) repeats it up to max_new_tokens."""
    entry = _entry(prepared(workdir), "chat")
    im_end, endoftext = entry["ids"]["<|im_end|>"], entry["ids"]["<|endoftext|>"]
    assert entry["source_reply"] == ["hello", "world"] + ["<|im_end|>"] * 6, entry["source_reply"]
    assert entry["reply"] == ["hello", "world", "<|im_end|>"], entry["reply"]
    assert entry["generation_config"] == {"eos_token_id": [im_end, endoftext], "pad_token_id": endoftext}
    assert entry["config_ids"] == {"bos_token_id": None, "eos_token_id": [im_end, endoftext], "pad_token_id": endoftext}


def test_round_trip_keeps_the_vocab_padding_multiple(workdir):
    """HF -> Megatron (--make-vocab-size-divisible-by 16) -> HF -> Megatron (no option): 16 again,
    so a restore with the training YAML's value is accepted."""
    assert _entry(prepared(workdir), "chat")["vocab_multiple_after_round_trip"] == 16


def test_failed_export_leaves_nothing_and_a_retry_works(workdir):
    """Random bytes over a record header in the checkpoint's data file: one line naming the file,
    exit 2, nothing in or beside --out; the same command after the file is repaired succeeds."""
    entry = _entry(prepared(workdir), "chat")
    failed = entry["failed"]
    lines = failed["stderr"].strip().splitlines()
    assert failed["code"] == 2 and len(lines) == 1 and "Traceback" not in failed["stderr"], failed
    assert lines[0].startswith("checkpoint error: ") and f"megatron_damaged/{failed['damaged_file']}" in lines[0], lines
    assert failed["left_beside_out"] == [], failed
    retry = entry["retry"]
    assert retry["code"] == 0, retry
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(retry["files"]), retry


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
