"""Checkpoints move between the two tested megatron-core releases, at another layout.

A checkpoint (weights + distributed-optimizer state, DP=2) saved under this environment's
megatron-core is continued under the other lane's (``$PSFT_OTHER_PYTHON``, set by
``make test`` in the current lane: the fast lane's interpreter) at TP=2 and at PP=2, and the
other way round; the per-step losses must equal the saving release's own continuation within
1e-5 (fp32). Loading only the weights must NOT continue the same way (the Adam state matters:
the comparison can fail). Four launches: save and load under each release
(tests/parallel/xversion_worker.py).
"""

import os
import tempfile

import pytest

from tests.parallel.launch import torchrun
from tests.parallel.parity_worker import TOLERANCE

OTHER_PYTHON = os.environ.get("PSFT_OTHER_PYTHON")
WORKER = "tests/parallel/xversion_worker.py"

pytestmark = pytest.mark.skipif(
    not OTHER_PYTHON,
    reason="needs PSFT_OTHER_PYTHON, another environment's interpreter with another megatron-core "
           "(make test sets it in the current lane)")

_cache = {}


def _round_trip() -> dict:
    if not _cache:
        with tempfile.TemporaryDirectory(prefix="psft_xversion_") as tmp:
            here, there = os.path.join(tmp, "saved_here"), os.path.join(tmp, "saved_there")
            _cache["saved_here"] = torchrun(WORKER, 2, ["--mode", "save", "--ckpt", here])
            _cache["saved_there"] = torchrun(WORKER, 2, ["--mode", "save", "--ckpt", there], python=OTHER_PYTHON)
            _cache["loaded_here"] = torchrun(WORKER, 2, ["--mode", "load", "--ckpt", there])
            _cache["loaded_there"] = torchrun(WORKER, 2, ["--mode", "load", "--ckpt", here], python=OTHER_PYTHON)
    return _cache


def _check(saver: dict, loader: dict) -> None:
    assert saver["megatron_core"] != loader["megatron_core"], (
        f"both sides run megatron-core {saver['megatron_core']}: PSFT_OTHER_PYTHON={OTHER_PYTHON} "
        "must be another release")
    want = saver["continued"]
    lines = [f"saved by megatron-core {saver['megatron_core']} at {saver['layout']}, "
             f"loaded by {loader['megatron_core']}; saver's continuation {want}"]
    failures = []
    for key, load in loader["loads"].items():
        if "error" in load:
            failures.append(f"{key}: {load['error']}\n{load['traceback']}")
            continue
        assert load["saved_by"] == saver["megatron_core"] and load["iteration"] == 3, load
        diff = max(abs(a - b) for a, b in zip(load["losses"], want))
        lines.append(f"  {key} ({load['layout']}): {load['losses']} max diff {diff:.3g}")
        if key.endswith("_weights_only"):
            if diff <= 10 * TOLERANCE:
                failures.append(f"{key}: continued like the full load without the Adam state (diff {diff:.3g})")
        elif diff > TOLERANCE:
            failures.append(f"{key}: continuation differs by {diff:.3g} > {TOLERANCE}")
    print("\n".join(lines))
    assert not failures, "\n".join(lines + failures)


def test_other_release_continues_this_releases_checkpoint():
    result = _round_trip()
    _check(result["saved_here"], result["loaded_there"])


def test_this_release_continues_the_other_releases_checkpoint():
    result = _round_trip()
    _check(result["saved_there"], result["loaded_here"])

