"""One worker of a two-"node" job: two torchrun agents on this machine (``--nnodes 2``, a c10d
rendezvous on localhost), one process each. It runs ``pretrain_psft.main`` several times in
sequence, in-process, with one default process group for all of them. Each rank writes its
stdout/stderr to ``<work>/<phase>.rank<r>.log`` and its findings to ``<work>/<phase>.rank<r>.json``
after every scenario.

phase ``first``:
- ``node_local``: each rank's log dir is another directory (as two nodes whose local disks
  hold the same path): the start must stop in one line (a shared filesystem is required);
- ``init``: 1 step into ``init`` (the weights ``model.restore_from_path`` names below);
- ``killed``: SFT-KL from those weights, a checkpoint every 3 steps; during step 6 both ranks
  stop (``<work>/ready`` is written) and the test SIGKILLs both agents.

phase ``second`` (same run directory):
- ``resume``: resume to step 5 - from iter_0000003, steps 4 and 5 must equal the killed run's;
  while it starts: the files of the checkpoint read outside megatron's own load and outside the
  checksum pass (rank 0 once, rank 1 never), all-gathers outside megatron's load (none),
  and where the restore's weights go (only into the frozen reference);
- ``views``: rank 1 sees a stale ``latest`` (iter_0000003): both ranks must resume from
  iter_0000005; at step 6 a periodic save, then a signal: the step must not be written twice;
  rotation must not hold up the save (a slow delete on rank 0); rank 0 must not fsync rank 1's
  files;
- ``injected``: rank 1's save raises while rank 0 is inside megatron's save; rank 1 then stays
  alive (so no closed connection can wake rank 0) until rank 0 is gone: rank 0 must end by
  itself within seconds, exit status 2, one line; ``latest`` still the previous checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import threading
import time

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)

import pretrain_psft  # noqa: E402
from psft_megatron.training import trainer as trainer_module  # noqa: E402

BASE = ["trainer.val_check_interval=0", "trainer.progress_bar=false", "trainer.devices=null",
        "exp_manager.create_tensorboard_logger=false", "model.global_batch_size=4", "model.micro_batch_size=2"]
RUN = ["model.psft.loss=sft_kl", "model.psft.kl_coef=0.5", "exp_manager.resume_if_exists=true",
       "exp_manager.checkpoint_callback_params.every_n_train_steps=3"]


class Recorder:
    """Per-rank findings, written to ``<work>/<phase>.rank<r>.json`` after every change."""

    def __init__(self, work: str, phase: str):
        self.path = os.path.join(work, f"{phase}.rank{torch.distributed.get_rank()}.json")
        self.data = {}

    def __setitem__(self, key, value):
        self.data[key] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


def main_of(work: str, log_name: str, overrides, capture: bool = True):
    """``pretrain_psft.main`` with ``overrides`` into ``work/log_name``; (code, stdout, stderr)."""
    argv = ["--config-path", os.path.join(REPO, "configs"), "--config-name", "tiny_cpu", *BASE,
            f"exp_manager.explicit_log_dir={os.path.join(work, log_name)}", *overrides]
    if not capture:
        return pretrain_psft.main(argv), "", ""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = pretrain_psft.main(argv)
        except BaseException as exc:  # noqa: BLE001 - recorded: the test says what escaped
            code = f"raised {type(exc).__name__}: {exc}"
    sys.stdout.write(out.getvalue())
    sys.stderr.write(err.getvalue())
    return code, out.getvalue(), err.getvalue()


def capture_trainer():
    """Record the Trainer each start builds (``holder[0]``), once its set-up is done."""
    holder = [None]
    setup = trainer_module.Trainer.setup

    def recording(self):
        holder[0] = self
        return setup(self)

    trainer_module.Trainer.setup = recording
    return holder


def first(work: str, rec: Recorder) -> None:
    rank = torch.distributed.get_rank()
    code, _, err = main_of(work, f"local_{rank}", ["trainer.max_steps=1"])
    rec["node_local"] = {"code": code, "stderr": err}
    torch.distributed.barrier()
    code, _, err = main_of(work, "init", ["trainer.max_steps=1"])
    rec["init"] = {"code": code, "stderr": err}
    torch.distributed.barrier()
    from psft_megatron.training import step as step_module

    train_step, calls = step_module.train_step, [0]

    def stop_in_step_6(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:  # steps 1-5 are logged, iter_0000003 is saved: "the node dies" here
            if rank == 0:
                open(os.path.join(work, "ready"), "w").close()
            time.sleep(3600)
        return train_step(*args, **kwargs)

    step_module.train_step = stop_in_step_6
    main_of(work, "run", RUN + ["trainer.max_steps=100", restore(work)])


def restore(work: str) -> str:
    return f"model.restore_from_path={os.path.join(work, 'init', 'checkpoints', 'iter_0000001')}"


class Reads:
    """Counts, on this rank, the files of ``root`` opened outside megatron's own load and outside
    the checksum pass, and this package's own all-gathers outside megatron's load."""

    NAMES = (".metadata", "common.pt", "metadata.json", "checksums.json", "latest")

    def __init__(self, root: str):
        import builtins

        from megatron.core import dist_checkpointing

        self.root, self.opened, self.all_gathers, self.inside = root, {}, 0, 0
        self.on, self.where = False, []  # where: the callers of what was counted (for the failure message)
        real_open, real_load, real_gather = builtins.open, dist_checkpointing.load, torch.distributed.all_gather_object

        def counting_open(file, *args, **kwargs):
            if self.on and not self.inside and isinstance(file, str) and os.path.abspath(file).startswith(self.root) \
                    and os.path.basename(file) in self.NAMES:
                name = os.path.basename(file)
                self.opened[name] = self.opened.get(name, 0) + 1
                self.where.append(f"open {name}: {caller()}")
            return real_open(file, *args, **kwargs)

        def inside(real):
            def wrapped(*args, **kwargs):
                self.inside += 1
                try:
                    return real(*args, **kwargs)
                finally:
                    self.inside -= 1
            return wrapped

        def counting_gather(*args, **kwargs):
            ours = "psft_megatron" in sys._getframe(1).f_code.co_filename  # not megatron's own (its optimizer's)
            if self.on and not self.inside and ours:
                self.all_gathers += 1
                self.where.append(f"all_gather_object: {caller()}")
            return real_gather(*args, **kwargs)

        builtins.open = counting_open
        dist_checkpointing.load = inside(real_load)
        try:  # the checksum pass (a code without checksums has none)
            from psft_megatron.checkpointing import integrity

            integrity.file_digest = inside(integrity.file_digest)
        except ImportError:
            pass
        torch.distributed.all_gather_object = counting_gather


def caller() -> str:
    """The innermost frames outside this file, for a failure message."""
    import traceback

    frames = [f for f in traceback.extract_stack()[:-2] if not f.filename.endswith("multinode_worker.py")]
    return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames[-4:]))


def count_restore_loads(work: str):
    """Every load_checkpoint of the restore weights: the id of the first chunk it filled."""
    from psft_megatron.checkpointing import dist_checkpoint

    loads, real = [], dist_checkpoint.load_checkpoint
    init = os.path.join(work, "init")

    def recording(path, chunks, *args, **kwargs):
        if os.path.abspath(path).startswith(init):
            loads.append(id(chunks[0]))
        return real(path, chunks, *args, **kwargs)

    dist_checkpoint.load_checkpoint = recording
    return loads


def second(work: str, rec: Recorder) -> None:
    rank = torch.distributed.get_rank()
    holder = capture_trainer()
    reads = Reads(os.path.join(work, "run", "checkpoints"))
    loads = count_restore_loads(work)
    setup = trainer_module.Trainer.setup

    def counted_setup(self):
        reads.on = True
        try:
            return setup(self)
        finally:
            reads.on = False

    trainer_module.Trainer.setup = counted_setup
    code, out, err = main_of(work, "run", RUN + ["trainer.max_steps=5", restore(work)])
    trainer_module.Trainer.setup = setup
    t = holder[0]
    from psft_megatron.model.unwrap import unwrap

    frozen = [id(c) for c in (t.frozen or [])]
    live = [id(unwrap(c)) for c in t.tm.chunks] if getattr(t, "tm", None) else []
    metrics = []
    if rank == 0:
        with open(os.path.join(work, "run", "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    rec["resume"] = {"code": code, "stdout": out, "stderr": err, "opened": dict(reads.opened),
                     "all_gathers": reads.all_gathers, "where": list(reads.where), "restore_loads": len(loads),
                     "restore_into_frozen": [i in frozen for i in loads], "restore_into_live": [i in live for i in loads],
                     "metrics": metrics}
    torch.distributed.barrier()
    views(work, rec, holder)
    torch.distributed.barrier()
    injected(work, rec)


def views(work: str, rec: Recorder, holder) -> None:
    """Stale ``latest`` on rank 1, a signal right after a periodic save, a slow rotation."""
    import shutil

    from psft_megatron.checkpointing import dist_checkpoint, manager

    rank, ckpts = torch.distributed.get_rank(), os.path.join(work, "run", "checkpoints")
    if rank == 1:
        manager.CheckpointManager.latest = lambda self: os.path.join(ckpts, "iter_0000003")  # an NFS cache's view
    writes, real_save = [], dist_checkpoint.save_checkpoint

    def counting_save(path, *args, **kwargs):
        writes.append(os.path.basename(path))
        return real_save(path, *args, **kwargs)

    dist_checkpoint.save_checkpoint = counting_save
    signals = trainer_module.StopSignals.agreed

    def signal_at_step_6(self):
        if holder[0].step == 6:
            self.name = "SIGTERM"
            return True
        return signals(self)

    trainer_module.StopSignals.agreed = signal_at_step_6
    saved, deletion = threading.Event(), {}
    fsynced, real_fsync, real_rmtree = [], os.fsync, shutil.rmtree
    if rank == 0:
        def slow_rmtree(path, *args, **kwargs):  # returns when the save returned (or after 30 s)
            deletion.setdefault("save_returned_first", saved.wait(30))
            return real_rmtree(path, *args, **kwargs)

        def recording_fsync(fd):
            try:
                fsynced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            except OSError:
                pass
            return real_fsync(fd)

        shutil.rmtree, os.fsync = slow_rmtree, recording_fsync
    real_manager_save = manager.CheckpointManager.save

    def save_then_flag(self, *args, **kwargs):
        path = real_manager_save(self, *args, **kwargs)
        saved.set()
        return path

    manager.CheckpointManager.save = save_then_flag
    code, out, err = main_of(work, "run", RUN + ["trainer.max_steps=8", restore(work)])
    rec["views"] = {"code": code, "stdout": out, "stderr": err, "writes": list(writes),
                    "resumed_at": holder[0].history[0]["step"] - 1 if holder[0].history else None,
                    "deletion": dict(deletion), "fsynced_by_rank0": list(fsynced)}
    shutil.rmtree, os.fsync = real_rmtree, real_fsync
    dist_checkpoint.save_checkpoint, manager.CheckpointManager.save = real_save, real_manager_save
    trainer_module.StopSignals.agreed = signals


def injected(work: str, rec: Recorder) -> None:
    """Rank 1's save raises before megatron's save while rank 0 is inside it."""
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    if rank == 1:
        def failing_save(*args, **kwargs):
            rec["injected_at"] = time.time()
            raise RuntimeError("injected failure")

        dist_checkpointing.save = failing_save
    code, _, _ = main_of(work, "run", RUN + ["trainer.max_steps=7", restore(work)], capture=False)
    rec["injected"] = {"code": code, "ended_at": time.time()}
    if rank == 1:  # stay alive (connected) until rank 0 has ended on its own, at most 45 s
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # its agent may stop it when the other node ends
        with open(os.path.join(work, "second.rank0.json")) as f:
            peer = json.load(f)["pid"]
        while time.time() - rec.data["injected_at"] < 45 and os.path.exists(f"/proc/{peer}"):
            time.sleep(0.1)
        rec["rank0_gone_after_s"] = None if os.path.exists(f"/proc/{peer}") else time.time() - rec.data["injected_at"]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--phase", choices=("first", "second"), required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(REPO)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    log = open(os.path.join(args.work, f"{args.phase}.rank{rank}.log"), "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    rec = Recorder(args.work, args.phase)
    rec["pid"] = os.getpid()
    (first if args.phase == "first" else second)(args.work, rec)


if __name__ == "__main__":
    main()
