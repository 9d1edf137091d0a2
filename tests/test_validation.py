"""Validation is one pass over the validation set: each sample evaluated at most once (exactly
once without limit_val_batches), the last partial batch evaluated exactly (its filler rows
carry no loss token), sizes checked before the first step (psft_megatron.training.data_plan)."""

import numpy as np
import pytest
import torch

from psft_megatron.data import DataConfig, SFTDataset, TokenizerConfig, build_tokenizer
from psft_megatron.data.dataset import load_or_tokenize
from psft_megatron.data.errors import DataError
from psft_megatron.data.sampler import EvalSampler
from psft_megatron.errors import UserError
from tests.data_fixtures.helpers import HF_TOKENIZER, TINY_SFT


@pytest.fixture(scope="module")
def tok():
    cfg = TokenizerConfig(library="huggingface", model=HF_TOKENIZER)
    return build_tokenizer(cfg), cfg


def val_set(tok, packing=False, **kw):
    tokenizer, tok_cfg = tok
    cfg = DataConfig.from_dict({"file_names": [f"{TINY_SFT}/valid.jsonl"], "max_seq_length": 128,
                                "packing": packing, **kw}, prefix="model.data.validation_ds")
    return SFTDataset(load_or_tokenize(cfg, tokenizer, tok_cfg)[0], cfg, pad_id=tokenizer.pad_id)


def evaluated_items(num_items, g, mbs, dp, **kw):
    """All ranks' item indices of one pass (fillers -1 removed), in evaluation order."""
    samplers = [EvalSampler(num_items, g, mbs, r, dp, **kw) for r in range(dp)]
    per_rank = [[mb for step in s for mb in step] for s in samplers]
    steps = [list(step) for step in samplers[0]]
    assert all(len(step) == samplers[0].num_microbatches for step in steps)
    assert all(len(mb) == mbs for rank in per_rank for mb in rank)  # same shapes on every rank
    return [i for rank in per_rank for mb in rank for i in mb if i >= 0], samplers[0]


@pytest.mark.parametrize("dp,mbs", [(1, 8), (2, 2), (4, 1)])
def test_50_samples_in_batches_of_8_each_exactly_once(dp, mbs):
    items, s = evaluated_items(50, 8, mbs, dp)
    assert sorted(items) == list(range(50))  # 7 batches, the last holds 2: nothing twice, nothing left out
    assert (s.num_batches, s.evaluated, s.fillers, s.not_evaluated, s.dropped) == (7, 50, 6, 0, 0)
    # a limit far above the set's size never wraps around
    items, s = evaluated_items(50, 8, mbs, dp, limit_batches=100)
    assert sorted(items) == list(range(50)) and s.num_batches == 7


def test_limit_and_drop_last_never_repeat():
    items, s = evaluated_items(50, 8, 2, 2, limit_batches=3)
    assert sorted(items) == list(range(24)) and (s.evaluated, s.not_evaluated) == (24, 26)
    items, s = evaluated_items(50, 8, 2, 2, drop_last=True)
    assert sorted(items) == list(range(48)) and s.dropped == 2
    items, s = evaluated_items(50, 8, 2, 2, shuffle=True, seed=3)
    assert sorted(items) == list(range(50))  # a fixed permutation, still each once
    assert items == evaluated_items(50, 8, 2, 2, shuffle=True, seed=3)[0]
    items, s = evaluated_items(5, 8, 2, 2)  # smaller than one batch: one partial batch
    assert sorted(items) == list(range(5)) and s.num_batches == 1


@pytest.mark.parametrize("packing", [False, True])
def test_partial_batch_metrics_are_token_means_over_exactly_the_evaluated_samples(tok, packing):
    """The loss plug-in's NLL and entropy over a pass (fillers included) equal the token mean
    computed sample by sample over the 50 samples, each once."""
    from psft_megatron.losses import LossConfig, PSFTLoss, reduce_loss_metrics

    ds = val_set(tok, packing=packing)
    vocab = tok[0].vocab_size
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))  # logits = table[token]
    loss = PSFTLoss(LossConfig(kind="sft"))
    mbs = ds.micro_batch_size(2)
    g = 8 if not packing else 2  # packed: the 50 samples fill a few rows; batches of 2 rows
    metrics, seen = [], []
    for rank in range(2):
        for step in EvalSampler(len(ds), g, mbs, rank, 2):
            for items in step:
                micro = ds.collate(items)
                seen += [int(k) for k in micro["sample_index"] if k >= 0]
                seq_ids = micro["seq_ids"] if packing else None
                metrics.append(loss.loss_func(micro["labels"], micro["loss_mask"], seq_ids=seq_ids)(
                    table[micro["tokens"]])[2])
    assert sorted(seen) == list(range(50))
    got = reduce_loss_metrics(metrics)
    nll, ent, n = 0.0, 0.0, 0
    for k in range(50):
        ids, mask = (torch.as_tensor(np.asarray(a, dtype=np.int64)) for a in ds.sample(k))
        logp = torch.log_softmax(table[ids[:-1]], -1)
        keep = mask[1:].bool()
        nll -= logp.gather(-1, ids[1:, None])[:, 0][keep].sum().item()
        ent -= (logp.exp() * logp).sum(-1)[keep].sum().item()
        n += int(keep.sum())
    assert got["num_tokens"] == n
    assert got["nll"] == pytest.approx(nll / n, rel=1e-5) and got["entropy"] == pytest.approx(ent / n, rel=1e-5)


def settings(val_ds=None, **model):
    from psft_megatron.config import build_run_config
    from psft_megatron.training.data_plan import load_data_settings

    raw = {"trainer": {"val_check_interval": 5, "limit_val_batches": 100},
           "model": {"global_batch_size": 8, "micro_batch_size": 2, **model,
                     "tokenizer": {"library": "huggingface", "model": HF_TOKENIZER},
                     "data": {"train_ds": {"file_names": [f"{TINY_SFT}/train.jsonl"]},
                              "validation_ds": {"file_names": [f"{TINY_SFT}/valid.jsonl"], **(val_ds or {})}}}}
    return load_data_settings(build_run_config(raw), world_size=2)


def test_validation_size_is_checked_and_logged_before_training(tok):
    ds = val_set(tok)
    s = settings()
    sampler = s.validation_sampler(ds, 0, 2)
    assert (sampler.num_batches, sampler.evaluated) == (7, 50)
    lines = s.plan_lines(ds, s.train_sampler(ds, 2, 0, 2), 10, ds, sampler, 5)
    assert any("validation data: 50 samples in 7 batches of 8 (the last holds 2, evaluated exactly)" in l
               for l in lines), lines
    # drop_last on a set smaller than one validation batch would evaluate nothing: an error
    big = settings(val_ds={"global_batch_size": 64, "drop_last": True})
    with pytest.raises(DataError) as err:
        big.validation_sampler(ds, 0, 2)
    assert isinstance(err.value, UserError) and "model.data.validation_ds.drop_last=false" in err.value.line()
    # without drop_last the same set is one exact partial batch
    assert settings(val_ds={"global_batch_size": 64}).validation_sampler(ds, 0, 2).evaluated == 50


@pytest.mark.parametrize("trainer,val_ds,message", [
    ({"val_check_interval": 5}, None, "trainer.val_check_interval: 5 asks for validation, but model.data.validation_ds"),
    ({"val_check_interval": 5, "limit_val_batches": 0}, {}, "trainer.limit_val_batches: must be >= 1"),
    ({}, {"global_batch_size": 6}, "model.data.validation_ds.global_batch_size: 6 is not divisible"),
])
def test_validation_config_errors_name_the_key(trainer, val_ds, message):
    from psft_megatron.config import build_run_config
    from psft_megatron.errors import ConfigError
    from psft_megatron.training.data_plan import load_data_settings

    data = {"train_ds": {"file_names": [f"{TINY_SFT}/train.jsonl"]}}
    if val_ds is not None:
        data["validation_ds"] = {"file_names": [f"{TINY_SFT}/valid.jsonl"], **val_ds}
    cfg = build_run_config({"trainer": trainer, "model": {"global_batch_size": 8, "micro_batch_size": 2, "data": data,
                                                          "tokenizer": {"library": "huggingface", "model": HF_TOKENIZER}}})
    with pytest.raises(ConfigError) as err:
        load_data_settings(cfg, world_size=2)
    assert message in err.value.line() and err.value.line().startswith("config error: ")
