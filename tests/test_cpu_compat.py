"""The CPU compatibility layer: what it rewrites, and that it refuses to run on CUDA."""

import subprocess
import sys
import textwrap

import pytest
import torch

from tests.parallel.launch import REPO

CHECKS = textwrap.dedent(
    """
    import torch
    from psft_megatron import cpu_compat
    cpu_compat.install(); cpu_compat.install()  # idempotent
    x = torch.zeros(3, device="cuda")
    assert x.device.type == "cpu", x.device
    assert torch.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2, device=0).device.type == "cpu"
    assert x.cuda() is x and x.to("cuda").device.type == "cpu"
    assert torch.empty(2, pin_memory=True).device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor", x.type()
    assert x.to(torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert x.type(torch.float64).dtype == torch.float64  # type(dtype) is untouched
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
    # megatron's RNG tracker runs on the CPU generator: forks are reproducible and
    # do not disturb the default stream.
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    tracker = get_cuda_rng_tracker()
    tracker.reset(); tracker.add("model-parallel-rng", 42)
    torch.manual_seed(0); before = torch.rand(2)
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(2)
    after = torch.rand(2)
    assert torch.equal(after, before), "fork disturbed the default stream"
    tracker.reset(); tracker.add("model-parallel-rng", 42)
    with tracker.fork():
        b = torch.rand(2)
    assert torch.equal(a, b) and not torch.equal(a, before)
    print("OK")
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is for CPU-only machines")
def test_cpu_layer_rewrites_cuda_requests():
    proc = subprocess.run([sys.executable, "-c", CHECKS], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_cpu_layer_refuses_when_cuda_is_available(monkeypatch):
    from psft_megatron import cpu_compat

    if cpu_compat.is_installed():
        pytest.skip("already installed in this process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must not be installed when CUDA is available"):
        cpu_compat.install()
    assert not cpu_compat.is_installed()
