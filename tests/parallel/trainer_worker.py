"""Trainer parity worker: the same tiny PSFT run (K = 4) at several layouts in ONE launch
(also with the fused output layer at TP=2+SP, TP=2+PP=2 and CP=2).

    torchrun --nproc_per_node 4 tests/parallel/trainer_worker.py --out /tmp/t.json

All runs start from the same initial weights (saved once, loaded through
``model.restore_from_path``) and read the same global batches; their per-step losses must
agree within 1e-5 (fp32). Also: K = 1 equals SFT, the SFT warm-up switches at step W, ASFT and
EAFT train at TP=2+PP=2 and TP=2+SP (fused) like at TP=1, and
(at TP=2+PP=2 and CP=2) the old log-probs of batches 2..K of every window equal a fresh
forward of the window-start weights through an independent copy of the model; with
``model.psft.freeze_old_policy`` (TP=2+SP) those of every batch equal the initial model's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.config import load_run_config  # noqa: E402
from psft_megatron.training.trainer import Trainer  # noqa: E402
from tests.parallel.launch import train_tiny  # noqa: E402
from tests.parallel.results import error_entry  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BASE = ["trainer.max_steps=8", "trainer.val_check_interval=0", "trainer.progress_bar=false",
        "trainer.devices=null", "model.psft.old_policy_interval=4", "model.global_batch_size=8",
        "model.micro_batch_size=2", "model.optim.sched.warmup_steps=0", "model.num_layers=4",
        "exp_manager.create_tensorboard_logger=false"]

LAYOUTS = {
    "tp1": ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false"],
    "tp2": ["model.tensor_model_parallel_size=2", "model.sequence_parallel=false"],
    "tp2_sp": ["model.tensor_model_parallel_size=2", "model.sequence_parallel=true"],
    "pp2": ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false", "model.pipeline_model_parallel_size=2"],
    "tp2_pp2": ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"],
    "cp2": ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false", "model.context_parallel_size=2"],
}
# the output layer fused into the log-prob op (model.psft.fused_output_layer): compared with "tp1"
FUSED = {
    "fused_tp2_sp": LAYOUTS["tp2_sp"],
    "fused_tp2_pp2": LAYOUTS["tp2_pp2"],
    "fused_cp2": LAYOUTS["cp2"],
}
# SFT-KL (the reference pass through the pipeline): PP=2 and TP=2+PP=2 compared with TP=1
SFT_KL = {f"sft_kl_{name}": LAYOUTS[name] + ["model.psft.loss=sft_kl", "model.psft.kl_coef=0.5"]
          for name in ("tp1", "pp2", "tp2_pp2")}
# ASFT (the frozen reference's log-probs through the pipeline) and EAFT (its gate through the fused
# output layer at TP=2+SP): 4 steps each, compared with TP=1 unfused
NEW_KINDS = {
    "asft_tp1": LAYOUTS["tp1"] + ["model.psft.loss=asft"],
    "asft_tp2_pp2": LAYOUTS["tp2_pp2"] + ["model.psft.loss=asft"],
    "eaft_tp1": LAYOUTS["tp1"] + ["model.psft.loss=eaft"],
    "eaft_fused_tp2_sp": LAYOUTS["tp2_sp"] + ["model.psft.loss=eaft", "model.psft.fused_output_layer=true",
                                              "model.psft.chunk_size=16"],
}
NEW_KINDS = {name: overrides + ["trainer.max_steps=4"] for name, overrides in NEW_KINDS.items()}
# variants at TP=2+SP
VARIANTS = {
    "k1": ["model.psft.old_policy_interval=1"],
    "sft": ["model.psft.loss=sft"],
    "warmup3": ["model.psft.warmup_sft_steps=3"],
    "frozen": ["model.psft.freeze_old_policy=true"],  # pi_old = the initial model all run long
}


def old_logprob_diffs(chunks, micros, seq_length: int) -> list:
    """Per micro-batch (last pipeline stage): max |micro["old_logprobs"] - log p| with log p a
    forward of ``chunks`` (eval mode, no grad). The result is compared inside the loss closure
    with the very micro-batch that was fed forward: independent of how the trainer matches
    results to micro-batches."""
    from psft_megatron.ops import vocab_parallel_logprobs
    from psft_megatron.training.forward import forward_only, model_forward

    diffs = []

    def forward_step(data_iterator, model):
        micro = next(data_iterator)

        def compare(output):
            logp = vocab_parallel_logprobs(output, micro["labels"])
            diffs.append((micro["old_logprobs"] - logp).abs().max().item())
            return torch.zeros(()), torch.zeros((), dtype=torch.int), {}

        return model_forward(model, micro), compare

    forward_only(chunks, micros, forward_step, seq_length=seq_length)
    return diffs


class CheckingTrainer(Trainer):
    """Checks every window's old log-probs against a fresh forward of the window-start weights
    through an independent copy of the model (eval mode, same layout)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.old_logprob_max_diff = 0.0
        self.old_logprob_batches_checked = 0

    def _attach_old_logprobs(self, window):
        super()._attach_old_logprobs(window)
        fresh = self._build_frozen_copy()  # copies the current = window-start weights
        for micros in window[1:]:
            diffs = old_logprob_diffs(fresh, micros, self._seq_length(micros))
            self.old_logprob_max_diff = max([self.old_logprob_max_diff] + diffs)
            self.old_logprob_batches_checked += len(diffs)

    def check_result(self) -> dict:
        stats = torch.tensor([self.old_logprob_max_diff, self.old_logprob_batches_checked])
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        return {"old_logprob_check": {"max_diff": stats[0].item(), "batches": int(stats[1])}}


class FrozenCheckingTrainer(Trainer):
    """model.psft.freeze_old_policy: every window's old log-probs (all K batches) against the
    initial model - a copy loaded from the run's initial checkpoint at set-up, not the trainer's
    frozen copy - and against the window-start weights (what a dynamic pi_old would give)."""

    def setup(self):
        from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint
        from psft_megatron.model.builder import build_gpt_chunks

        super().setup()
        self.initial = build_gpt_chunks(self.model_cfg, self.tm.config, self.tm.layer_spec)
        load_checkpoint(self.cfg.model.restore_from_path, self.initial)
        self.windows = []

    def _attach_old_logprobs(self, window):
        super()._attach_old_logprobs(window)
        window_start = self._build_frozen_copy()
        vs_initial, vs_window_start = [], []
        for micros in window:
            vs_initial += old_logprob_diffs(self.initial, micros, self._seq_length(micros))
            vs_window_start += old_logprob_diffs(window_start, micros, self._seq_length(micros))
        self.windows.append({"step": self.step, "vs_initial": max(vs_initial, default=0.0),
                             "vs_window_start": max(vs_window_start, default=0.0), "micro_batches": len(vs_initial)})

    def check_result(self) -> dict:
        out = []
        for entry in self.windows:  # the last pipeline stage's numbers (TP ranks agree)
            stats = torch.tensor([entry["vs_initial"], entry["vs_window_start"], entry["micro_batches"]])
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
            out.append(dict(step=entry["step"], vs_initial=stats[0].item(), vs_window_start=stats[1].item(),
                            micro_batches=int(stats[2])))
        return {"frozen_check": out}


# runs whose trainer checks its old log-probs
CHECKING = {"tp2_pp2": CheckingTrainer, "cp2": CheckingTrainer, "frozen": FrozenCheckingTrainer}


def run(overrides, workdir, name, cls=Trainer):
    return train_tiny(BASE + overrides, os.path.join(workdir, name), cls)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", help="comma-separated run names (default all; for debugging one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(REPO)
    # one shared temp dir, named by the launch (torchrun's port) before any collective exists
    workdir = os.path.join(tempfile.gettempdir(), f"psft_trainer_{os.environ.get('MASTER_PORT', os.getpid())}")
    init = Trainer(load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", BASE + LAYOUTS["tp1"] + [
        f"exp_manager.explicit_log_dir={os.path.join(workdir, 'init')}"])[0])  # not the config's runs/ dir
    init.setup()  # world-of-N TP=1 set-up only to write the initial weights
    weights = init.save()
    init.close()
    restore = [f"model.restore_from_path={weights}"]

    results = {}
    runs = list(LAYOUTS.items()) + [(n, LAYOUTS["tp2_sp"] + o) for n, o in VARIANTS.items()]
    # small row chunks: several TP exchanges of statistics per micro-batch
    runs += [(n, o + ["model.psft.fused_output_layer=true", "model.psft.chunk_size=16"]) for n, o in FUSED.items()]
    runs += list(SFT_KL.items())
    runs += list(NEW_KINDS.items())
    if args.only:
        runs = [run for run in runs if run[0] in args.only.split(",")]
    for name, overrides in runs:
        try:
            trainer = run(restore + overrides, workdir, name, CHECKING.get(name, Trainer))
            results[name] = {"history": trainer.history}
            if name in CHECKING:
                results[name].update(trainer.check_result())
        except Exception as exc:  # reported per run by the test (several ranks: the job stops)
            results[name] = error_entry(exc, name)
        if torch.distributed.get_rank() == 0:
            losses = [round(h["loss"], 6) for h in results[name].get("history", [])]
            print(f"[trainer] {name}: {losses or results[name].get('error')}", flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
        shutil.rmtree(workdir, ignore_errors=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
