"""Pre-tokenised cache: warm load equals cold tokenisation, no re-tokenisation, key changes."""

import os

import numpy as np
import pytest

import psft_megatron.data.dataset as dataset_mod
from psft_megatron.data import DataConfig, SFTDataset, TokenizerConfig, build_tokenizer
from psft_megatron.data.dataset import load_or_tokenize
from tests.data_fixtures.helpers import HF_TOKENIZER, SPM_MODEL, TINY_SFT, write_jsonl


@pytest.fixture(scope="module")
def tok():
    cfg = TokenizerConfig(library="huggingface", model=HF_TOKENIZER)
    return build_tokenizer(cfg), cfg


def test_warm_cache_equals_cold_and_does_not_tokenize(tok, tmp_path, monkeypatch):
    tokenizer, tok_cfg = tok
    cfg = DataConfig(file_names=[f"{TINY_SFT}/train.jsonl", f"{TINY_SFT}/valid.jsonl"], cache_dir=str(tmp_path),
                     max_seq_length=64, packing=False)
    nocache = DataConfig(**{**cfg.__dict__, "cache_dir": None})
    ref, _ = load_or_tokenize(nocache, tokenizer, tok_cfg)
    cold, info = load_or_tokenize(cfg, tokenizer, tok_cfg)
    assert not info["cache_hit"] and os.path.exists(os.path.join(info["cache_path"], "meta.json"))

    def boom(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(dataset_mod, "tokenize_files", boom)
    warm, info2 = load_or_tokenize(cfg, tokenizer, tok_cfg)
    assert info2["cache_hit"] and info2["cache_path"] == info["cache_path"]
    assert isinstance(warm.ids, np.memmap)
    for store in (cold, warm):
        assert np.array_equal(store.ids, ref.ids) and np.array_equal(store.mask, ref.mask)
        assert np.array_equal(store.offsets, ref.offsets)
        assert str(store.location(310)) == str(ref.location(310)) == f"{TINY_SFT}/valid.jsonl:line 11"
    # the length policy runs on the cached samples (max_seq_length is not part of the key)
    a = SFTDataset(warm, cfg, pad_id=0)
    b = SFTDataset(ref, cfg, pad_id=0)
    assert a.length_stats == b.length_stats and a.length_stats.truncated > 0


def test_key_changes_with_data_tokenizer_and_settings(tok, tmp_path):
    tokenizer, tok_cfg = tok
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    cache = str(tmp_path / "cache")
    paths = set()
    cfg = DataConfig(file_names=[f], cache_dir=cache)
    paths.add(load_or_tokenize(cfg, tokenizer, tok_cfg)[1]["cache_path"])
    assert load_or_tokenize(cfg, tokenizer, tok_cfg)[1]["cache_hit"]
    plain = TokenizerConfig(library="huggingface", model=HF_TOKENIZER, chat_template=False)
    paths.add(load_or_tokenize(cfg, tokenizer, plain)[1]["cache_path"])
    sp_cfg = TokenizerConfig(library="sentencepiece", model=SPM_MODEL)
    paths.add(load_or_tokenize(cfg, build_tokenizer(sp_cfg), sp_cfg)[1]["cache_path"])
    write_jsonl(f, [{"prompt": "a", "response": "c"}])
    paths.add(load_or_tokenize(cfg, tokenizer, tok_cfg)[1]["cache_path"])
    write_jsonl(f, [{"q": "a", "r": "c"}])
    cfg2 = DataConfig(file_names=[f], cache_dir=cache, prompt_key="q", response_key="r")
    paths.add(load_or_tokenize(cfg2, tokenizer, tok_cfg)[1]["cache_path"])
    assert len(paths) == 5
    assert not any(n.startswith(".tmp-") for n in os.listdir(cache))  # no half-written caches left
