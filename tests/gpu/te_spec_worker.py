"""GPU check (one process): NCCL runtime without the CPU layer, and the TE layer spec
computing the same logits as the ``cpu`` spec from the same distributed checkpoint; the TE
checkpoint loads back into the ``cpu`` spec."""

import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from psft_megatron.compat import cpu as cpu_compat  # noqa: E402
from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from psft_megatron.model.builder import build_gpt_chunks  # noqa: E402
from psft_megatron.distributed.runtime import ParallelConfig, initialize  # noqa: E402
from tests.parallel.parity_worker import TINY_MODEL  # noqa: E402


def main(out: str) -> None:
    info = initialize(ParallelConfig())
    result = {"backend": info.backend, "cpu_compat": cpu_compat.is_installed()}
    config = TINY_MODEL.to_transformer_config(ParallelConfig())
    (cpu_model,) = build_gpt_chunks(TINY_MODEL, config, "cpu")
    tokens = torch.randint(0, TINY_MODEL.vocab_size, (2, 16), device="cuda")
    positions = torch.arange(16, device="cuda").expand(2, 16)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(os.path.join(tmp, "cpu"), [cpu_model])
        (te_model,) = build_gpt_chunks(TINY_MODEL, config, "te")
        # TE's attention keeps FP8 metadata the cpu spec has not: fresh state, reported
        result["missing_extra_state"] = load_checkpoint(os.path.join(tmp, "cpu"), [te_model])["missing_extra_state"]
        save_checkpoint(os.path.join(tmp, "te"), [te_model])
        (back,) = build_gpt_chunks(TINY_MODEL, config, "cpu")
        load_checkpoint(os.path.join(tmp, "te"), [back])  # and the TE checkpoint into the cpu spec
    with torch.no_grad():
        ref = cpu_model(tokens, positions, None).float()
        got = te_model(tokens, positions, None).float()
        again = back(tokens, positions, None).float()
    result["max_abs_logit_diff"] = (ref - got).abs().max().item()
    result["relative_logit_error"] = ((ref - got).norm() / ref.norm()).item()
    result["round_trip_logit_diff"] = (ref - again).abs().max().item()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[sys.argv.index("--out") + 1])
    from tests.parallel.launch import finish_worker

    finish_worker()
