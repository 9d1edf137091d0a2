"""Bad configs, data and checkpoints end in one line and exit status 2, on every rank, with no
traceback; a damaged latest checkpoint falls back to the previous one; restores are strict and
take the model from the checkpoint; README's export command works on a training checkpoint.
The 2-process cases run in one launch (tests/parallel/user_errors_worker.py)."""

import json
import os
import subprocess
import sys

import pytest

from tests.parallel.launch import REPO, torchrun, worker_env

_cache = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("user_errors"))


def cases(work):
    if "r" not in _cache:
        result = torchrun("tests/parallel/user_errors_worker.py", 2, ["--work", work])
        _cache["r"] = {r["rank"]: r["cases"] for r in result["ranks"]}
    return _cache["r"]


with open(os.path.join(REPO, "configs", "tiny_cpu.yaml")) as _f:
    _MAX_STEPS_LINE = [line.rstrip() for line in _f].index("  max_steps: 100") + 1

#: case -> (kind prefix of the one line, fragments it must contain)
ERRORS = {
    "bad_latest": ("checkpoint error:", ["checkpoints/latest: unreadable", "resume_fallback=true"]),
    "norm_epsilon_mismatch": ("config error:", ["model.norm_epsilon=1e-06 in the YAML", "trained with 1e-05",
                                                 "iter_0000002/model.yaml"]),
    "tied_mismatch": ("config error:", ["model.tie_word_embeddings=True in the YAML", "trained with False"]),
    "hf_dir": ("checkpoint error:", ["a Hugging Face model directory", "tools/convert_hf_to_megatron.py --hf-dir"]),
    "truncated_restore": ("checkpoint error:", ["truncated/__", ".distcp: truncated (1000 bytes"]),
    "no_common": ("checkpoint error:", ["nocommon/common.pt: missing"]),
    "extra_weight": ("checkpoint error:", ["weights the model does not use: decoder.layers.self_attention.linear_qkv.bias"]),
    "missing_weight": ("checkpoint error:", ["the model needs weights the checkpoint does not have",
                                             "q_layernorm.weight"]),
    "negative_lr": ("config error:", ["model.optim.lr=-1.0 must be > 0"]),
    "empty_data": ("data error:", ["empty.jsonl"]),
    # the worker writes "max_steps: [100": the parser stops on the next line
    "bad_yaml": ("config error:", [f"broken_yaml/tiny_cpu.yaml:{_MAX_STEPS_LINE + 1}:", "invalid YAML: expected ',' or "
                                   f"']', but got ':' (while parsing a flow sequence at line {_MAX_STEPS_LINE})"]),
    "diverging": ("training error:", ["stopping at step 3: 2 consecutive steps with a non-finite",
                                      "(trainer.max_consecutive_skipped_steps=2)", "last good checkpoint: (none)"]),
    "negative_save_interval": ("config error:", ["exp_manager.checkpoint_callback_params.every_n_train_steps=-5 "
                                                 "must be >= 0"]),
    "too_long": ("config error:", ["model.data.train_ds.max_seq_length=512 is longer than "
                                   "model.max_position_embeddings=256"]),
    "global_batch_6": ("config error:", ["model.global_batch_size=6 is not divisible by model.micro_batch_size * "
                                         "data-parallel size = 4*1"]),
    "another_run": ("config error:", ["exp_manager.explicit_log_dir:", "/train holds another run (checkpoints "
                                      "iter_0000002 .. iter_0000004, metrics.jsonl with 4 record(s))",
                                      "set exp_manager.resume_if_exists=true to continue it",
                                      "exp_manager.overwrite=true to move it aside"]),
    "log_dir_file": ("config error:", ["exp_manager.explicit_log_dir:", "a_file is a file, not a directory"]),
    "ckpt_dir_file": ("config error:", ["exp_manager.explicit_log_dir (its checkpoints/):",
                                        "ckfile/checkpoints is a file, not a directory"]),
    "vocab_mismatch": ("config error:", ["model.vocab_size: the checkpoint", "v512/checkpoints/iter_0000001 has vocab "
                                         "size 512", "this run's model has 384"]),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_one_line_exit_2_no_traceback_on_any_rank(name, work):
    ranks = cases(work)
    prefix, fragments = ERRORS[name]
    rank0, rank1 = ranks[0][name], ranks[1][name]
    assert rank0["code"] == 2 and rank1["code"] == 2, (rank0, rank1)
    lines = rank0["stderr"].strip().splitlines()
    assert len(lines) == 1, rank0["stderr"]
    assert lines[0].startswith(prefix), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert rank1["stderr"].strip() == "", rank1["stderr"]
    for rank in (rank0, rank1):
        assert "Traceback" not in rank["stdout"] + rank["stderr"]


def test_sequence_parallel_at_tp1_warns_once_and_trains(work):
    ranks = cases(work)
    rank0, rank1 = ranks[0]["sp_at_tp1"], ranks[1]["sp_at_tp1"]
    assert rank0["code"] == 0 and rank1["code"] == 0, (rank0, rank1)
    warning = ("WARNING: model.sequence_parallel=true needs model.tensor_model_parallel_size > 1; sequence "
               "parallelism is off (as Megatron-LM turns it off at TP=1)")
    assert rank0["stdout"].splitlines().count(warning) == 1, rank0["stdout"]
    assert warning not in rank1["stdout"] + rank1["stderr"]
    assert "at TP=1+PP=1+CP=1 on 2 process(es)" in rank0["stdout"], rank0["stdout"]  # no SP in the layout


def test_cosine_schedule_trains_through_warmup_and_decay_and_saves(work):
    """README's failing repro, in this launch's layout (TP=2 + SP): CosineAnnealing with tiny_cpu's
    warm-up of 5 over trainer.max_steps=8 trains to the end and writes its checkpoint; each
    step's logged lr is the one its update used, megatron's cosine after n = step - 1 steps."""
    from tests.test_schedules import expected_lr

    ranks = cases(work)
    r = ranks[0]["cosine"]
    assert r["code"] == 0 and ranks[1]["cosine"]["code"] == 0, r
    assert "done: 8 steps" in r["stdout"] and "iter_0000008" in r["stdout"], r["stdout"][-2000:]
    assert os.path.isdir(os.path.join(work, "cosine", "checkpoints", "iter_0000008"))
    want = [expected_lr("cosine", n, 5, 8, peak=3e-3, floor=1e-4) for n in range(8)]
    assert ranks[0]["cosine_lr"] == pytest.approx(want, rel=1e-9), (ranks[0]["cosine_lr"], want)


def test_damaged_latest_checkpoint_falls_back_and_metrics_keep_one_record_per_step(work):
    r = cases(work)[0]
    assert r["fallback"]["code"] == 0, r["fallback"]
    out = r["fallback"]["stdout"]
    assert "iter_0000003/__" in out and ".distcp: truncated (100 bytes" in out, out
    assert "resuming from the newest intact checkpoint" in out, out
    assert "resumed from" in out and "iter_0000002 at step 2" in out, out
    assert r["metrics_steps"] == [1, 2, 3, 4]


def test_restore_says_what_it_restored(work):
    r = cases(work)[0]["restore"]
    assert r["code"] == 0, r
    assert "restored weights from" in r["stdout"] and "trained to step 2" in r["stdout"], r["stdout"]
    assert "optimizer state, LR schedule and data position start fresh" in r["stdout"]


def test_training_checkpoints_carry_their_model(work):
    cases(work)
    with open(os.path.join(work, "restore", "checkpoints", "latest")) as f:
        ckpt = os.path.join(work, "restore", "checkpoints", f.read().strip())
    import yaml

    with open(os.path.join(ckpt, "model.yaml")) as f:
        record = yaml.safe_load(f)
    assert record["model"]["num_layers"] == 2 and record["model"]["add_qkv_bias"] is True
    assert record["model"]["tokenizer"]["model"].endswith("examples/data/tiny_tokenizer")
    assert record["source"]["kind"] == "trained" and record["source"]["restored_from"].endswith("iter_0000002")


def test_readme_export_command_on_a_training_run(work, tmp_path):
    """README: ``convert_megatron_to_hf.py --ckpt runs/<run>/checkpoints --out ... --verify``,
    no --config: the model comes from the checkpoint (vocab size from the tokenizer included)."""
    cases(work)
    out = str(tmp_path / "hf")
    env = worker_env()
    proc = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--ckpt",
                           os.path.join(work, "restore", "checkpoints"), "--out", out, "--verify"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == 384 and config["num_hidden_layers"] == 2
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    assert "argmax agreement 1.0000" in proc.stdout, proc.stdout


def test_world_of_one_exit_code_2(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")  # the CPU lane
    proc = subprocess.run([sys.executable, "pretrain_psft.py", "--config-path", "configs", "--config-name", "tiny_cpu",
                           "trainer.devices=null", "model.optim.betas=[0.9,1.5]",
                           f"exp_manager.explicit_log_dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["config error: model.optim.betas=[0.9, 1.5] must be in [0, 1)"]


def test_resume_at_or_past_max_steps_trains_and_writes_nothing(work):
    r = cases(work)[0]
    assert r["done"]["code"] == 0, r["done"]
    out = r["done"]["stdout"]
    assert "nothing to train: " in out and "iter_0000004 is at step 4 and trainer.max_steps=3" in out, out
    assert "done:" not in out and "resumed from" not in out, out
    assert r["train_unchanged"], "a refused new run or a resume with nothing to train changed the run directory"


def test_changed_bytes_are_a_damaged_checkpoint_and_the_fallback_stays_in_the_run(work):
    r = cases(work)[0]
    out = r["corrupt_fallback"]["stdout"]
    assert r["corrupt_fallback"]["code"] == 0, r["corrupt_fallback"]
    assert "iter_0000004/__" in out and "sha256 mismatch" in out, out
    assert "resuming from the newest intact checkpoint" in out and "iter_0000003 at step 3" in out, out
    # iter_0000100 is another run's (intact, newer): never resumed, never rotated away
    assert "iter_0000100" not in out.split("resuming from")[1], out
    assert r["after_fallback"] == ["iter_0000003", "iter_0000004", "iter_0000005", "iter_0000100"]


def test_overwrite_moves_the_old_run_aside_intact(work):
    r = cases(work)[0]
    assert r["overwrite"]["code"] == 0, r["overwrite"]
    assert "exp_manager.overwrite: moved the previous run in" in r["overwrite"]["stdout"]
    moved = r["moved"]
    assert len(moved["names"]) == 1 and moved["intact"], moved
    assert moved["new"] == ["iter_0000001", "latest"] and moved["records"] == 1, moved


@pytest.mark.parametrize("where", ["data", "header"])
def test_export_refuses_a_checkpoint_with_changed_bytes(work, tmp_path, where):
    """The converter verifies the checksums before reading: a byte changed in tensor data or in
    a record's header (the start of a data file) is named, not exported as garbage."""
    import shutil

    from psft_megatron.convert import convert_megatron_to_hf
    from psft_megatron.errors import CheckpointError

    cases(work)
    src = os.path.join(work, "restore", "checkpoints")
    with open(os.path.join(src, "latest")) as f:
        ckpt = shutil.copytree(os.path.join(src, f.read().strip()), str(tmp_path / "ckpt"))
    data = max((os.path.join(ckpt, n) for n in os.listdir(ckpt) if n.endswith(".distcp")), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2 if where == "data" else 0)
        f.write(os.urandom(256))
    with pytest.raises(CheckpointError, match=r"\.distcp: sha256 mismatch"):
        convert_megatron_to_hf(ckpt, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
