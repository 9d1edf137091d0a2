"""The loss plug-in (psft_megatron.plugin) in loops written elsewhere: ONE 2-process launch.

    torchrun --nproc_per_node 2 tests/parallel/plugin_worker.py --out /tmp/p.json

1. examples/plugin_mcore_loop.py's ``main`` (its own process group and CPU layer, TP=2), then
   both examples (plain megatron-core loop; Megatron-Bridge forward step) at TP=2 and PP=2;
2. parity: pretrain_psft.py's Trainer (PSFT, K = 4) against the plain loop with the plug-in on
   the same initial weights and batches, at TP=2 and PP=2, calculate_per_token_loss on and off
   (the Trainer with megatron's switch turned off too): per-step loss and every gradient;
3. collect_old_logprobs at PP=2 and PP=2+VPP=2 with dropout 0.1 against a single-process
   eval-mode reference (None off the last stage, train mode restored), the fused and unfused
   switch, the ratio at a window start with dropout, and the normaliser refusal (TP=2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "examples"))

import plugin_bridge_forward_step as bridge_example  # noqa: E402
import plugin_mcore_loop as loop  # noqa: E402
from tests.parallel.results import error_entry  # noqa: E402

STEPS = 5  # one window of K = 4 and the first step of the next
BASE = ["trainer.max_steps=5", "trainer.val_check_interval=0", "trainer.progress_bar=false", "trainer.devices=null",
        "model.psft.old_policy_interval=4", "model.global_batch_size=8", "model.micro_batch_size=2",
        "model.optim.sched.warmup_steps=0", "exp_manager.create_tensorboard_logger=false"]
LAYOUTS = {"tp2": (2, 1, ["model.tensor_model_parallel_size=2", "model.sequence_parallel=false"]),
           "pp2": (1, 2, ["model.tensor_model_parallel_size=1", "model.sequence_parallel=false",
                          "model.pipeline_model_parallel_size=2"])}


def guarded(fn):
    try:
        return fn()
    except Exception as exc:  # reported per part; the test names it (several ranks: the job stops)
        return error_entry(exc, getattr(fn, "__name__", "part"))


def losses_of(history):
    return [None if r["metrics"] is None else r["metrics"]["loss"] for r in history]


def everywhere(value):
    """A last-stage value known on every rank (None elsewhere; rank order decides ties)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return next((v for v in out if v is not None), None)


# ----------------------------------------------------------------------------- 1. examples
def examples():
    # the plain loop at TP=2 through the example's own main(): process group and CPU layer
    res = {"mcore_tp2": [r["metrics"] for r in loop.main(["--tp", "2", "--steps", str(STEPS)])]}
    for name, (tp, pp, _) in LAYOUTS.items():
        for ex_name, ex in (("mcore", loop), ("bridge", bridge_example)):
            if f"{ex_name}_{name}" in res:
                continue
            hist = ex.run(tp, pp, steps=STEPS)
            res[f"{ex_name}_{name}"] = everywhere([r["metrics"] for r in hist] if hist[0]["metrics"] else None)
    return res


# ----------------------------------------------------------------------------- 2. parity
def parity(workdir):
    from psft_megatron.config import load_run_config
    from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint
    from psft_megatron.checkpointing.manager import CheckpointManager
    from psft_megatron.losses import LossConfig
    from psft_megatron.model.unwrap import unwrap
    from psft_megatron.plugin import PluginLoss
    from psft_megatron.training.trainer import Trainer
    from tests.parallel.launch import train_tiny

    init = Trainer(load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", BASE + LAYOUTS["tp2"][2])[0])
    init.setup()
    init.log_dir = os.path.join(workdir, "init")
    init.checkpoints = CheckpointManager(os.path.join(init.log_dir, "checkpoints"))
    weights = init.save()
    init.close()

    def snapshot(chunks, store):
        store.append({f"{i}.{n}": p.main_grad.detach().clone() for i, c in enumerate(chunks)
                      for n, p in unwrap(c).named_parameters()})

    class Recording(Trainer):
        per_token = True

        def setup(self):
            super().setup()
            assert self.info.data_parallel_size == 1  # DDP's scaling does not depend on the switch
            self.tm.config.calculate_per_token_loss = self.per_token
            self.grads, self.batches = [], []
            opt, prepare = self.tm.optimizer, self.tm.optimizer.prepare_grads
            opt.prepare_grads = lambda: (snapshot(self.tm.chunks, self.grads), prepare())[1]

        def _micro_batches(self, dataset, sampler):
            for micros, state in super()._micro_batches(dataset, sampler):
                self.batches.append([{k: micros_k.clone() for k, micros_k in m.items()
                                      if k in ("tokens", "labels", "loss_mask", "position_ids")} for m in micros])
                yield micros, state

    out = {}
    for name, (tp, pp, overrides) in LAYOUTS.items():
        for per_token in (True, False):
            Recording.per_token = per_token
            trainer = train_tiny(BASE + overrides + [f"model.restore_from_path={weights}"],
                                 os.path.join(workdir, f"{name}_{per_token}"), Recording)
            model, optimizer, scheduler, _ = loop.build(trainer.model_cfg, tp, pp, per_token_loss=per_token,
                                                        lr=trainer.cfg.model.optim.lr,
                                                        weight_decay=trainer.cfg.model.optim.weight_decay,
                                                        load=lambda chunks: load_checkpoint(weights, chunks))
            step = loop.partial(loop.forward_step, PluginLoss(LossConfig(kind="psft", clip_eps_high=0.28)))
            grads = []
            hist = loop.train(model, optimizer, scheduler, step, trainer.batches[:STEPS], 4,
                              on_grads=lambda m: snapshot([m], grads))
            grad_diff = max((g[k] - h[k]).abs().max().item() for g, h in zip(grads, trainer.grads) for k in g)
            stats = torch.tensor([grad_diff, max(v.abs().max().item() for g in grads for v in g.values())])
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            out[f"{name}_per_token_{'on' if per_token else 'off'}"] = {
                "trainer_loss": [h["loss"] for h in trainer.history],
                "plugin_loss": everywhere(losses_of(hist) if hist[0]["metrics"] is not None else None),
                "grad_max_abs_diff": stats[0].item(), "grad_max_abs": stats[1].item(), "steps": len(grads)}
    return out


# ----------------------------------------------------------------------------- 3. collect, dropout, refusal
def collect_checks(workdir):
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint, save_checkpoint
    from psft_megatron.distributed.runtime import ParallelConfig, reinitialize_model_parallel
    from psft_megatron.errors import ConfigError
    from psft_megatron.losses import LossConfig
    from psft_megatron.model.builder import build_gpt_chunks
    from psft_megatron.plugin import PluginLoss, collect_old_logprobs, enable_logprob_output
    from psft_megatron.training.setup import setup_model_and_optimizer

    cfg = dataclasses.replace(loop.TINY, num_layers=4)  # PP=2 x VPP=2
    dropout = {"hidden_dropout": 0.1, "attention_dropout": 0.1}
    reinitialize_model_parallel(ParallelConfig(), 1234)
    (ref,) = build_gpt_chunks(cfg, cfg.to_transformer_config(ParallelConfig(), **dropout), "cpu")
    weights = os.path.join(workdir, "collect_weights")
    save_checkpoint(weights, [ref])
    rows = loop.progressions(torch.Generator().manual_seed(0), 4)  # the same 2 micro-batches on every rank
    micros = [{k: v[i::2] for k, v in rows.items()} for i in range(2)]
    ref.eval()
    with torch.no_grad():
        want = [torch.log_softmax(ref(m["tokens"], m["position_ids"], None).float(), -1)
                .gather(-1, m["labels"][..., None])[..., 0] for m in micros]
    out = {}
    for name, par, fused in (("pp2", ParallelConfig(1, 2), False), ("pp2_vpp2", ParallelConfig(1, 2, 2), True),
                             ("tp2", ParallelConfig(2), True)):
        reinitialize_model_parallel(par, 1234)
        tm = setup_model_and_optimizer(cfg, par, OptimizerConfig(optimizer="adam", lr=1e-3), layer_spec="cpu",
                                       transformer_overrides=dropout,
                                       after_build=lambda chunks: load_checkpoint(weights, chunks))
        enable_logprob_output(tm.chunks, fused=fused)
        model = tm.chunks if len(tm.chunks) > 1 else tm.chunks[0]
        its = [iter(micros) for _ in tm.chunks] if len(tm.chunks) > 1 else iter(micros)
        got = collect_old_logprobs(model, its, len(micros), seq_length=loop.SEQ, micro_batch_size=2)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        entry = {"none_off_last_stage": got is None if not last else None,
                 "train_mode_restored": all(c.training for c in tm.chunks),
                 "max_abs_diff": max(((g - w) * (m["loss_mask"] != 0)).abs().max().item()  # fused: 0 off the mask
                                     for g, w, m in zip(got, want, micros)) if last else None}
        key = f"{name}{'_fused' if fused else ''}"
        out[key] = {k: everywhere(v) if k != "train_mode_restored" else v for k, v in entry.items()}
    # the ratio at a window start with dropout 0.1 (tp2 model above): old=None is exactly 1; old
    # from the eval-mode pass is not
    loss = PluginLoss(LossConfig(kind="psft"), metrics="all")
    ratios = {}
    for old in (None, got):
        step_metrics = []

        def forward_step(data_iterator, model, _old=old):
            micro = next(data_iterator)
            idx = next(i for i, m in enumerate(micros) if m is micro)
            output = model(micro["tokens"], micro["position_ids"], None, labels=micro["labels"])
            return output, loop.partial(loss, micro["loss_mask"], old_logprobs=None if _old is None else _old[idx])

        tm.config.finalize_model_grads_func = None
        tm.config.calculate_per_token_loss = False  # with finalize absent: megatron's per-micro-batch mean
        from megatron.core.pipeline_parallel import get_forward_backward_func

        step_metrics = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micros),
                                                   model=tm.chunks[0], num_microbatches=2, seq_length=loop.SEQ,
                                                   micro_batch_size=2, forward_only=False)
        from psft_megatron.plugin import reduce_metrics

        red = reduce_metrics(step_metrics)
        ratios["none" if old is None else "eval_pass"] = [red["ratio_mean"], red["ratio_max"]]
    out["ratio_at_window_start_dropout"] = ratios
    # the normaliser refusal: per-token loss without finalize_model_grads_func, every rank
    tm.config.calculate_per_token_loss = True
    try:
        loop.train_step(tm.chunks[0], tm.optimizer, tm.scheduler, loop.partial(loop.forward_step, loss), micros)
        out["refusal"] = "no error"
    except ConfigError as exc:
        out["refusal"] = str(exc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="examples,parity,collect")
    args = parser.parse_args()
    only = args.only.split(",")
    results = {}
    if "examples" in only:
        results["examples"] = guarded(examples)  # first: the example's own process group and CPU layer
    else:
        torch.distributed.init_process_group("gloo")
        from psft_megatron.compat import cpu

        cpu.install()
    holder = [tempfile.mkdtemp(prefix="psft_plugin_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    workdir = holder[0]
    if "collect" in only:
        results["collect"] = guarded(lambda: collect_checks(workdir))
    if "parity" in only:
        results["parity"] = guarded(lambda: parity(workdir))
    if dist.get_rank() == 0:
        for part, value in results.items():
            print(f"[plugin] {part}: {json.dumps(value)[:3000]}", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f)
        shutil.rmtree(workdir, ignore_errors=True)
    dist.barrier()


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
