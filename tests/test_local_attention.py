"""The ``local`` spec's core attention equals the ``cpu`` spec's reference on every path the
CPU can run: causal with GQA (no K/V repeat), causal with a mask (the CP path), packed rows
per segment from host bounds (no dense mask, no device read), with and without padded
boundaries, values and gradients, dropout off."""

import types

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from psft_megatron.data.collate import collate_packed, packed_seq_params_class
from psft_megatron.model import local_attention
from psft_megatron.model.cpu_layers import SDPACoreAttention
from psft_megatron.model.local_attention import LocalCoreAttention


class _Group:
    def size(self):
        return 1

    def rank(self):
        return 0


def make(cls, heads=4, groups=2):
    cfg = TransformerConfig(num_layers=1, hidden_size=8 * heads, num_attention_heads=heads,
                            num_query_groups=groups, kv_channels=8)
    return cls(cfg, 1, AttnMaskType.causal, "self", pg_collection=types.SimpleNamespace(cp=_Group())).eval()


def packed(bounds, padded=None):
    cu = torch.tensor(bounds, dtype=torch.int32)
    cu_p = None if padded is None else torch.tensor(padded, dtype=torch.int32)
    host = padded if padded is not None else bounds
    longest = max(b - a for a, b in zip(host[:-1], host[1:]))
    return packed_seq_params_class()(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_p,
                                     cu_seqlens_kv_padded=cu_p, max_seqlen_q=longest, max_seqlen_kv=longest,
                                     segment_bounds=tuple(host))


def run(module, inputs, **kwargs):
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    out = module(*leaves, None, **kwargs)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), [x.grad for x in leaves]


def assert_same(local, ref):
    torch.testing.assert_close(local[0], ref[0], atol=2e-6, rtol=1e-5)
    for g_local, g_ref in zip(local[1], ref[1]):
        torch.testing.assert_close(g_local, g_ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 1), (4, 4)])
def test_causal_gqa_equals_reference(heads, groups):
    torch.manual_seed(0)
    s, b = 9, 2
    inputs = [torch.randn(s, b, heads, 8), torch.randn(s, b, groups, 8), torch.randn(s, b, groups, 8)]
    assert_same(run(make(LocalCoreAttention, heads, groups), inputs), run(make(SDPACoreAttention, heads, groups), inputs))


def test_masked_attention_equals_reference():
    """The CP path: an explicit [sq, sk] mask with grouped K/V."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = torch.rand(6, 10) > 0.3
    mask[:, 0] = True
    out_local = make(LocalCoreAttention)._attend(q, k, v, mask)
    out_ref = make(SDPACoreAttention)._attend(q, k, v, mask)
    torch.testing.assert_close(out_local, out_ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("bounds,padded", [([0, 4, 9, 11], None), ([0, 3, 7, 9, 11], [0, 4, 8, 10, 11]),
                                           ([0, 11], None), ([0, 1, 2, 11], None)])
def test_packed_rows_equal_reference(bounds, padded, monkeypatch):
    torch.manual_seed(2)
    t = 11
    inputs = [torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)]
    params = packed(bounds, padded)
    # the local path must not read the boundaries back from the device
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("device read in the packed path"))
    local = run(make(LocalCoreAttention), inputs, packed_seq_params=params)
    monkeypatch.undo()
    assert_same(local, run(make(SDPACoreAttention), inputs, packed_seq_params=params))


def test_packed_rows_from_the_data_pipeline():
    """collate_packed gives the bounds; without them the local path reads cu_seqlens once."""
    import numpy as np

    samples = [(np.arange(1, 6, dtype=np.int32), np.ones(5, dtype=np.uint8)),
               (np.arange(1, 4, dtype=np.int32), np.ones(3, dtype=np.uint8))]
    row = collate_packed(samples, row_length=10, pad_id=0)
    params = row["packed_seq_params"]
    assert params.segment_bounds == (0, 4, 6, 10)
    assert params.segment_bounds == tuple(params.cu_seqlens_q.tolist())
    torch.manual_seed(3)
    inputs = [torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)]
    bare = packed_seq_params_class()(**{k: getattr(params, k) for k in ("qkv_format", "cu_seqlens_q", "cu_seqlens_kv",
                                                                         "max_seqlen_q", "max_seqlen_kv")})
    assert_same(run(make(LocalCoreAttention), inputs, packed_seq_params=bare),
                run(make(SDPACoreAttention), inputs, packed_seq_params=params))


def test_segment_bounds_must_cover_the_row():
    with pytest.raises(ValueError, match="do not cover the packed length 12"):
        local_attention.segment_bounds(packed([0, 4, 11]), 12)
