"""HF <-> Megatron converter checks for the MoE classes (Qwen3-MoE, Qwen2-MoE), two stages.

Run by tests/test_convert_moe.py::

    python tests/parallel/convert_moe_worker.py prepare --workdir W --out prep.json      (a world of one)
    torchrun --nproc_per_node 4 tests/parallel/convert_moe_worker.py layouts --workdir W --out lay.json

``prepare`` builds tiny random HF MoE models with transformers (fp32, every parameter random),
stores their logits on fixed tokens, converts HF -> Megatron with the tool (``--verify`` on one
family), compares the TP=EP=1 logits, exports back to HF (``--verify`` on the other) and
compares tensor by tensor, exports once more without an HF template (config.json generated
from the model config) and converts once with a planted bug (the experts of every MoE layer
rotated by one, so the router's choices reach the wrong weights).
``layouts`` loads every converted checkpoint at EP=1, EP=2, EP=4, TP=2+EP=2 (ETP=2 and ETP=1,
with SP), PP=2, PP=2+EP=2 and EP=2 with the allgather dispatcher, runs a forward pass,
gathers the vocab-parallel logits and compares them with HF's; then it saves one model at
TP=2+EP=2 with megatron's saver and exports that checkpoint to HF (round trip from an
expert-sharded layout).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tests.parallel.convert_worker import (  # noqa: E402
    TOLERANCE, compare_dirs, import_and_export, load_info, pipeline_logits)

_ROPE = {"rope_type": "default", "rope_theta": 1000000.0}
# name -> (transformers config class, kwargs, save options)
MOE_FAMILIES = {
    # Qwen3-30B-A3B-like: QK RMSNorm, head_dim 32 != 64 / 4, 8 experts, top-2 renormalised
    # (norm_topk_prob), layer 2 dense (mlp_only_layers), untied, sharded safetensors.
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, mlp_only_layers=[2], tie_word_embeddings=False, rope_parameters=_ROPE),
        {"max_shard_size": "100KB"}),
    # Qwen1.5-MoE-like: QKV bias, shared expert (width 48) scaled by sigmoid(x @ gate), softmax
    # over all experts without renormalisation, MoE every second layer (decoder_sparse_step=2).
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=False,
        rope_parameters=_ROPE), {}),
}


# ----------------------------------------------------------------------------- prepare
def prepare(workdir: str) -> dict:
    from psft_megatron.convert import mapping
    from psft_megatron.convert.hf_to_megatron import read_model_yaml
    from psft_megatron.convert.verify import compare, hf_logits, megatron_logits
    from tools import convert_hf_to_megatron as to_megatron
    from tools import convert_megatron_to_hf as to_hf

    torch.set_num_threads(1)
    results = {}
    for family in MOE_FAMILIES:
        entry = results.setdefault(family, {})
        try:
            ckpt = os.path.join(workdir, family, "megatron")
            hf_dir = os.path.join(workdir, family, "hf")
            t0 = time.time()
            found, cfg, ref, tokens = import_and_export(workdir, family, MOE_FAMILIES,
                                                        verify="import" if family == "qwen3_moe" else "export")
            entry.update(found)
            entry["model_config"] = {k: getattr(cfg, k) for k in (
                "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_norm_topk_prob", "moe_dense_layers",
                "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "add_qkv_bias", "qk_layernorm")}

            # without an HF template: config.json generated from the model config
            # (decoder_sparse_step written as the equivalent mlp_only_layers)
            bare, out = os.path.join(workdir, family, "bare"), os.path.join(workdir, family, "hf_no_template")
            shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns("hf_config", "model.yaml"))
            assert to_hf.main(["--ckpt", bare, "--out", out, "--config", os.path.join(ckpt, "model.yaml")]) == 0
            generated = json.load(open(os.path.join(out, "config.json")))
            entry["no_template"] = {
                "architecture": generated["architectures"], "mlp_only_layers": generated.get("mlp_only_layers"),
                "round_trip": compare_dirs(hf_dir, out), "load_info": load_info(out),
                "exported_logits": compare(ref, hf_logits(out, tokens)),
            }
            entry["seconds"] = round(time.time() - t0, 2)
        except Exception as err:  # reported per family
            entry["error"] = repr(err)
            entry["traceback"] = traceback.format_exc()

    # Planted bug: expert e of every MoE layer gets expert e+1's weights; the logits must differ.
    family = "qwen3_moe"
    original = mapping._moe_mlp_rules

    def rotated_experts(cfg, m, h):
        rules = original(cfg, m, h)
        n = cfg.num_experts

        def shift(name):
            head, sep, rest = name.partition(".mlp.experts.")
            if not sep:
                return name
            e, _, tail = rest.partition(".")
            return f"{head}.mlp.experts.{(int(e) + 1) % n}.{tail}"

        return [mapping.Rule(r.megatron, [shift(x) for x in r.hf], r.to_megatron, r.to_hf) for r in rules]

    entry = results["planted_expert_order"] = {}
    try:
        mapping._moe_mlp_rules = rotated_experts
        hf_dir, ckpt = os.path.join(workdir, family, "hf"), os.path.join(workdir, "planted")
        assert to_megatron.main(["--hf-dir", hf_dir, "--out", ckpt, "--dtype", "fp32"]) == 0
        saved = torch.load(os.path.join(workdir, family, "hf_logits.pt"))
        cfg = read_model_yaml(os.path.join(ckpt, "model.yaml"))
        entry["tp1"] = compare(saved["logits"], megatron_logits(cfg, ckpt, saved["tokens"]))
    except Exception as err:
        entry["error"] = repr(err)
        entry["traceback"] = traceback.format_exc()
    finally:
        mapping._moe_mlp_rules = original
    return results


# ----------------------------------------------------------------------------- layouts
LAYOUTS = {  # name -> (TP, PP, EP, ETP, dispatcher); SP on with TP > 1
    "ep1": (1, 1, 1, None, "alltoall"),
    "ep2": (1, 1, 2, None, "alltoall"),
    "ep4": (1, 1, 4, None, "alltoall"),
    "tp2_ep2": (2, 1, 2, None, "alltoall"),  # ETP = TP = 2
    "tp2_ep2_etp1": (2, 1, 2, 1, "alltoall"),
    "pp2": (1, 2, 1, None, "alltoall"),
    "pp2_ep2": (1, 2, 2, None, "alltoall"),
    "ep2_allgather": (1, 1, 2, None, "allgather"),
}
#: the layout a checkpoint is saved at (megatron's saver) and exported from
SAVE_LAYOUT, SAVE_FAMILY = "tp2_ep2", "qwen2_moe"


def layouts(workdir: str) -> dict:
    import dataclasses

    from psft_megatron.checkpointing.dist_checkpoint import load_checkpoint, save_checkpoint
    from psft_megatron.convert.hf_to_megatron import read_model_yaml
    from psft_megatron.model.builder import build_gpt_chunks
    from psft_megatron.distributed.runtime import ParallelConfig, initialize, reinitialize_model_parallel

    torch.set_num_threads(1)
    t0 = time.time()
    initialize(ParallelConfig())
    results = {"init": round(time.time() - t0, 2)}
    models = {}
    for family in MOE_FAMILIES:
        ckpt = os.path.join(workdir, family, "megatron")
        cfg = dataclasses.replace(read_model_yaml(os.path.join(ckpt, "model.yaml")), params_dtype="float32")
        models[family] = (ckpt, cfg, torch.load(os.path.join(workdir, family, "hf_logits.pt")))
    for name, (tp, pp, ep, etp, dispatcher) in LAYOUTS.items():
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=tp > 1,
                                  expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        t0 = time.time()
        reinitialize_model_parallel(parallel)
        results[f"init/{name}"] = round(time.time() - t0, 2)
        for family, (ckpt, base, saved) in models.items():
            cfg = dataclasses.replace(base, moe_token_dispatcher_type=dispatcher)
            diff, checked, error = torch.zeros(1, dtype=torch.float64), torch.zeros(1), None
            start = built = loaded = time.time()
            try:
                chunks = build_gpt_chunks(cfg, cfg.to_transformer_config(parallel), "cpu")
                built = time.time()
                load_checkpoint(ckpt, chunks)
                loaded = time.time()
                for c in chunks:
                    c.eval()
                logits = pipeline_logits(chunks, saved["tokens"])
                if logits is not None:
                    diff[0] = float((logits[..., : cfg.vocab_size] - saved["logits"]).abs().max())
                    checked[0] = 1
                if family == SAVE_FAMILY and name == SAVE_LAYOUT:
                    save_checkpoint(os.path.join(workdir, "saved_" + SAVE_LAYOUT), chunks)
            except Exception:
                error = traceback.format_exc()
                diff[0] = float("inf")
            torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(checked)
            results[f"{family}/{name}"] = {"max_abs_diff": float(diff[0]), "ranks_checked": int(checked[0]),
                                           "seconds": [round(built - start, 2), round(loaded - built, 2),
                                                       round(time.time() - loaded, 2)],
                                           **({"error": error} if error else {})}

    # Export the expert-sharded checkpoint (rank 0, at TP=PP=EP=1) and compare with the source.
    t0 = time.time()
    reinitialize_model_parallel(ParallelConfig())
    entry = results["export_from_" + SAVE_LAYOUT] = {}
    if torch.distributed.get_rank() == 0:
        try:
            from psft_megatron.convert import convert_megatron_to_hf

            src = os.path.join(workdir, SAVE_FAMILY, "megatron")
            out = os.path.join(workdir, "hf_from_" + SAVE_LAYOUT)
            convert_megatron_to_hf(os.path.join(workdir, "saved_" + SAVE_LAYOUT), out,
                                   hf_template=os.path.join(src, "hf_config"), config=os.path.join(src, "model.yaml"),
                                   log=lambda *a: None)
            entry.update(compare_dirs(os.path.join(workdir, SAVE_FAMILY, "hf"), out))
            entry["seconds"] = round(time.time() - t0, 2)
        except Exception:
            entry["error"] = traceback.format_exc()
    torch.distributed.barrier()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", choices=["prepare", "layouts"])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    t0 = time.time()
    result = prepare(args.workdir) if args.stage == "prepare" else layouts(args.workdir)
    result["wall"] = [t0, time.time()]
    if args.stage == "prepare" or torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
