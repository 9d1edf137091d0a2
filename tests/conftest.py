"""Session-wide test switches.

``PSFT_TEST_CHECK=1`` (``make check``, the edit-run loop): multi-process launches are skipped
where they start - :func:`tests.parallel.launch.torchrun`, a request for rank slots
(:func:`tests.parallel.rank_slots.rank_slots`, taken before every ``mp.spawn`` and multi-rank
subprocess, so a skipped launch never queues behind other jobs), ``torch.multiprocessing.spawn``
and any subprocess running ``torch.distributed.run`` / ``torchrun`` - except those in
``CHECK_LAUNCHES``, one small parity launch. Every single-process test runs; the launches run in
``make test``. A test file added later is covered the same way without being listed anywhere.
"""

from __future__ import annotations

import os
import subprocess

import pytest

CHECK = os.environ.get("PSFT_TEST_CHECK", "") not in ("", "0")
#: (worker script, its arguments) launched even under PSFT_TEST_CHECK: the 2-process parity suite
CHECK_LAUNCHES = {("tests/parallel/parity_worker.py", ("--suite", "two"))}
SKIP_REASON = "multi-process launch: make test runs it (PSFT_TEST_CHECK is set)"


def _is_launcher(args) -> bool:
    words = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args or [])
    text = " ".join(os.fspath(w) if not isinstance(w, bytes) else w.decode() for w in words)
    return "torch.distributed.run" in text or os.path.basename(text.split(" ")[0]) == "torchrun"


def _install_check_mode() -> None:
    import torch.multiprocessing

    from tests.parallel import launch, rank_slots

    original_torchrun = launch.torchrun
    allowed = [False]  # inside a launch of CHECK_LAUNCHES: its own subprocess may start

    def torchrun(script, nproc, args, *rest, **kwargs):
        if (script, tuple(args)) not in CHECK_LAUNCHES:
            pytest.skip(SKIP_REASON)
        allowed[0] = True
        try:
            return original_torchrun(script, nproc, args, *rest, **kwargs)
        finally:
            allowed[0] = False

    def spawn(*args, **kwargs):
        pytest.skip(SKIP_REASON)

    def slots(ranks):
        pytest.skip(SKIP_REASON)

    class Popen(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs):
            if _is_launcher(args) and not allowed[0]:
                pytest.skip(SKIP_REASON)
            super().__init__(args, *rest, **kwargs)

    launch.torchrun = torchrun  # launch.torchrun keeps the real rank_slots for CHECK_LAUNCHES
    rank_slots.rank_slots = slots
    torch.multiprocessing.spawn = spawn
    subprocess.Popen = Popen


def pytest_configure(config):
    if CHECK:
        _install_check_mode()
