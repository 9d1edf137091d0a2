"""The comparisons of the GPU tests (tests/gpu, skipped without CUDA) run here on the CPU: they
pass on the real ops, reach the multi-tile path at the device's default tiles, and fail on a
planted error of a part in a thousand (fp32) or a percent (bf16 gradients)."""

import pytest
import torch

from tests.gpu import test_fused_logprobs_cuda as fused_check
from tests.gpu import test_plugin_cuda as plugin_check


@pytest.fixture
def small_fused(monkeypatch):
    # the CPU's default tiles are 512 x 512: two full tiles and a remainder each way
    monkeypatch.setattr(fused_check, "ROWS", 1100)
    monkeypatch.setattr(fused_check, "VOCAB", 1100)
    monkeypatch.setattr(fused_check, "HIDDEN", 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plugin_check_passes(dtype):
    plugin_check.check_logprobs("cpu", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_check_passes_at_the_default_tiles(small_fused, dtype):
    fused_check.check_fused_op("cpu", dtype, masked=True)


def _scaled_gradient(op, factor):
    """``op`` with the gradient of its first argument scaled by ``factor`` (a planted bug)."""
    def planted(x, *args, **kwargs):
        x.register_hook(lambda grad: grad * factor)
        return op(x, *args, **kwargs)
    return planted


@pytest.mark.parametrize("dtype,factor", [(torch.float32, 1.001), (torch.bfloat16, 1.02)])
def test_plugin_check_fails_on_a_small_gradient_error(monkeypatch, dtype, factor):
    monkeypatch.setattr(plugin_check, "vocab_parallel_logprobs",
                        _scaled_gradient(plugin_check.vocab_parallel_logprobs, factor))
    with pytest.raises(AssertionError, match="logits grad: relative error"):
        plugin_check.check_logprobs("cpu", dtype)


@pytest.mark.parametrize("dtype,factor", [(torch.float32, 1.001), (torch.bfloat16, 1.02)])
def test_fused_check_fails_on_a_small_gradient_error(small_fused, monkeypatch, dtype, factor):
    monkeypatch.setattr(fused_check, "fused_linear_logprobs",
                        _scaled_gradient(fused_check.fused_linear_logprobs, factor))
    with pytest.raises(AssertionError, match="hidden grad: relative error"):
        fused_check.check_fused_op("cpu", dtype, masked=True)
