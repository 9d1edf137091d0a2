"""MoE on gloo: what each MoE fix is for, and the layer specs' checkpoint keys.

Run by tests/test_moe_fixes.py (4 processes)::

    torchrun --nproc_per_node 4 tests/parallel/moe_worker.py --out /tmp/r.json

A tiny Qwen3-MoE-like model (8 experts, top-2, QK-norm, GQA, fp32 router, aux loss with weight 1
so that its gradient is visible) is saved once at TP=EP=1 and loaded at every layout. Each probe
runs megatron's own code twice: with one fix (of :mod:`psft_megatron.compat.moe_fixes`) or CPU patch
(of :mod:`psft_megatron.compat.cpu`) reverted, and with everything in effect; a probe reports a
bug when megatron raises or its result differs from the TP=EP=1 reference (every rank holds the
same batch, so the reference is the same everywhere):

- ``router_gemm_without_te``: a forward at TP=EP=1;
- ``moe_split_sizes_as_numpy``: the forward at EP=4 (alltoall);
- ``gloo_uneven_first_dim``: the forward at TP=2+SP, EP=2, ETP=2 (alltoall);
- ``aux_loss_scale_tp_cp``: the router's gradient (loss + aux loss, per-token loss, megatron's
  schedule and DDP) at TP=2+SP, EP=1;
- ``experts_always_expert_parallel``: the experts' gradients at TP=2+SP, EP=1, ETP=1, and
  whether the optimizer at EP=1 has the expert sub-optimizer that EP>1 has (its state then
  reshards between them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.compat import cpu as cpu_compat, moe_fixes  # noqa: E402
from psft_megatron.compat.releases import megatron_version  # noqa: E402
from psft_megatron.model import ModelConfig  # noqa: E402
from psft_megatron.distributed.runtime import ParallelConfig, initialize, reinitialize_model_parallel  # noqa: E402

MODEL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                    vocab_size=250, make_vocab_size_divisible_by=32, qk_layernorm=True, num_experts=8,
                    moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=1.0)
BATCH, SEQ = 2, 16


def _outcome(probe) -> dict:
    try:
        wrong = probe()
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        in_megatron = [f for f in frames if "/megatron/core/" in f.filename]
        last = (in_megatron or frames)[-1]
        message = (str(exc).strip().splitlines() or [""])[0][:200]
        return {"bug": True, "detail": f"{type(exc).__name__}: {message} (at {os.path.basename(last.filename)}:"
                                       f"{last.lineno})"}
    return {"bug": bool(wrong), "detail": wrong or "ok"}


def _all_agree(flag: bool) -> bool:
    from psft_megatron.distributed.runtime import all_reduce_values

    return bool(all_reduce_values([float(flag)], op="max")[0])


def batch():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ + 1), generator=gen)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(BATCH, SEQ), "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous()}


def build(parallel: ParallelConfig, ckpt: str = None, dispatcher: str = "alltoall"):
    """megatron model + DDP + optimizer at ``parallel`` (cpu spec), weights from ``ckpt``."""
    import dataclasses

    from megatron.core.optimizer import OptimizerConfig

    from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint
    from psft_megatron.training.setup import setup_model_and_optimizer

    reinitialize_model_parallel(parallel, seed=1234)
    model_cfg = dataclasses.replace(MODEL, moe_token_dispatcher_type=dispatcher)
    return setup_model_and_optimizer(model_cfg, parallel, OptimizerConfig(optimizer="adam", lr=1e-3),
                                     layer_spec="cpu", after_build=(lambda c: load_checkpoint(ckpt, c)) if ckpt else None)


def forward_logprobs(tm) -> torch.Tensor:
    """Summed label log-probs of the batch, forward only (no aux loss)."""
    from megatron.core import parallel_state

    from psft_megatron.ops import vocab_parallel_logprobs

    micro = batch()
    with torch.no_grad():
        logits = tm.chunks[0](micro["tokens"], micro["position_ids"], None)
        lp = vocab_parallel_logprobs(logits.float(), micro["labels"],
                                     tp_group=parallel_state.get_tensor_model_parallel_group())
    return lp.sum()


def gradients(tm) -> dict:
    """One forward/backward through megatron's schedule (SFT loss + aux loss, per-token
    normalisation); the reduced ``main_grad`` of the routers and the full expert weights."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from psft_megatron.model.unwrap import unwrap
    from psft_megatron.losses import LossConfig, PSFTLoss
    from psft_megatron.training.forward import make_train_forward_step

    for chunk in tm.chunks:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=make_train_forward_step(PSFTLoss(LossConfig(kind="sft"))),
                                data_iterator=iter([batch()]), model=tm.chunks[0], num_microbatches=1,
                                seq_length=SEQ, micro_batch_size=BATCH, forward_only=False)
    out = {}
    for name, param in unwrap(tm.chunks[0]).named_parameters():
        if ".mlp.router." in name or ".mlp.experts." in name:
            out[name] = param.main_grad.detach().clone()
    return out


def _sub_optimizers(optimizer) -> int:
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def _max_diff(got: dict, want: dict, keys) -> float:
    return max(float((got[k] - want[k]).abs().max()) for k in keys)


class Probes:
    def __init__(self, ckpt: str):
        self.ckpt = ckpt
        tm = build(ParallelConfig(), ckpt)
        self.ref_lp = float(forward_logprobs(tm))
        self.ref_grads = gradients(tm)

    def forward_matches(self, parallel, dispatcher="alltoall") -> str:
        got = float(forward_logprobs(build(parallel, self.ckpt, dispatcher)))
        diff = abs(got - self.ref_lp)
        return "" if diff < 1e-4 else f"log-prob sum {got:.6f} vs {self.ref_lp:.6f} at {parallel.describe()}"

    def router_gemm_without_te(self) -> str:
        return self.forward_matches(ParallelConfig())

    def moe_split_sizes_as_numpy(self) -> str:
        return self.forward_matches(ParallelConfig(expert_model_parallel_size=4))

    def gloo_uneven_first_dim(self) -> str:
        return self.forward_matches(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                                   expert_model_parallel_size=2, expert_tensor_parallel_size=2))

    def aux_loss_scale_tp_cp(self) -> str:
        got = gradients(build(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), self.ckpt))
        routers = [k for k in got if ".router." in k]
        diff = _max_diff(got, self.ref_grads, routers)
        return "" if diff < 1e-6 else f"router gradient differs from TP=1 by {diff:.3g} at TP=2+SP"

    def experts_always_expert_parallel(self) -> str:
        problems = []
        tm = build(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, expert_tensor_parallel_size=1),
                   self.ckpt)
        got = gradients(tm)
        experts = [k for k in got if ".experts." in k]
        diff = _max_diff(got, self.ref_grads, experts)
        if diff > 1e-6:
            problems.append(f"expert gradients differ from TP=1 by {diff:.3g} at TP=2+SP, ETP=1, EP=1")
        ep1 = build(ParallelConfig())  # the optimizer's structure only: no weights needed
        ep2 = build(ParallelConfig(expert_model_parallel_size=2))
        if _sub_optimizers(ep1.optimizer) != _sub_optimizers(ep2.optimizer):
            problems.append(f"the optimizer has {_sub_optimizers(ep1.optimizer)} sub-optimizer(s) at EP=1, "
                            f"{_sub_optimizers(ep2.optimizer)} at EP=2 (optimizer state saved at EP=2 does not load "
                            "at EP=1)")
        return "; ".join(problems)


def fix_entry(probes: Probes, name: str, module) -> dict:
    fixes = module.FIXES if module is moe_fixes else module.PATCHES
    fix = next(f for f in fixes if f.name == name)
    entry = {"needed": fix.needed(), "applied": name in module.applied(), "range": fix.megatron}
    with module.disabled(name):
        entry["off"] = _outcome(getattr(probes, name))
    entry["on"] = _outcome(getattr(probes, name))
    entry["off"]["bug"] = _all_agree(entry["off"]["bug"])
    entry["on"]["bug"] = _all_agree(entry["on"]["bug"])
    return entry


def spec_keys() -> dict:
    """Sharded checkpoint keys of the same MoE model (a dense layer, a shared expert with gate)
    under each layer spec this machine can build."""
    import dataclasses

    from psft_megatron.model.builder import build_gpt_chunks

    reinitialize_model_parallel(ParallelConfig(), seed=1234)
    cfg = dataclasses.replace(MODEL, num_layers=3, moe_dense_layers=[1], moe_shared_expert_intermediate_size=48,
                              moe_shared_expert_gate=True)
    specs = ["cpu", "local"] + (["te"] if torch.cuda.is_available() else [])
    out = {}
    for spec in specs:
        (model,) = build_gpt_chunks(cfg, cfg.to_transformer_config(ParallelConfig()), spec)
        out[spec] = sorted({v.key for v in model.sharded_state_dict().values()
                            if hasattr(v, "key") and not v.key.endswith("_extra_state")})
    return out


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts device-to-host reads of tensors (each is a host sync on a GPU)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def _expert_parameters(trainer) -> dict:
    """The trainer's parameter counts, and the same from the config and this rank's model:
    SwiGLU experts of 3 h f parameters, E per MoE layer, EP=2 (each rank holds E/2)."""
    c = trainer.model_cfg
    per_expert = 3 * c.hidden_size * c.moe_ffn_hidden_size
    moe_layers = sum(c.moe_layer_pattern())
    local = sum(p.numel() for chunk in trainer.tm.chunks for p in chunk.parameters())  # dense + E/2 experts
    return {"total": trainer.parameters.total, "active": trainer.parameters.active,
            "expected_total": local + (c.num_experts // 2) * moe_layers * per_expert,
            "expected_active": local + (c.num_experts // 2) * moe_layers * per_expert
            - (c.num_experts - c.moe_router_topk) * moe_layers * per_expert}


class RouterRecorder:
    """What each router saw in the training forwards (train mode, autograd on), recorded from its
    gating logits: per step, layer, micro-batch and rank the token count T, the summed softmax
    probabilities P [E] and the tokens per expert f [E] of its own top-k. The expected step
    metrics follow from these alone (:func:`expected_moe_metrics`), not from megatron's routing
    map, its aux-loss tracker or psft_megatron's MoEMetrics."""

    def __init__(self, chunks, topk: int):
        from megatron.core.transformer.moe.router import TopKRouter

        from psft_megatron.model.unwrap import unwrap

        self.topk, self.current, self.steps = topk, [], []
        for chunk in chunks:
            for module in unwrap(chunk).modules():
                if isinstance(module, TopKRouter):
                    module.gating = self._wrap(module, module.gating)

    def _wrap(self, router, gating):
        def recorded(*args, **kwargs):
            logits = gating(*args, **kwargs)
            if router.training and torch.is_grad_enabled():
                flat = logits.detach().double().reshape(-1, logits.shape[-1])
                chosen = torch.topk(flat, self.topk, dim=-1).indices
                counts = torch.zeros_like(flat).scatter_(1, chosen, 1.0).sum(0)
                self.current.append({"layer": router.layer_number - 1, "tokens": flat.shape[0],
                                     "probs": torch.softmax(flat, dim=-1).sum(0).tolist(), "counts": counts.tolist()})
            return logits
        return recorded

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = []


def expected_moe_metrics(steps_per_rank: list, num_experts: int, topk: int) -> list:
    """Per step: the aux loss before its coefficient, E / (k T^2) * sum_e P_e f_e (Switch
    Transformer), averaged over layers, micro-batches and ranks; per layer the busiest expert's
    tokens over the mean (all ranks and micro-batches); the mean tokens per expert and layer."""
    out = []
    for step in zip(*steps_per_rank):
        records = [r for rank in step for r in rank]
        aux = [num_experts / (topk * r["tokens"] ** 2) * sum(p * f for p, f in zip(r["probs"], r["counts"]))
               for r in records]
        metrics = {"moe_aux_loss": sum(aux) / len(aux)}
        layers = sorted({r["layer"] for r in records})
        per_layer = {i: [sum(c) for c in zip(*[r["counts"] for r in records if r["layer"] == i])] for i in layers}
        for i, counts in per_layer.items():
            metrics[f"moe_load_max_mean/layer_{i}"] = max(counts) / (sum(counts) / num_experts)
        metrics["moe_load_max_mean"] = max(metrics[f"moe_load_max_mean/layer_{i}"] for i in layers)
        metrics["moe_tokens_per_expert"] = sum(sum(c) for c in per_layer.values()) / (len(layers) * num_experts)
        out.append(metrics)
    return out


def train_tiny_moe(workdir: str) -> dict:
    """configs/tiny_moe_cpu.yaml through the trainer for 3 steps on this world (EP=2, DP=4):
    the MoE metrics of each step (history), what metrics.jsonl holds, the metrics expected
    from what the routers saw (RouterRecorder), the host reads of the MoE metrics per step and
    the parameter counts (total, active) for MFU."""
    from psft_megatron.config import load_run_config
    from psft_megatron.training.trainer import Trainer

    from tests.parallel.launch import REPO

    class RecordingTrainer(Trainer):
        host_reads: list = []

        def setup(self):
            super().setup()
            self.recorder = RouterRecorder(self.tm.chunks, self.tm.config.moe_router_topk)
            step_metrics = self.moe_metrics.step_metrics

            def end_step(num_microbatches):
                self.recorder.end_step()
                with _HostReads() as reads:
                    out = step_metrics(num_microbatches)
                self.host_reads.append(reads.count)
                return out

            self.moe_metrics.step_metrics = end_step

    log_dir = os.path.join(workdir, "tiny_moe")
    cfg, resolved = load_run_config(os.path.join(REPO, "configs"), "tiny_moe_cpu", [
        "trainer.devices=4", "trainer.max_steps=3", "trainer.val_check_interval=0", "model.micro_batch_size=2",
        "model.global_batch_size=8", "exp_manager.create_tensorboard_logger=false",
        "exp_manager.checkpoint_callback_params.save_last=false", f"exp_manager.explicit_log_dir={log_dir}"])
    cwd = os.getcwd()
    os.chdir(REPO)  # the config's data and tokenizer paths are relative to the repository
    try:
        trainer = RecordingTrainer(cfg, resolved)
        trainer.setup()
        trainer.train()
        trainer.close()
    finally:
        os.chdir(cwd)
    steps_per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(steps_per_rank, trainer.recorder.steps)
    config = trainer.tm.config
    out = {"history": [{k: v for k, v in h.items() if k.startswith("moe_") or k in ("step", "num_positions")}
                       for h in trainer.history],
           "expected": expected_moe_metrics(steps_per_rank, config.num_moe_experts, config.moe_router_topk),
           "host_reads": trainer.host_reads, "parameters": _expert_parameters(trainer)}
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(log_dir, "metrics.jsonl")) as f:
            out["jsonl_keys"] = sorted(json.loads(f.readline()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    initialize(ParallelConfig(), seed=1234)
    from psft_megatron.checkpointing.dist_checkpoint import save_checkpoint

    workdir = [tempfile.mkdtemp(prefix="psft_moe_") if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(workdir, src=0)
    ckpt = os.path.join(workdir[0], "reference")
    try:
        tm = build(ParallelConfig())
        save_checkpoint(ckpt, tm.chunks)
        probes = Probes(ckpt)
        result = {"megatron_core": str(megatron_version()), "torch": torch.__version__, "fixes": {}}
        for fix in moe_fixes.FIXES:
            result["fixes"][fix.name] = fix_entry(probes, fix.name, moe_fixes)
        for name in cpu_compat.MULTI_RANK_PATCHES:
            result["fixes"][name] = fix_entry(probes, name, cpu_compat)
        result["allgather_ep2_tp2"] = _outcome(lambda: probes.forward_matches(
            ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2,
                           expert_tensor_parallel_size=1), dispatcher="allgather"))
        result["spec_keys"] = spec_keys()
        result["trainer"] = train_tiny_moe(workdir[0])
    finally:
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(workdir[0], ignore_errors=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "spec_keys"}, indent=1), flush=True)


_result: dict = {}


def launch_once() -> dict:
    """The worker's result for the tests, one launch per test session."""
    if not _result:
        from tests.parallel.launch import torchrun

        _result.update(torchrun("tests/parallel/moe_worker.py", 4, []))
    return _result


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
