"""MoE architecture keys: validation naming the key, the mapping onto megatron's
TransformerConfig, the router's top-k semantics against plain torch, and the expert layout
checks that run before distributed start."""

import pytest
import torch

from psft_megatron.config.loader import build_run_config, check_layout, check_requirements
from psft_megatron.errors import ConfigError
from psft_megatron.model import ModelConfig
from psft_megatron.distributed.runtime import ParallelConfig

MOE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=250,
           num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32)


def test_dense_model_has_no_moe_fields():
    cfg = ModelConfig(**{k: v for k, v in MOE.items() if not k.startswith(("num_experts", "moe_"))})
    tc = cfg.to_transformer_config(ParallelConfig())
    assert not cfg.is_moe and tc.num_moe_experts is None


def test_moe_transformer_config_mapping():
    cfg = ModelConfig(**MOE, moe_dense_layers=[0, 3], moe_z_loss_coeff=1e-3, moe_token_dispatcher_type="allgather",
                      moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True, moe_norm_topk_prob=False)
    tc = cfg.to_transformer_config(ParallelConfig(expert_model_parallel_size=2))
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (8, 2, 32)
    assert tc.moe_layer_freq == [0, 1, 1, 0]
    assert tc.moe_router_pre_softmax and tc.moe_router_score_function == "softmax"
    assert (tc.moe_shared_expert_intermediate_size, tc.moe_shared_expert_gate) == (64, True)
    assert (tc.moe_router_load_balancing_type, tc.moe_aux_loss_coeff, tc.moe_z_loss_coeff) == ("aux_loss", 0.001, 1e-3)
    assert (tc.moe_token_dispatcher_type, tc.moe_router_dtype) == ("allgather", "fp32")
    assert (tc.expert_model_parallel_size, tc.expert_tensor_parallel_size) == (2, 1)
    assert not (tc.moe_grouped_gemm or tc.moe_permute_fusion or tc.moe_router_fusion)
    assert not ModelConfig(**MOE).to_transformer_config(ParallelConfig()).moe_router_pre_softmax


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_experts": 0}, "model.num_experts must be an integer >= 1"),
        ({"moe_router_topk": 9}, "model.moe_router_topk=9 is larger than model.num_experts=8"),
        ({"moe_ffn_hidden_size": None}, "model.moe_ffn_hidden_size is not set"),
        ({"moe_shared_expert_gate": True}, "model.moe_shared_expert_gate=true needs"),
        ({"moe_aux_loss_type": "sinkhorn"}, "model.moe_aux_loss_type='sinkhorn'"),
        ({"moe_aux_loss_coeff": -1.0}, "model.moe_aux_loss_coeff=-1.0"),
        ({"moe_z_loss_coeff": -1.0}, "model.moe_z_loss_coeff=-1.0"),
        ({"moe_token_dispatcher_type": "a2a"}, "model.moe_token_dispatcher_type='a2a'"),
        ({"moe_router_dtype": "bf16"}, "model.moe_router_dtype='bf16'"),
        ({"moe_dense_layers": [4]}, "model.moe_dense_layers=[4]: 4 is not a layer index"),
        ({"moe_dense_layers": [0, 1, 2, 3]}, "names every layer"),
    ],
)
def test_bad_moe_values_name_the_key(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig(**{**MOE, **change})


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_topk_semantics_match_plain_torch(norm_topk_prob):
    """megatron's routing with the flags ModelConfig sets == HF's Qwen3-MoE (renormalised
    top-k) / Qwen2-MoE (top-k of the full softmax) router written in plain torch."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    tc = ModelConfig(**MOE, moe_norm_topk_prob=norm_topk_prob).to_transformer_config(ParallelConfig())
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs, routing_map = topk_routing_with_score_function(
        logits, tc.moe_router_topk, use_pre_softmax=tc.moe_router_pre_softmax,
        score_function=tc.moe_router_score_function)
    full = torch.softmax(logits, dim=-1)
    weights, chosen = torch.topk(full, 2, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    want = torch.zeros_like(full).scatter(1, chosen, weights)
    assert torch.equal(routing_map, want > 0)
    torch.testing.assert_close(probs.double(), want, rtol=1e-6, atol=1e-6)  # megatron softmaxes in fp32


def _run(model: dict, world: int = 4):
    raw = {"model": {"micro_batch_size": 1, "global_batch_size": 8, **MOE, **model}}
    cfg = build_run_config(raw)
    check_layout(cfg, world)
    check_requirements(cfg)
    return cfg


def test_expert_layout_accepted():
    _run({"expert_model_parallel_size": 4})
    _run({"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_model_parallel_size": 2,
          "expert_tensor_parallel_size": 1})


@pytest.mark.parametrize(
    "model,world,message",
    [
        ({"expert_model_parallel_size": 3}, 6, "model.num_experts=8 is not divisible by model.expert_model_parallel_size=3"),
        ({"expert_model_parallel_size": 8}, 4, "world size 4 is not divisible by model.expert_tensor_parallel_size"),
        ({"expert_model_parallel_size": 0}, 4, "model.expert_model_parallel_size=0 must be >= 1"),
        ({"expert_tensor_parallel_size": 3, "moe_ffn_hidden_size": 32}, 3,
         "model.moe_ffn_hidden_size=32 is not divisible by model.expert_tensor_parallel_size=3"),
        ({"num_experts": None, "moe_router_topk": 2, "expert_model_parallel_size": 2}, 4,
         "model.expert_model_parallel_size=2 needs an MoE model"),
        ({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2}, 4, "model.sequence_parallel must be true"),
        ({"tensor_model_parallel_size": 2, "sequence_parallel": True, "moe_shared_expert_intermediate_size": 33}, 4,
         "model.moe_shared_expert_intermediate_size=33 is not divisible"),
    ],
)
def test_bad_expert_layout_names_the_key(model, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        _run(model, world)


def test_flex_dispatcher_refused_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, also on a GPU box
    with pytest.raises(ConfigError, match="model.moe_token_dispatcher_type=flex needs GPUs"):
        _run({"moe_token_dispatcher_type": "flex"})


def test_parallel_config_expert_grid():
    ParallelConfig(expert_model_parallel_size=2).validate(2)
    with pytest.raises(ValueError, match="ETP\\*EP\\*PP"):
        ParallelConfig(expert_model_parallel_size=4).validate(2)
    assert "EP=2" in ParallelConfig(expert_model_parallel_size=2).describe()


def test_chained_optimizer_keys_are_not_model_weights():
    # the strict key check of a restore: an MoE model's ChainedOptimizer stores its dense and
    # expert optimizers' state under "chained_<i>.optimizer..."; those are not weights
    from psft_megatron.checkpointing.dist_checkpoint import _is_model_key

    assert not _is_model_key("optimizer.state.exp_avg.decoder.layers.0.mlp.linear_fc1.weight")
    assert not _is_model_key("chained_1.optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.float32).bucket_idx_0.exp_avg")
    assert _is_model_key("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight")
    assert _is_model_key("chained_layer.weight")  # only the optimizer's prefix is recognised
