"""Two torchrun agents as two nodes (``--nnodes 2``, c10d rendezvous on localhost, one process
each): a shared filesystem is required and checked; rank 0 reads the filesystem and decides;
a job killed without warning resumes exactly; saves fail fast and whole; see
tests/parallel/multinode_worker.py for the scenarios and docs/long_jobs.md ("Multi-node
requirements")."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.parallel.launch import REPO, hang_guard, worker_env
from tests.parallel.rank_slots import rank_slots

_cache = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agents(work: str, phase: str):
    """Start the two agents of one job (their own sessions, output to files)."""
    port, procs = _free_port(), []
    for node in range(2):
        log = open(os.path.join(work, f"{phase}.agent{node}.log"), "w")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"psft-{phase}",
               "--rdzv-conf", f"is_host={node == 0}", "--max-restarts", "0",
               os.path.join(REPO, "tests", "parallel", "multinode_worker.py"), "--work", work, "--phase", phase]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def _kill(procs) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _read(work: str, name: str):
    path = os.path.join(work, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f) if name.endswith(".json") else f.read()


def _logs(work: str) -> str:
    return "\n".join(f"--- {n}\n{(_read(work, n) or '')[-3000:]}" for n in sorted(os.listdir(work)) if n.endswith(".log"))


def _run_both_phases(work: str) -> dict:
    with rank_slots(2):
        procs = _agents(work, "first")
        try:
            deadline = time.time() + hang_guard(300)
            while not os.path.exists(os.path.join(work, "ready")):
                assert time.time() < deadline and all(p.poll() is None for p in procs), _logs(work)
                time.sleep(0.2)
            with open(os.path.join(work, "run", "metrics.jsonl")) as f:
                killed_metrics = [json.loads(line) for line in f if line.strip()]
        finally:
            _kill(procs)  # as a node failure: no signal handler runs, nothing is saved
        procs = _agents(work, "second")
        ended = [None, None]
        try:
            deadline = time.time() + hang_guard(300)
            while any(e is None for e in ended):
                assert time.time() < deadline, _logs(work)
                for i, proc in enumerate(procs):
                    if ended[i] is None and proc.poll() is not None:
                        ended[i] = time.time()
                time.sleep(0.1)
        finally:
            _kill(procs)
    ranks = {phase: [_read(work, f"{phase}.rank{r}.json") or {} for r in range(2)] for phase in ("first", "second")}
    logs = {phase: [_read(work, f"{phase}.rank{r}.log") or "" for r in range(2)] for phase in ("first", "second")}
    agent_logs = [_read(work, f"second.agent{node}.log") or "" for node in range(2)]
    return {"killed_metrics": killed_metrics, "ranks": ranks, "logs": logs, "agents_ended": ended, "work": work,
            "agent_logs": agent_logs, "all": _logs(work)}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    if "r" not in _cache:
        _cache["r"] = _run_both_phases(str(tmp_path_factory.mktemp("multinode")))
    return _cache["r"]


def test_node_local_disks_stop_at_start_up_in_one_line(job):
    first = job["ranks"]["first"]
    for rank in (0, 1):
        assert first[rank]["node_local"]["code"] == 2, job["all"]
    lines = first[0]["node_local"]["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: exp_manager.explicit_log_dir:"), lines
    assert "is not one shared directory: rank(s) 1 on" in lines[0] and "shared by every node" in lines[0], lines
    assert first[1]["node_local"]["stderr"] == ""


def test_killed_job_resumes_exactly_and_reads_each_checkpoint_once(job):
    r0, r1 = job["ranks"]["second"]
    resume = r0["resume"]
    assert resume["code"] == 0 and r1["resume"]["code"] == 0, job["all"]
    assert "resumed from" in resume["stdout"] and "iter_0000003 at step 3" in resume["stdout"], resume["stdout"]
    killed = {m["step"]: m for m in job["killed_metrics"]}
    resumed = {m["step"]: m for m in resume["metrics"]}
    for step in (4, 5):  # SFT-KL: the reference must be the initial (restored) weights again
        for key in ("loss", "nll", "kl", "entropy"):
            assert resumed[step][key] == killed[step][key], (step, key, resumed[step], killed[step])
    # rank 0 reads the checkpoint's index, common state, checksums and `latest` once; rank 1 none
    assert resume["opened"] == {n: 1 for n in (".metadata", "common.pt", "metadata.json", "checksums.json",
                                               "latest")}, resume["where"]
    assert r1["resume"]["opened"] == {}, r1["resume"]["opened"]
    assert resume["all_gathers"] == 0 and r1["resume"]["all_gathers"] == 0, resume["where"]
    # the restore's weights are read once, into the frozen reference only (never into the model)
    for r in (r0, r1):
        assert r["resume"]["restore_loads"] == 1 and r["resume"]["restore_into_frozen"] == [True], r["resume"]


def test_ranks_that_see_different_latest_files_agree(job):
    r0, r1 = job["ranks"]["second"]
    assert r0["views"]["code"] == 0 and r1["views"]["code"] == 0, job["all"]
    assert r0["views"]["resumed_at"] == 5 and r1["views"]["resumed_at"] == 5, (r0["views"], r1["views"])


def test_a_step_is_saved_once_and_rotation_does_not_hold_up_the_save(job):
    views = job["ranks"]["second"][0]["views"]
    assert "stopped by SIGTERM after step 6" in views["stdout"], views["stdout"]
    assert views["writes"] == [".tmp_iter_0000006"], views["writes"]
    assert views["deletion"] == {"save_returned_first": True}, views["deletion"]
    assert views["fsynced_by_rank0"] and not [n for n in views["fsynced_by_rank0"] if n.startswith("__1_")], \
        views["fsynced_by_rank0"]


def test_an_exception_in_one_ranks_save_ends_every_rank_within_seconds(job):
    r0, r1 = job["ranks"]["second"]
    injected_at = r1["injected_at"]
    assert all(job["agents_ended"]) and max(job["agents_ended"]) - injected_at < 60, \
        (job["agents_ended"], injected_at, job["all"])
    assert r1["injected"]["code"] == 2, r1
    # rank 0 was waiting inside megatron's save for rank 1, which stayed alive: it ended itself
    assert r1["rank0_gone_after_s"] is not None and r1["rank0_gone_after_s"] < 30, r1
    log0, log1 = job["logs"]["second"]
    errors = [line for line in log0.splitlines() if line.startswith("checkpoint error:")]
    assert len(errors) == 1, log0[-3000:]
    assert "writing checkpoint" in errors[0] and "iter_0000007 failed (rank 1: RuntimeError: injected failure)" \
        in errors[0] and "iter_0000006 is intact" in errors[0], errors
    assert "Traceback" not in log0 + log1 and "checkpoint error" not in log1, log1[-3000:]
    for node in (0, 1):  # each agent reports its worker's exit status 2
        assert "exitcode  : 2" in job["agent_logs"][node], job["agent_logs"][node][-3000:]
    from psft_megatron.checkpointing.dist_checkpoint import damaged

    root = os.path.join(job["work"], "run", "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == "iter_0000006"
    assert damaged(os.path.join(root, "iter_0000006"), verify_data=True) is None
