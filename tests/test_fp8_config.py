"""FP8 settings on CPU: both spellings validated and translated into megatron's
TransformerConfig / DDP fields, clear errors before distributed start, GPU requirements."""

import dataclasses
import os

import pytest
import torch

from psft_megatron.config import ConfigError, check_requirements, load_run_config
from psft_megatron.config.loader import fp8_config
from psft_megatron.model.fp8 import FP8Config, fp8_hardware_problem
from tests.parallel.launch import REPO, worker_env

CONFIGS = os.path.join(REPO, "configs")
#: the TransformerConfig fields an FP8 run sets; every other field stays the bf16 run's
FP8_FIELDS = ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_param")


def _fp8(*overrides):
    cfg, _ = load_run_config(CONFIGS, "tiny_cpu", list(overrides))
    return fp8_config(cfg.model)


def _transformer_config(fp8: FP8Config):
    from psft_megatron.model import ModelConfig
    from psft_megatron.distributed.runtime import ParallelConfig

    arch = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=100,
                       params_dtype="bfloat16")
    return arch.to_transformer_config(ParallelConfig(), **fp8.transformer_config_fields())


def test_fp8_is_off_by_default_and_with_nemo_off_switch():
    assert not _fp8().enabled
    # NeMo's shipped megatron_gpt_config.yaml: fp8 false, fp8_hybrid true, history 1024, algo max
    off = _fp8("model.fp8=false", "model.fp8_hybrid=true", "model.fp8_amax_history_len=1024",
               "model.fp8_amax_compute_algo=max", "model.fp8_interval=1", "model.reduce_amax=true")
    assert not off.enabled and off.transformer_config_fields() == {} and off.ddp_config_fields() == {}
    assert _transformer_config(off).fp8 is None


@pytest.mark.parametrize(
    "overrides,expected",
    [
        # megatron-core / NeMo 2 spelling
        (["model.fp8=hybrid"], dict(fp8="hybrid", fp8_recipe="delayed", fp8_margin=0, fp8_amax_history_len=1,
                                     fp8_amax_compute_algo="most_recent", fp8_param=False)),
        (["model.fp8=e4m3", "model.fp8_recipe=delayed", "model.fp8_margin=2", "model.fp8_amax_history_len=1024",
          "model.fp8_amax_compute_algo=max"],
         dict(fp8="e4m3", fp8_recipe="delayed", fp8_margin=2, fp8_amax_history_len=1024, fp8_amax_compute_algo="max")),
        (["model.fp8=hybrid", "model.fp8_recipe=tensorwise"], dict(fp8="hybrid", fp8_recipe="tensorwise")),
        (["model.fp8=e4m3", "model.fp8_recipe=blockwise"], dict(fp8="e4m3", fp8_recipe="blockwise")),
        (["model.fp8=e4m3", "model.fp8_recipe=mxfp8", "model.fp8_param_gather=true",
          "model.optim.use_distributed_optimizer=true"], dict(fp8="e4m3", fp8_recipe="mxfp8", fp8_param=True)),
        # NeMo 1 spelling
        (["model.fp8=true", "model.fp8_hybrid=true", "model.fp8_e4m3=false", "model.fp8_margin=1",
          "model.fp8_amax_history_len=32", "model.fp8_amax_compute_algo=max", "model.fp8_interval=1",
          "model.reduce_amax=true"],
         dict(fp8="hybrid", fp8_recipe="delayed", fp8_margin=1, fp8_amax_history_len=32, fp8_amax_compute_algo="max")),
        (["model.fp8=true", "model.fp8_e4m3=true"], dict(fp8="e4m3")),
        (["model.fp8=true", "model.fp8_hybrid=true", "model.fp8_params=true",
          "model.optim.use_distributed_optimizer=true"], dict(fp8="hybrid", fp8_param=True)),
    ],
)
def test_fp8_keys_are_translated_into_the_transformer_config(overrides, expected):
    fp8 = _fp8(*overrides)
    config = _transformer_config(fp8)
    for field, value in expected.items():
        assert getattr(config, field) == value, (field, getattr(config, field), value)
    assert fp8.ddp_config_fields() == {"fp8_param_gather": expected.get("fp8_param", False)}
    # the FP8 region is megatron's: every other field is the bf16 run's without FP8
    got, bf16 = _fields_besides_fp8(config), _fields_besides_fp8(_transformer_config(FP8Config()))
    assert got.keys() == bf16.keys() and not [k for k in got if got[k] != bf16[k]], \
        {k: (got.get(k), bf16.get(k)) for k in got.keys() | bf16.keys() if got.get(k) != bf16.get(k)}
    assert config.bf16 and config.params_dtype == torch.bfloat16


def _fields_besides_fp8(config) -> dict:
    """The config's fields other than those FP8 sets (init methods: fresh callables each time)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in FP8_FIELDS and not callable(getattr(config, f.name))}


def test_fp8_param_gather_reaches_megatrons_ddp_config():
    from megatron.core.distributed import DistributedDataParallelConfig

    fp8 = _fp8("model.fp8=hybrid", "model.fp8_param_gather=true", "model.optim.use_distributed_optimizer=true")
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, **fp8.ddp_config_fields())
    assert ddp.fp8_param_gather is True


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.fp8=e5m2"], "model.fp8='e5m2' is not one of e4m3, hybrid (or true with model.fp8_e4m3"),
        (["model.fp8=true"], "model.fp8=true (NeMo's spelling) needs exactly one of model.fp8_e4m3=true or "
                             "model.fp8_hybrid=true, got neither"),
        (["model.fp8=true", "model.fp8_e4m3=true", "model.fp8_hybrid=true"], "got fp8_e4m3=true, fp8_hybrid=true"),
        (["model.fp8=hybrid", "model.fp8_e4m3=true"], "model.fp8=hybrid conflicts with model.fp8_e4m3=true"),
        (["model.fp8=hybrid", "model.fp8_recipe=nvfp4"],
         "model.fp8_recipe='nvfp4' is not one of delayed, tensorwise, blockwise, mxfp8"),
        (["model.fp8=hybrid", "model.fp8_amax_compute_algo=mean"], "model.fp8_amax_compute_algo='mean' is not one of"),
        (["model.fp8=hybrid", "model.fp8_amax_history_len=0"], "model.fp8_amax_history_len=0 must be >= 1"),
        (["model.fp8=hybrid", "model.fp8_margin=-1"], "model.fp8_margin=-1 must be >= 0"),
        (["model.fp8=hybrid", "model.fp8_recipe=tensorwise", "model.fp8_amax_history_len=1024"],
         "model.fp8_amax_history_len=1024 applies to model.fp8_recipe=delayed only"),
        (["model.fp8=hybrid", "model.fp8_recipe=mxfp8", "model.fp8_margin=1"],
         "model.fp8_margin=1 applies to model.fp8_recipe=delayed only"),
        (["model.fp8=hybrid", "model.fp8_interval=4"], "model.fp8_interval=4: Transformer Engine >= 1.8 ignores it"),
        (["model.fp8=hybrid", "model.reduce_amax=false"], "model.reduce_amax=false is not supported"),
        (["model.fp8=hybrid", "model.fp8_param_gather=true", "model.fp8_params=false"],
         "model.fp8_param_gather=true conflicts with its NeMo spelling model.fp8_params=false"),
        (["model.fp8=hybrid", "model.fp8_param_gather=true"],
         "model.fp8_param_gather=true needs model.optim.use_distributed_optimizer=true"),
        (["model.fp8=hybrid", "model.fp8_e4m3=yes"], "model.fp8_e4m3 must be true or false"),
        (["model.fp8=hybrid", "model.fp8_margin=abc"], "model.fp8_margin must be an integer"),
        (["model.fp8_recipe=delayd"], "model.fp8_recipe='delayd' is not one of"),  # checked even with FP8 off
    ],
)
def test_bad_fp8_settings_are_named_at_load(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(CONFIGS, "tiny_cpu", overrides)
    assert message in str(err.value)


def test_misspelled_fp8_key_gets_a_suggestion():
    with pytest.raises(ConfigError, match="'model.fp8_recipie'; did you mean 'fp8_recipe'"):
        load_run_config(CONFIGS, "tiny_cpu", ["model.fp8_recipie=delayed"])


def test_fp8_without_transformer_engine_fails_before_start_with_the_install_hint():
    from psft_megatron.optional import is_available

    if is_available("transformer_engine"):
        pytest.skip("transformer-engine is installed here")
    for overrides in (["model.fp8=hybrid"], ["model.fp8=true", "model.fp8_e4m3=true"]):
        cfg, _ = load_run_config(CONFIGS, "tiny_cpu", overrides)
        with pytest.raises(ConfigError, match=r"model.fp8=(hybrid|e4m3) needs Transformer Engine.*pip install -e '\.\[te\]'"):
            check_requirements(cfg)


def test_fp8_with_another_layer_spec_or_no_fp8_gpu_is_named(monkeypatch):
    import psft_megatron.optional as optional

    monkeypatch.setattr(optional, "is_available", lambda module: True)  # as if TE were installed
    cfg, _ = load_run_config(CONFIGS, "tiny_cpu", ["model.fp8=hybrid", "model.layer_spec=local"])
    with pytest.raises(ConfigError, match="model.fp8=hybrid needs model.layer_spec=te, got 'local'"):
        check_requirements(cfg)
    cfg, _ = load_run_config(CONFIGS, "tiny_cpu", ["model.fp8=hybrid", "model.layer_spec=null"])
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr("torch.cuda.get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr("torch.version.cuda", "12.4")
    with pytest.raises(ConfigError, match=r"model.fp8_recipe=delayed needs FP8 .*compute capability >= 8.9; "
                                          r"NVIDIA A100-SXM4-80GB has compute capability 8.0, CUDA 12.4"):
        check_requirements(cfg)
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda device=None: (9, 0))
    check_requirements(cfg)  # an H100 / H200 passes


@pytest.mark.parametrize(
    "recipe,capability,cuda,problem",
    [
        ("delayed", None, None, "this machine has no CUDA device"),
        ("delayed", (8, 0), "12.4", "compute capability >= 8.9"),
        ("tensorwise", (8, 9), "12.0", "CUDA >= 12.1 on Ada"),
        ("tensorwise", (8, 9), "12.4", None),
        ("delayed", (9, 0), "12.4", None),
        ("blockwise", (9, 0), "12.4", "CUDA >= 12.9"),
        ("blockwise", (9, 0), "12.9", None),
        ("blockwise", (8, 9), "12.9", "compute capability >= 9.0"),
        ("mxfp8", (9, 0), "12.8", "compute capability >= 10.0 and < 12.0"),
        ("mxfp8", (10, 0), "12.8", None),
        ("mxfp8", (12, 0), "12.8", "compute capability >= 10.0 and < 12.0"),
    ],
)
def test_fp8_hardware_requirements_follow_transformer_engine(recipe, capability, cuda, problem):
    found = fp8_hardware_problem(FP8Config(format="hybrid", recipe=recipe), capability, cuda, "GPU")
    if problem is None:
        assert found is None
    else:
        assert problem in found and f"model.fp8_recipe={recipe}" in found
    assert fp8_hardware_problem(FP8Config(), capability, cuda) is None  # FP8 off: nothing to check


def test_fp8_alignment_pads_every_ranks_share_of_the_sequence():
    from psft_megatron.data.lengths import required_multiple

    assert FP8Config().align_size == 1
    assert FP8Config(format="hybrid").align_size == 16
    assert FP8Config(format="e4m3", recipe="mxfp8").align_size == 32
    assert required_multiple(1, 1, False, 1) == 1
    assert required_multiple(1, 1, False, 16) == 16
    assert required_multiple(2, 1, True, 16) == 32  # SP: s / TP per rank
    assert required_multiple(2, 1, False, 16) == 16  # no SP: every TP rank sees the whole sequence
    assert required_multiple(2, 2, True, 32) == 128  # s / (CP * TP) per rank, a multiple of 32
    assert required_multiple(1, 2, False, 16) == 32  # 2*CP chunks, s / CP per rank


def test_pretrain_exits_with_the_install_hint_before_distributed_start():
    import subprocess
    import sys

    from psft_megatron.optional import is_available

    if is_available("transformer_engine"):
        pytest.skip("transformer-engine is installed here")
    proc = subprocess.run([sys.executable, "pretrain_psft.py", "--config-name", "tiny_cpu", "model.fp8=true",
                           "model.fp8_hybrid=true", "trainer.devices=null", "model.tensor_model_parallel_size=1"],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("config error: model.fp8=hybrid needs Transformer Engine, which is not installed: "
            "pip install -e '.[te]'") in proc.stderr
    assert "Traceback" not in proc.stderr and "process group" not in proc.stderr.lower()
