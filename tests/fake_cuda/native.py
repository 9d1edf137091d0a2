"""Build and load the native half of the fake-CUDA lane (``shim.cpp``).

:func:`load` must run before ``import torch`` in the process that uses the lane: the shim
registers CUDA hooks that torch reads once, when it first asks about accelerators. The shared
library is compiled with the system C++ compiler against the installed torch's headers (a few
seconds) and cached under ``build/fake_cuda/`` keyed on the shim's source and torch's version.

This module never imports torch itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SOURCE = os.path.join(HERE, "shim.cpp")
#: environment variable naming an already built shim (set by the test for its workers)
ENV = "PSFT_FAKE_CUDA_SHIM"

_loaded = None


class ShimUnavailable(RuntimeError):
    """The shim cannot be built here (no C++ compiler, or torch without headers)."""


def _torch_dir() -> str:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise ShimUnavailable("torch is not installed")
    return list(spec.submodule_search_locations)[0]


def build(cache_dir: str = None) -> str:
    """Compile the shim for the installed torch (cached); returns the path of the library."""
    torch_dir = _torch_dir()
    include, lib = os.path.join(torch_dir, "include"), os.path.join(torch_dir, "lib")
    if not os.path.isdir(include):
        raise ShimUnavailable(f"torch at {torch_dir} ships no C++ headers")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise ShimUnavailable("no C++ compiler (g++) on PATH")
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + importlib.metadata.version("torch").encode() + torch_dir.encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.join(REPO, "build", "fake_cuda")
    out = os.path.join(cache_dir, f"fake_cuda_{key}.so")
    if os.path.exists(out):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    cmd = [compiler, "-O1", "-shared", "-fPIC", "-std=c++17", f"-I{include}", SOURCE, f"-L{lib}",
           "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}", "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ShimUnavailable(f"compiling {SOURCE} failed:\n{proc.stderr[-3000:]}")
    os.replace(tmp, out)
    return out


def load(path: str = None):
    """Load the shim (before ``import torch``); returns the ctypes handle."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if "torch" in sys.modules:
        raise RuntimeError("tests.fake_cuda.native.load() must run before torch is imported")
    _loaded = ctypes.CDLL(path or os.environ.get(ENV) or build(), mode=ctypes.RTLD_GLOBAL)
    return _loaded
