"""Run-config loading: NeMo-style YAML + overrides, unknown keys named with a suggestion."""

import os

import pytest

from psft_megatron.config import ConfigError, build_run_config, check_layout, load_run_config
from tests.parallel.launch import REPO, worker_env

CONFIGS = os.path.join(REPO, "configs")


def test_tiny_config_loads_with_overrides():
    cfg, raw = load_run_config(CONFIGS, "tiny_cpu", ["model.psft.clip_eps_high=0.2", "trainer.progress_bar=false",
                                                     "model.kv_channels=32"])
    assert cfg.model.psft.clip_eps_high == 0.2 and cfg.trainer.progress_bar is False
    assert cfg.model.architecture["head_dim"] == 32  # NeMo alias
    assert cfg.model.tensor_model_parallel_size == 2 and raw["model"]["psft"]["loss"] == "psft"
    # the ASFT / EAFT keys and their defaults (the papers')
    psft = load_run_config(CONFIGS, "tiny_cpu", ["model.psft.loss=eaft", "model.psft.eaft_topk=8"])[0].model.psft
    assert (psft.loss, psft.eaft_topk, psft.eaft_alpha, psft.asft_kl_coef) == ("eaft", 8, 1.0, 0.1)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.psft.clip_eps_hihg=0.2", "'model.psft.clip_eps_hihg'; did you mean 'clip_eps_high'"),
        ("model.optim.lrr=1", "'model.optim.lrr'; did you mean 'lr'"),
        ("model.num_layer=2", "'model.num_layer'; did you mean 'num_layers'"),
        ("trainer.max_step=3", "'trainer.max_step'; did you mean 'max_steps'"),
        ("model.psft.loss=ppo", "model.psft.loss='ppo' is not one of psft, sft, dft, sft_kl, asft, eaft"),
        ("model.psft.asft_kl_coef=-0.1", "model.psft.asft_kl_coef=-0.1 must be >= 0"),
        ("model.psft.eaft_topk=1", "model.psft.eaft_topk=1 must be >= 2"),
        ("model.psft.eaft_topk=2.5", "model.psft.eaft_topk must be an integer"),
        ("model.psft.eaft_alpha=-1", "model.psft.eaft_alpha=-1"),
        ("model.psft.old_policy_interval=0", "model.psft.old_policy_interval=0 must be >= 1"),
        ("trainer.max_steps=abc", "trainer.max_steps must be an integer"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is not one of"),
        ("model.optim.sched.name=exp", "model.optim.sched.name='exp' is not one of"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(CONFIGS, "tiny_cpu", [override])
    assert message in str(err.value)


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_run_config(CONFIGS, "nope")


@pytest.mark.parametrize(
    "model,world,message",
    [
        ({"num_attention_heads": 6, "num_query_groups": 6, "tensor_model_parallel_size": 4}, 4,
         "model.num_attention_heads=6 is not divisible by model.tensor_model_parallel_size=4"),
        ({"num_attention_heads": 4, "num_query_groups": 1, "tensor_model_parallel_size": 2}, 2,
         "model.num_query_groups=1 is not divisible"),
        ({"num_layers": 3, "pipeline_model_parallel_size": 2}, 2, "model.num_layers=3 is not divisible"),
        ({"global_batch_size": 6, "micro_batch_size": 4}, 1, "model.global_batch_size=6 is not divisible"),
        ({"tensor_model_parallel_size": 2}, 3, "world size 3 is not divisible"),
    ],
)
def test_layout_checks_name_the_keys(model, world, message):
    cfg = build_run_config({"model": model})
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        check_layout(cfg, world)


#: what tools/convert_hf_to_megatron.py records for the models the shipped configs restore
#: (from their HF config.json files), by restore_from_path
RESTORED_MODELS = {
    "/ckpt/qwen2.5-7b-instruct": dict(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                                      num_query_groups=4, vocab_size=152064, max_position_embeddings=32768,
                                      rotary_base=1e6, norm_epsilon=1e-6, add_qkv_bias=True),
    "/ckpt/llama3.1-8b-instruct": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                                       num_query_groups=8, vocab_size=128256, max_position_embeddings=131072,
                                       rotary_base=5e5, norm_epsilon=1e-5,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "/ckpt/qwen3-4b-base": dict(num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32,
                                num_query_groups=8, head_dim=128, vocab_size=151936, max_position_embeddings=32768,
                                rotary_base=1e6, norm_epsilon=1e-6, qk_layernorm=True, tie_word_embeddings=True),
    "/ckpt/qwen3-30b-a3b": dict(num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32,
                                num_query_groups=4, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                                rotary_base=1e6, norm_epsilon=1e-6, qk_layernorm=True, num_experts=128,
                                moe_router_topk=8, moe_ffn_hidden_size=768, moe_norm_topk_prob=True,
                                moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=False,
                                moe_aux_loss_type="aux_loss", moe_aux_loss_coeff=0.001, moe_z_loss_coeff=None,
                                moe_token_dispatcher_type="alltoall", moe_router_dtype="fp32", moe_dense_layers=[]),
}


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".yaml")))
def test_shipped_configs_load_and_fit_their_world(name):
    from psft_megatron.model import ModelConfig
    from psft_megatron.checkpointing.model_record import ModelRecord, merge_architecture

    cfg, _ = load_run_config(CONFIGS, name)
    if cfg.model.restore_from_path:  # the architecture comes from the checkpoint's model.yaml
        record = ModelRecord("model.yaml", RESTORED_MODELS[cfg.model.restore_from_path])
        cfg.model.architecture = merge_architecture(record, cfg.model.architecture)
    check_layout(cfg, (cfg.trainer.devices or 1) * cfg.trainer.num_nodes)
    arch = dict(cfg.model.architecture)
    arch.setdefault("vocab_size", 1000)  # the tiny config takes it from its tokenizer
    ModelConfig.from_dict(arch)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.data.train_ds.file_names=[nope.jsonl]", "model.data.train_ds.file_names[0]: nope.jsonl does not exist"),
        ("model.tokenizer.model=no/such/dir", "model.tokenizer.model: no/such/dir does not exist"),
        ("model.restore_from_path=/no/ckpt", "model.restore_from_path: /no/ckpt is not a directory"),
    ],
)
def test_missing_files_are_named_before_distributed_start(override, message, monkeypatch):
    from psft_megatron.config import check_paths

    monkeypatch.chdir(REPO)
    cfg, _ = load_run_config(CONFIGS, "tiny_cpu", [override])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_paths(cfg)


def test_pretrain_reports_layout_errors_before_distributed_start():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "pretrain_psft.py", "--config-name", "tiny_cpu", "model.num_layers=3",
                           "model.pipeline_model_parallel_size=2", "trainer.devices=null"],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: world size 1 is not divisible by model.tensor_model_parallel_size" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override,message", [
    ("exp_manager.checkpoint_callback_params.every_n_train_steps=-5",
     "exp_manager.checkpoint_callback_params.every_n_train_steps=-5 must be >= 0"),
    ("exp_manager.checkpoint_callback_params.save_top_k=-1",
     "exp_manager.checkpoint_callback_params.save_top_k=-1 must be >= 1"),
    ("trainer.max_consecutive_skipped_steps=-1", "trainer.max_consecutive_skipped_steps=-1 must be >= 0"),
    ("trainer.num_nodes=0", "trainer.num_nodes=0 must be >= 1"),
    ("trainer.devices=0", "trainer.devices=0 must be >= 1"),
])
def test_counts_out_of_range_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(CONFIGS, "tiny_cpu", [override])
    assert message in str(err.value), str(err.value)


def test_invalid_yaml_is_one_line_with_file_and_line(tmp_path):
    with open(os.path.join(CONFIGS, "tiny_cpu.yaml")) as f:
        lines = f.read().splitlines()
    row = next(i for i, line in enumerate(lines) if line.strip() == "max_steps: 100")
    lines[row] = lines[row].replace("100", "[100")  # an unclosed flow sequence
    (tmp_path / "broken.yaml").write_text("\n".join(lines) + "\n")
    (tmp_path / "child.yaml").write_text("defaults:\n  - broken\n  - _self_\nname: child\n")
    for name in ("broken", "child"):  # the error is in the file it is in, also through Hydra's defaults
        with pytest.raises(ConfigError) as err:
            load_run_config(str(tmp_path), name)
        line = err.value.line()
        assert line.startswith(f"config error: {tmp_path / 'broken.yaml'}:{row + 2}:"), line
        assert "invalid YAML" in line and f"(while parsing a flow sequence at line {row + 1})" in line, line
        assert "\n" not in line


def test_parallel_config_is_built_from_the_section_field_by_field():
    """Each layout key reaches its own ParallelConfig field (distinct values: a swap shows), and
    the config section's layout keys are exactly ParallelConfig's fields."""
    import dataclasses

    from psft_megatron.config.schema import ModelSection
    from psft_megatron.distributed.layout import ParallelConfig

    names = [f.name for f in dataclasses.fields(ParallelConfig)]
    section = {f.name: (f.type, f.default) for f in dataclasses.fields(ModelSection)}
    for f in dataclasses.fields(ParallelConfig):
        assert f.name in section and section[f.name][1] == f.default, f.name
    values = {name: value for name, value in zip(
        [n for n in names if n != "sequence_parallel"], (2, 3, 5, 7, 11, 13))}
    assert len(values) == len(names) - 1, "a new layout field: give it a distinct value here"
    overrides = [f"model.{name}={value}" for name, value in values.items()] + ["model.sequence_parallel=true"]
    cfg, _ = load_run_config(CONFIGS, "tiny_cpu", overrides)
    parallel = ParallelConfig.from_section(cfg.model)
    assert {name: getattr(parallel, name) for name in values} == values
    assert parallel.sequence_parallel is True


def test_sequence_parallel_at_tp1_is_turned_off_with_one_warning():
    from psft_megatron.distributed.layout import ParallelConfig

    cfg, _ = load_run_config(CONFIGS, "tiny_cpu", ["model.tensor_model_parallel_size=1", "model.sequence_parallel=true"])
    lines = []
    parallel = ParallelConfig.from_section(cfg.model, warn=lines.append)
    assert parallel.sequence_parallel is False and "SP" not in parallel.describe()
    assert lines == ["WARNING: model.sequence_parallel=true needs model.tensor_model_parallel_size > 1; sequence "
                     "parallelism is off (as Megatron-LM turns it off at TP=1)"]
    quiet = []
    assert ParallelConfig.from_section(load_run_config(CONFIGS, "tiny_cpu")[0].model, warn=quiet.append).sequence_parallel
    assert quiet == []


@pytest.mark.parametrize("overrides,message", [
    # the validation batch inherits model.global_batch_size: name that key, not the one never set
    (["model.global_batch_size=6", "model.micro_batch_size=2", "+model.data.validation_ds.micro_batch_size=4"],
     "model.global_batch_size (the validation batch too: model.data.validation_ds.global_batch_size is not set): 6 "
     "is not divisible by model.data.validation_ds.micro_batch_size * data-parallel size = 4*1"),
    # the training batch: the layout check names it first
    (["model.global_batch_size=6"], "model.global_batch_size=6 is not divisible by model.micro_batch_size * "
                                    "data-parallel size = 4*1"),
    (["model.data.train_ds.max_seq_length=512"], "model.data.train_ds.max_seq_length=512 is longer than "
                                                 "model.max_position_embeddings=256"),
    (["model.data.validation_ds.max_seq_length=300"], "model.data.validation_ds.max_seq_length=300 is longer than "
                                                      "model.max_position_embeddings=256"),
    (["model.psft.agg_mode=mean"], "model.psft.agg_mode='mean' is not one of token-mean"),
    (["model.psft.chunk_size=-1"], "model.psft.chunk_size=-1 must be a positive int"),
    (["model.psft.kl_estimator=full", "model.psft.loss=sft_kl"], "model.psft.kl_estimator=full needs the reference"),
])
def test_preflight_names_the_key_the_value_came_from(overrides, message, monkeypatch):
    from psft_megatron.training.run_objects import preflight

    monkeypatch.chdir(REPO)
    cfg, _ = load_run_config(CONFIGS, "tiny_cpu", ["model.tensor_model_parallel_size=1",
                                                   "model.sequence_parallel=false", *overrides])
    with pytest.raises(ConfigError) as err:
        preflight(cfg, 1, announce=False)
    assert message in str(err.value), str(err.value)
