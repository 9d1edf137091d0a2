"""Comparisons for the GPU tests, relative to the scale of the tensor compared.

A fixed ``atol`` of 1e-2 passes any bf16 gradient whose entries are mostly below 1e-2 (a logits
gradient is ~1/vocabulary per entry): such a check cannot fail. Here a result is compared with a
float64 reference through its relative error ``||got - want|| / ||want||`` (Frobenius norms):

- fp32 results: at most ``FP32_RTOL`` (measured on CPU: <= 3.2e-7 for the fused op's values and
  gradients at 2100 x 17000);
- half-precision results: at most ``HALF_FACTOR`` times the error of the plain-torch path in the
  same dtype on the same device (the ``baseline``: what megatron's unfused path computes), which
  itself must look like half-precision rounding (<= ``HALF_MAX``). Measured on CPU in bf16: the
  fused op 3.4e-4 (log-probs) to 2.3e-3 (gradients), the plain path 3.4e-4 to 2.9e-3.

A tile that is skipped or mis-normalised, one row or vocabulary block wrong, moves the error by
orders of magnitude more than these bounds.
"""

from __future__ import annotations

import torch

FP32_RTOL = 1e-5
HALF_FACTOR = 2.0
HALF_MAX = 2e-2


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64 on the CPU; ``got`` must be finite."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    assert torch.isfinite(got).all(), "non-finite entries"
    assert want.norm() > 0, "an all-zero reference compares nothing"
    return ((got - want).norm() / want.norm()).item()


def assert_accurate(got: torch.Tensor, want: torch.Tensor, what: str, baseline: torch.Tensor = None) -> float:
    """``got`` against the float64 ``want``: within FP32_RTOL for fp32 results, else within
    HALF_FACTOR x the ``baseline``'s error (same dtype, plain torch). Returns the error."""
    err = relative_error(got, want)
    if baseline is None:
        assert err <= FP32_RTOL, f"{what}: relative error {err:.3g} > {FP32_RTOL:g}"
        return err
    base = relative_error(baseline, want)
    assert base <= HALF_MAX, f"{what}: the plain path's own error {base:.3g} is not half-precision rounding"
    assert err <= max(HALF_FACTOR * base, FP32_RTOL), \
        f"{what}: relative error {err:.3g} > {HALF_FACTOR:g} x the plain path's {base:.3g}"
    return err
