"""Per-family tensor mapping HF <-> Megatron (TP=1 names and layouts), written once for both directions.

Megatron names are those of a TP=1/PP=1 ``GPTModel`` built with the ``local``/``cpu`` layer
spec (``decoder.layers.{i}.input_layernorm.weight``, ...); the checkpoint keys (TE names,
layers stacked) are megatron's business (:mod:`psft_megatron.convert.megatron_io`).

Notation: nh = query heads, ng = KV groups, hd = head_dim, r = nh / ng, H = hidden, F = ffn,
V = vocab, P = padded vocab.

Layouts:
- ``linear_qkv.weight`` [(nh + 2 ng) hd, H] is grouped per KV group:
  [q heads of group 0 (r hd rows), k0 (hd), v0 (hd), q heads of group 1, k1, v1, ...];
  HF keeps q [nh hd, H], k [ng hd, H], v [ng hd, H] apart. Bias: same without H.
- ``linear_fc1.weight`` [2F, H] = cat(gate [F, H], up [F, H]).
- embeddings / output layer: [P, H] in Megatron (zero rows past V), [V, H] in HF.

MoE layers (Qwen3-MoE, Qwen2-MoE; E experts of width Fe, shared expert of width S) replace the
dense MLP of every layer not in ``cfg.moe_dense_layers``:

- router ``mlp.router.weight`` [E, H] = HF ``mlp.gate.weight``;
- expert e: ``mlp.experts.local_experts.{e}.linear_fc1.weight`` [2Fe, H] = cat(HF
  ``mlp.experts.{e}.gate_proj``, ``up_proj``), ``linear_fc2.weight`` [H, Fe] = ``down_proj``
  (megatron's SequentialMLP names at EP=1; its checkpoint keys, shared with TEGroupedMLP, stack
  the experts on a leading axis: :mod:`psft_megatron.convert.megatron_io`);
- shared expert (Qwen2-MoE): ``mlp.shared_experts.linear_fc1.weight`` [2S, H] = cat(HF
  ``mlp.shared_expert.gate_proj``, ``up_proj``), ``linear_fc2.weight`` = ``down_proj``,
  ``mlp.shared_experts.gate_weight`` [1, H] = ``mlp.shared_expert_gate.weight``.

HF files store the experts one by one (``mlp.experts.{e}.*``: the layout transformers'
``save_pretrained`` writes, whatever layout its modules use in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from psft_megatron.model.config import ModelConfig


# ----------------------------------------------------------------------------- layout helpers
def qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """HF q [nh hd, ...], k [ng hd, ...], v [ng hd, ...] -> megatron qkv [(nh + 2 ng) hd, ...].

    Works for weights ([..., H]) and biases (1-D).
    """
    ng = num_query_groups
    rest = q.shape[1:]
    parts = (q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def qkv_split(qkv: torch.Tensor, num_heads: int, num_query_groups: int, head_dim: int):
    """Inverse of :func:`qkv_merge`: megatron qkv -> (q [nh hd, ...], k [ng hd, ...], v [ng hd, ...])."""
    ng, r = num_query_groups, num_heads // num_query_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(ng, (r + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [r * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).clone(), k.reshape(-1, *rest).clone(), v.reshape(-1, *rest).clone())


def fc1_merge(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate [F, H], up [F, H] -> megatron linear_fc1 [2F, H]."""
    return torch.cat([gate, up], dim=0)


def fc1_split(fc1: torch.Tensor):
    """megatron linear_fc1 [2F, H] -> (gate [F, H], up [F, H])."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.clone(), up.clone()


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """[V, H] -> [P, H] with zero rows V..P-1."""
    if weight.shape[0] > padded_vocab:
        raise ValueError(f"vocab {weight.shape[0]} is larger than the padded vocab {padded_vocab}")
    if weight.shape[0] == padded_vocab:
        return weight
    out = weight.new_zeros((padded_vocab, *weight.shape[1:]))
    out[: weight.shape[0]] = weight
    return out


def unpad_vocab(weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """[P, H] -> [V, H] (the first V rows; a view, no copy)."""
    return weight[:vocab]


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensor(s) it is made of.

    ``to_megatron(hf_tensors, cfg)`` -> megatron tensor; ``to_hf(tensor, cfg)`` -> HF tensors
    (same order as ``hf``). ``{i}`` in names is the global layer index.
    """

    megatron: str
    hf: Sequence[str]
    to_megatron: Callable
    to_hf: Callable


def _same(tensors, cfg):
    return tensors[0]


def _same_back(tensor, cfg):
    return [tensor]


def _qkv(tensors, cfg):
    return qkv_merge(*tensors, cfg.num_query_groups or cfg.num_attention_heads)


def _qkv_back(tensor, cfg):
    return list(qkv_split(tensor, cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads, cfg.kv_channels))


def _fc1(tensors, cfg):
    return fc1_merge(*tensors)


def _fc1_back(tensor, cfg):
    return list(fc1_split(tensor))


def _vocab(tensors, cfg):
    return pad_vocab(tensors[0], cfg.padded_vocab_size(1))


def _vocab_back(tensor, cfg):
    return [unpad_vocab(tensor, cfg.vocab_size)]


EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
HF_EMBEDDING = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"

#: HF tensors that carry no information (old rotary buffers); skipped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def global_rules(cfg: ModelConfig) -> List[Rule]:
    """Rules for the tensors outside the decoder layers (no output layer when tied)."""
    rules = [
        Rule(EMBEDDING, [HF_EMBEDDING], _vocab, _vocab_back),
        Rule("decoder.final_layernorm.weight", ["model.norm.weight"], _same, _same_back),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule(OUTPUT, [HF_LM_HEAD], _vocab, _vocab_back))
    return rules


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    """Whether decoder layer ``i`` (global index) is an MoE layer."""
    return cfg.is_moe and i not in set(cfg.moe_dense_layers or [])


def _dense_mlp_rules(m: str, h: str) -> List[Rule]:
    return [Rule(m + "linear_fc1.weight", [h + "gate_proj.weight", h + "up_proj.weight"], _fc1, _fc1_back),
            Rule(m + "linear_fc2.weight", [h + "down_proj.weight"], _same, _same_back)]


def _moe_mlp_rules(cfg: ModelConfig, m: str, h: str) -> List[Rule]:
    """Router, experts one by one, and the shared expert (with its gate) when there is one."""
    rules = [Rule(m + "router.weight", [h + "gate.weight"], _same, _same_back)]
    for e in range(cfg.num_experts):
        rules += _dense_mlp_rules(f"{m}experts.local_experts.{e}.", f"{h}experts.{e}.")
    if cfg.moe_shared_expert_intermediate_size:
        rules += _dense_mlp_rules(m + "shared_experts.", h + "shared_expert.")
        if cfg.moe_shared_expert_gate:
            rules.append(Rule(m + "shared_experts.gate_weight", [h + "shared_expert_gate.weight"], _same, _same_back))
    return rules


def layer_rules(cfg: ModelConfig, layer: Optional[int] = None) -> List[Rule]:
    """Rules for decoder layer ``{i}`` (format the names with ``i=``); ``layer``: the global
    index, which decides between the dense and the MoE MLP (None: the dense layout)."""
    m, h = "decoder.layers.{i}.", "model.layers.{i}."
    attn = h + "self_attn."
    rules = [
        Rule(m + "input_layernorm.weight", [h + "input_layernorm.weight"], _same, _same_back),
        Rule(m + "self_attention.linear_qkv.weight",
             [attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"], _qkv, _qkv_back),
    ]
    if cfg.add_qkv_bias:
        rules.append(Rule(m + "self_attention.linear_qkv.bias",
                          [attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"], _qkv, _qkv_back))
    if cfg.qk_layernorm:
        rules += [
            Rule(m + "self_attention.q_layernorm.weight", [attn + "q_norm.weight"], _same, _same_back),
            Rule(m + "self_attention.k_layernorm.weight", [attn + "k_norm.weight"], _same, _same_back),
        ]
    rules += [
        Rule(m + "self_attention.linear_proj.weight", [attn + "o_proj.weight"], _same, _same_back),
        Rule(m + "pre_mlp_layernorm.weight", [h + "post_attention_layernorm.weight"], _same, _same_back),
    ]
    if layer is not None and is_moe_layer(cfg, layer):
        rules += _moe_mlp_rules(cfg, m + "mlp.", h + "mlp.")
    else:
        rules += _dense_mlp_rules(m + "mlp.", h + "mlp.")
    return rules


def _fmt(rule: Rule, i: int) -> Rule:
    return Rule(rule.megatron.format(i=i), [n.format(i=i) for n in rule.hf], rule.to_megatron, rule.to_hf)


def all_rules(cfg: ModelConfig) -> List[Rule]:
    """Every rule, with layer names filled in: embedding, final norm, (output), then layer by layer."""
    return [rule for group in rules_by_layer(cfg) for rule in group]


def rules_by_layer(cfg: ModelConfig) -> List[List[Rule]]:
    """[globals, layer 0, layer 1, ...]: the unit of streaming."""
    return [global_rules(cfg)] + [[_fmt(r, i) for r in layer_rules(cfg, i)] for i in range(cfg.num_layers)]


def _mlp_shapes(prefix: str, H: int, F: int) -> Dict[str, tuple]:
    return {prefix + "gate_proj.weight": (F, H), prefix + "up_proj.weight": (F, H), prefix + "down_proj.weight": (H, F)}


def hf_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """Expected shape of every HF tensor the rules read (lm_head only when untied)."""
    H, F, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    nh, ng, hd = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads, cfg.kv_channels
    shapes = {HF_EMBEDDING: (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes[HF_LM_HEAD] = (V, H)
    for i in range(cfg.num_layers):
        a, p = f"model.layers.{i}.self_attn.", f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            a + "q_proj.weight": (nh * hd, H), a + "k_proj.weight": (ng * hd, H), a + "v_proj.weight": (ng * hd, H),
            a + "o_proj.weight": (H, nh * hd),
        })
        if is_moe_layer(cfg, i):
            shapes[p + "mlp.gate.weight"] = (cfg.num_experts, H)
            for e in range(cfg.num_experts):
                shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", H, cfg.moe_ffn_hidden_size))
            if cfg.moe_shared_expert_intermediate_size:
                shapes.update(_mlp_shapes(p + "mlp.shared_expert.", H, cfg.moe_shared_expert_intermediate_size))
                if cfg.moe_shared_expert_gate:
                    shapes[p + "mlp.shared_expert_gate.weight"] = (1, H)
        else:
            shapes.update(_mlp_shapes(p + "mlp.", H, F))
        if cfg.add_qkv_bias:
            shapes.update({a + "q_proj.bias": (nh * hd,), a + "k_proj.bias": (ng * hd,), a + "v_proj.bias": (ng * hd,)})
        if cfg.qk_layernorm:
            shapes.update({a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
    return shapes


def hf_to_megatron(rule: Rule, get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The megatron TP=1 tensor of ``rule`` from HF tensors fetched with ``get(name)``."""
    return rule.to_megatron([get(name) for name in rule.hf], cfg)


def megatron_to_hf(rule: Rule, tensor: torch.Tensor, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """The HF tensors of ``rule`` from its megatron TP=1 tensor."""
    return dict(zip(rule.hf, rule.to_hf(tensor, cfg)))


def find_rule(cfg: ModelConfig, megatron_name: str) -> Optional[Rule]:
    for rule in all_rules(cfg):
        if rule.megatron == megatron_name:
            return rule
    return None
