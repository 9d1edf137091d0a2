"""Checkpoint integrity in one process: checksums written at save and verified by every reader
(psft_megatron/checkpointing/integrity.py, dist_checkpoint.damaged); the vocab check of a
restore without model.yaml (checkpointing/restore.vocab_problem). The checkpoints here are
small torch.distributed.checkpoint directories with the files of a megatron one (no model)."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from psft_megatron.checkpointing.dist_checkpoint import CheckpointInfo, damaged
from psft_megatron.checkpointing.integrity import CHECKSUMS, write_checksums
from psft_megatron.checkpointing.restore import vocab_problem


def _checkpoint(path: str) -> str:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    dcp.save({"embedding.word_embeddings.weight": torch.randn(512, 16), "decoder.w": torch.randn(4096)},
             checkpoint_id=path, no_dist=True)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, f)
    torch.save({"iteration": 3, "run_id": "r1"}, os.path.join(path, "common.pt"))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = _checkpoint(str(tmp_path_factory.mktemp("integrity") / "ckpt"))
    write_checksums(path)
    return path


def _data_file(path: str) -> str:
    return os.path.join(path, next(n for n in os.listdir(path) if n.endswith(".distcp")))


def _overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_checksums_cover_every_file_of_the_checkpoint(saved):
    with open(os.path.join(saved, CHECKSUMS)) as f:
        recorded = json.load(f)
    assert recorded["algorithm"] == "sha256"
    assert sorted(recorded["files"]) == sorted([".metadata", "common.pt", "metadata.json",
                                                os.path.basename(_data_file(saved))])
    assert damaged(saved) is None and damaged(saved, verify_data=True) is None


@pytest.mark.parametrize("where", ["tensor data", "record header", "common.pt"])
def test_changed_bytes_are_named_by_the_verifying_pass(saved, tmp_path, where):
    copy = shutil.copytree(saved, str(tmp_path / "copy"))
    target = os.path.join(copy, "common.pt") if where == "common.pt" else _data_file(copy)
    offset = {"tensor data": os.path.getsize(target) // 2, "record header": 0, "common.pt": 40}[where]
    _overwrite(target, offset, b"\xff" * 256 if where == "tensor data" else os.urandom(16))
    if where == "tensor data":
        assert damaged(copy) is None  # sizes alone cannot see it
    problem = damaged(copy, verify_data=True)
    assert problem and problem.startswith(target) and "sha256 mismatch" in problem, problem


def test_truncation_missing_coverage_and_unreadable_checksums(saved, tmp_path):
    copy = shutil.copytree(saved, str(tmp_path / "t"))
    with open(_data_file(copy), "r+b") as f:
        f.truncate(100)
    assert "truncated (100 bytes" in damaged(copy)
    copy = shutil.copytree(saved, str(tmp_path / "c"))
    with open(os.path.join(copy, CHECKSUMS)) as f:
        recorded = json.load(f)
    del recorded["files"][os.path.basename(_data_file(copy))]
    with open(os.path.join(copy, CHECKSUMS), "w") as f:
        json.dump(recorded, f)
    assert damaged(copy).endswith(f".distcp: not in {CHECKSUMS}")
    with open(os.path.join(copy, CHECKSUMS), "w") as f:
        f.write("{not json")
    assert damaged(copy) == f"{os.path.join(copy, CHECKSUMS)}: unreadable (JSONDecodeError)"


def test_a_checkpoint_written_before_checksums_gets_the_size_checks(saved, tmp_path):
    copy = shutil.copytree(saved, str(tmp_path / "old"))
    os.remove(os.path.join(copy, CHECKSUMS))
    _overwrite(_data_file(copy), 100, b"\xff" * 8)
    assert damaged(copy, verify_data=True) is None


def _model(vocab, unit=128):
    return SimpleNamespace(vocab_size=vocab, make_vocab_size_divisible_by=unit)


def test_vocab_of_a_restore_without_model_yaml():
    recorded = CheckpointInfo("/c", common={"vocab_size": 512}, vocab_rows=512)
    problem = vocab_problem(recorded, _model(384))
    assert problem.startswith("model.vocab_size: the checkpoint /c has vocab size 512 (its common state), this "
                              "run's model has 384;"), problem
    assert vocab_problem(recorded, _model(512)) is None
    from_config = CheckpointInfo("/c", common={"config": json.dumps({"model": {"vocab_size": 500}})}, vocab_rows=512)
    assert "vocab size 500 (its training config)" in vocab_problem(from_config, _model(384))
    # nothing recorded: only more vocab than stored rows is certain (384 at TP=2 is stored as 512)
    rows_only = CheckpointInfo("/c", common={}, vocab_rows=512)
    assert vocab_problem(rows_only, _model(384)) is None
    assert "stores 512 embedding rows, fewer than this run's vocab size 600" in vocab_problem(rows_only, _model(600))
