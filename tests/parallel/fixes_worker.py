"""What each CPU patch and each distributed-optimizer fix is for, on the installed megatron-core.

Run by tests/test_cpu_compat.py and tests/test_distopt_fixes.py (one process, world of one)::

    torchrun --nproc_per_node 1 tests/parallel/fixes_worker.py --out /tmp/r.json

For every patch of psft_megatron.compat.cpu and every fix of psft_megatron.compat.distopt_fixes it runs
a probe through megatron-core's own code twice: with that one patch/fix reverted
(``disabled(name)``) and with everything in effect. A probe reports a bug when megatron raises
or when it returns a wrong result silently. The tests then require: the bug shows with the
patch off exactly on the releases the patch is declared for, and never with it on.
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

from psft_megatron.compat import cpu as cpu_compat, distopt_fixes  # noqa: E402
from psft_megatron.compat.releases import megatron_version  # noqa: E402
from psft_megatron.distributed.runtime import ParallelConfig, initialize  # noqa: E402


def _outcome(probe) -> dict:
    """{"bug": bool, "detail": str}: an exception or a non-empty string from ``probe`` is a bug."""
    try:
        wrong = probe()
    except Exception as exc:  # the failure a machine without CUDA shows
        frames = traceback.extract_tb(exc.__traceback__)
        in_megatron = [f for f in frames if "/megatron/core/" in f.filename]
        last = (in_megatron or frames)[-1]  # megatron's line that failed
        where = f"{os.path.basename(last.filename)}:{last.lineno}"
        message = (str(exc).strip().splitlines() or [""])[0][:200]
        return {"bug": True, "detail": f"{type(exc).__name__}: {message} (at {where}: {last.line})"}
    return {"bug": bool(wrong), "detail": wrong or "ok"}


# ----------------------------------------------------------------------------- CPU patches
def probe_device_argument():
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    norm = get_grad_norm_fp32([torch.full((4,), 0.5)], norm_type=2)  # device='cuda' buffers inside
    return None if abs(float(norm) - 1.0) < 1e-6 else f"norm {norm} != 1.0"


def probe_pin_memory():
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    pos = torch.arange(8.0).view(8, 1, 1, 1)  # pin_memory=True index tensor inside
    out = get_pos_emb_on_this_cp_rank(pos, 0, parallel_state.get_context_parallel_group())
    return None if torch.equal(out, pos) else "CP=1 slice changed the embedding"


probe_tensor_cuda = probe_pin_memory  # the same line calls .cuda() on that index tensor


def probe_tensor_type_name():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.ones(4)  # clip asserts grad.type() == 'torch.cuda.FloatTensor'
    clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=2.0)
    return None if torch.allclose(param.grad, torch.full((4,), 0.5), atol=1e-5) else f"grad {param.grad}"


def probe_current_device():
    from megatron.core.utils import GlobalMemoryBuffer

    buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "probe")  # device=current_device()
    return None if buf.shape == (2, 3) else f"shape {tuple(buf.shape)}"


def probe_synchronize():
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    FileSystemWriterAsync.preload_tensors([], non_blocking=True)  # torch.cuda.synchronize() inside


def probe_current_stream():
    """0.19's DDP bucket groups ask for the current stream at every gradient sync; the MoE
    alltoall dispatcher of every release before its device-to-host copies."""
    from tests.parallel.parity_worker import Layout, build_layout

    if "ddp" not in _built:
        _built["ddp"] = build_layout(Layout("ddp", ParallelConfig()), None)
    (chunk,) = _built["ddp"].chunks
    chunk.start_grad_sync()
    chunk.finish_grad_sync()
    probe_moe_layer()


def probe_moe_layer():
    """A forward of a one-layer MoE model (alltoall dispatcher, EP=1): the dispatcher makes a
    side stream at construction and copies its split sizes to the host on it every forward."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from psft_megatron.model import ModelConfig
    from psft_megatron.model.builder import build_gpt_chunks

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None  # made again by the next dispatcher
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, vocab_size=64,
                      make_vocab_size_divisible_by=32, num_experts=4, moe_ffn_hidden_size=16)
    (model,) = build_gpt_chunks(cfg, cfg.to_transformer_config(ParallelConfig()), "cpu")
    with torch.no_grad():
        out = model(torch.zeros(1, 8, dtype=torch.long), torch.arange(8).view(1, 8), None)
    return None if out.shape == (1, 8, 64) else f"logits shape {tuple(out.shape)}"


_built: dict = {}


def probe_cuda_rng():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1234, force_reset_rng=True)
    names = set(tensor_parallel.get_cuda_rng_tracker().get_states())
    return None if "model-parallel-rng" in names else f"tracker states {sorted(names)}"


def probe_megatron_set_rng_state():
    """megatron's tracker: a fork draws from the tracker's stream and leaves the default one alone."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("probe-rng", 42)
    torch.manual_seed(0)
    before = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork("probe-rng"):
        inside = torch.rand(4)
    after = torch.rand(4)
    expected = torch.rand(4, generator=torch.Generator().manual_seed(42))
    problems = []
    if not torch.equal(inside, expected):
        problems.append("the fork did not draw from the tracker's stream"
                        + (" (it drew from the default stream)" if torch.equal(inside, before) else ""))
    if not torch.equal(after, before):
        problems.append("the default stream was disturbed")
    return "; ".join(problems)


CPU_PROBES = {
    "device_argument": probe_device_argument,
    "pin_memory": probe_pin_memory,
    "tensor_cuda": probe_tensor_cuda,
    "tensor_type_name": probe_tensor_type_name,
    "current_device": probe_current_device,
    "synchronize": probe_synchronize,
    "current_stream": probe_current_stream,
    "cuda_streams": probe_moe_layer,
    "cuda_rng": probe_cuda_rng,
    "megatron_set_rng_state": probe_megatron_set_rng_state,
}


def cpu_patches() -> dict:
    results = {}
    for patch in cpu_compat.PATCHES:
        if patch.name in cpu_compat.MULTI_RANK_PATCHES:  # shown by tests/parallel/moe_worker.py
            continue
        probe = CPU_PROBES[patch.name]
        entry = {"needed": patch.needed(), "applied": patch.name in cpu_compat.applied(), "range": patch.megatron}
        with cpu_compat.disabled(patch.name):
            entry["off"] = _outcome(probe)
        entry["on"] = _outcome(probe)
        results[patch.name] = entry
    # the model-parallel seeds the probes disturbed
    from psft_megatron.distributed.runtime import set_seeds

    set_seeds(1234)
    return results


# ----------------------------------------------------------------------------- distopt fixes
def distopt_fixes_check(workdir: str) -> dict:
    """Train 3 steps with the distributed optimizer (torch Adam, DP=1), save, continue 2 steps;
    then, per fix, load into a fresh model + optimizer with that fix off and continue."""
    from tests.parallel.parity_worker import Layout, build_layout, make_global_batches, run_steps

    from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint, save_checkpoint

    batches = make_global_batches(5)
    layout = Layout("distopt", ParallelConfig(), distopt=True)
    tm = build_layout(layout, None)
    run_steps(tm, batches, range(3))
    ckpt = os.path.join(workdir, "distopt")
    save_checkpoint(ckpt, tm.chunks, tm.optimizer, common={"iteration": 3})
    want = run_steps(tm, batches, range(3, 5))["loss"]

    def probe():
        fresh = build_layout(layout, None)
        load_checkpoint(ckpt, fresh.chunks, fresh.optimizer)
        inner = fresh.optimizer.optimizer
        steps = [state["step"] for state in inner.state.values() if "step" in state]
        shared = len(steps) > 1 and len({id(s) for s in steps}) == 1
        got = run_steps(fresh, batches, range(3, 5))["loss"]
        diff = max(abs(a - b) for a, b in zip(got, want))
        problems = []
        if shared:
            problems.append(f"all {len(steps)} params share one Adam step tensor")
        if diff > 1e-6:
            problems.append(f"continuation losses {got} differ from {want} by {diff:.3g}")
        return "; ".join(problems)

    results = {"reference_losses": want}
    for fix in distopt_fixes.FIXES:
        entry = {"needed": fix.needed(), "applied": fix.name in distopt_fixes.applied(), "range": fix.megatron}
        with distopt_fixes.disabled(fix.name):
            entry["off"] = _outcome(probe)
        entry["on"] = _outcome(probe)
        results[fix.name] = entry

    # Not a patch: the reason for DISTOPT_SAVE_METADATA (the default format fails to save).
    def default_format_save():
        from megatron.core import dist_checkpointing

        from psft_megatron.model.unwrap import unwrap

        model_state = {"model": unwrap(tm.chunks[0]).sharded_state_dict()}
        state = dict(model_state, optimizer=tm.optimizer.sharded_state_dict(model_state, is_loading=False))
        dist_checkpointing.save(state, os.path.join(workdir, "default_format"))

    results["default_sharding_type_save"] = _outcome(default_format_save)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    initialize(ParallelConfig(), seed=1234)
    result = {"megatron_core": str(megatron_version()), "torch": torch.__version__,
              "cpu_compat": cpu_patches()}
    workdir = tempfile.mkdtemp(prefix="psft_fixes_")
    try:
        result["distopt_fixes"] = distopt_fixes_check(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1), flush=True)


_result: dict = {}


def launch_once() -> dict:
    """The worker's result for the tests, one launch per test session."""
    if not _result:
        from tests.parallel.launch import torchrun

        _result.update(torchrun("tests/parallel/fixes_worker.py", 1, []))
    return _result


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
