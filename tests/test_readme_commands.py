"""README's quick-start commands, run exactly as written, in a clean shell.

The convention that keeps README tested when it is rewritten: a fenced shell block whose line
before the opening fence is exactly

    <!-- tested: quick-start -->

is run by this test as it stands, after the state ``make demo`` leaves (a venv at ``.venv``, the
demo's ``runs/tiny_cpu``). Mark every block a new user runs after ``make demo`` this way; keep
such blocks self-contained (they activate ``.venv`` themselves) and cheap enough for the suite
(the step counts are the block's own). Blocks without the marker are not run. The test does not
depend on where the blocks are or how many there are, but fails when there are none.

How a block runs: ``bash -e`` with nothing from the test's environment but a system ``PATH``
and a fresh ``HOME`` (``env -i``), in a copy of the repository (a directory of links to its
files, without ``runs/``, so the user's runs are never touched; outputs stay in the copy).
``.venv`` in the copy is the venv running this test (``make demo``'s on the fast lane, the
current lane's there): the block's own activation line is what puts ``torchrun`` and ``python``
on the PATH. The demo's ``runs/tiny_cpu/metrics.jsonl`` is a stand-in written here (the demo run
itself is not repeated). A block passes when it exits 0 and prints no traceback and no Python
warning (``PYTHONWARNINGS`` is not set: warnings a user would see fail it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.parallel.launch import REPO, hang_guard, worker_env
from tests.parallel.rank_slots import rank_slots

MARKER = "<!-- tested: quick-start -->"
#: never linked into the copy: the user's runs and venv, git's and tools' own directories
LEFT_OUT = {"runs", ".venv", ".git", ".lanes", ".pytest_cache"}
#: a Python warning as the warnings module prints it: "path.py:12: UserWarning: ..."
WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ", re.M)


def quick_start_blocks(path: str = os.path.join(REPO, "README.md")):
    """The text of every fenced block whose preceding line is :data:`MARKER`."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks = []
    for i, line in enumerate(lines[:-1]):
        if line.strip() != MARKER:
            continue
        assert lines[i + 1].startswith("```"), f"README.md:{i + 1}: {MARKER} must be followed by a code fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
        blocks.append((i + 2, "\n".join(lines[i + 2:end])))
    return blocks


BLOCKS = quick_start_blocks()


def test_readme_marks_quick_start_blocks():
    assert BLOCKS, f"README.md has no block marked {MARKER}: nothing of the quick start is tested"


def _top_level_entries():
    """The repository's own top-level files and directories (git's when it is a checkout), so
    that nothing of the user's (a plot in the root, say) is linked and written through."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True,
                                 env=worker_env()).stdout
        names = {path.split("/", 1)[0] for path in tracked.splitlines() if path}
    except (OSError, subprocess.CalledProcessError):
        names = set(os.listdir(REPO))
    return sorted(names - LEFT_OUT)


def _copy_of_the_repo(root: str) -> str:
    """``root``/repo: links to the repository's top-level entries, ``.venv`` -> this venv, and
    the demo's metrics (a stand-in)."""
    copy = os.path.join(root, "repo")
    os.makedirs(copy)
    for name in _top_level_entries():
        os.symlink(os.path.join(REPO, name), os.path.join(copy, name))
    os.symlink(sys.prefix, os.path.join(copy, ".venv"))
    demo = os.path.join(copy, "runs", "tiny_cpu")
    os.makedirs(demo)
    with open(os.path.join(demo, "metrics.jsonl"), "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "loss": -1.0 - 0.01 * step, "nll": 6.0 - 0.1 * step, "entropy": 5.9,
                                "clip_frac": 0.1}) + "\n")
    return copy


@pytest.mark.skipif(not os.path.exists(os.path.join(sys.prefix, "bin", "activate")),
                    reason="needs a venv (as make demo makes one) to stand for .venv")
@pytest.mark.parametrize("line,block", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_quick_start_block_runs_as_written(line, block, tmp_path):
    copy = _copy_of_the_repo(str(tmp_path))
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "CUDA_VISIBLE_DEVICES": ""}  # the CPU quick start
    ranks = max([int(n) for n in re.findall(r"--nproc_per_node[= ](\d+)", block)] or [1])
    with rank_slots(ranks):
        proc = subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in env.items()), "bash", "-e", "-c", block],
                              cwd=copy, capture_output=True, text=True, timeout=hang_guard(300),
                              env=worker_env())  # `env -i` then keeps only `env` above
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"README.md:{line} failed (exit {proc.returncode}):\n{block}\n---\n{out[-5000:]}"
    assert "Traceback" not in out, out[-5000:]
    assert not WARNING_LINE.search(out), f"README.md:{line} printed warnings:\n" + "\n".join(
        m for m in out.splitlines() if WARNING_LINE.match(m))
