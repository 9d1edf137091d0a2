"""The machine-wide rank-slot pool of the test launches (tests/parallel/rank_slots.py): jobs
that together want more ranks than the pool wait for each other; smaller ones run together."""

import os
import subprocess
import sys

import pytest

from tests.parallel.launch import REPO

# Holds the slots, marks itself present, and waits (up to the given seconds) to see the other
# job present too; prints whether it did. The mark is removed before the slots are released.
HOLD = """
import os, sys, time
from tests.parallel.rank_slots import rank_slots
ranks, me, other, wait = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
with rank_slots(ranks):
    open(me, "w").close()
    deadline = time.time() + wait
    while not os.path.exists(other) and time.time() < deadline:
        time.sleep(0.05)
    print(os.path.exists(other))
    time.sleep(0.5)  # stay present long enough for the other to see this one
    os.remove(me)
"""


def _saw_each_other(ranks, pool, tmp_path, wait):
    env = dict(os.environ, PYTHONPATH=REPO, PSFT_TEST_RANK_SLOTS=str(pool), TMPDIR=str(tmp_path))
    marks = [str(tmp_path / "a"), str(tmp_path / "b")]
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(r), marks[i], marks[1 - i], str(wait)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, text=True) for i, r in enumerate(ranks)]
    out = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), out
    return [o.strip() == "True" for o in out]


@pytest.mark.parametrize("ranks,pool,overlap", [
    ((4, 4), 4, False),  # a 4-rank job runs alone on a pool of 4
    ((4, 2), 4, False),
    ((2, 2), 4, True),   # two 2-rank jobs share it
    ((8, 1), 4, False),  # more than the pool: takes all of it
    ((4, 4), 0, True),   # pool off
])
def test_jobs_wait_only_when_the_pool_is_short(tmp_path, ranks, pool, overlap):
    # jobs that may overlap wait long for each other (robust on a loaded machine); jobs that
    # must not overlap hold their slots 1.5 s each, and neither may see the other
    saw = _saw_each_other(ranks, pool, tmp_path, wait=30.0 if overlap else 1.5)
    assert saw == [overlap, overlap], saw
