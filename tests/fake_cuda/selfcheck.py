"""The fake-CUDA lane refuses what a GPU refuses (run by tests/test_fake_cuda.py in a fresh
process: the native shim must load before torch). Prints one JSON object."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from tests.fake_cuda import native  # noqa: E402

native.load()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.fake_cuda import device as fake_cuda  # noqa: E402


def raises(fn, error) -> str:
    try:
        fn()
    except error as exc:
        return str(exc).split(", at ")[0]
    return ""


def main() -> None:
    fake_cuda.install(local_rank=0)
    out = {}
    weight = torch.randn(10, 4, device="cuda", requires_grad=True)
    out["weight_device"] = str(weight.device)
    out["embedding_host_ids"] = raises(lambda: F.embedding(torch.tensor([[1, 2]]), weight), fake_cuda.DeviceMismatchError)
    ids = torch.tensor([[1, 2]]).pin_memory()
    out["pinned"] = bool(ids.is_pinned())
    fake_cuda.reset_records()
    dev_ids = ids.to("cuda", non_blocking=True)
    out["h2d"] = fake_cuda.records()["h2d"][0]
    emb = F.embedding(dev_ids, weight)
    (emb * torch.tensor(2.0)).sum().backward()  # a 0-dim host scalar is allowed, as on CUDA
    out["grad_device"] = str(weight.grad.device)
    out["grad_value"] = float(weight.grad[1].sum())
    other = torch.randn(4, device="cuda:1")
    out["two_devices"] = raises(lambda: weight[0] + other, fake_cuda.DeviceMismatchError)
    out["item"] = float(torch.ones((), device="cuda").item())
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    out["collective_host"] = raises(lambda: torch.distributed.all_reduce(torch.ones(2)), fake_cuda.CollectiveDeviceError)
    t = torch.ones(2, device="cuda")
    torch.distributed.all_reduce(t)
    out["collective_device"] = t.tolist()
    gloo = torch.distributed.new_group([0], backend="gloo")
    out["gloo_group_host"] = raises(lambda: torch.distributed.all_reduce(torch.ones(2), group=gloo),
                                    fake_cuda.CollectiveDeviceError)
    torch.distributed.destroy_process_group()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
