"""The bundled assets are what tools/make_tiny_assets.py generates, and stay small."""

import filecmp
import os
import sys

from tests.data_fixtures.helpers import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import make_tiny_assets  # noqa: E402


def test_bundled_dataset_is_reproducible_and_small(tmp_path):
    make_tiny_assets.main(["--out", str(tmp_path)])
    bundled = os.path.join(REPO, "examples", "data")
    for name in ("train.jsonl", "valid.jsonl", "nested.jsonl"):
        assert filecmp.cmp(tmp_path / "tiny_sft" / name, os.path.join(bundled, "tiny_sft", name), shallow=False)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(bundled) for f in fs)
    assert total < 2 * 1024 * 1024
    from psft_megatron.data import TokenizerConfig, build_tokenizer

    tok = build_tokenizer(TokenizerConfig(model=str(tmp_path / "tiny_tokenizer")))
    assert tok.has_chat_template and tok.token_to_id("<|im_end|>") is not None
    sp = build_tokenizer(TokenizerConfig(library="sentencepiece", model=str(tmp_path / "tiny_spm" / "tiny.model")))
    assert sp.eos_id is not None and sp.bos_id is not None
