"""ModelConfig validation, vocab padding, TransformerConfig mapping and layer-spec errors."""

import pytest

from psft_megatron.model import ModelConfig
from psft_megatron.distributed.runtime import ParallelConfig

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=250)


def test_padded_vocab_is_multiple_of_divisor_times_tp():
    cfg = ModelConfig(**BASE, make_vocab_size_divisible_by=128)
    assert cfg.padded_vocab_size(1) == 256
    assert cfg.padded_vocab_size(4) == 512
    assert ModelConfig(**{**BASE, "vocab_size": 151936}).padded_vocab_size(8) == 152576


def test_transformer_config_mapping():
    cfg = ModelConfig(**BASE, num_query_groups=2, head_dim=32, add_qkv_bias=True, qk_layernorm=True)
    tc = cfg.to_transformer_config(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    assert (tc.kv_channels, tc.num_query_groups, tc.normalization) == (32, 2, "RMSNorm")
    assert tc.gated_linear_unit and tc.add_qkv_bias and tc.qk_layernorm and not tc.add_bias_linear
    assert tc.sequence_parallel and tc.calculate_per_token_loss
    # SP without TP is meaningless in megatron: switched off, not an error.
    assert not cfg.to_transformer_config(ParallelConfig(sequence_parallel=True)).sequence_parallel


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_query_groups": 3}, "model.num_query_groups=3"),
        ({"hidden_size": 66}, "set model.head_dim"),
        ({"params_dtype": "fp8"}, "model.params_dtype"),
        ({"num_layers": 0}, "model.num_layers"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "only 'llama3'"),
        ({"rope_scaling": {"factor": 8, "high_freq_factor": 2.0}}, "model.rope_scaling.high_freq_factor"),
    ],
)
def test_bad_values_name_the_key(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig(**{**BASE, **change})


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="model.hiden_size"):
        ModelConfig.from_dict({**BASE, "hiden_size": 3})


def test_parallel_layout_must_fit_world():
    with pytest.raises(ValueError, match="not divisible by TP\\*PP\\*CP"):
        ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2).validate(6)
    with pytest.raises(ValueError, match="virtual_pipeline_model_parallel_size"):
        ParallelConfig(virtual_pipeline_model_parallel_size=2).validate(2)


def test_layer_spec_errors():
    from psft_megatron.model.layer_specs import build_block_spec
    from psft_megatron.optional import MissingOptionalDependency, is_available

    tc = ModelConfig(**BASE).to_transformer_config(ParallelConfig())
    with pytest.raises(ValueError, match="layer_spec='tee' is not one of te, local, cpu"):
        build_block_spec("tee", tc)
    if not is_available("transformer_engine"):
        with pytest.raises(MissingOptionalDependency, match=r"pip install -e '\.\[te\]'"):
            build_block_spec("te", tc)
