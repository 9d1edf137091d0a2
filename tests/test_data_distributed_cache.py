"""Under torch.distributed, rank 0 tokenises into the cache; the other ranks only memory-map it."""

import os
import socket

import torch.multiprocessing as mp

from tests.data_fixtures.helpers import HF_TOKENIZER, TINY_SFT
from tests.parallel.rank_slots import rank_slots


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, cache, out):
    import torch.distributed as dist

    import psft_megatron.data.dataset as dataset_mod
    from psft_megatron.data import DataConfig, SFTDataset, TokenizerConfig, build_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    original = dataset_mod.tokenize_files
    dataset_mod.tokenize_files = lambda *a, **k: calls.append(1) or original(*a, **k)
    tok_cfg = TokenizerConfig(model=HF_TOKENIZER)
    cfg = DataConfig(file_names=[f"{TINY_SFT}/valid.jsonl"], cache_dir=cache, max_seq_length=64)
    ds = SFTDataset.build(cfg, build_tokenizer(tok_cfg), tok_cfg)
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(f"{len(calls)} {ds.cache_info['cache_hit']} {int(ds.store.ids.sum())}")
    dist.barrier()
    dist.destroy_process_group()


def test_rank0_tokenizes_once_others_hit_the_cache(tmp_path):
    out = str(tmp_path)
    with rank_slots(2):
        mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "cache"), out), nprocs=2, join=True)
    r0 = open(os.path.join(out, "rank0")).read().split()
    r1 = open(os.path.join(out, "rank1")).read().split()
    assert r0[:1] == ["1"] and r1[:2] == ["0", "True"] and r0[2] == r1[2]
