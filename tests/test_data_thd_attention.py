"""SDPACoreAttention THD path: block-diagonal causal attention per cu_seqlens segment, GQA, CP refusal."""

import types

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from psft_megatron.model.cpu_layers import SDPACoreAttention


class _Group:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size

    def rank(self):
        return 0


def attention(cp_size=1):
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8)
    return SDPACoreAttention(cfg, 1, AttnMaskType.causal, "self",
                             pg_collection=types.SimpleNamespace(cp=_Group(cp_size))).eval()


def params(cu, padded=None):
    cu = torch.tensor(cu, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=None if padded is None else torch.tensor(padded, dtype=torch.int32),
                           max_seqlen_q=int((cu[1:] - cu[:-1]).max()), max_seqlen_kv=int((cu[1:] - cu[:-1]).max()))


def reference(q, k, v, bounds, scale):
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].permute(1, 0, 2) for x in (q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).permute(1, 0, 2))
    return torch.cat(outs).reshape(q.shape[0], -1)


def test_thd_matches_per_segment_causal_attention_with_gqa():
    torch.manual_seed(0)
    t = 11
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    attn = attention()
    out = attn(q, k, v, None, packed_seq_params=params([0, 4, 9, 11]))
    assert out.shape == (t, 32)
    torch.testing.assert_close(out, reference(q, k, v, [0, 4, 9, 11], attn.softmax_scale), atol=1e-6, rtol=0)
    # cu_seqlens_q_padded wins when present (tokens live at the padded offsets)
    out = attn(q, k, v, None, packed_seq_params=params([0, 3, 7, 9], padded=[0, 4, 8, 11]))
    torch.testing.assert_close(out, reference(q, k, v, [0, 4, 8, 11], attn.softmax_scale), atol=1e-6, rtol=0)
    # an unsqueezed batch dim of 1 is accepted
    out1 = attn(q[:, None], k[:, None], v[:, None], None, packed_seq_params=params([0, 4, 8, 11]))
    torch.testing.assert_close(out1, out, atol=0, rtol=0)


def test_thd_refuses_cp_and_bad_metadata():
    q, k, v = torch.randn(8, 4, 8), torch.randn(8, 2, 8), torch.randn(8, 2, 8)
    with pytest.raises(NotImplementedError, match=r"context parallelism \(CP > 1\)"):
        attention(cp_size=2)(q, k, v, None, packed_seq_params=params([0, 4, 8]))
    with pytest.raises(ValueError, match="cu_seqlens ends at 6 but the packed length is 8"):
        attention()(q, k, v, None, packed_seq_params=params([0, 4, 6]))
    with pytest.raises(NotImplementedError, match="qkv_format='thd' only"):
        attention()(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
