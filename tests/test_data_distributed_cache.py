"""The token cache under torch.distributed, on two simulated nodes with node-local cache disks.

Three gloo ranks: rank 0 alone on "node A", ranks 1 and 2 on "node B" (LOCAL_RANK 0 and 1).
Each node's ranks get their own cache root under the same setting, as a node-local disk would
give them. Rank 0 alone reads the data files for the key (broadcast); rank 0 builds node A's
cache while rank 1 (node B's first rank) builds node B's, and rank 2 waits for it; then every
rank memory-maps its node's copy. A second start reads no data byte anywhere and tokenises
nowhere.
"""

import json
import os
import socket

from tests.data_fixtures.helpers import HF_TOKENIZER, TINY_SFT, write_jsonl
from tests.parallel.launch import cpu_spawn

NODES = {0: ("A", 0), 1: ("B", 0), 2: ("B", 1)}  # rank -> (node, LOCAL_RANK)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, root, data, out):
    import torch.distributed as dist

    import psft_megatron.data.fingerprint as fingerprint
    import psft_megatron.data.token_cache as token_cache
    from psft_megatron.data import DataConfig, SFTDataset, TokenizerConfig, build_tokenizer

    node, local_rank = NODES[rank]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE="2" if node == "B" else "1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counts = {"tokenised": 0, "hashed": []}
    tokenize, sha = token_cache.tokenize_files, fingerprint.file_sha256
    token_cache.tokenize_files = lambda *a, **k: counts.__setitem__("tokenised", counts["tokenised"] + 1) or \
        tokenize(*a, **k)
    fingerprint.file_sha256 = lambda path: counts["hashed"].append(os.path.basename(path)) or sha(path)
    tok_cfg = TokenizerConfig(model=HF_TOKENIZER)
    tokenizer = build_tokenizer(tok_cfg)
    cfg = DataConfig(file_names=[data], cache_dir=os.path.join(root, f"node{node}", "cache"), max_seq_length=64)
    result = {}
    for start in ("cold", "warm"):
        counts.update(tokenised=0, hashed=[])
        ds = SFTDataset.build(cfg, tokenizer, tok_cfg)
        result[start] = dict(counts, hit=ds.cache_info["cache_hit"], path=ds.cache_info["cache_path"],
                             ids=int(ds.store.ids.sum()), kept=len(ds.spans))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def test_one_builder_per_node_and_rank0_alone_reads_the_data(tmp_path):
    with open(f"{TINY_SFT}/valid.jsonl") as f:
        data = write_jsonl(tmp_path / "valid.jsonl", [line.rstrip("\n") for line in f])
    os.utime(data, (1e9, 1e9))  # written long ago: its hash may be remembered
    cpu_spawn(_worker, (3, _free_port(), str(tmp_path), data, str(tmp_path)), 3)
    r = [json.load(open(tmp_path / f"rank{k}.json")) for k in range(3)]
    cold, warm = [x["cold"] for x in r], [x["warm"] for x in r]
    assert [c["tokenised"] for c in cold] == [1, 1, 0]  # rank 0 for node A, rank 1 for node B; rank 2 waited
    assert "valid.jsonl" in cold[0]["hashed"] and not cold[1]["hashed"] and not cold[2]["hashed"]
    assert [c["hit"] for c in cold] == [False, False, True]
    assert cold[0]["path"].startswith(str(tmp_path / "nodeA")) and cold[1]["path"] == cold[2]["path"]
    assert cold[1]["path"].startswith(str(tmp_path / "nodeB")) and os.path.basename(cold[0]["path"]) == \
        os.path.basename(cold[1]["path"])  # the same key on both nodes
    assert len({(c["ids"], c["kept"]) for c in cold + warm}) == 1
    # a restart: every rank hits its node's cache, and no rank reads a data or tokenizer byte
    assert [w["tokenised"] for w in warm] == [0, 0, 0] and all(w["hit"] for w in warm)
    assert [w["hashed"] for w in warm] == [[], [], []]
