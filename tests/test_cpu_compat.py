"""The CPU compatibility layer: what it rewrites, that it refuses to run on CUDA, and that each
patch is needed exactly on the megatron-core releases it is declared for."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from psft_megatron.compat import cpu as cpu_compat
from tests.parallel.fixes_worker import launch_once
from tests.parallel.launch import REPO

CHECKS = textwrap.dedent(
    """
    import torch
    from psft_megatron.compat import cpu as cpu_compat
    from psft_megatron.compat.releases import version_in
    cpu_compat.install(); cpu_compat.install()  # idempotent
    x = torch.zeros(3, device="cuda")
    assert x.device.type == "cpu", x.device
    assert torch.empty(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2, device=0).device.type == "cpu"
    assert x.cuda() is x and x.to(device="cuda").device.type == "cpu"
    assert x.to(torch.cuda.current_device()).device.type == "cpu"
    assert torch.empty(2, pin_memory=True).device.type == "cpu"
    assert x.type() == "torch.cuda.FloatTensor", x.type()
    assert x.to(torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert x.type(torch.float64).dtype == torch.float64  # type(dtype) is untouched
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_event(None)
    torch.cuda.Stream().record_event().synchronize()
    torch.cuda.Event().synchronize()
    # classes, not functions: transformers annotates `torch.cuda.Stream | None` at import time
    assert isinstance(torch.cuda.Stream | None, object) and isinstance(torch.cuda.Event | None, object)
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
    # a patch named in PSFT_PATCHES_OFF is left out; disabled() reverts one for a block
    assert "pin_memory" not in cpu_compat.applied()
    with cpu_compat.disabled("current_device"):
        try:
            torch.cuda.current_device()
            raise SystemExit("current_device still patched inside disabled()")
        except (AssertionError, RuntimeError):
            pass
    assert torch.cuda.current_device() == torch.device("cpu")
    print("OK")
    """
)

def test_cpu_layer_rewrites_cuda_requests():
    checks = CHECKS.replace('assert torch.empty(2, pin_memory=True).device.type == "cpu"\n', "")
    proc = subprocess.run([sys.executable, "-c", checks], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PSFT_PATCHES_OFF="pin_memory", CUDA_VISIBLE_DEVICES=""))  # a CPU run
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_cpu_layer_refuses_when_cuda_is_available(monkeypatch):
    # whether or not an earlier test installed the layer in this process: start uninstalled
    monkeypatch.setattr(cpu_compat, "_installed_mode", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must not be installed when CUDA is available"):
        cpu_compat.install()
    assert not cpu_compat.is_installed()


@pytest.mark.parametrize("name", [patch.name for patch in cpu_compat.PATCHES
                                  if patch.name not in cpu_compat.MULTI_RANK_PATCHES])
def test_patch_is_needed_exactly_where_declared(name):
    """megatron-core's own code at one of the patch's sites, with the patch off and on."""
    result = launch_once()
    entry = result["cpu_compat"][name]
    version = result["megatron_core"]
    print(f"megatron-core {version}, torch {result['torch']}, {name} (declared for {entry['range']}): "
          f"off -> {entry['off']['detail']}; on -> {entry['on']['detail']}")
    assert not entry["on"]["bug"], f"{name} on, megatron-core {version}: {entry['on']['detail']}"
    assert entry["applied"] == entry["needed"], entry
    if entry["needed"]:
        assert entry["off"]["bug"], (f"megatron-core {version} runs the probed site without {name} "
                                     f"(declared {entry['range']}): drop the patch for this release")
    else:
        assert not entry["off"]["bug"], (f"megatron-core {version} needs {name}, but it is declared only "
                                         f"for {entry['range']}: {entry['off']['detail']}")
