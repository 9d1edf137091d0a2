"""The FP8 / layer-spec path on CPU (no Transformer Engine here), in ONE 2-process launch.

    torchrun --nproc_per_node 2 tests/parallel/fp8_path_worker.py --out /tmp/f.json

1. ``specs``: the ``local`` spec on a CPU machine builds the ``cpu`` spec's modules; with apex
   it would use apex's RMSNorm (class choice only: apex is not installed here).
2. ``checkpoints``: FP8 metadata (``_extra_state``) across specs and layouts, with a stand-in
   for TE's attention module that carries extra state: saved at TP=2, loaded at TP=1 (DP=2)
   into a model with and without that state, and a checkpoint without it loaded into a model
   that has it (fresh state, reported). Weights and logits must be identical every way.
3. ``trainer_<recipe>``: the real Trainer with ``model.fp8`` on the ``cpu`` spec at TP=2+SP,
   K=4. megatron's FP8 region (``get_fp8_context`` in ``TransformerBlock``) is replaced by a
   recorder, since TE cannot run here. Recorded: which contexts the training steps and the
   old-policy passes enter (recipe fields, grad mode, module mode), which modules run inside
   the region (decoder linears) and outside it (embedding, output layer), the sequence lengths
   (FP8 alignment), and a bitwise snapshot of the training state around every old-policy pass.
   ``sft_kl_<recipe>``: the frozen reference copy's FP8 setting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.config import loader as config_loader  # noqa: E402
from psft_megatron.training.trainer import Trainer  # noqa: E402
from tests.parallel.launch import train_tiny  # noqa: E402
from tests.parallel.results import error_entry  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BASE = ["trainer.max_steps=5", "trainer.val_check_interval=0", "trainer.progress_bar=false",
        "trainer.devices=null", "model.psft.old_policy_interval=4", "model.global_batch_size=4",
        "model.micro_batch_size=2", "model.optim.sched.warmup_steps=0",
        "model.tensor_model_parallel_size=2", "model.sequence_parallel=true", "model.layer_spec=cpu",
        "exp_manager.create_tensorboard_logger=false", "exp_manager.resume_if_exists=false",
        "exp_manager.checkpoint_callback_params.save_last=false"]
FP8_FIELDS = ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_param")


# ---------------------------------------------------------------------- FP8 region recorder
class Recorder:
    """Stands in for megatron.core.fp8_utils.get_fp8_context (TE's autocast)."""

    def __init__(self):
        self.depth = 0
        self.phase = "train"
        self.entries = []  # one per region entered

    def get_fp8_context(self, config, layer_no=-1, is_init=False):
        if is_init:
            return contextlib.nullcontext()
        self.entries.append({"phase": self.phase, "config_id": id(config),
                             "fields": {f: getattr(config, f) for f in FP8_FIELDS},
                             "grad_enabled": torch.is_grad_enabled()})
        return self._region()

    @contextlib.contextmanager
    def _region(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


RECORDER = Recorder()


def watch_modules(chunks, seen: dict) -> None:
    """Record, per module kind and phase, whether it ran inside the FP8 region."""
    from psft_megatron.model.unwrap import unwrap

    for chunk in chunks:
        for name, module in unwrap(chunk).named_modules():
            kind = next((k for k in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer",
                                     "word_embeddings") if name.endswith(k)), None)
            if kind is None:
                continue

            def hook(module, args, kind=kind):
                seen.setdefault(f"{RECORDER.phase}:{kind}", set()).add(RECORDER.depth > 0)

            module.register_forward_pre_hook(hook)


# ---------------------------------------------------------------------- training-state snapshot
def _flatten(value, prefix, out):
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().clone()
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}", out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def training_state(trainer) -> dict:
    """Everything training reads or writes, flattened: weights, grads, optimizer state,
    schedule, data position, RNG streams, module train/eval modes."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from psft_megatron.model.unwrap import unwrap

    out = {}
    for i, chunk in enumerate(trainer.tm.chunks):
        for name, param in unwrap(chunk).named_parameters():
            out[f"param{i}.{name}"] = param.detach().clone()
            grad = getattr(param, "main_grad", None)
            if grad is not None:
                out[f"main_grad{i}.{name}"] = grad.detach().clone()
        out[f"modes{i}"] = [m.training for m in chunk.modules()]
    _flatten(trainer.tm.optimizer.state_dict(), "optimizer", out)
    _flatten(trainer.tm.scheduler.state_dict(), "scheduler", out)
    _flatten(trainer.sampler.state_dict(), "sampler", out)
    out["rng.torch"] = torch.get_rng_state()
    out["rng.python"] = random.getstate()
    out["rng.numpy"] = repr(np.random.get_state())
    _flatten(get_cuda_rng_tracker().get_states(), "rng.tracker", out)
    out["step"] = trainer.step
    return out


def state_differences(before: dict, after: dict) -> list:
    diffs = sorted(set(before) ^ set(after))
    for key in set(before) & set(after):
        a, b = before[key], after[key]
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        if not same:
            diffs.append(key)
    return diffs


class RecordingTrainer(Trainer):
    """Marks the phases for the recorder and checks every old-policy pass leaves the training
    state bitwise unchanged."""

    def setup(self):
        super().setup()
        self.seen = {}
        self.state_diffs = []
        self.old_passes = 0
        self.seq_lengths = set()
        watch_modules(self.tm.chunks, self.seen)

    def _attach_old_logprobs(self, window):
        for micros in window:
            self.seq_lengths.update(int(m["tokens"].shape[1]) for m in micros)
        before = training_state(self)
        RECORDER.phase = "old"
        try:
            super()._attach_old_logprobs(window)
        finally:
            RECORDER.phase = "train"
        self.old_passes += 1
        self.state_diffs += state_differences(before, training_state(self))


def run_trainer(overrides, workdir, name):
    RECORDER.entries.clear()
    trainer = train_tiny(BASE + overrides, os.path.join(workdir, name), RecordingTrainer)
    live = id(trainer.tm.config)
    frozen = id(trainer.frozen[0].config) if trainer.frozen else None
    entries = [dict(e, model="live" if e["config_id"] == live else "frozen" if e["config_id"] == frozen else "?")
               for e in RECORDER.entries]
    for e in entries:
        del e["config_id"]
    return {
        "history": [{k: h[k] for k in ("loss", "nll")} for h in trainer.history],
        "entries": entries,
        "seen": {k: sorted(v) for k, v in trainer.seen.items()},
        "state_diffs": trainer.state_diffs,
        "old_passes": trainer.old_passes,
        "seq_lengths": sorted(trainer.seq_lengths),
        "live_fp8": trainer.tm.config.fp8,
        "frozen_fp8": trainer.frozen[0].config.fp8 if trainer.frozen else "none",
        "frozen_fp8_param": trainer.frozen[0].config.fp8_param if trainer.frozen else None,
    }


# ---------------------------------------------------------------------- specs and checkpoints
TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
            vocab_size=100, make_vocab_size_divisible_by=32)


def check_specs() -> dict:
    from psft_megatron.model import ModelConfig
    from psft_megatron.model.fusions import Kernels
    from psft_megatron.model.layer_specs import build_block_spec
    from psft_megatron.distributed.runtime import ParallelConfig, reinitialize_model_parallel

    reinitialize_model_parallel(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    tc = ModelConfig(**TINY).to_transformer_config(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))

    def classes(spec):
        layer = spec.layer_specs[0].submodules
        return {"norm": spec.layer_norm.__name__, "input_norm": layer.input_layernorm.__name__,
                "attention": layer.self_attention.submodules.core_attention.__name__,
                "qkv": layer.self_attention.submodules.linear_qkv.__name__}

    return {"cpu": classes(build_block_spec("cpu", tc)),
            "local_here": classes(build_block_spec("local", tc)),
            "local_apex": classes(build_block_spec("local", tc, kernels=Kernels(cuda=True, apex_norm=True))),
            "cpu_apex": classes(build_block_spec("cpu", tc, kernels=Kernels(cuda=True, apex_norm=True)))}


def _fp8_meta_attention():
    from psft_megatron.model.cpu_layers import SDPACoreAttention

    class FP8MetaAttention(SDPACoreAttention):
        """Carries extra state as TE's attention does (its FP8 metadata), nothing else."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.meta = torch.zeros(4)
            self.loaded_from = "nothing"

        def get_extra_state(self):
            return self.meta.clone()

        def set_extra_state(self, state):
            self.loaded_from = "none" if state is None else "state"
            if state is not None:
                self.meta = state.clone()

    return FP8MetaAttention


def build(with_meta: bool, parallel):
    from psft_megatron.model import ModelConfig, cpu_layers
    from psft_megatron.model.builder import build_gpt_chunks

    cfg = ModelConfig(**TINY)
    original = cpu_layers.SDPACoreAttention
    if with_meta:
        cpu_layers.SDPACoreAttention = _fp8_meta_attention()
    try:
        torch.manual_seed(0)
        return build_gpt_chunks(cfg, cfg.to_transformer_config(parallel), "cpu")[0]
    finally:
        cpu_layers.SDPACoreAttention = original


def full_logits(model, tokens):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model.eval()(tokens, positions, None))


def check_checkpoints(workdir: str) -> dict:
    from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint, save_checkpoint
    from psft_megatron.distributed.runtime import ParallelConfig, reinitialize_model_parallel

    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    reinitialize_model_parallel(tp2)
    with_meta = build(True, tp2)
    plain = build(False, tp2)
    plain.load_state_dict({k: v for k, v in with_meta.state_dict().items() if not k.endswith("_extra_state")})
    for i, layer in enumerate(with_meta.decoder.layers):
        layer.self_attention.core_attention.meta = torch.arange(4.0) + 10 * i
    saved_meta = [layer.self_attention.core_attention.meta.tolist() for layer in with_meta.decoder.layers]
    tokens = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))
    reference = full_logits(plain, tokens)
    save_checkpoint(os.path.join(workdir, "meta_tp2"), [with_meta])
    save_checkpoint(os.path.join(workdir, "plain_tp2"), [plain])

    tp1 = ParallelConfig()  # DP = 2
    reinitialize_model_parallel(tp1)
    out = {}
    for ckpt in ("meta_tp2", "plain_tp2"):
        for target in ("meta", "plain"):
            model = build(target == "meta", tp1)
            state = load_checkpoint(os.path.join(workdir, ckpt), [model])
            result = {"missing": state["missing_extra_state"],
                      "max_logit_diff": (full_logits(model, tokens) - reference).abs().max().item()}
            if target == "meta":
                attention = [layer.self_attention.core_attention for layer in model.decoder.layers]
                result["meta"] = [a.meta.tolist() for a in attention]
                result["loaded_from"] = [a.loaded_from for a in attention]
            out[f"{ckpt}->{target}"] = result
    out["saved_meta"] = saved_meta
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.chdir(REPO)
    import megatron.core.transformer.transformer_block as block

    block.get_fp8_context = RECORDER.get_fp8_context
    config_loader.check_requirements = lambda cfg: None  # TE is not installed on this machine

    # the same directory on every rank, before the process group exists
    workdir = os.path.join(tempfile.gettempdir(), f"psft_fp8_{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    runs = {
        "trainer_delayed": ["model.fp8=hybrid", "model.fp8_amax_history_len=16", "model.fp8_amax_compute_algo=max"],
        "trainer_tensorwise": ["model.fp8=true", "model.fp8_e4m3=true", "model.fp8_recipe=tensorwise"],
        "sft_kl_delayed": ["model.fp8=hybrid", "model.psft.loss=sft_kl"],
        "sft_kl_tensorwise": ["model.fp8=hybrid", "model.fp8_recipe=tensorwise", "model.psft.loss=sft_kl"],
        "no_fp8": [],
    }
    checks = {name: (lambda o=overrides, n=name: run_trainer(o, workdir, n)) for name, overrides in runs.items()}
    checks.update(specs=check_specs, checkpoints=lambda: check_checkpoints(workdir))
    results = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as exc:  # reported per check by the test (several ranks: the job stops)
            results[name] = error_entry(exc, name)
        torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, default=str)
        shutil.rmtree(workdir, ignore_errors=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
