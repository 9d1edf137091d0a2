"""Trainer parity worker: the same tiny PSFT run (K = 4) at several layouts in ONE launch
(also with the fused output layer at TP=2+SP, TP=2+PP=2 and CP=2).

    torchrun --nproc_per_node 4 tests/parallel/trainer_worker.py --out /tmp/t.json

All runs start from the same initial weights (saved once, loaded through
``model.restore_from_path``) and read the same global batches; their per-step losses must
agree within 1e-5 (fp32). Also: K = 1 equals SFT, the SFT warm-up switches at step W, ASFT and
EAFT train at TP=2+PP=2 and TP=2+SP (fused) like at TP=1, and
(at TP=2+PP=2 and CP=2) the old log-probs of batches 2..K of every window equal a fresh
forward of the window-start weights through an independent copy of the model.
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
from psft_megatron.checkpointing.manager import CheckpointManager  # noqa: E402
from psft_megatron.training.trainer import Trainer  # noqa: E402
from tests.parallel.launch import train_tiny  # noqa: E402

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
}


class CheckingTrainer(Trainer):
    """Checks every window's old log-probs against a fresh forward of the window-start weights
    through an independent copy of the model (eval mode, same layout)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.old_logprob_max_diff = 0.0
        self.old_logprob_batches_checked = 0

    def _attach_old_logprobs(self, window):
        from psft_megatron.ops import vocab_parallel_logprobs
        from psft_megatron.training.forward import forward_only, model_forward

        super()._attach_old_logprobs(window)
        fresh = self._build_frozen_copy()  # copies the current = window-start weights

        def forward_step(data_iterator, model):
            # The result is compared inside the loss closure with the very micro-batch that was
            # fed forward: independent of how the trainer matches results to micro-batches.
            micro = next(data_iterator)

            def compare(output):
                logp = vocab_parallel_logprobs(output, micro["labels"])
                diff = (micro["old_logprobs"] - logp).abs().max().item()
                self.old_logprob_max_diff = max(self.old_logprob_max_diff, diff)
                self.old_logprob_batches_checked += 1
                zero = torch.zeros(())
                return zero, torch.zeros((), dtype=torch.int), {}

            return model_forward(model, micro), compare

        for micros in window[1:]:
            forward_only(fresh, micros, forward_step, seq_length=self._seq_length(micros))


def run(overrides, workdir, name, cls=Trainer):
    return train_tiny(BASE + overrides, os.path.join(workdir, name), cls)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=None, help="comma-separated run names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(REPO)
    # one shared temp dir, named by rank 0
    holder = [tempfile.mkdtemp(prefix="psft_trainer_") if os.environ.get("RANK", "0") == "0" else None]
    init = Trainer(load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", BASE + LAYOUTS["tp1"])[0])
    init.setup()  # world-of-N TP=1 set-up only to write the initial weights
    torch.distributed.broadcast_object_list(holder, src=0)
    workdir = holder[0]
    init.log_dir = os.path.join(workdir, "init")
    init.checkpoints = CheckpointManager(os.path.join(init.log_dir, "checkpoints"))  # not the config's runs/ dir
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
            checking = name in ("tp2_pp2", "cp2")
            trainer = run(restore + overrides, workdir, name, CheckingTrainer if checking else Trainer)
            results[name] = {"history": trainer.history}
            if checking:
                stats = torch.tensor([trainer.old_logprob_max_diff, trainer.old_logprob_batches_checked])
                torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
                results[name]["old_logprob_check"] = {"max_diff": stats[0].item(), "batches": int(stats[1])}
        except Exception as exc:  # reported per run by the test
            import traceback

            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
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
