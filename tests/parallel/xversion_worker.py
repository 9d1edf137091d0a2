"""Checkpoints across megatron-core releases: save under one, continue under another.

Run by tests/test_cross_version_checkpoints.py, once per (release, mode), on 2 processes::

    torchrun --nproc_per_node 2 tests/parallel/xversion_worker.py --mode save --ckpt DIR --out r.json
    torchrun --nproc_per_node 2 tests/parallel/xversion_worker.py --mode load --ckpt DIR --out r.json

save: the parity suite's tiny fp32 model at DP=2 with the distributed optimizer (torch Adam)
trains 3 steps, saves weights + optimizer state (psft_megatron.checkpointing.dist_checkpoint), and continues 2
steps: the saving release's own continuation. The batches are stored beside the checkpoint, so
the loading side trains on exactly the same data.

load: at other layouts (TP=2 and PP=2, distributed optimizer, DP=1) the checkpoint is loaded
with its optimizer state and training continues for the same 2 steps; a weights-only load is
the negative control (its continuation must differ: the Adam state matters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from psft_megatron.compat.releases import megatron_version  # noqa: E402
from psft_megatron.distributed.runtime import ParallelConfig, initialize  # noqa: E402
from tests.parallel.results import error_entry  # noqa: E402
from tests.parallel.parity_worker import (  # noqa: E402
    STEPS, Layout, P, build_layout, make_global_batches, run_steps,
)

SAVE_LAYOUT = Layout("save_dp2_distopt", P(), distopt=True)
LOAD_LAYOUTS = [Layout("load_tp2_distopt", P(tp=2), distopt=True),
                Layout("load_pp2_distopt", P(pp=2), distopt=True)]
BATCHES_FILE = "xversion_batches.pt"


def save(ckpt_dir: str) -> dict:
    batches = make_global_batches(STEPS + 2)
    tm = build_layout(SAVE_LAYOUT, None)
    trained = run_steps(tm, batches, range(STEPS))["loss"]
    save_checkpoint(ckpt_dir, tm.chunks, tm.optimizer,
                    common={"iteration": STEPS, "megatron_core": str(megatron_version())})
    if torch.distributed.get_rank() == 0:
        torch.save(batches, os.path.join(ckpt_dir, BATCHES_FILE))
    continued = run_steps(tm, batches, range(STEPS, STEPS + 2))["loss"]
    from megatron.core import parallel_state

    layout = f"{SAVE_LAYOUT.parallel.describe()}+DP={parallel_state.get_data_parallel_world_size()} (distributed optimizer)"
    return {"layout": layout, "trained": trained, "continued": continued}


def load(ckpt_dir: str) -> dict:
    batches = torch.load(os.path.join(ckpt_dir, BATCHES_FILE), weights_only=True)
    out = {}
    for layout in LOAD_LAYOUTS:
        for with_optimizer in (True, False):
            key = layout.name + ("" if with_optimizer else "_weights_only")
            try:
                tm = build_layout(layout, None)
                common = load_checkpoint(ckpt_dir, tm.chunks, tm.optimizer if with_optimizer else None)
                losses = run_steps(tm, batches, range(STEPS, STEPS + 2))["loss"]
                out[key] = {"layout": layout.parallel.describe(), "losses": losses,
                            "iteration": common.get("iteration"), "saved_by": common.get("megatron_core")}
            except Exception as exc:  # several ranks: the job stops (results.error_entry)
                out[key] = error_entry(exc, key)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("save", "load"), required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    initialize(ParallelConfig(), seed=1234)
    result = {"megatron_core": str(megatron_version()), "python": sys.version.split()[0],
              "torch": torch.__version__}
    result.update(save(args.ckpt) if args.mode == "save" else {"loads": load(args.ckpt)})
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "loads"}), flush=True)


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
