"""Bad inputs through ``pretrain_psft.main`` in ONE 2-process launch (tiny_cpu, TP=2 + SP).

Each case runs the real entry point with its stdout and stderr captured on every rank and
records the exit status and what each rank printed. The default process group is created
here, so each case's shutdown leaves it for the next case. Cases, in order (later ones use
the checkpoints of earlier ones):

- train: 3 steps, a checkpoint every step;
- fallback: the latest checkpoint's data file truncated; the resume takes the previous one;
- bad `latest` with resume_fallback=false; restore mismatches; an HF directory; a damaged
  restore checkpoint; strict loads (an extra and a missing weight); a negative lr; an empty
  data file; a good restore (what it prints);
- what a new user met: invalid YAML, a run diverging at lr=1e30, a negative save interval,
  sequences longer than the model's positions, a global batch the micro-batches do not divide;
  sequence parallelism at TP=1 (a warning, then training); a cosine schedule trained through its
  warm-up and decay to the end, with its checkpoint.
- run directories: a new run into `train` (stops, nothing changed); a resume at/past
  max_steps (nothing trained, nothing written); bytes overwritten in the latest checkpoint
  with another run's checkpoint copied in as iter_0000100 (the fallback skips both); a log dir
  that is a file, a checkpoints/ that is a file; a vocab-512 checkpoint without model.yaml
  restored into the vocab-384 model; exp_manager.overwrite (the old run moved aside, intact).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)

import pretrain_psft  # noqa: E402

BASE = ["trainer.val_check_interval=0", "trainer.progress_bar=false", "trainer.devices=null",
        "exp_manager.create_tensorboard_logger=false", "model.global_batch_size=4", "model.micro_batch_size=2"]


def largest_data_file(ckpt: str) -> str:
    """The biggest ``.distcp`` file of a checkpoint (file names differ between megatron-core releases)."""
    files = [os.path.join(ckpt, n) for n in os.listdir(ckpt) if n.endswith(".distcp")]
    return max(files, key=os.path.getsize)


def run_case(work: str, name: str, overrides, config_path: str = os.path.join(REPO, "configs")) -> dict:
    """``pretrain_psft.main`` with ``overrides`` (log dir ``work/name``; ``config_path``/tiny_cpu.yaml);
    what it returned and printed."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["--config-path", config_path, "--config-name", "tiny_cpu", *BASE,
            f"exp_manager.explicit_log_dir={os.path.join(work, name)}", *overrides]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = pretrain_psft.main(argv)
        except BaseException as exc:  # noqa: BLE001 - recorded: the test says what escaped
            code, err_text = f"raised {type(exc).__name__}: {exc}", err.getvalue()
            return {"code": code, "stdout": out.getvalue(), "stderr": err_text}
    torch.distributed.barrier()
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def on_rank0(fn) -> None:
    if torch.distributed.get_rank() == 0:
        fn()
    torch.distributed.barrier()


def snapshot(path: str) -> dict:
    """{relative path: [size, mtime_ns]} of every file under ``path``."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = [os.path.getsize(full), os.stat(full).st_mtime_ns]
    return out


def overwrite_bytes(path: str, count: int = 256) -> None:
    """``count`` bytes in the middle of ``path`` set to 0xff (the size stays)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * count)


def run_directory_cases(work: str, results: dict) -> None:
    """The run-directory and integrity cases (see the module docstring), in order."""
    rank, train = torch.distributed.get_rank(), os.path.join(work, "train")
    ckpts = os.path.join(train, "checkpoints")
    on_rank0(lambda: open(os.path.join(ckpts, "latest"), "w").write("iter_0000004\n"))  # bad_latest broke it
    before = snapshot(train) if rank == 0 else None
    results["another_run"] = run_case(work, "train", ["trainer.max_steps=2", "exp_manager.resume_if_exists=false"])
    results["done"] = run_case(work, "train", ["trainer.max_steps=3", "exp_manager.resume_if_exists=true"])
    if rank == 0:
        results["train_unchanged"] = snapshot(train) == before

    def corrupt():
        overwrite_bytes(largest_data_file(os.path.join(ckpts, "iter_0000004")))
        with open(os.path.join(work, "restore", "checkpoints", "latest")) as f:  # another run's checkpoint
            shutil.copytree(os.path.join(work, "restore", "checkpoints", f.read().strip()),
                            os.path.join(ckpts, "iter_0000100"))
        open(os.path.join(work, "a_file"), "w").close()
        os.makedirs(os.path.join(work, "ckfile"))
        open(os.path.join(work, "ckfile", "checkpoints"), "w").close()

    on_rank0(corrupt)
    results["corrupt_fallback"] = run_case(work, "train", [
        "trainer.max_steps=5", "exp_manager.resume_if_exists=true",
        "exp_manager.checkpoint_callback_params.save_top_k=3"])
    if rank == 0:
        results["after_fallback"] = sorted(n for n in os.listdir(ckpts) if n.startswith("iter_"))
    results["log_dir_file"] = run_case(work, "a_file", ["trainer.max_steps=1"])
    results["ckpt_dir_file"] = run_case(work, "ckfile", ["trainer.max_steps=1"])
    results["vocab512"] = run_case(work, "v512", ["trainer.max_steps=1", "model.vocab_size=512"])
    on_rank0(lambda: os.remove(os.path.join(work, "v512", "checkpoints", "iter_0000001", "model.yaml")))
    results["vocab_mismatch"] = run_case(work, "v384", [
        "trainer.max_steps=1", f"model.restore_from_path={os.path.join(work, 'v512', 'checkpoints', 'iter_0000001')}"])
    before = snapshot(train) if rank == 0 else None
    results["overwrite"] = run_case(work, "train", ["trainer.max_steps=1", "exp_manager.overwrite=true"])
    if rank == 0:
        moved = [n for n in os.listdir(work) if n.startswith("train.old-")]
        results["moved"] = {"names": moved, "intact": len(moved) == 1 and snapshot(os.path.join(work, moved[0])) == before,
                            "new": sorted(os.listdir(ckpts)), "records": len(open(os.path.join(train, "metrics.jsonl")).readlines())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    work, rank = args.work, torch.distributed.get_rank()
    ckpts = os.path.join(work, "train", "checkpoints")
    results = {}

    results["train"] = run_case(work, "train", [
        "trainer.max_steps=3", "exp_manager.checkpoint_callback_params.every_n_train_steps=1",
        "exp_manager.checkpoint_callback_params.save_top_k=3"])

    # damaged latest checkpoint: resume from the previous one; metrics.jsonl one record per step
    on_rank0(lambda: open(largest_data_file(os.path.join(ckpts, "iter_0000003")), "r+b").truncate(100))
    results["fallback"] = run_case(work, "train", [
        "trainer.max_steps=4", "exp_manager.resume_if_exists=true",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=1",
        "exp_manager.checkpoint_callback_params.save_top_k=3"])
    if rank == 0:
        with open(os.path.join(work, "train", "metrics.jsonl")) as f:
            results["metrics_steps"] = [json.loads(line)["step"] for line in f if line.strip()]

    good = os.path.join(ckpts, "iter_0000002")
    # copies of a good checkpoint: without model.yaml, truncated, without common.pt; an HF directory
    def damage_copies():
        for name in ("noyaml", "truncated", "nocommon"):
            shutil.copytree(good, os.path.join(work, name))
        os.remove(os.path.join(work, "noyaml", "model.yaml"))
        with open(largest_data_file(os.path.join(work, "truncated")), "r+b") as f:
            f.truncate(1000)
        os.remove(os.path.join(work, "nocommon", "common.pt"))
        hf = os.path.join(work, "hf")
        shutil.copytree(os.path.join(REPO, "examples", "data", "tiny_tokenizer"), hf)
        for name in ("config.json", "model.safetensors"):
            with open(os.path.join(hf, name), "w") as f:
                f.write("{}")
        open(os.path.join(work, "empty.jsonl"), "w").close()
        os.makedirs(os.path.join(work, "broken_yaml"))
        with open(os.path.join(REPO, "configs", "tiny_cpu.yaml")) as f:
            text = f.read().replace("  max_steps: 100\n", "  max_steps: [100\n")
        with open(os.path.join(work, "broken_yaml", "tiny_cpu.yaml"), "w") as f:
            f.write(text)

    on_rank0(damage_copies)
    restart = ["trainer.max_steps=1", "exp_manager.resume_if_exists=false"]
    cases = {
        "bad_latest": (["trainer.max_steps=5", "exp_manager.resume_if_exists=true",
                        "exp_manager.resume_fallback=false"], "train"),
        "norm_epsilon_mismatch": (restart + [f"model.restore_from_path={good}", "model.norm_epsilon=1e-6"], None),
        "tied_mismatch": (restart + [f"model.restore_from_path={good}", "model.tie_word_embeddings=true"], None),
        "hf_dir": (restart + [f"model.restore_from_path={os.path.join(work, 'hf')}"], None),
        "truncated_restore": (restart + [f"model.restore_from_path={os.path.join(work, 'truncated')}"], None),
        "no_common": (restart + [f"model.restore_from_path={os.path.join(work, 'nocommon')}"], None),
        "extra_weight": (restart + [f"model.restore_from_path={os.path.join(work, 'noyaml')}",
                                    "model.add_qkv_bias=false"], None),
        "missing_weight": (restart + [f"model.restore_from_path={os.path.join(work, 'noyaml')}",
                                      "model.qk_layernorm=true"], None),
        "negative_lr": (restart + ["model.optim.lr=-1"], None),
        "empty_data": (restart + [f"model.data.train_ds.file_names=[{os.path.join(work, 'empty.jsonl')}]"], None),
        "restore": (restart + [f"model.restore_from_path={good}"], None),
        "diverging": (restart + ["trainer.max_steps=6", "model.optim.lr=1e30", "model.optim.sched.warmup_steps=0",
                                 "trainer.max_consecutive_skipped_steps=2"], None),
        "negative_save_interval": (restart + ["exp_manager.checkpoint_callback_params.every_n_train_steps=-5"], None),
        "too_long": (restart + ["model.data.train_ds.max_seq_length=512"], None),
        "global_batch_6": (restart + ["model.global_batch_size=6", "model.micro_batch_size=4"], None),
        "sp_at_tp1": (restart + ["model.tensor_model_parallel_size=1", "model.sequence_parallel=true"], None),
        "cosine": (["trainer.max_steps=8", "exp_manager.resume_if_exists=false", "model.optim.sched.name=CosineAnnealing",
                    "model.optim.sched.min_lr=1e-4"], None),
    }
    if rank == 0:
        with open(os.path.join(ckpts, "latest"), "wb") as f:
            f.write(b"\xff\xfe\x00binary")
    torch.distributed.barrier()
    for name, (overrides, log_name) in cases.items():
        results[name] = run_case(work, log_name or name, overrides)
    results["bad_yaml"] = run_case(work, "bad_yaml", restart, config_path=os.path.join(work, "broken_yaml"))
    if rank == 0:
        with open(os.path.join(work, "cosine", "metrics.jsonl")) as f:
            results["cosine_lr"] = [json.loads(line)["lr"] for line in f if line.strip()]
    run_directory_cases(work, results)
    results = {"rank": rank, "cases": results}
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"ranks": gathered}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
