"""GPU vs CPU training steps from the same weights (one process each).

    CUDA_VISIBLE_DEVICES= torchrun --nproc_per_node 1 tests/gpu/train_step_worker.py --mode cpu --workdir D --out a.json
    torchrun --nproc_per_node 1 tests/gpu/train_step_worker.py --mode gpu --workdir D --runs local,te --out b.json

``--mode cpu`` writes the initial weights to ``D/init`` and trains the tiny PSFT run (K = 2) in
fp32 on the ``cpu`` spec: the reference. ``--mode gpu`` trains the same run from those weights on
CUDA, one run per entry of ``--runs``: ``local`` / ``te`` in bf16, ``te_fp8_<recipe>`` with FP8
(Transformer Engine). Every run records its per-step NLL and loss; FP8 runs also check that
each old-policy pass leaves the training state (weights, grads, optimizer, schedule, data
position, RNG) bitwise unchanged and leaves TE's backward FP8 state and all scales untouched
(docs/fp8.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.config import load_run_config  # noqa: E402
from psft_megatron.training.trainer import Trainer  # noqa: E402
from tests.parallel.fp8_path_worker import state_differences, training_state  # noqa: E402
from tests.parallel.launch import train_tiny  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BASE = ["trainer.max_steps=6", "trainer.val_check_interval=0", "trainer.progress_bar=false", "trainer.devices=null",
        "model.tensor_model_parallel_size=1", "model.sequence_parallel=false", "model.psft.old_policy_interval=2",
        "model.global_batch_size=8", "model.micro_batch_size=4", "model.optim.lr=1e-3",
        "model.optim.sched.warmup_steps=0", "exp_manager.create_tensorboard_logger=false",
        "exp_manager.resume_if_exists=false", "exp_manager.checkpoint_callback_params.save_last=false"]


def te_fp8_state(chunks) -> dict:
    """TE's FP8 state per module: scales and amax histories, forward and backward (delayed
    recipe; other recipes keep none)."""
    from psft_megatron.model.unwrap import unwrap

    out = {}
    for i, chunk in enumerate(chunks):
        for name, module in unwrap(chunk).named_modules():
            meta = getattr(module, "fp8_meta", None)
            if not isinstance(meta, dict):
                continue
            for key in ("scaling_fwd", "scaling_bwd"):
                state = meta.get(key)
                for field in ("scale", "amax_history"):
                    value = getattr(state, field, None)
                    if isinstance(value, torch.Tensor):
                        out[f"{i}.{name}.{key}.{field}"] = value.detach().clone()
    return out


class CheckingTrainer(Trainer):
    def setup(self):
        super().setup()
        self.state_diffs, self.fp8_changed = [], set()

    def _attach_old_logprobs(self, window):
        before, fp8_before = training_state(self), te_fp8_state(self.tm.chunks)
        super()._attach_old_logprobs(window)
        self.state_diffs += state_differences(before, training_state(self))
        after = te_fp8_state(self.tm.chunks)
        # TE creates a module's FP8 state at its first FP8 forward (the first window's pass
        # can be it): only state that existed before counts as changed
        for key in set(fp8_before) & set(after):
            if not torch.equal(fp8_before[key], after[key]):
                self.fp8_changed.add(".".join(key.split(".")[-2:]))


def run(overrides, workdir, name):
    trainer = train_tiny(BASE + overrides, os.path.join(workdir, name), CheckingTrainer)
    return {"history": [{k: h[k] for k in ("loss", "nll", "entropy")} for h in trainer.history],
            "layer_spec": trainer.tm.layer_spec, "state_diffs": trainer.state_diffs,
            "fp8_changed": sorted(trainer.fp8_changed),
            "fusions": {k: getattr(trainer.tm.config, k) for k in ("bias_activation_fusion", "bias_dropout_fusion",
                                                                   "apply_rope_fusion", "gradient_accumulation_fusion")}}


RUNS = {
    "local": ["model.layer_spec=local", "trainer.precision=bf16"],
    "te": ["model.layer_spec=te", "trainer.precision=bf16"],
}


def fp8_run(name: str):
    recipe = name[len("te_fp8_"):]
    return ["model.layer_spec=te", "trainer.precision=bf16", "model.fp8=hybrid", f"model.fp8_recipe={recipe}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--runs", default="local,te")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.chdir(REPO)
    results = {}
    if args.mode == "cpu":
        init = Trainer(load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", BASE + [
            "model.layer_spec=cpu", f"exp_manager.explicit_log_dir={os.path.join(args.workdir, 'init')}"])[0])
        init.setup()
        results["init"] = init.save()
        init.close()
        results["cpu"] = run(["model.layer_spec=cpu", f"model.restore_from_path={results['init']}"], args.workdir, "cpu")
    else:
        restore = [f"model.restore_from_path={os.path.join(args.workdir, 'init', 'checkpoints', 'iter_0000000')}"]
        for name in args.runs.split(","):
            try:
                overrides = RUNS[name] if name in RUNS else fp8_run(name)
                results[name] = run(restore + overrides, args.workdir, name)
            except Exception as exc:  # reported per run by the test
                import traceback

                results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, default=str)


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
