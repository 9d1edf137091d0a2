"""Rank 0 decides from the filesystem and every rank agrees (psft_megatron.distributed.decisions)."""

import json
import os
import socket


from tests.parallel.launch import cpu_spawn


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, root, out):
    import torch.distributed as dist

    from psft_megatron.distributed.decisions import rank0_decides, ranks_seeing, require_shared_directory
    from psft_megatron.errors import ConfigError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    # each rank "reads" its own answer; every rank gets rank 0's
    result["decided"] = rank0_decides(lambda: f"rank {dist.get_rank()} read this")
    try:
        rank0_decides(lambda: (_ for _ in ()).throw(ConfigError("x.y: bad")))
    except ConfigError as exc:
        result["error"] = str(exc)
    shared = os.path.join(root, "shared")
    result["shared"] = ranks_seeing(shared)
    # rank 1 and 2 look at their own "node-local" copy of the same path name
    local = shared if rank == 0 else os.path.join(root, f"node{rank}")
    os.makedirs(local, exist_ok=True)
    result["local"] = ranks_seeing(local if rank else shared)
    try:
        require_shared_directory(local if rank else shared, "exp_manager.explicit_log_dir", "checkpointing")
    except ConfigError as exc:
        result["require"] = str(exc)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def test_rank0_decides_and_shared_directories(tmp_path):
    out = str(tmp_path)
    cpu_spawn(_worker, (3, _free_port(), str(tmp_path), out), 3)
    results = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(3)]
    for r in results:
        assert r["decided"] == "rank 0 read this"
        assert r["error"] == "x.y: bad"
        assert r["shared"] == [True, True, True]
        assert r["local"] == [True, False, False]
        assert "rank(s) 1-2 on" in r["require"] and "exp_manager.explicit_log_dir" in r["require"]
    assert not os.listdir(os.path.join(out, "shared"))  # the check leaves nothing behind
