"""GPU: NCCL runtime without the CPU layer; TE spec == cpu spec on the same checkpoint."""

import pytest

from psft_megatron.optional import is_available
from tests.parallel.launch import torchrun


def test_te_spec_matches_cpu_spec_on_gpu():
    if not is_available("transformer_engine"):
        pytest.skip("transformer-engine not installed (pip install -e '.[te]')")
    result = torchrun("tests/gpu/te_spec_worker.py", 1, [], gpu=True)
    assert result["backend"] == "nccl" and result["cpu_compat"] is False
    # fp32 both ways; relative to the logits' scale (a permuted or missing weight is O(1))
    assert result["relative_logit_error"] < 1e-2, result
    assert result["round_trip_logit_diff"] == 0.0, result  # cpu -> te -> cpu: the same weights
    assert all("_extra_state" in key for key in result["missing_extra_state"]), result
