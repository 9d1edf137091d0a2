"""HF <-> Megatron converters for the MoE classes Qwen3MoeForCausalLM and Qwen2MoeForCausalLM.

In-process checks of the config mapping, the tensor mapping and the refusals (no megatron
runtime), then two launches (tests/parallel/convert_moe_worker.py): ``prepare`` in a world of
one (tiny random HF models built with transformers, converted with the tools, TP=EP=1 logits,
export and bit-exact round trip, export without a template, ``--verify``, a planted expert-order
bug) and ``layouts`` under torchrun with 4 gloo processes (EP=1, EP=2, EP=4, TP=2+EP=2 with
ETP 2 and 1, PP=2, PP=2+EP=2, the allgather dispatcher; export of a checkpoint saved at
TP=2+EP=2). Logits are compared with the HF model's in fp32: max |diff| <= 1e-4, as for the
dense families.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from psft_megatron.convert import ConversionError, convert_hf_to_megatron, mapping
from psft_megatron.convert.hf_config import hf_config_from_model, model_config_from_hf
from tests.parallel.convert_moe_worker import LAYOUTS, MOE_FAMILIES, SAVE_LAYOUT
from tests.parallel.convert_worker import TOLERANCE
from tests.parallel.launch import REPO, hang_guard, torchrun, worker_env

QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "attention_bias": False,
    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "output_router_logits": False,
}
QWEN2_MOE = dict(
    {k: v for k, v in QWEN3_MOE.items() if k not in ("head_dim", "attention_bias")},
    architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", shared_expert_intermediate_size=24,
    norm_topk_prob=False, qkv_bias=True)


# ----------------------------------------------------------------------------- config and mapping
def test_qwen3_moe_config():
    cfg, arch = model_config_from_hf(dict(QWEN3_MOE, router_aux_loss_coef=0.01))
    assert arch == "Qwen3MoeForCausalLM" and cfg.qk_layernorm and not cfg.add_qkv_bias
    assert (cfg.num_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (4, 2, 16)
    assert cfg.moe_norm_topk_prob and cfg.moe_dense_layers == [] and cfg.moe_aux_loss_coeff == 0.01
    assert cfg.moe_shared_expert_intermediate_size is None and not cfg.moe_shared_expert_gate
    # transformers 5 writes the expert count as num_local_experts
    spelled = {k: v for k, v in QWEN3_MOE.items() if k != "num_experts"}
    assert model_config_from_hf(dict(spelled, num_local_experts=4))[0] == model_config_from_hf(QWEN3_MOE)[0]


def test_qwen2_moe_config_has_gated_shared_expert():
    cfg, arch = model_config_from_hf(QWEN2_MOE)
    assert arch == "Qwen2MoeForCausalLM" and cfg.add_qkv_bias and not cfg.qk_layernorm
    assert cfg.moe_shared_expert_intermediate_size == 24 and cfg.moe_shared_expert_gate
    assert not cfg.moe_norm_topk_prob
    assert not model_config_from_hf(dict(QWEN2_MOE, qkv_bias=False))[0].add_qkv_bias


@pytest.mark.parametrize("step,only,dense", [
    (1, [], []), (2, [], [0, 2]), (1, [1, 3], [1, 3]), (2, [1], [0, 1, 2]), (4, [], [0, 1, 2]),
])
def test_dense_layers_follow_decoder_sparse_step_and_mlp_only_layers(step, only, dense):
    """HF: layer i is sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    cfg, _ = model_config_from_hf(dict(QWEN3_MOE, decoder_sparse_step=step, mlp_only_layers=only))
    assert cfg.moe_dense_layers == dense
    assert [mapping.is_moe_layer(cfg, i) for i in range(4)] == [i not in dense for i in range(4)]


@pytest.mark.parametrize("config", [QWEN3_MOE, dict(QWEN2_MOE, decoder_sparse_step=2), dict(QWEN3_MOE, mlp_only_layers=[0])])
def test_hf_config_round_trips_through_model_config(config):
    cfg, arch = model_config_from_hf(config)
    generated = hf_config_from_model(cfg)  # no template: decoder_sparse_step 1 + the dense layers listed
    again, arch2 = model_config_from_hf(generated)
    assert again == cfg and arch2 == arch
    assert hf_config_from_model(cfg, template=config)["architectures"] == [arch]


def test_template_ignores_training_only_moe_keys():
    """The load-balancing loss, dispatcher and router precision are training choices: a run may
    change them and still export with its source's config.json."""
    cfg, _ = model_config_from_hf(QWEN3_MOE)
    trained = type(cfg)(**dict(vars(cfg), moe_aux_loss_coeff=0.1, moe_z_loss_coeff=1e-3,
                               moe_token_dispatcher_type="allgather", moe_router_dtype=None))
    assert hf_config_from_model(trained, template=QWEN3_MOE)["num_experts"] == 4
    with pytest.raises(ConversionError, match=r"moe_router_topk: template 2 vs checkpoint 3"):
        hf_config_from_model(type(cfg)(**dict(vars(cfg), moe_router_topk=3)), template=QWEN3_MOE)


def test_moe_layer_rules():
    cfg, _ = model_config_from_hf(dict(QWEN2_MOE, mlp_only_layers=[1]))
    names = {r.megatron: r.hf for r in mapping.all_rules(cfg)}
    m, h = "decoder.layers.0.mlp.", "model.layers.0.mlp."
    assert names[m + "router.weight"] == [h + "gate.weight"]
    assert names[m + "experts.local_experts.3.linear_fc1.weight"] == [h + "experts.3.gate_proj.weight",
                                                                      h + "experts.3.up_proj.weight"]
    assert names[m + "experts.local_experts.3.linear_fc2.weight"] == [h + "experts.3.down_proj.weight"]
    assert names[m + "shared_experts.linear_fc1.weight"] == [h + "shared_expert.gate_proj.weight",
                                                             h + "shared_expert.up_proj.weight"]
    assert names[m + "shared_experts.gate_weight"] == [h + "shared_expert_gate.weight"]
    assert names["decoder.layers.1.mlp.linear_fc1.weight"] == ["model.layers.1.mlp.gate_proj.weight",
                                                              "model.layers.1.mlp.up_proj.weight"]
    assert not any(n.startswith("decoder.layers.1.mlp.router") for n in names)
    # every HF tensor is read by exactly one rule, and hf_shapes lists exactly those
    read = [n for hf in names.values() for n in hf]
    assert len(read) == len(set(read)) and set(read) == set(mapping.hf_shapes(cfg))
    shapes = mapping.hf_shapes(cfg)
    assert shapes[h + "experts.0.gate_proj.weight"] == (16, 32) and shapes[h + "shared_expert_gate.weight"] == (1, 32)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (32, 48)


# ----------------------------------------------------------------------------- refusals
def write_hf(tmp_path, config, drop=(), add=None):
    """A fake HF directory: config.json + random tensors of the right shapes (minus ``drop``, plus ``add``)."""
    cfg, _ = model_config_from_hf(config)
    tensors = {n: torch.randn(s) for n, s in mapping.hf_shapes(cfg).items() if n not in drop}
    tensors.update(add or {})
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


@pytest.mark.parametrize("change,match", [
    (dict(attention_bias=True), r"Qwen3MoeForCausalLM with attention_bias=true is not supported"),
    (dict(num_experts=0), r"Qwen3MoeForCausalLM: config.json num_experts=0 must be an integer >= 1"),
    (dict(decoder_sparse_step=0), r"decoder_sparse_step=0 must be an integer >= 1"),
    (dict(num_experts_per_tok=5), r"moe_router_topk=5 is larger than model.num_experts=4"),
    (dict(mlp_only_layers=[0, 1, 2, 3]), r"names every layer: no MoE layer is left"),
    (dict(mlp_only_layers="0"), r"mlp_only_layers='0' must be a list"),
])
def test_unsupported_moe_configs_are_named(change, match):
    with pytest.raises(ConversionError, match=match):
        model_config_from_hf(dict(QWEN3_MOE, **change))


def test_qwen2_moe_needs_its_shared_expert():
    config = {k: v for k, v in QWEN2_MOE.items() if k != "shared_expert_intermediate_size"}
    with pytest.raises(ConversionError, match="Qwen2MoeForCausalLM: config.json has no 'shared_expert_intermediate_size'"):
        model_config_from_hf(config)


def test_export_refuses_what_the_architecture_cannot_express():
    qwen3, _ = model_config_from_hf(QWEN3_MOE)
    qwen2, _ = model_config_from_hf(QWEN2_MOE)
    with pytest.raises(ConversionError, match="Qwen3ForCausalLM is a dense architecture, but the model has num_experts=4"):
        hf_config_from_model(qwen3, architecture="Qwen3ForCausalLM")
    with pytest.raises(ConversionError, match="Qwen2MoeForCausalLM needs a gated shared expert"):
        hf_config_from_model(type(qwen2)(**dict(vars(qwen2), add_qkv_bias=True, moe_shared_expert_gate=False)))
    with pytest.raises(ConversionError, match="Qwen3MoeForCausalLM has no shared expert"):
        hf_config_from_model(type(qwen2)(**dict(vars(qwen2), qk_layernorm=True, add_qkv_bias=False)),
                             architecture="Qwen3MoeForCausalLM")


def test_missing_expert_tensor_names_tensor_and_file(tmp_path):
    d = write_hf(tmp_path, QWEN3_MOE, drop=["model.layers.2.mlp.experts.3.up_proj.weight"])
    with pytest.raises(ConversionError, match=r"'model.layers.2.mlp.experts.3.up_proj.weight' is missing from "
                                              r".*model.safetensors"):
        convert_hf_to_megatron(d, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_expert_shape_mismatch_is_named(tmp_path):
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    d = write_hf(tmp_path, QWEN3_MOE, drop=[name], add={name: torch.randn(32, 20)})
    with pytest.raises(ConversionError, match=rf"'{name}' in .*model.safetensors has shape \[32, 20\], config.json "
                                              r"implies \[32, 16\]"):
        convert_hf_to_megatron(d, str(tmp_path / "out"))


def test_fused_expert_layout_is_explained(tmp_path):
    experts = [f"model.layers.0.mlp.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")]
    d = write_hf(tmp_path, QWEN3_MOE, drop=experts, add={"model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 32, 32),
                                                         "model.layers.0.mlp.experts.down_proj": torch.randn(4, 32, 16)})
    with pytest.raises(ConversionError, match=r"'model.layers.0.mlp.experts.down_proj' in .*model.safetensors holds "
                                              r"all experts of a layer in one 3-D tensor"):
        convert_hf_to_megatron(d, str(tmp_path / "out"))


def test_experts_of_a_dense_layer_are_refused(tmp_path):
    d = write_hf(tmp_path, dict(QWEN3_MOE, mlp_only_layers=[1]),
                 add={"model.layers.1.mlp.gate.weight": torch.randn(4, 32)})
    with pytest.raises(ConversionError, match=r"not covered by the converter.*model.layers.1.mlp.gate.weight"):
        convert_hf_to_megatron(d, str(tmp_path / "out"))


# ----------------------------------------------------------------------------- end to end
_cache = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("convert_moe"))


def prepared(workdir) -> dict:
    if "prepare" not in _cache:
        out = os.path.join(workdir, "prepare.json")
        env = worker_env()
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tests/parallel/convert_moe_worker.py"), "prepare",
                               "--workdir", workdir, "--out", out], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=hang_guard(600))
        if proc.returncode != 0 or not os.path.exists(out):
            raise AssertionError(f"prepare failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
        with open(out) as f:
            _cache["prepare"] = json.load(f)
    return _cache["prepare"]


def layouts(workdir) -> dict:
    prepared(workdir)
    if "layouts" not in _cache:
        _cache["layouts"] = torchrun("tests/parallel/convert_moe_worker.py", 4, ["layouts", "--workdir", workdir])
    return _cache["layouts"]


def _entry(result, key):
    entry = result[key]
    assert "error" not in entry, f"{key}: {entry.get('error')}\n{entry.get('traceback', '')}"
    return entry


def _bit_exact(trip):
    assert trip["missing"] == [] and trip["extra"] == [] and trip["different"] == [], trip


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_tp1_logits_match_hf(workdir, family):
    entry = _entry(prepared(workdir), family)
    assert entry["tp1"]["max_abs_diff"] <= TOLERANCE, entry["tp1"]
    assert entry["tp1"]["argmax_agreement"] == 1.0


def test_model_configs_read_from_hf(workdir):
    qwen3 = _entry(prepared(workdir), "qwen3_moe")["model_config"]
    qwen2 = _entry(prepared(workdir), "qwen2_moe")["model_config"]
    assert qwen3["moe_dense_layers"] == [2] and qwen3["moe_norm_topk_prob"] and qwen3["qk_layernorm"]
    assert qwen2["moe_dense_layers"] == [0, 2] and not qwen2["moe_norm_topk_prob"] and qwen2["add_qkv_bias"]
    assert qwen2["moe_shared_expert_intermediate_size"] == 48 and qwen2["moe_shared_expert_gate"]


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_round_trip_is_bit_exact(workdir, family):
    entry = _entry(prepared(workdir), family)
    _bit_exact(entry["round_trip"])
    assert entry["round_trip"]["num_tensors"] > 100  # experts one by one
    assert entry["load_info"] == {"missing_keys": [], "unexpected_keys": [], "warnings": []}, entry["load_info"]
    assert entry["exported_logits"]["max_abs_diff"] == 0.0
    files = entry["side_files"]
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"} <= set(files)
    assert sum(f.endswith(".safetensors") for f in files) > 1


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_export_without_template(workdir, family):
    entry = _entry(prepared(workdir), family)["no_template"]
    assert entry["architecture"] == [MOE_FAMILIES[family][0].replace("Config", "ForCausalLM")]
    _bit_exact(entry["round_trip"])
    assert entry["load_info"] == {"missing_keys": [], "unexpected_keys": [], "warnings": []}, entry["load_info"]
    assert entry["exported_logits"]["max_abs_diff"] == 0.0  # generated config.json: the same model


def test_verify_option_reports_logit_diff(workdir):
    result = prepared(workdir)
    for family, key in (("qwen3_moe", "import"), ("qwen2_moe", "export")):
        numbers = _entry(result, family)[key]["verify"]
        assert numbers["max_abs_diff"] <= TOLERANCE and numbers["argmax_agreement"] == 1.0, numbers
    assert result["qwen3_moe"]["import"]["architecture"] == "Qwen3MoeForCausalLM"


def test_planted_expert_order_bug_is_caught(workdir):
    entry = _entry(prepared(workdir), "planted_expert_order")
    assert entry["tp1"]["max_abs_diff"] > 100 * TOLERANCE, entry


LAYOUT_CASES = [(family, layout) for layout in LAYOUTS for family in MOE_FAMILIES]


@pytest.mark.parametrize("family,layout", LAYOUT_CASES, ids=[f"{f}-{l}" for f, l in LAYOUT_CASES])
def test_logits_match_hf_at_layout(workdir, family, layout):
    entry = _entry(layouts(workdir), f"{family}/{layout}")
    assert entry["ranks_checked"] >= 1, entry
    assert entry["max_abs_diff"] <= TOLERANCE, entry


def test_export_of_checkpoint_saved_at_tp2_ep2_is_bit_exact(workdir):
    entry = _entry(layouts(workdir), "export_from_" + SAVE_LAYOUT)
    _bit_exact(entry)
    assert entry["num_tensors"] > 100
