"""The machine-wide rank-slot pool of the test launches (tests/parallel/rank_slots.py): jobs
that together want more ranks than the pool wait for each other; smaller ones run together."""

import json
import os
import subprocess
import sys

import pytest

from tests.parallel.launch import REPO

# Two jobs, A then B. A takes its slots and marks itself in; B waits for that, then asks for its
# own. A stays in until it sees B in (the jobs overlap) or sees B waiting for slots: B holds the
# pool's gate lock while it collects (rank_slots), so a gate A cannot lock means B is blocked;
# A then gives B another 2 s to get in wrongly. B, once in, records whether A is still in.
# Nothing depends on when the processes happen to start: a late B only makes A wait.
HOLD = """
import fcntl, json, os, sys, time
from tests.parallel.rank_slots import _lock_dir, rank_slots
ranks, role, marks = int(sys.argv[1]), sys.argv[2], sys.argv[3]
mark = lambda name: os.path.join(marks, name)
def wait_for(done, seconds):
    deadline = time.time() + seconds
    while not done() and time.time() < deadline:
        time.sleep(0.02)
    return done()
def gate_is_held():
    fd = os.open(os.path.join(_lock_dir(), "gate"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
if role == "A":
    with rank_slots(ranks):
        open(mark("a_in"), "w").close()
        seen = wait_for(lambda: os.path.exists(mark("b_in")) or (os.path.exists(mark("b_asks")) and gate_is_held()), 120)
        if seen and not os.path.exists(mark("b_in")):
            wait_for(lambda: os.path.exists(mark("b_in")), 2.0)
        b_in = os.path.exists(mark("b_in"))
        if b_in:
            wait_for(lambda: os.path.exists(mark("b_checked")), 120)
        os.remove(mark("a_in"))
    print(json.dumps({"saw_other": b_in, "conclusive": seen}))
else:
    assert wait_for(lambda: os.path.exists(mark("a_in")), 120), "A never got its slots"
    open(mark("b_asks"), "w").close()
    with rank_slots(ranks):
        open(mark("b_in"), "w").close()
        a_in = os.path.exists(mark("a_in"))
        open(mark("b_checked"), "w").close()
    print(json.dumps({"saw_other": a_in, "conclusive": True}))
"""


def _saw_each_other(ranks, pool, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, PSFT_TEST_RANK_SLOTS=str(pool), TMPDIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(r), role, str(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role, r in zip("AB", ranks)]
    out = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), out
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in out]
    assert all(r["conclusive"] for r in results), f"A saw B neither in nor waiting for slots: {results}"
    return [r["saw_other"] for r in results]


@pytest.mark.parametrize("ranks,pool,overlap", [
    ((4, 4), 4, False),  # a 4-rank job runs alone on a pool of 4
    ((4, 2), 4, False),
    ((2, 2), 4, True),   # two 2-rank jobs share it
    ((8, 1), 4, False),  # more than the pool: takes all of it
    ((4, 4), 0, True),   # pool off
])
def test_jobs_wait_only_when_the_pool_is_short(tmp_path, ranks, pool, overlap):
    assert _saw_each_other(ranks, pool, tmp_path) == [overlap, overlap]
