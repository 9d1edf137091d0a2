"""GPU: the loss plug-in's values and gradients on CUDA equal the CPU's (same inputs)."""

import pytest
import torch

from psft_megatron.losses import LossConfig, PSFTLoss
from psft_megatron.ops import vocab_parallel_logprobs

DEVICE = "cuda"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 64, 1000, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 1000, (2, 64), generator=gen)
    mask = (torch.rand(2, 64, generator=gen) > 0.2).float()
    weights = torch.randn(2, 64, generator=gen)
    return logits, labels, mask, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_entropy_and_grads_match_cpu(dtype):
    logits, labels, _, weights = _inputs(dtype)
    out = {}
    for device in ("cpu", DEVICE):
        x = logits.to(device).requires_grad_()
        logp, entropy = vocab_parallel_logprobs(x, labels.to(device), return_entropy=True)
        ((logp * weights.to(device)).sum() + 0.1 * entropy.sum()).backward()
        out[device] = (logp.detach().cpu(), entropy.detach().cpu(), x.grad.float().cpu())
    for cpu, gpu in zip(out["cpu"], out[DEVICE]):
        torch.testing.assert_close(gpu, cpu, **TOL[dtype])
    assert out[DEVICE][0].dtype == torch.float32  # log-probs are fp32 whatever the logits dtype


@pytest.mark.parametrize("kind", ["sft", "psft", "dft"])
def test_loss_values_and_grads_match_cpu(kind):
    logits, labels, mask, _ = _inputs(torch.float32)
    old = vocab_parallel_logprobs(logits, labels) + 0.3 * torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    loss = PSFTLoss(LossConfig(kind=kind))
    out = {}
    for device in ("cpu", DEVICE):
        x = logits.to(device).requires_grad_()
        total, count, metrics = loss.loss_func(labels.to(device), mask.to(device),
                                               old_logprobs=old.to(device) if kind == "psft" else None)(x)
        (total / count).backward()
        out[device] = (total.detach().cpu(), int(count), x.grad.cpu(),
                       {k: v.detach().cpu() for k, v in metrics.items() if isinstance(v, torch.Tensor)})
    cpu, gpu = out["cpu"], out[DEVICE]
    torch.testing.assert_close(gpu[0], cpu[0], rtol=1e-5, atol=1e-5)
    assert gpu[1] == cpu[1]
    torch.testing.assert_close(gpu[2], cpu[2], rtol=1e-5, atol=1e-6)
    for key in cpu[3]:
        torch.testing.assert_close(gpu[3][key], cpu[3][key], rtol=1e-5, atol=1e-5)
