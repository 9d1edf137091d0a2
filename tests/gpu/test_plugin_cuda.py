"""GPU: the loss plug-in on CUDA - log-probs, entropies and their logits gradient against a
float64 reference (fp32 and bf16 logits), and each objective's value, normaliser, metrics and
gradient against the same computation on the CPU. Tolerances relative to the tensors' scale
(tests/gpu/tolerances.py)."""

import pytest
import torch

from psft_megatron.losses import LossConfig, PSFTLoss
from psft_megatron.ops import vocab_parallel_logprobs
from tests.gpu.tolerances import FP32_RTOL, assert_accurate, relative_error

DEVICE = "cuda"


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 64, 1000, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 1000, (2, 64), generator=gen)
    mask = (torch.rand(2, 64, generator=gen) > 0.2).float()
    weights = torch.randn(2, 64, generator=gen)
    return logits, labels, mask, weights


def _plain(logits, labels, weights, dtype=None):
    """log p(label), entropy and the gradient of sum(w * logp) + 0.1 * sum(entropy) through
    log_softmax: ``dtype`` None keeps the logits' dtype (softmax in fp32, the gradient back in
    it), torch.float64 gives the reference."""
    x = logits.to(dtype or logits.dtype).requires_grad_()
    logp_all = torch.log_softmax(x.to(dtype or torch.float32), dim=-1)
    logp, entropy = logp_all.gather(-1, labels[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)
    ((logp * weights.to(logp.dtype)).sum() + 0.1 * entropy.sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


def check_logprobs(device, dtype) -> dict:
    logits, labels, _, weights = (t.to(device) for t in _inputs(dtype))
    x = logits.clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(x, labels, return_entropy=True)
    ((logp * weights).sum() + 0.1 * entropy.sum()).backward()
    assert logp.dtype == entropy.dtype == torch.float32 and x.grad.dtype == dtype  # fp32 whatever the logits
    want = _plain(logits, labels, weights, torch.float64)
    plain = _plain(logits, labels, weights) if dtype != torch.float32 else [None] * 3
    return {name: assert_accurate(got, ref, f"{device} {dtype} {name}", base)
            for name, got, ref, base in zip(("logp", "entropy", "logits grad"), (logp, entropy, x.grad), want, plain)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_entropy_and_grads_match_float64(dtype):
    print(check_logprobs(DEVICE, dtype))


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
    assert gpu[1] == cpu[1]
    assert relative_error(gpu[0], cpu[0]) <= FP32_RTOL and relative_error(gpu[2], cpu[2]) <= FP32_RTOL
    if kind == "psft":  # the clip binds on some tokens, so its branch is compared too
        assert cpu[3]["clip_frac"].sum() > 0, cpu[3]
    assert gpu[3].keys() == cpu[3].keys()
    for key in cpu[3]:
        torch.testing.assert_close(gpu[3][key], cpu[3][key], rtol=FP32_RTOL, atol=FP32_RTOL * cpu[3][key].abs().max())
