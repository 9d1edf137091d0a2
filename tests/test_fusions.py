"""Layer-spec choice and megatron's fusion switches per machine (decided in one place)."""

import pytest

from psft_megatron.model.fusions import FUSION_FIELDS, Kernels, default_layer_spec, fusion_fields
from psft_megatron.model.layer_specs import resolve_layer_spec

CPU = Kernels()
GPU = Kernels(cuda=True)
GPU_APEX = Kernels(cuda=True, apex_norm=True, apex_grad_accum=True)
GPU_TE = Kernels(cuda=True, transformer_engine=True)
GPU_TE_APEX = Kernels(cuda=True, transformer_engine=True, apex_norm=True, apex_grad_accum=True)


@pytest.mark.parametrize("kernels,spec", [(CPU, "cpu"), (Kernels(transformer_engine=True), "cpu"), (GPU, "local"),
                                          (GPU_APEX, "local"), (GPU_TE, "te"), (GPU_TE_APEX, "te")])
def test_default_layer_spec(kernels, spec):
    assert default_layer_spec(kernels) == spec
    assert resolve_layer_spec(None, kernels) == spec
    assert resolve_layer_spec("cpu", kernels) == "cpu"


def test_unknown_layer_spec_is_named():
    with pytest.raises(ValueError, match="layer_spec='tee' is not one of te, local, cpu"):
        resolve_layer_spec("tee", CPU)


def _on(fields):
    return {name for name, value in fields.items() if value}


@pytest.mark.parametrize(
    "spec,kernels,on",
    [
        ("cpu", GPU_TE_APEX, set()),  # the reference: plain torch everywhere
        ("local", CPU, set()),  # megatron's fusions are CUDA kernels (jit / apex)
        ("local", GPU, {"bias_activation_fusion", "bias_dropout_fusion"}),
        ("local", GPU_APEX, {"bias_activation_fusion", "bias_dropout_fusion", "gradient_accumulation_fusion"}),
        ("local", GPU_TE, {"bias_activation_fusion", "bias_dropout_fusion"}),  # local stays TE-free
        ("te", GPU_TE, {"bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion"}),
        ("te", GPU_TE_APEX, {"bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
                             "gradient_accumulation_fusion"}),
    ],
)
def test_fusion_switches(spec, kernels, on):
    fields = fusion_fields(spec, kernels)
    assert set(fields) == set(FUSION_FIELDS)
    assert _on(fields) == on


def test_fusion_switches_reach_the_transformer_config():
    from psft_megatron.model import ModelConfig
    from psft_megatron.distributed.runtime import ParallelConfig

    arch = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=100)
    config = arch.to_transformer_config(ParallelConfig(), **fusion_fields("local", GPU_APEX))
    assert config.bias_activation_fusion and config.bias_dropout_fusion and config.gradient_accumulation_fusion
    assert not config.apply_rope_fusion and not config.masked_softmax_fusion
    plain = arch.to_transformer_config(ParallelConfig())
    assert not any(getattr(plain, name) for name in FUSION_FIELDS)


KERNEL_MODULES = ("transformer_engine", "apex", "fused_layer_norm_cuda", "fused_weight_gradient_mlp_cuda")


class _Machine:
    """A meta-path finder that makes exactly ``installed`` of KERNEL_MODULES importable (empty
    stand-ins under ``root``; ``broken``: one whose import raises) and the others absent."""

    def __init__(self, root, installed, broken=()):
        self.root = str(root)
        for name in installed:
            (root / f"{name}.py").write_text("raise ImportError('broken install')\n" if name in broken else "")
        self.installed = set(installed)

    def find_spec(self, name, path=None, target=None):
        import importlib.machinery

        if name not in KERNEL_MODULES:
            return None
        if name not in self.installed:
            raise ModuleNotFoundError(f"No module named {name!r} (not on this simulated machine)", name=name)
        return importlib.machinery.PathFinder.find_spec(name, [self.root])


@pytest.mark.parametrize("cuda,installed,broken,expected", [
    # no GPU: the CUDA-only kernels count for nothing, whatever is installed
    (False, KERNEL_MODULES, (), Kernels(transformer_engine=True)),
    (True, (), (), GPU),
    (True, ("apex",), (), GPU),  # apex's Python package without its CUDA extensions
    (True, ("apex", "fused_layer_norm_cuda"), (), Kernels(cuda=True, apex_norm=True)),
    (True, ("fused_layer_norm_cuda", "fused_weight_gradient_mlp_cuda"), (), Kernels(cuda=True, apex_grad_accum=True)),
    (True, KERNEL_MODULES, (), GPU_TE_APEX),
    (True, ("transformer_engine",), ("transformer_engine",), GPU),  # a TE that fails to import
])
def test_machine_detection(monkeypatch, tmp_path, cuda, installed, broken, expected):
    import sys

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for name in KERNEL_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Machine(tmp_path, installed, broken)] + sys.meta_path)
    assert Kernels.detect() == expected
