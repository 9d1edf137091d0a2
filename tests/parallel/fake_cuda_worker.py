"""The trainer on a fake CUDA machine (tests/fake_cuda): every rank believes it owns a GPU and
talks NCCL; values are computed on the CPU, and every misplaced tensor is an error.

    torchrun --nproc_per_node 2 tests/parallel/fake_cuda_worker.py --out /tmp/f.json [--cpu]

Runs, in one launch (2 ranks): PSFT (K = 2) at TP=2+SP with validation and a periodic
checkpoint, then a resume from that checkpoint; SFT-KL at PP=2 (reference pass through the
pipeline); PSFT with packed rows (THD attention); bf16; the fused output layer
(``model.psft.fused_output_layer``); an MoE model at EP=2 (alltoall dispatcher, MoE metrics).
All from the same initial weights (one checkpoint per architecture). Records
per run: the history, whether every parameter / buffer / micro-batch tensor was on this rank's
CUDA device, the host-to-device copies of the batches (pinned? non-blocking?), host syncs per
step, collectives. ``--cpu`` runs the same on the CPU (no lane) for the value comparison.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)

CPU = "--cpu" in sys.argv
if not CPU:
    from tests.fake_cuda import native  # noqa: E402

    native.load()  # before torch

import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

if not CPU:
    from tests.fake_cuda import device as fake_cuda  # noqa: E402

    fake_cuda.install()

from psft_megatron.config import load_run_config  # noqa: E402
from psft_megatron.training.trainer import Trainer  # noqa: E402
from tests.parallel.launch import finish_worker, train_tiny  # noqa: E402

BASE = ["trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.progress_bar=false",
        "trainer.devices=null", "model.global_batch_size=4", "model.micro_batch_size=2",
        "model.optim.sched.warmup_steps=0", "model.psft.old_policy_interval=2",
        "exp_manager.create_tensorboard_logger=false", "model.layer_spec=null"]
RUNS = {
    # name: (overrides, steps)
    "psft_tp2_sp": (["model.tensor_model_parallel_size=2", "model.sequence_parallel=true",
                     "exp_manager.checkpoint_callback_params.every_n_train_steps=2"], 4),
    "psft_tp2_sp_resumed": (["model.tensor_model_parallel_size=2", "model.sequence_parallel=true",
                             "exp_manager.resume_if_exists=true"], 6),
    "sft_kl_pp2": (["model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
                    "model.pipeline_model_parallel_size=2", "model.psft.loss=sft_kl", "model.psft.kl_coef=0.5"], 4),
    "psft_packed": (["model.tensor_model_parallel_size=2", "model.sequence_parallel=true",
                     "model.data.train_ds.packing=true", "model.data.validation_ds.packing=true"], 3),
    "psft_bf16": (["model.tensor_model_parallel_size=2", "model.sequence_parallel=true", "trainer.precision=bf16",
                   "trainer.val_check_interval=0"], 2),
    "psft_fused": (["model.tensor_model_parallel_size=2", "model.sequence_parallel=true",
                    "model.psft.fused_output_layer=true", "trainer.val_check_interval=0"], 2),
    "moe_ep2": (["model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
                 "model.expert_model_parallel_size=2", "trainer.val_check_interval=0"], 2),
}
#: the MoE architecture of configs/tiny_moe_cpu.yaml (its runs start from their own weights)
MOE = ["model.num_experts=8", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=32",
       "model.moe_token_dispatcher_type=alltoall", "model.moe_aux_loss_coeff=0.001", "model.moe_router_dtype=fp32"]


def record_loss_inputs(seen: set) -> None:
    """Remember the dtype of every output the loss functions receive (logits on the last stage)."""
    from psft_megatron.losses import PSFTLoss

    original = PSFTLoss.loss_func

    def loss_func(self, *args, **kwargs):
        inner = original(self, *args, **kwargs)

        def recorded(output_tensor):
            seen.add(str(output_tensor.dtype))
            return inner(output_tensor)

        return recorded

    PSFTLoss.loss_func = loss_func


def count_fused_calls(calls: list) -> None:
    """Count the fused output layer's calls (model.psft.fused_output_layer: no logits tensor)."""
    from psft_megatron.losses import fused_output

    original = fused_output.fused_linear_logprobs

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    fused_output.fused_linear_logprobs = counted


class CheckingTrainer(Trainer):
    """Records where the model's tensors and every micro-batch's tensors live."""

    misplaced: list

    def setup(self):
        self.misplaced = []
        self.val_history = []
        super().setup()
        modules = list(self.tm.chunks) + list(self.frozen or [])
        for module in modules:
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                self._check(f"model {name}", tensor)

    def validate(self):
        metrics = super().validate()
        self.val_history.append(metrics)
        return metrics

    def _check(self, what, tensor):
        if isinstance(tensor, torch.Tensor) and not (CPU or fake_cuda.on_device(tensor)):
            self.misplaced.append(f"{what}: {tuple(tensor.shape)} on {tensor.device}")

    def _check_micro(self, micro):
        for key, value in micro.items():
            if key == "packed_seq_params" and value is not None:
                for field in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
                    self._check(f"micro-batch packed_seq_params.{field}", getattr(value, field))
            elif key != "sample_index":
                self._check(f"micro-batch {key}", value)


def patch_forward(trainer_cls):
    """Check every micro-batch the forward steps see (training, old-policy, reference, validation)."""
    from psft_megatron.training import forward

    original = forward.model_forward

    def model_forward(model, micro, *args, **kwargs):
        if trainer_cls.current is not None:
            trainer_cls.current._check_micro(micro)
        return original(model, micro, *args, **kwargs)

    forward.model_forward = model_forward


def initial_weights(root: str, arch) -> str:
    """The checkpoint every run of an architecture starts from: written at TP=1 by the first
    launch (the CPU one), loaded by the next (the fake-CUDA one)."""
    latest = os.path.join(root, "checkpoints", "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            return os.path.join(root, "checkpoints", f.read().strip())
    init = Trainer(load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", BASE + arch + [
        "model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
        f"exp_manager.explicit_log_dir={root}"])[0])
    init.setup()  # TP=1 only to write the initial weights
    path = init.save()
    init.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated run names")
    parser.add_argument("--weights", default=None,
                        help="directory of the initial weights: written there if empty, else loaded (the CPU and "
                             "the fake-CUDA launch share them)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(REPO)
    CheckingTrainer.current = None
    patch_forward(CheckingTrainer)
    loss_dtypes = set()
    record_loss_inputs(loss_dtypes)
    fused_calls = []
    count_fused_calls(fused_calls)

    # one work dir for all ranks, named by the launch (torchrun's port) before any collective exists
    workdir = os.path.join(tempfile.gettempdir(), f"psft_fakecuda_{os.environ.get('MASTER_PORT', os.getpid())}")
    weights_root = args.weights or os.path.join(workdir, "init")
    weights = {"dense": initial_weights(os.path.join(weights_root, "dense"), []),
               "moe": initial_weights(os.path.join(weights_root, "moe"), MOE)}

    results = {}
    names = args.only.split(",") if args.only else list(RUNS)
    for name in names:
        overrides, steps = RUNS[name]
        log_dir = os.path.join(workdir, name.replace("_resumed", ""))
        if not CPU:
            fake_cuda.reset_records()
        loss_dtypes.clear()
        fused_calls.clear()

        class Run(CheckingTrainer):
            def setup(self):
                CheckingTrainer.current = self
                super().setup()

        # No try/except: a rank that fails would leave the others waiting in a collective; the
        # launch fails instead, and torchrun prints the failing rank's traceback.
        arch = MOE if name.startswith("moe") else []
        trainer = train_tiny(BASE + arch + [f"model.restore_from_path={weights['moe' if arch else 'dense']}",
                                            f"trainer.max_steps={steps}"] + overrides, log_dir, Run)
        entry = {"history": trainer.history, "misplaced": trainer.misplaced[:20],
                 "num_misplaced": len(trainer.misplaced), "loss_input_dtypes": sorted(loss_dtypes),
                 "validation": trainer.val_history, "fused_calls": len(fused_calls)}
        if not CPU:
            entry["records"] = fake_cuda.records()
        CheckingTrainer.current = None
        results[name] = entry
        if torch.distributed.get_rank() == 0:
            print(f"[fake_cuda] {name}: {[round(h['loss'], 6) for h in entry['history']]}", flush=True)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, results)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"ranks": gathered}, f)
        shutil.rmtree(workdir, ignore_errors=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    finish_worker()
