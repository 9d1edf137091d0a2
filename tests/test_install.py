"""Installing the package where today's stack is already installed (a current NGC PyTorch
container: Python 3.12, a CUDA build of torch, megatron-core 0.19) changes neither torch nor
megatron-core. Runs in make test's current lane, which is set up that way (.ci/current-lane.txt
first, then the package)."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from psft_megatron.compat.releases import version_in
from tests.parallel.launch import REPO

pytestmark = pytest.mark.skipif(
    not (torch.version.cuda and version_in(">=0.17")),
    reason="needs an environment with a CUDA build of torch and megatron-core >= 0.17 (make test's current lane)")


def _stack() -> dict:
    """Installed torch, megatron-core and NVIDIA runtime wheels, with versions."""
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    keep = lambda name: name in ("torch", "megatron-core", "megatron_core") or name.startswith("nvidia-")  # noqa: E731
    stack = {p["name"].lower(): p["version"] for p in json.loads(out) if keep(p["name"].lower())}
    build = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                           capture_output=True, text=True, timeout=300, check=True).stdout.strip()
    stack["torch build"] = build
    return stack


def _pip_install(*extra) -> subprocess.CompletedProcess:
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    return subprocess.run([sys.executable, "-m", "pip", "install", *isolation, *extra, "-e", REPO],
                          capture_output=True, text=True, timeout=900)


def test_pip_install_e_keeps_torch_and_megatron_core(tmp_path):
    before = _stack()
    assert "torch" in before and "megatron-core" in before, before

    report = tmp_path / "report.json"
    dry = _pip_install("--dry-run", "--report", str(report))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    would = sorted(item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"])
    assert would == ["psft-megatron"], f"pip would also install {would}"

    real = _pip_install()
    assert real.returncode == 0, real.stdout + real.stderr
    after = _stack()
    assert after == before, f"pip install -e . changed the stack:\nbefore {before}\nafter  {after}"
    print(f"kept: torch {before['torch build']}, megatron-core {before['megatron-core']}, "
          f"{sum(k.startswith('nvidia-') for k in before)} nvidia-* wheels")
