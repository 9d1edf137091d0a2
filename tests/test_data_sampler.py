"""SFTSampler: determinism, exact resume, disjoint DP shards that cover the epoch."""

import itertools

import pytest

from psft_megatron.data import SFTSampler


def take(sampler, steps):
    return list(itertools.islice(iter(sampler), steps))


def test_same_seed_same_batches_other_seed_differs():
    a = take(SFTSampler(100, 16, 2, 0, 2, seed=7), 20)
    b = take(SFTSampler(100, 16, 2, 0, 2, seed=7), 20)
    c = take(SFTSampler(100, 16, 2, 0, 2, seed=8), 20)
    assert a == b and a != c
    assert all(len(step) == 4 and all(len(mb) == 2 for mb in step) for step in a)  # 16 = 2 * 4 * 2


@pytest.mark.parametrize("stop", [1, 5, 6, 7, 13])
def test_resume_gives_the_same_batches(stop):
    # 100 items, global batch 16: 6 steps per epoch, tail of 4 dropped; stop inside and at epoch ends
    full = take(SFTSampler(100, 16, 2, 1, 2, seed=3), 20)
    first = SFTSampler(100, 16, 2, 1, 2, seed=3)
    head = take(first, stop)
    state = dict(first.state_dict())
    resumed = SFTSampler(100, 16, 2, 1, 2, seed=3)
    resumed.load_state_dict(state)
    assert head + take(resumed, 20 - stop) == full
    assert state["consumed_samples"] == 16 * stop


def test_dp_shards_disjoint_and_cover_the_epoch():
    dp = 4
    samplers = [SFTSampler(203, 24, 3, r, dp, seed=11) for r in range(dp)]
    s0 = samplers[0]
    assert s0.steps_per_epoch == 8 and s0.dropped_per_epoch == 203 - 8 * 24 and s0.num_microbatches == 2
    shards = []
    for s in samplers:
        shards.append([i for step in take(s, s.steps_per_epoch) for mb in step for i in mb])
    flat = [i for sh in shards for i in sh]
    assert len(flat) == len(set(flat)) == 8 * 24  # disjoint
    assert set(flat) == set(s0.epoch_order(0).tolist())  # exactly the epoch's full batches
    # the next epoch reshuffles
    nxt = take(samplers[0], 1)[0]
    assert samplers[0].epoch == 1 and nxt != take(SFTSampler(203, 24, 3, 0, dp, seed=11), 1)[0]


def test_drop_last_false_fills_the_tail_and_no_shuffle():
    s = SFTSampler(10, 4, 1, 0, 1, seed=0, shuffle=False, drop_last=False, num_epochs=1)
    steps = list(s)
    assert s.steps_per_epoch == 3 and s.repeated_per_epoch == 2 and s.dropped_per_epoch == 0
    assert [i for st in steps for mb in st for i in mb] == list(range(10)) + [0, 1]


def test_bad_arguments_and_mismatched_state():
    with pytest.raises(ValueError, match="not a multiple"):
        SFTSampler(100, 10, 3, 0, 1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        SFTSampler(5, 8, 1, 0, 1)
    s = SFTSampler(100, 16, 2, 0, 2, seed=3)
    with pytest.raises(ValueError, match="num_samples=90"):
        s.load_state_dict(dict(SFTSampler(90, 16, 2, 0, 2, seed=3).state_dict()))
