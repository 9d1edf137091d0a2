"""Every documented lr schedule (docs/config.md: ``model.optim.sched.name``) follows its formula
through the warm-up and the whole decay, driven without training: the config as a user writes
it, the trainer's OptimizerConfig and ScheduleConfig (training/run_objects.py), and the code that
makes the optimizer and megatron's own ``OptimizerParamScheduler`` (training/setup.py
``optimizer_and_scheduler``) with a stand-in for megatron's ``get_megatron_optimizer`` that
makes the parameter groups as it does (peak and floor copied from the OptimizerConfig). The same schedules inside a real training run: tests/test_user_errors.py
(``cosine`` case)."""

from __future__ import annotations

import math
import os

import pytest

from psft_megatron.config import load_run_config
from psft_megatron.errors import ConfigError
from tests.config_docs import enumerated_keys
from tests.parallel.launch import REPO

PEAK, FLOOR = 1e-3, 1e-4
NAMES = enumerated_keys()["model.optim.sched.name"]


def expected_lr(style: str, n: int, warmup: int, horizon: int, peak: float = PEAK, floor: float = FLOOR) -> float:
    """docs/config.md's formula: the lr after n optimizer steps (the one step n + 1 uses)."""
    if warmup and n <= warmup:
        return peak * n / warmup
    if style == "constant":
        return peak
    if n > horizon:
        return floor
    r = (n - warmup) / (horizon - warmup)
    c = 1.0 - r if style == "linear" else (1.0 + math.cos(math.pi * r)) / 2.0
    return floor + (peak - floor) * c


class MegatronGroups:
    """Stands in for megatron's optimizer: the parameter groups ``get_megatron_optimizer`` makes
    from an OptimizerConfig (``max_lr`` = ``config.lr``, ``min_lr`` = ``config.min_lr``; a
    weight-decay group and a no-weight-decay one)."""

    def __init__(self, config):
        self.param_groups = [{"params": [], "max_lr": config.lr, "min_lr": config.min_lr, "wd_mult": mult}
                             for mult in (1.0, 0.0)]


def lr_curve(overrides, steps: int):
    """The lr of the parameter groups after n = 0..steps scheduler steps, and the decay style."""
    from psft_megatron.training.run_objects import optimizer_config, schedule_config
    from psft_megatron.training.setup import optimizer_and_scheduler

    cfg, _ = load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", [f"model.optim.lr={PEAK}", *overrides])
    schedule = schedule_config(cfg)
    # what setup_model_and_optimizer runs, with the stand-in for get_megatron_optimizer
    groups, scheduler = optimizer_and_scheduler(optimizer_config(cfg), schedule, [],
                                                make_optimizer=lambda config, chunks: MegatronGroups(config))
    curve = []
    for n in range(steps + 1):
        if n:
            scheduler.step(increment=1)
        lrs = {group["lr"] for group in groups.param_groups}
        assert len(lrs) == 1, lrs  # one schedule for every group
        curve.append(lrs.pop())
    return curve, schedule.lr_decay_style


@pytest.mark.parametrize("warmup", [4, 0])
@pytest.mark.parametrize("name", NAMES)
def test_schedule_follows_its_formula_through_warmup_and_decay(name, warmup):
    horizon = 12
    curve, style = lr_curve([f"model.optim.sched.name={name}", f"model.optim.sched.warmup_steps={warmup}",
                             f"model.optim.sched.min_lr={FLOOR}", f"model.optim.sched.max_steps={horizon}"],
                            horizon + 3)
    want = [expected_lr(style, n, warmup, horizon) for n in range(horizon + 4)]
    assert curve == pytest.approx(want, rel=1e-12, abs=1e-15), (name, curve, want)
    decaying = style != "constant"
    # the named points: warm-up end, the middle of the decay, the last step, after it
    middle = warmup + (horizon - warmup) // 2
    assert curve[warmup] == pytest.approx(PEAK)
    assert curve[middle] == pytest.approx((PEAK + FLOOR) / 2 if decaying else PEAK)
    assert curve[horizon] == pytest.approx(FLOOR if decaying else PEAK)
    assert curve[horizon + 3] == pytest.approx(FLOOR if decaying else PEAK)
    if warmup:
        assert curve[0] == 0.0 and curve[1] == pytest.approx(PEAK / warmup)


def test_the_horizon_defaults_to_trainer_max_steps():
    curve, _ = lr_curve(["model.optim.sched.name=linear", "model.optim.sched.warmup_steps=2", "trainer.max_steps=6"], 6)
    assert curve == pytest.approx([expected_lr("linear", n, 2, 6, floor=0.0) for n in range(7)])


@pytest.mark.parametrize("overrides,message", [
    (["model.optim.sched.name=CosineAnnealing", "model.optim.sched.warmup_steps=8", "trainer.max_steps=8"],
     "model.optim.sched.warmup_steps=8 must be less than trainer.max_steps (the decay horizon"),
    (["model.optim.sched.name=linear", "model.optim.sched.warmup_steps=5", "model.optim.sched.max_steps=3"],
     "model.optim.sched.warmup_steps=5 must be less than model.optim.sched.max_steps=3"),
    (["model.optim.sched.max_steps=0"], "model.optim.sched.max_steps=0 must be >= 1"),
])
def test_a_decay_that_ends_before_the_warmup_is_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", overrides)
    assert message in str(err.value), str(err.value)


def test_constant_schedule_may_warm_up_past_max_steps():
    cfg, _ = load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", ["trainer.max_steps=3"])  # warm-up 5
    assert cfg.model.optim.sched.name == "constant" and cfg.model.optim.sched.warmup_steps == 5


def test_resume_names_the_configured_schedule_values_it_does_not_use():
    from psft_megatron.training.run_objects import resumed_schedule_note

    saved = {"max_lr": 3e-3, "min_lr": 0.0, "lr_warmup_steps": 2, "lr_decay_steps": 8, "lr_decay_style": "linear",
             "num_steps": 4}
    assert resumed_schedule_note(dict(saved, num_steps=0), saved) is None
    note = resumed_schedule_note(dict(saved, max_lr=1e-3, lr_decay_steps=12, num_steps=0), saved)
    assert note.startswith("note: the lr schedule continues from the checkpoint")
    assert "model.optim.lr 0.001 -> 0.003" in note and "trainer.max_steps) 12 -> 8" in note, note
