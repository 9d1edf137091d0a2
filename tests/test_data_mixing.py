"""Weighted mixing of data files (concat_sampling_probabilities): shares per global batch,
every file reshuffled on its own, exact resume; and the training sampler's seed / drop_last."""

import itertools

import numpy as np
import pytest

from psft_megatron.data import DataConfig, SFTDataset, TokenizerConfig, build_tokenizer
from psft_megatron.data.dataset import load_or_tokenize
from psft_megatron.data.errors import ConfigError
from psft_megatron.data.mixing import MixtureSampler
from tests.data_fixtures.helpers import HF_TOKENIZER, TINY_SFT, write_jsonl


def take(sampler, steps):
    return list(itertools.islice(iter(sampler), steps))


def sources(sizes):
    """Disjoint item ranges, one per source."""
    starts = np.cumsum([0] + list(sizes))
    return [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]


def test_every_batch_holds_the_shares_and_each_file_is_used_up_before_it_repeats():
    sizes, probs, g = [30, 7, 100], [0.5, 0.2, 0.3], 10
    s = MixtureSampler(sources(sizes), probs, g, 1, seed=5)
    batches = [s.next_global_batch() for _ in range(60)]
    src = np.searchsorted(np.cumsum(sizes), np.concatenate(batches), side="right")
    counts = np.zeros(3)
    for t, k in enumerate(src, start=1):  # never a whole item ahead of its share, about one behind at most
        counts[k] += 1
        assert np.all(counts < np.asarray(probs) * t + 1) and np.all(counts > np.asarray(probs) * t - 1.5)
    for b in batches:  # each global batch: 5, 2 and 3 items of the three files
        assert np.bincount(np.searchsorted(np.cumsum(sizes), b, side="right"), minlength=3).tolist() == [5, 2, 3]
    small = [i for i in np.concatenate(batches) if 30 <= i < 37]  # file 1: 7 items, 120 draws
    for p in range(len(small) // 7):  # each pass is a permutation of the file, reshuffled per pass
        assert sorted(small[7 * p : 7 * p + 7]) == list(range(30, 37))
    assert small[:7] != small[7:14]
    assert s.epochs() == pytest.approx([300 / 30, 120 / 7, 180 / 100])


@pytest.mark.parametrize("stop", [1, 7, 13])
def test_resume_from_the_saved_state_gives_the_same_batches(stop):
    make = lambda rank: MixtureSampler(sources([11, 40]), [0.35, 0.65], 12, 2, rank, 2, seed=9)  # noqa: E731
    for rank in range(2):
        full = take(make(rank), 25)
        first = make(rank)
        head = take(first, stop)
        state = dict(first.state_dict())
        resumed = make(rank)
        resumed.load_state_dict(state)
        assert head + take(resumed, 25 - stop) == full
        assert state["consumed_samples"] == 12 * stop
    # DP shards of a step are disjoint and make up the global batch
    a, b = take(make(0), 1)[0], take(make(1), 1)[0]
    assert sorted(i for mb in a + b for i in mb) == sorted(make(0).next_global_batch().tolist())


def test_a_state_of_other_weights_sizes_or_sampler_is_refused():
    s = MixtureSampler(sources([10, 10]), [0.5, 0.5], 4, 1, seed=1)
    for other in (MixtureSampler(sources([10, 10]), [0.25, 0.75], 4, 1, seed=1),
                  MixtureSampler(sources([10, 12]), [0.5, 0.5], 4, 1, seed=1)):
        with pytest.raises(ConfigError, match="resuming would not reproduce"):
            s.load_state_dict(other.state_dict())
    from psft_megatron.data import SFTSampler

    with pytest.raises(ConfigError, match="without concat_sampling_probabilities"):
        s.load_state_dict(SFTSampler(20, 4, 1).state_dict())
    with pytest.raises(ConfigError, match="'mixture' sampler"):
        SFTSampler(20, 4, 1).load_state_dict(s.state_dict())


def test_mixed_dataset_packs_each_file_on_its_own(tmp_path):
    tok_cfg = TokenizerConfig(library="huggingface", model=HF_TOKENIZER)
    tokenizer = build_tokenizer(tok_cfg)
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(9)])
    for packing in (False, True):
        cfg = DataConfig.from_dict({"file_names": [f"{TINY_SFT}/valid.jsonl", other], "packing": packing,
                                    "max_seq_length": 128, "concat_sampling_probabilities": [0.75, 0.25]})
        ds = SFTDataset(load_or_tokenize(cfg, tokenizer, tok_cfg)[0], cfg, pad_id=tokenizer.pad_id)
        for k, n in ((0, 50), (1, 9)):  # items of file k hold exactly its samples
            samples = [j for i in ds.source_items(k) for j in ds.item_samples(int(i))]
            assert sorted(samples) == list(range(50 * k, 50 * k + n))


def train_sampler(train_ds, world=1, **model):
    from psft_megatron.config import build_run_config
    from psft_megatron.training.data_plan import load_data_settings

    cfg = build_run_config({"model": {"global_batch_size": 4, "micro_batch_size": 1, **model,
                                      "tokenizer": {"library": "huggingface", "model": HF_TOKENIZER},
                                      "data": {"train_ds": {"file_names": ["x.jsonl"], **train_ds}}}})
    settings = load_data_settings(cfg, world)

    class Items:  # a dataset of 10 unpacked samples, two files of 5
        rows = None

        def __len__(self):
            return 10

        def source_items(self, k):
            return np.arange(5 * k, 5 * k + 5)

    return settings.train_sampler(Items(), 1, 0, 1), settings


def test_seed_shuffle_and_drop_last_reach_the_sampler():
    default, _ = train_sampler({}, seed=1234)
    assert default.seed == 1234 and default.drop_last and default.steps_per_epoch == 2  # model.seed
    seeded, _ = train_sampler({"seed": 7})
    assert seeded.seed == 7 and take(seeded, 2) != take(train_sampler({})[0], 2)
    keep, _ = train_sampler({"drop_last": False})
    assert not keep.drop_last and keep.steps_per_epoch == 3 and keep.repeated_per_epoch == 2
    ordered, _ = train_sampler({"shuffle": False})
    assert [i for st in take(ordered, 2) for mb in st for i in mb] == list(range(8))
    mixed, settings = train_sampler({"file_names": ["a.jsonl", "b.jsonl"], "concat_sampling_probabilities": [0.5, 0.5]})
    assert isinstance(mixed, MixtureSampler)
    lines = settings.plan_lines(type("D", (), {"rows": None})(), mixed, 10)
    assert "mixing a.jsonl p=0.5 (5 samples), b.jsonl p=0.5 (5 samples)" in lines[0] and "4.00, 4.00 passes" in lines[0]


@pytest.mark.parametrize("train_ds,message", [
    ({"concat_sampling_probabilities": [0.5, 0.4]}, "concat_sampling_probabilities: must sum to 1, got 0.9"),
    ({"concat_sampling_probabilities": [1.0]}, "concat_sampling_probabilities: 1 values for 2 file_names"),
    ({"concat_sampling_probabilities": [1.0, 0.0]}, "concat_sampling_probabilities[1]: must be a number > 0"),
    ({"concat_sampling_probabilities": [0.5, 0.5], "drop_last": False}, "drop_last: false has no effect"),
])
def test_mixing_config_errors_name_the_key(train_ds, message):
    with pytest.raises(ConfigError) as err:
        DataConfig.from_dict({"file_names": ["a.jsonl", "b.jsonl"], **train_ds})
    assert err.value.line() == f"config error: model.data.train_ds.{message}" or message in err.value.line()
