"""Pre-tokenised cache: warm load equals cold tokenisation, no re-tokenisation, key changes."""

import os

import numpy as np
import pytest

import psft_megatron.data.token_cache as cache_mod
from psft_megatron.data import ConfigError, DataConfig, DataError, SFTDataset, TokenizerConfig, build_tokenizer
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

    monkeypatch.setattr(cache_mod, "tokenize_files", boom)
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


def _opens_of(monkeypatch, path):
    """Count the times ``path`` is opened from now on (any reader, any hasher)."""
    import builtins

    opened, original = [], builtins.open

    def counting_open(file, *args, **kwargs):
        if os.path.abspath(str(file)) == os.path.abspath(path):
            opened.append(1)
        return original(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return opened


def test_a_warm_start_reads_no_data_byte_and_a_change_is_seen(tok, tmp_path, monkeypatch):
    tokenizer, tok_cfg = tok
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}] * 3)
    os.utime(f, (1e9, 1e9))  # written long ago (a file modified in the last seconds is hashed every time)
    cfg = DataConfig(file_names=[f], cache_dir=str(tmp_path / "cache"))
    cold = load_or_tokenize(cfg, tokenizer, tok_cfg)[1]
    opened = _opens_of(monkeypatch, f)
    warm = load_or_tokenize(cfg, tokenizer, tok_cfg)[1]
    assert warm["cache_hit"] and warm["cache_path"] == cold["cache_path"] and opened == []
    # the same size, another content and time: hashed again, another key, tokenised again
    write_jsonl(f, [{"prompt": "a", "response": "c"}] * 3)
    opened.clear()
    changed = load_or_tokenize(cfg, tokenizer, tok_cfg)[1]
    assert not changed["cache_hit"] and changed["cache_path"] != cold["cache_path"] and len(opened) == 2  # hash + read


def test_a_hit_names_this_runs_files(tok, tmp_path):
    tokenizer, tok_cfg = tok
    cache = str(tmp_path / "cache")
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "response": "b"}] * 2)
    load_or_tokenize(DataConfig(file_names=[first], cache_dir=cache), tokenizer, tok_cfg)
    os.makedirs(tmp_path / "moved")
    moved = str(tmp_path / "moved" / "a.jsonl")
    os.rename(first, moved)  # the same bytes elsewhere: the same key, and errors name the new path
    store, info = load_or_tokenize(DataConfig(file_names=[moved], cache_dir=cache), tokenizer, tok_cfg)
    assert info["cache_hit"] and str(store.location(1)) == f"{moved}:line 2"


def test_worker_processes_give_the_same_store_and_the_first_error(tok, tmp_path):
    tokenizer, tok_cfg = tok
    files = [f"{TINY_SFT}/train.jsonl", f"{TINY_SFT}/valid.jsonl"]
    here = load_or_tokenize(DataConfig(file_names=files, num_workers=0), tokenizer, tok_cfg)[0]
    pool, info = load_or_tokenize(DataConfig(file_names=files, num_workers=2), tokenizer, tok_cfg)
    assert info["workers"] == 2
    for name in ("ids", "mask", "offsets", "src_file", "src_pos", "has_target"):
        assert np.array_equal(getattr(here, name), getattr(pool, name)), name
    assert pool.source_counts == here.source_counts == [300, 50] and pool.stats == here.stats
    # two bad records in different chunks (256 records each): the first in file order is reported
    lines = ['{"prompt": "a", "response": "b"}'] * 600
    lines[300], lines[520] = '{"prompt": "a"}', "not json"
    bad = write_jsonl(tmp_path / "bad.jsonl", lines)
    for workers in (0, 2):
        with pytest.raises(DataError, match=r"bad.jsonl:line 301: missing key 'response'"):
            load_or_tokenize(DataConfig(file_names=[bad], num_workers=workers), tokenizer, tok_cfg)


def test_a_run_keeps_its_token_cache_in_its_run_directory(tmp_path):
    from psft_megatron.config import load_run_config
    from psft_megatron.training.data_plan import load_data_settings
    from tests.parallel.launch import REPO

    run = str(tmp_path / "run")
    cfg, _ = load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", [f"exp_manager.explicit_log_dir={run}"])
    settings = load_data_settings(cfg, 2)
    assert settings.train.cache_dir == settings.validation.cache_dir == os.path.join(run, "token_cache")
    cfg, _ = load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", [
        f"exp_manager.explicit_log_dir={run}", f"+model.data.train_ds.cache_dir={tmp_path}/shared"])
    assert load_data_settings(cfg, 2).train.cache_dir == f"{tmp_path}/shared"


def test_num_workers_null_uses_the_cpus_for_large_data_only(tmp_path, monkeypatch):
    import psft_megatron.data.tokenize as tokenize

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": "a", "response": "b"}])
    assert tokenize.resolve_workers(DataConfig(file_names=[small])) == 0  # starting workers costs more
    monkeypatch.setattr(tokenize, "POOL_MIN_BYTES", 1)
    assert tokenize.resolve_workers(DataConfig(file_names=[small])) == 8  # the CPUs (the writer mostly waits)
    assert tokenize.resolve_workers(DataConfig(file_names=[small]), ranks_sharing_the_node=4) == 2
    assert tokenize.resolve_workers(DataConfig(file_names=[small], num_workers=3)) == 3
    with pytest.raises(ConfigError, match=r"model.data.train_ds.num_workers: must be null \(automatic\) or an int"):
        DataConfig.from_dict({"file_names": [small], "num_workers": -1})
