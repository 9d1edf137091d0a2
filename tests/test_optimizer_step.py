"""The trainer's optimizer step keeps megatron's ChainedOptimizer semantics
(tests/parallel/optimizer_worker.py, one 1-process launch): with two sub-optimizers, the same
grad norm and bitwise the same parameters as megatron's own ``step()`` over 3 clipped steps; a
non-finite gradient skips the update of every sub-optimizer (megatron's step would apply it)."""

from tests.parallel.launch import torchrun

_cache = {}


def result():
    if "r" not in _cache:
        _cache["r"] = torchrun("tests/parallel/optimizer_worker.py", 1, [])
    return _cache["r"]


def test_two_sub_optimizers_step_exactly_like_megatron():
    steps = result()["steps"]
    assert len(steps) == 3
    for s in steps:
        assert s["ok"] and s["ref_ok"]
        assert s["grad_norm"] == s["ref_grad_norm"] and s["grad_norm"] > 0.05 * 100  # clipping is active
        assert s["max_param_diff"] == 0.0, s


def test_non_finite_grad_norm_skips_every_sub_optimizer():
    nan = result()["nan"]
    assert nan["ok"] is False and nan["grad_norm"] == "nan"
    assert nan["max_param_change"] == 0.0 and nan["finite"]
    assert result()["nan_megatron"] == {"finite": False, "changed": True}  # what the guard prevents
