"""Long jobs: exact resume inside an old-policy window, atomic saves, signals, NaN steps,
unwritable checkpoint directories (see docs/long_jobs.md)."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tests.parallel.launch import REPO, hang_guard, torchrun, worker_env
from tests.parallel.rank_slots import rank_slots

_cache = {}


def resume_results():
    if "r" not in _cache:
        _cache["r"] = torchrun("tests/parallel/resume_worker.py", 4, [])
    return _cache["r"]


def test_resume_inside_a_window_is_bitwise_exact():
    r = resume_results()
    assert r["resumed_from_step"] == 6  # inside the window [4, 8) of K = 4
    assert len(r["straight"]) == len(r["resumed"]) == 12
    assert r["resumed"] == r["straight"], "resumed run differs from the uninterrupted one"


def test_resume_at_another_layout_and_optimizer_kind_mismatch():
    r = resume_results()
    assert r["other_layout_step"] == 6
    assert [h["step"] for h in r["other_layout"]] == [7, 8]
    # saved inside a window at TP=2: at TP=1 pi_old is re-synced, so step 7 has ratio 1
    assert r["other_layout"][0]["loss"] == -1.0 and r["straight"][6]["loss"] != -1.0
    assert abs(r["other_layout"][0]["nll"] - r["straight"][6]["nll"]) < 1e-5  # same weights and batch
    message = r["optimizer_kind_error"]
    assert message and "use_distributed_optimizer=false; this run has true" in message, message


def test_nan_steps_are_skipped_counted_and_stop_the_run():
    r = resume_results()
    skipped = [h["skipped"] for h in r["nan_history"]]
    assert skipped == [0.0, 1.0, 0.0, 0.0, 2.0, 3.0], r["nan_history"]
    assert all(h["nll"] == h["nll"] for h in r["nan_history"])  # the weights stayed finite
    message = r["nan_error"]
    assert message and "step 6" in message and "non-finite loss" in message, message
    assert "trainer.max_consecutive_skipped_steps=2" in message and "iter_0000003" in message, message


def test_unwritable_checkpoint_dir_fails_cleanly():
    message = resume_results()["unwritable_error"]
    assert message and "blocker/checkpoints is not writable" in message and "NotADirectoryError" in message


def _read_metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pretrain(log_dir, *overrides, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "pretrain_psft.py", "--config-name", "tiny_cpu", "trainer.val_check_interval=0",
            f"exp_manager.explicit_log_dir={log_dir}", "exp_manager.resume_if_exists=true",
            "exp_manager.create_tensorboard_logger=false", *overrides]


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path):
    with rank_slots(2):  # the 2-rank jobs below, one at a time
        _sigterm_saves_exits_zero_and_resumes_exactly(tmp_path)


def _sigterm_saves_exits_zero_and_resumes_exactly(tmp_path):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    subprocess.run(_pretrain(straight, "trainer.max_steps=24"), cwd=REPO, env=worker_env(), check=True,
                   capture_output=True, timeout=hang_guard(300))
    proc = subprocess.Popen(_pretrain(stopped, "trainer.max_steps=1000"), cwd=REPO, env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(stopped, "metrics.jsonl")
    deadline = time.time() + hang_guard(240)
    while time.time() < deadline:
        if os.path.exists(metrics) and len(_read_metrics(stopped)) >= 3:
            break
        time.sleep(0.05)
    # as SLURM signals a job step: torchrun and every worker; torchrun forwards it to the
    # workers again (a repeat within StopSignals.REPEAT_S, ignored)
    for process in [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True):
        process.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=hang_guard(240))
    # the workers save and exit 0; torchrun itself reports the signal it got and exits 1
    # (docs/long_jobs.md, "Preemption")
    assert proc.returncode == 1 and "SignalException" in out, out[-3000:]
    assert "stopped by SIGTERM" in out, out[-3000:]
    assert "exitcode  : 1" not in out and "exitcode: 1" not in out, out[-3000:]
    with open(os.path.join(stopped, "checkpoints", "latest")) as f:
        step = int(f.read().strip()[len("iter_"):])
    assert 3 <= step <= 20, step
    subprocess.run(_pretrain(stopped, f"trainer.max_steps={step + 3}"), cwd=REPO, env=worker_env(), check=True,
                   capture_output=True, timeout=hang_guard(300))
    want = {r["step"]: r["loss"] for r in _read_metrics(straight)}
    got = {r["step"]: r["loss"] for r in _read_metrics(stopped)}
    assert [got[s] for s in range(1, step + 4)] == [want[s] for s in range(1, step + 4)]


def test_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    from psft_megatron.checkpointing.dist_checkpoint import load_common

    log_dir = str(tmp_path / "run")
    worker = [sys.executable, "tests/parallel/killed_save_worker.py", "--log-dir", log_dir]
    subprocess.run(worker + ["--max-steps", "4"], cwd=REPO, env=worker_env(), check=True, capture_output=True,
                   timeout=hang_guard(300))
    # Its own session and a log file, not pipes: megatron's save leaves a helper process that
    # would hold the pipes open after the SIGKILL; the whole group is cleaned up below.
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(worker + ["--max-steps", "6", "--kill-during-save"], cwd=REPO, env=worker_env(),
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = killed.wait(timeout=hang_guard(300))
        finally:
            try:
                os.killpg(killed.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    root = os.path.join(log_dir, "checkpoints")
    assert os.path.isdir(os.path.join(root, ".tmp_iter_0000006"))  # the half-done save
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == "iter_0000004"
    assert load_common(os.path.join(root, "iter_0000004"))["iteration"] == 4
    done = subprocess.run(worker + ["--max-steps", "6"], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=hang_guard(300))
    assert done.returncode == 0 and "saved at step 6" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000006", "latest"]
