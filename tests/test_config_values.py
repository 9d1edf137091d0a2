"""Every value docs/config.md documents for an enumerated key (its "Enumerated keys" table) is
accepted and reaches the object the trainer builds from it; any other value is a ConfigError
naming the key, raised before torch.distributed starts.

The keys and values are read from the docs, and each key has a probe here: the config is loaded
as a user's overrides are (Hydra, ``configs/tiny_cpu.yaml``), then run through the trainer's own
builders (``run_objects.preflight``: data settings, layer spec, OptimizerConfig, schedule, loss
configs; ``model_config(...).to_transformer_config``; the FP8 config) and the probe reads the
value back from the object built. A documented value without an expectation here, an expectation
for an undocumented value and a documented key without a probe all fail. GPU-only values
(``te``, FP8, the flex dispatcher) are checked as far as a CPU goes: the config objects they
produce, and the one-line error a CPU run gets before distributed start.
"""

from __future__ import annotations

import os

import pytest
import torch

from psft_megatron.config import load_run_config
from psft_megatron.distributed.layout import ParallelConfig
from psft_megatron.errors import ConfigError
from tests.config_docs import enumerated_keys
from tests.parallel.launch import REPO

WORLD = 2  # tiny_cpu's TP=2 + SP on two processes
MOE = ["model.num_experts=4", "model.moe_ffn_hidden_size=32"]
TEMPLATE = ["model.data.train_ds.prompt_template='{input} {output}'"]
VOCAB = 384  # the bundled tokenizer's


class Refused:
    """Expected: building the object raises a ConfigError whose message contains ``fragment``."""

    def __init__(self, fragment: str):
        self.fragment = fragment

    def __eq__(self, other) -> bool:
        return isinstance(other, ConfigError) and self.fragment in str(other)

    def __repr__(self) -> str:
        return f"Refused({self.fragment!r})"


def _outcome(fn, *args):
    try:
        return fn(*args)
    except ConfigError as exc:
        return exc


def _load(overrides):
    cfg, _ = load_run_config(os.path.join(REPO, "configs"), "tiny_cpu", ["trainer.devices=null", *overrides])
    return cfg


def _preflight(cfg):
    from psft_megatron.training.run_objects import preflight

    return preflight(cfg, WORLD, announce=False)


def _transformer_config(cfg):
    """The model's megatron TransformerConfig as the trainer makes it (before fusions / FP8)."""
    from psft_megatron.training.trainer import model_config

    model = model_config(cfg.model.architecture, VOCAB, str(cfg.trainer.precision))
    return model.to_transformer_config(ParallelConfig.from_section(cfg.model))


def _fp8_fields(cfg):
    from psft_megatron.config.loader import fp8_config

    return fp8_config(cfg.model).transformer_config_fields()


def _layer_specs(cfg):
    """(on this CPU box, on a GPU with Transformer Engine)."""
    from psft_megatron.model.fusions import Kernels
    from psft_megatron.training.run_objects import layer_spec

    return (_outcome(layer_spec, cfg, Kernels()), layer_spec(cfg, Kernels(cuda=True, transformer_engine=True)))


def _tokenizer(cfg):
    from psft_megatron.data import build_tokenizer

    return type(build_tokenizer(_preflight(cfg).data.tokenizer)).__name__


def _data(key):
    return lambda cfg: getattr(_preflight(cfg).data.train, key)


def _same(values):
    return {v: v for v in values}


F32, BF16, F16 = (torch.float32, False, False), (torch.bfloat16, True, False), (torch.float16, False, True)
NEEDS_TE = Refused("pip install -e '.[te]'")

#: key -> (overrides that go with every value, probe(cfg) -> value, {documented value: expected}).
#: A value's own extra overrides: EXTRA[(key, value)].
PROBES = {
    "trainer.precision": ([], lambda cfg: (lambda tc: (tc.params_dtype, tc.bf16, tc.fp16))(_transformer_config(cfg)),
                          {"32": F32, "32-true": F32, "bf16": BF16, "bf16-mixed": BF16, "16": F16, "16-mixed": F16}),
    "model.layer_spec": ([], _layer_specs, {"te": (NEEDS_TE, "te"), "local": ("local", "local"), "cpu": ("cpu", "cpu"),
                                            "null": ("cpu", "te")}),
    "model.fp8": ([], lambda cfg: _fp8_fields(cfg).get("fp8"),
                  {"e4m3": "e4m3", "hybrid": "hybrid", "null": None, "true": "hybrid", "false": None}),
    "model.fp8_recipe": (["model.fp8=hybrid"], lambda cfg: _fp8_fields(cfg)["fp8_recipe"],
                         _same(["delayed", "tensorwise", "blockwise", "mxfp8"])),
    "model.fp8_amax_compute_algo": (["model.fp8=hybrid"], lambda cfg: _fp8_fields(cfg)["fp8_amax_compute_algo"],
                                    _same(["most_recent", "max"])),
    "model.moe_aux_loss_type": (MOE, lambda cfg: _transformer_config(cfg).moe_router_load_balancing_type,
                                _same(["aux_loss", "seq_aux_loss", "global_aux_loss", "none"])),
    "model.moe_token_dispatcher_type": (MOE, lambda cfg: _transformer_config(cfg).moe_token_dispatcher_type,
                                        _same(["alltoall", "allgather", "flex"])),
    "model.moe_router_dtype": (MOE, lambda cfg: _transformer_config(cfg).moe_router_dtype,
                               {"fp32": "fp32", "fp64": "fp64", "null": None}),
    "model.optim.name": ([], lambda cfg: (lambda o: (o.optimizer, o.decoupled_weight_decay))(_preflight(cfg).optimizer),
                         {"adam": ("adam", True), "adamw": ("adam", True)}),
    "model.optim.sched.name": ([], lambda cfg: _preflight(cfg).schedule.lr_decay_style,
                               {"constant": "constant", "CosineAnnealing": "cosine", "cosine": "cosine",
                                "linear": "linear", "WarmupAnnealing": "linear"}),
    "model.psft.loss": ([], lambda cfg: _preflight(cfg).loss.kind, _same(["psft", "sft", "dft", "sft_kl", "asft", "eaft"])),
    "model.psft.kl_estimator": (["model.psft.loss=sft_kl"], lambda cfg: _preflight(cfg).loss.kl_estimator,
                                _same(["k1", "k3"])),
    "model.psft.agg_mode": ([], lambda cfg: (lambda p: (p.loss.agg_mode, p.sft_loss.agg_mode))(_preflight(cfg)),
                            {v: (v, v) for v in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")}),
    "model.tokenizer.library": ([], _tokenizer, {"huggingface": "HFTokenizer", "sentencepiece": "SPTokenizer"}),
    "model.data.train_ds.schema": ([], _data("schema"), _same(["auto", "messages", "prompt_response",
                                                              "prompt_template"])),
    "model.data.train_ds.length_policy": ([], _data("length_policy"), _same(["truncate", "drop", "error"])),
    "model.data.train_ds.truncation_side": ([], _data("truncation_side"), _same(["left", "right"])),
    "model.data.train_ds.empty_loss_policy": ([], _data("empty_loss_policy"), _same(["skip", "error"])),
    "model.data.train_ds.truncation_method": (TEMPLATE, _data("truncation_method"), _same(["right", "left"])),
}
EXTRA = {
    ("model.fp8", "true"): ["model.fp8_hybrid=true"],
    ("model.tokenizer.library", "sentencepiece"): ["model.tokenizer.model=examples/data/tiny_spm/tiny.model"],
    ("model.data.train_ds.schema", "prompt_template"): TEMPLATE,
}
DOCUMENTED = enumerated_keys()
CASES = [(key, value) for key, values in DOCUMENTED.items() for value in values]


def test_every_documented_enumerated_key_has_a_probe_and_every_value_an_expectation():
    assert set(DOCUMENTED) == set(PROBES), (set(DOCUMENTED) ^ set(PROBES))
    for key, values in DOCUMENTED.items():
        assert sorted(values) == sorted(PROBES[key][2]), (key, values, sorted(PROBES[key][2]))


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_documented_value_reaches_its_object(key, value, monkeypatch):
    monkeypatch.chdir(REPO)  # tiny_cpu's data and tokenizer paths are relative to the repository
    common, probe, expected = PROBES[key]
    cfg = _load(common + EXTRA.get((key, value), []) + [f"{key}={value}"])
    assert probe(cfg) == expected[value], (key, value)


@pytest.mark.parametrize("key", sorted(PROBES))
def test_any_other_value_is_one_config_error_naming_the_key(key, monkeypatch):
    monkeypatch.chdir(REPO)
    common, probe, _ = PROBES[key]
    with pytest.raises(ConfigError) as err:
        probe(_load(common + [f"{key}=not-a-value"]))
    assert key in err.value.line(), err.value.line()


GPU_ONLY = [("model.layer_spec=te", [], "pip install -e '.[te]'"),
            ("model.fp8=hybrid", [], "needs Transformer Engine"),
            ("model.moe_token_dispatcher_type=flex", MOE, "needs GPUs")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU run gets")
@pytest.mark.parametrize("override,extra,fragment", GPU_ONLY, ids=[o for o, _, _ in GPU_ONLY])
def test_gpu_only_values_stop_a_cpu_run_before_distributed_start(override, extra, fragment, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        _preflight(_load(extra + [override]))
