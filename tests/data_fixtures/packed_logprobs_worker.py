"""Packed vs unpacked per-sample log-probs on tiny CPU GPT models (a world of one).

Run in its own process (it installs the process-wide CPU layer)::

    python tests/data_fixtures/packed_logprobs_worker.py [--modes clean,cross_attention,...]

Two models, same layer spec ("cpu": SDPA core attention, GQA): ``rope`` (the production
position embedding; RoPE restarts per sample through cu_seqlens) and ``learned`` (learned
absolute positions, which read ``position_ids``, so a collate whose positions do not restart
per sample shows up). Prints one JSON line ``{mode: {model: {"max_abs_diff", "samples", "rows"}}}``.

Planted bugs (the comparison must then fail for at least one model):
- ``no_position_restart``: packed position_ids = 0..s-1 over the whole row;
- ``cross_attention``: the core attention sees one segment per row (attends across samples);
- ``rope_offsets``: max_seqlen = row length, which makes megatron's THD RoPE continue positions
  across samples. RoPE is relative, so with a correct block-diagonal mask this is invisible
  in exact arithmetic (reported, not asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)
PLANTS = ("no_position_restart", "cross_attention", "rope_offsets")


def build_models(vocab_size: int, parallel):
    from megatron.core.models.gpt import GPTModel

    from psft_megatron.model import ModelConfig
    from psft_megatron.model.builder import build_gpt_chunks
    from psft_megatron.model.layer_specs import build_block_spec

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=32,
                      ffn_hidden_size=128, vocab_size=vocab_size, make_vocab_size_divisible_by=64,
                      max_position_embeddings=256, add_qkv_bias=True, qk_layernorm=True, init_method_std=0.05)
    tcfg = cfg.to_transformer_config(parallel)
    torch.manual_seed(0)
    rope = build_gpt_chunks(cfg, tcfg, layer_spec="cpu")[0]
    torch.manual_seed(0)
    learned = GPTModel(config=tcfg, transformer_layer_spec=build_block_spec("cpu", tcfg),
                       vocab_size=cfg.padded_vocab_size(1), max_sequence_length=256,
                       position_embedding_type="learned_absolute", parallel_output=True)
    return {"rope": rope.eval(), "learned": learned.eval()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="clean," + ",".join(PLANTS))
    ap.add_argument("--rows", type=int, default=3)
    args = ap.parse_args()

    from megatron.core.packed_seq_params import PackedSeqParams

    from psft_megatron.data import DataConfig, SFTDataset, TokenizerConfig, build_tokenizer, collate_unpacked
    from psft_megatron.data.dataset import load_or_tokenize
    from psft_megatron.distributed.runtime import ParallelConfig, initialize

    parallel = ParallelConfig()
    initialize(parallel, seed=1234)
    tok_cfg = TokenizerConfig(library="huggingface", model=os.path.join(REPO, "examples/data/tiny_tokenizer"))
    tok = build_tokenizer(tok_cfg)
    data_cfg = DataConfig(file_names=[os.path.join(REPO, "examples/data/tiny_sft/train.jsonl")],
                          max_seq_length=256, packing=True)
    ds = SFTDataset(load_or_tokenize(data_cfg, tok, tok_cfg)[0], data_cfg, pad_id=tok.pad_id)
    models = build_models(tok.vocab_size, parallel)

    from psft_megatron.model import cpu_layers

    original = cpu_layers.SDPACoreAttention._forward_thd

    def crossing(self, q, k, v, params):
        whole = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        return original(self, q, k, v, PackedSeqParams(qkv_format="thd", cu_seqlens_q=whole, cu_seqlens_kv=whole,
                                                       max_seqlen_q=q.shape[0], max_seqlen_kv=q.shape[0]))

    def logprobs(model, batch, packed_params=None):
        with torch.no_grad():
            logits = model(batch["tokens"], batch["position_ids"], None, labels=None,
                           packed_seq_params=packed_params)  # [b, s, V_padded] fp32
        lp = torch.log_softmax(logits.float(), dim=-1)
        return lp.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)  # [b, s]

    rows = [r for r in range(len(ds)) if len(ds.item_samples(r)) > 1][: args.rows]

    def compare(plant):
        result = {}
        for name, model in models.items():
            worst, count = 0.0, 0
            for r in rows:
                packed = ds.collate([r])
                params = packed["packed_seq_params"]
                s = packed["tokens"].shape[1]
                if plant == "rope_offsets":
                    params.max_seqlen_q = params.max_seqlen_kv = s
                if plant == "no_position_restart":
                    packed["position_ids"] = torch.arange(s)[None]
                lp_packed = logprobs(model, packed, params)[0]
                ks = ds.item_samples(r)
                unpacked = collate_unpacked([ds.sample(k) for k in ks], tok.pad_id)
                lp_unpacked = logprobs(model, unpacked)
                for j in range(len(ks)):
                    a = lp_packed[packed["seq_ids"][0] == j]
                    b = lp_unpacked[j][unpacked["seq_ids"][j] == j]
                    assert a.shape == b.shape and a.numel() > 0, (a.shape, b.shape)
                    worst = max(worst, float((a - b).abs().max()))
                    count += 1
            result[name] = {"max_abs_diff": worst, "samples": count, "rows": len(rows)}
        return result

    out = {}
    for mode in args.modes.split(","):
        cpu_layers.SDPACoreAttention._forward_thd = crossing if mode == "cross_attention" else original
        out[mode] = compare(mode)
    cpu_layers.SDPACoreAttention._forward_thd = original
    print(json.dumps(out))


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
