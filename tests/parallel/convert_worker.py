"""HF <-> Megatron converter checks: tiny random HF models of every family, two stages.

Run by tests/test_convert.py::

    python tests/parallel/convert_worker.py prepare --workdir W --out prep.json      (a world of one)
    torchrun --nproc_per_node 4 tests/parallel/convert_worker.py layouts --workdir W --out lay.json

``prepare`` builds the HF models with transformers (fp32, every parameter random, norms
and biases included), stores their logits on fixed tokens, converts HF -> Megatron (the
tools' ``main``), compares TP=1 logits, exports back to HF and compares tensor by tensor,
and converts once more with a planted QKV-order bug (q and k swapped inside each group).
``layouts`` loads every converted checkpoint at TP=1, TP=2, TP=4, PP=2, TP=2+PP=2 and PP=2+VPP=2
(DP fills the 4 ranks), runs a forward pass through the pipeline stages, gathers the
vocab-parallel logits and compares them with the HF logits; then it saves one model at
TP=2+PP=2 with megatron's saver and exports that checkpoint to HF (round trip from a
sharded layout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

TOLERANCE = 1e-4
BATCH, SEQ = 2, 12

# name -> (transformers config class, kwargs, save options)
FAMILIES = {
    # Llama-3.1-like: llama3 RoPE scaling, GQA, untied, vocab 250 (padded to 256).
    "llama": ("LlamaConfig", dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), {}),
    # Qwen2.5-0.5B-like: QKV bias, tied embeddings, no lm_head in the files; vocab 200 (-> 256).
    "qwen2_tied": ("Qwen2Config", dict(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        {}),
    # the same with lm_head.weight present in the files (as some tied checkpoints ship it).
    "qwen2_tied_lm_head": ("Qwen2Config", dict(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        {"lm_head_in_files": True}),
    # Qwen3-like: QK RMSNorm, head_dim 32 != 64 / 4, untied, sharded safetensors with an index.
    "qwen3": ("Qwen3Config", dict(
        vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), {"max_shard_size": "100KB"}),
}


def tokens_for(vocab: int) -> torch.Tensor:
    from psft_megatron.convert.verify import sample_tokens

    return sample_tokens(vocab, BATCH, SEQ, seed=7)


def make_hf_model(family: str, out: str, families: dict = None) -> None:
    """Tiny random HF model of ``family`` (of ``families``, default :data:`FAMILIES`) saved in
    ``out`` (fp32), every parameter randomised."""
    import transformers
    from safetensors.torch import load_file, save_file

    cls_name, kwargs, opts = (families or FAMILIES)[family]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(sum(map(ord, family)))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.08 * torch.randn_like(param))
    model.save_pretrained(out, max_shard_size=opts.get("max_shard_size", "5GB"))
    if opts.get("lm_head_in_files"):
        path = os.path.join(out, "model.safetensors")
        tensors = load_file(path)
        assert "lm_head.weight" not in tensors
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, path, metadata={"format": "pt"})
    make_tokenizer(out)  # side files that must travel along (and give the export its stop ids)


def make_tokenizer(out: str) -> str:
    """A tiny word-level HF fast tokenizer saved in ``out`` (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world", "2", "+", "="])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(out)
    return out


def hf_tensors(hf_dir: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, name)))
    return out


def compare_dirs(src: str, dst: str) -> dict:
    """Tensor-by-tensor comparison: names, dtypes, bit equality."""
    a, b = hf_tensors(src), hf_tensors(dst)
    diffs = [n for n in a if n in b and not (a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]))]
    return {"missing": sorted(set(a) - set(b)), "extra": sorted(set(b) - set(a)), "different": diffs,
            "num_tensors": len(a)}


def load_info(hf_dir: str) -> dict:
    """Missing / unexpected keys and loading warnings of from_pretrained."""
    import logging

    from transformers import AutoModelForCausalLM

    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        _, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    warn = [r for r in records if "missing" in r.lower() or "unexpected" in r.lower() or "newly initialized" in r.lower()]
    return {"missing_keys": sorted(info["missing_keys"]), "unexpected_keys": sorted(info["unexpected_keys"]),
            "warnings": warn}


# ----------------------------------------------------------------------------- prepare
def _capture(fn, *args):
    """(return value, stdout, stderr) of ``fn(*args)``."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        value = fn(*args)
    return value, out.getvalue(), err.getvalue()


def import_and_export(workdir: str, family: str, families: dict = None, verify: str = "") -> tuple:
    """Build ``family`` (of ``families``, default :data:`FAMILIES`) with transformers, import it
    with the tool (TP=1 logits against HF's), export it back (60KB shards) and compare.

    Args:
        verify: "import" or "export": run that direction with ``--verify``.
    Returns:
        (entry for the tests, the imported ModelConfig, HF logits, tokens).
    """
    from psft_megatron.convert.hf_to_megatron import read_model_yaml
    from psft_megatron.convert.verify import compare, hf_logits, megatron_logits
    from tools import convert_hf_to_megatron as to_megatron
    from tools import convert_megatron_to_hf as to_hf

    entry = {}
    hf_dir, ckpt, back = (os.path.join(workdir, family, x) for x in ("hf", "megatron", "hf_back"))
    make_hf_model(family, hf_dir, families)
    tokens = tokens_for(json.load(open(os.path.join(hf_dir, "config.json")))["vocab_size"])
    ref = hf_logits(hf_dir, tokens)
    torch.save({"tokens": tokens, "logits": ref}, os.path.join(workdir, family, "hf_logits.pt"))
    args = ["--hf-dir", hf_dir, "--out", ckpt, "--dtype", "fp32", "--json", ckpt + ".json"]
    assert to_megatron.main(args + (["--verify"] if verify == "import" else [])) == 0
    entry["import"] = json.load(open(ckpt + ".json"))
    cfg = read_model_yaml(os.path.join(ckpt, "model.yaml"))
    entry["tp1"] = compare(ref, megatron_logits(cfg, ckpt, tokens))
    args = ["--ckpt", ckpt, "--out", back, "--max-shard-size", "60KB", "--json", back + ".json"]
    assert to_hf.main(args + (["--verify"] if verify == "export" else [])) == 0
    entry["export"] = json.load(open(back + ".json"))
    entry["round_trip"] = compare_dirs(hf_dir, back)
    entry["load_info"] = load_info(back)
    entry["exported_logits"] = compare(ref, hf_logits(back, tokens))
    entry["side_files"] = sorted(os.listdir(back))
    return entry, cfg, ref, tokens


def _prepare_family(workdir: str, family: str) -> dict:
    return import_and_export(workdir, family, verify={"llama": "import", "qwen3": "export"}.get(family, ""))[0]


def _trainer_layout(workdir: str, family: str) -> str:
    """A trainer's checkpoints/ directory holding the family's checkpoint as iter_0000010 (no
    model.yaml: a checkpoint of an older version) and, for llama, a damaged iter_0000020 (its
    data file cut short) that ``latest`` names."""
    import shutil

    src = os.path.join(workdir, family, "megatron")
    runs = os.path.join(workdir, family, "checkpoints")
    shutil.copytree(src, os.path.join(runs, "iter_0000010"), ignore=shutil.ignore_patterns("hf_config", "model.yaml"))
    latest = "iter_0000010"
    if family == "llama":
        latest = "iter_0000020"
        shutil.copytree(os.path.join(runs, "iter_0000010"), os.path.join(runs, latest))
        data = os.path.join(runs, latest, "__0_0.distcp")
        os.truncate(data, os.path.getsize(data) // 2)
    with open(os.path.join(runs, "latest"), "w") as f:
        f.write(latest + "\n")
    return runs


def _export_without_template(workdir: str, tok_dir: str, family: str) -> dict:
    """Export from a trainer's checkpoints/ directory without an HF template: config.json from
    the model config, tokenizer files from a training-style YAML's model.tokenizer.model (with a
    NeMo alias in it); first without --config (refused: no model.yaml)."""
    import yaml
    from transformers import AutoTokenizer

    from psft_megatron.convert.verify import compare, hf_logits
    from tools import convert_megatron_to_hf as to_hf

    runs, out = _trainer_layout(workdir, family), os.path.join(workdir, family, "hf_no_template")
    no_yaml = _capture(to_hf.main, ["--ckpt", runs, "--out", out])
    with open(os.path.join(workdir, family, "megatron", "model.yaml")) as f:
        model = yaml.safe_load(f)["model"]
    model["layernorm_epsilon"] = model.pop("norm_epsilon")
    train_yaml = os.path.join(workdir, family, "train.yaml")
    with open(train_yaml, "w") as f:
        yaml.safe_dump({"model": dict(model, tokenizer={"library": "huggingface", "model": tok_dir},
                                      tensor_model_parallel_size=2), "trainer": {"max_steps": 10}}, f)
    code, stdout, _ = _capture(to_hf.main, ["--ckpt", runs, "--out", out, "--config", train_yaml])
    assert code == 0, stdout
    saved = torch.load(os.path.join(workdir, family, "hf_logits.pt"))
    return {
        "without_model_yaml": {"code": no_yaml[0], "stderr": no_yaml[2]},
        "log": stdout,
        "exported_logits": compare(saved["logits"], hf_logits(out, saved["tokens"])),
        "round_trip": compare_dirs(os.path.join(workdir, family, "hf"), out),
        "load_info": load_info(out),
        "architecture": json.load(open(os.path.join(out, "config.json")))["architectures"],
        "tokenizer_vocab": len(AutoTokenizer.from_pretrained(out)),
    }


def _planted_qkv_order(workdir: str) -> dict:
    """Convert llama with q and k swapped inside every group; the logits check must fail."""
    from psft_megatron.convert import mapping
    from psft_megatron.convert.hf_to_megatron import read_model_yaml
    from psft_megatron.convert.verify import compare, megatron_logits
    from tools import convert_hf_to_megatron as to_megatron

    original = mapping.qkv_merge

    def wrong_qkv_merge(q, k, v, num_query_groups):
        ng = num_query_groups
        rest = q.shape[1:]
        return torch.cat((k.reshape(ng, -1, *rest), q.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest)), 1).reshape(-1, *rest)

    try:
        mapping.qkv_merge = wrong_qkv_merge
        hf_dir, ckpt = os.path.join(workdir, "llama", "hf"), os.path.join(workdir, "planted")
        assert to_megatron.main(["--hf-dir", hf_dir, "--out", ckpt, "--dtype", "fp32"]) == 0
        saved = torch.load(os.path.join(workdir, "llama", "hf_logits.pt"))
        cfg = read_model_yaml(os.path.join(ckpt, "model.yaml"))
        return {"tp1": compare(saved["logits"], megatron_logits(cfg, ckpt, saved["tokens"]))}
    finally:
        mapping.qkv_merge = original


def _guarded(entry: dict, fn, *args) -> None:
    """``entry.update(fn(*args))``; an exception is recorded in ``entry`` (reported by the test)."""
    try:
        entry.update(fn(*args))
    except Exception as err:
        entry["error"] = repr(err)
        entry["traceback"] = traceback.format_exc()


def prepare(workdir: str) -> dict:
    from tests.parallel.convert_chat import chat_export

    torch.set_num_threads(1)
    results = {}
    for family in FAMILIES:
        _guarded(results.setdefault(family, {}), _prepare_family, workdir, family)
    entry = results["export_without_template"] = {}
    tok_dir = make_tokenizer(os.path.join(workdir, "tokenizer"))
    for family in ("llama", "qwen3"):
        _guarded(entry.setdefault(family, {}), _export_without_template, workdir, tok_dir, family)
    _guarded(results.setdefault("planted_qkv_order", {}), _planted_qkv_order, workdir)
    _guarded(results.setdefault("chat", {}), chat_export, workdir)
    return results


# ----------------------------------------------------------------------------- layouts
LAYOUTS = {  # name -> (TP, PP, VPP)
    "tp1": (1, 1, None),
    "tp2": (2, 1, None),
    "tp4": (4, 1, None),  # padded vocab 512 here, 256 in the checkpoint: megatron's allow_shape_mismatch
    "pp2": (1, 2, None),
    "tp2_pp2": (2, 2, None),
    "pp2_vpp2": (1, 2, 2),
}


def pipeline_logits(chunks, tokens: torch.Tensor):
    """Forward through all (virtual) pipeline stages in order; [b, s, V_padded] on the last stage, else None.

    Activations [s, b, h] go from stage to stage by a broadcast inside the pipeline group.
    """
    from megatron.core import parallel_state as ps

    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    group = ps.get_pipeline_model_parallel_group()
    ranks = torch.distributed.get_process_group_ranks(group)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    hidden, logits = None, None
    steps = [(v, stage) for v in range(len(chunks)) for stage in range(pp)]
    for n, (v, stage) in enumerate(steps):
        last = n == len(steps) - 1
        out = None
        if stage == rank:
            chunk = chunks[v]
            if n > 0:
                chunk.set_input_tensor(hidden)
            with torch.no_grad():
                out = chunk(tokens, positions, None)
            if last:
                logits = out
        if last:
            break
        shape = (tokens.shape[1], tokens.shape[0], chunks[0].config.hidden_size)
        hidden = out.contiguous() if out is not None else torch.empty(shape)
        torch.distributed.broadcast(hidden, src=ranks[stage], group=group)
    if logits is None:
        return None
    tp_group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, logits.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


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
    for family in FAMILIES:
        ckpt = os.path.join(workdir, family, "megatron")
        cfg = dataclasses.replace(read_model_yaml(os.path.join(ckpt, "model.yaml")), params_dtype="float32")
        models[family] = (ckpt, cfg, torch.load(os.path.join(workdir, family, "hf_logits.pt")))
    for name, (tp, pp, vpp) in LAYOUTS.items():  # layout outside: megatron's groups are built once per layout
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  virtual_pipeline_model_parallel_size=vpp)
        t0 = time.time()
        reinitialize_model_parallel(parallel)
        results[f"init/{name}"] = round(time.time() - t0, 2)
        for family, (ckpt, cfg, saved) in models.items():
            diff, checked, error = torch.zeros(1, dtype=torch.float64), torch.zeros(1), None
            start = time.time()
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
                if family == "qwen2_tied" and name == "tp2_pp2":  # a checkpoint saved at a sharded layout
                    save_checkpoint(os.path.join(workdir, "saved_tp2_pp2"), chunks)
            except Exception:
                error = traceback.format_exc()
                diff[0] = float("inf")
            torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(checked)
            results[f"{family}/{name}"] = {"max_abs_diff": float(diff[0]), "ranks_checked": int(checked[0]),
                                           "seconds": [round(built - start, 2), round(loaded - built, 2), round(time.time() - loaded, 2)],
                                           **({"error": error} if error else {})}

    # Export the TP=2+PP=2-saved checkpoint (rank 0, at TP=PP=1) and compare with the source.
    t0 = time.time()
    reinitialize_model_parallel(ParallelConfig())
    entry = results["export_from_tp2_pp2"] = {}
    if torch.distributed.get_rank() == 0:
        try:
            from psft_megatron.convert import convert_megatron_to_hf

            family = "qwen2_tied"
            src = os.path.join(workdir, family, "megatron")
            out = os.path.join(workdir, "hf_from_tp2_pp2")
            convert_megatron_to_hf(os.path.join(workdir, "saved_tp2_pp2"), out, hf_template=os.path.join(src, "hf_config"),
                                   config=os.path.join(src, "model.yaml"), log=lambda *a: None)
            entry.update(compare_dirs(os.path.join(workdir, family, "hf"), out))
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
