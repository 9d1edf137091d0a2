"""Packed vs unpacked per-sample log-probs under TP=2 + SP (run with torchrun, 2 processes).

    torchrun --nproc_per_node 2 tests/data_fixtures/packed_tp_worker.py --out result.json

Packed rows are padded to a multiple of TP (``required_multiple``) so SP can split them; the
logits are gathered over TP before the log-softmax. Writes {"max_abs_diff", "samples", "tp"}.
"""

import argparse
import json
import os
import sys

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from psft_megatron.data import (DataConfig, SFTDataset, TokenizerConfig, build_tokenizer, collate_unpacked,
                                    required_multiple)
    from psft_megatron.data.dataset import load_or_tokenize
    from psft_megatron.model import ModelConfig
    from psft_megatron.model.builder import build_gpt_chunks
    from psft_megatron.distributed.runtime import ParallelConfig, initialize

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=tp > 1)
    initialize(parallel, seed=1234)
    multiple = required_multiple(tp, 1, tp > 1)
    tok_cfg = TokenizerConfig(model=os.path.join(REPO, "examples/data/tiny_tokenizer"))
    tok = build_tokenizer(tok_cfg)
    data_cfg = DataConfig(file_names=[os.path.join(REPO, "examples/data/tiny_sft/train.jsonl")], max_seq_length=255)
    ds = SFTDataset(load_or_tokenize(data_cfg, tok, tok_cfg)[0], data_cfg, pad_id=tok.pad_id, multiple=multiple)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=32,
                      ffn_hidden_size=128, vocab_size=tok.vocab_size, make_vocab_size_divisible_by=64,
                      max_position_embeddings=256, add_qkv_bias=True, qk_layernorm=True, init_method_std=0.05)
    torch.manual_seed(0)
    model = build_gpt_chunks(cfg, cfg.to_transformer_config(parallel), layer_spec="cpu")[0].eval()

    def logprobs(batch, params=None):
        with torch.no_grad():
            logits = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)
            logits = gather_from_tensor_model_parallel_region(logits)  # [b, s, V]
        return torch.log_softmax(logits.float(), -1).gather(-1, batch["labels"][..., None])[..., 0]

    worst, count = 0.0, 0
    rows = [r for r in range(len(ds)) if len(ds.item_samples(r)) > 1][:3]
    for r in rows:
        packed = ds.collate([r])
        assert packed["tokens"].shape[1] % multiple == 0
        lp = logprobs(packed, packed["packed_seq_params"])[0]
        ks = ds.item_samples(r)
        un = collate_unpacked([ds.sample(k) for k in ks], tok.pad_id, multiple=multiple)
        lpu = logprobs(un)
        for j in range(len(ks)):
            worst = max(worst, float((lp[packed["seq_ids"][0] == j] - lpu[j][un["seq_ids"][j] == j]).abs().max()))
            count += 1
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"max_abs_diff": worst, "samples": count, "tp": tp, "row_length": ds.row_length}, f)


if __name__ == "__main__":
    main()
    from tests.parallel.launch import finish_worker

    finish_worker()
