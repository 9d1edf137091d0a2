"""Packed and unpacked batches give the same per-sample log-probs on the tiny CPU GPT model.

The model runs in a subprocess (tests/data_fixtures/packed_logprobs_worker.py) because
``runtime.initialize`` installs the process-wide CPU layer. Two models: RoPE (production; the
THD path of megatron restarts RoPE per cu_seqlens segment) and learned absolute positions
(reads position_ids). Planted bugs must make the comparison fail.
"""

import json
import subprocess
import sys

import pytest

from tests.parallel.launch import REPO

TOL = 1e-5


@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, "tests/data_fixtures/packed_logprobs_worker.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                               "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_packed_equals_unpacked(results):
    for model, r in results["clean"].items():
        assert r["samples"] >= 6 and r["rows"] == 3, r
        assert r["max_abs_diff"] < TOL, (model, r)


def test_planted_position_bug_is_caught(results):
    # position_ids 0..s-1 over the whole packed row: the learned-position model must disagree
    assert results["no_position_restart"]["learned"]["max_abs_diff"] > 1e-2


def test_planted_cross_sample_attention_is_caught(results):
    for model, r in results["cross_attention"].items():
        assert r["max_abs_diff"] > 1e-2, (model, r)


def test_rope_is_relative_so_offsets_are_invisible(results):
    # max_seqlen = row length makes megatron's THD RoPE use per-row offsets; RoPE being
    # relative and attention block-diagonal, the log-probs still match (documented in docs/data.md)
    for model, r in results["rope_offsets"].items():
        assert r["max_abs_diff"] < TOL, (model, r)


def test_packed_equals_unpacked_under_tp2_sp():
    from tests.parallel.launch import torchrun

    result = torchrun("tests/data_fixtures/packed_tp_worker.py", 2, [], timeout=300)
    assert result["tp"] == 2 and result["samples"] >= 6 and result["row_length"] % 2 == 0, result
    assert result["max_abs_diff"] < TOL, result
