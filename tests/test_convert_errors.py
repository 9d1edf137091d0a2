"""Converter validation and layout helpers, in-process (no megatron runtime needed).

Unsupported architectures / RoPE types / features, missing tensors and shape mismatches must
fail before anything is written, with messages naming the architecture, tensor and file.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from psft_megatron.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf, mapping
from psft_megatron.convert.hf_config import hf_config_from_model, model_config_from_hf
from psft_megatron.convert.hf_io import ShardedSafetensorsWriter

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 16384, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


def write_hf(tmp_path, config, drop=(), reshape=None, shards=1):
    """A fake HF directory: config.json + random tensors of the right shapes (minus ``drop``)."""
    cfg, _ = model_config_from_hf(config)
    tensors = {n: torch.randn(s) for n, s in mapping.hf_shapes(cfg).items() if n not in drop}
    if reshape:
        tensors[reshape[0]] = torch.randn(reshape[1])
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        writer = ShardedSafetensorsWriter(str(d), max_shard_bytes=4096)
        for n, t in tensors.items():
            writer.add(n, t)
        writer.close()
    return str(d)


def test_unsupported_architecture_is_named(tmp_path):
    config = dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral")
    d = write_hf(tmp_path, LLAMA)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"'MistralForCausalLM' is not supported; supported: LlamaForCausalLM, "
                                              r"Qwen2ForCausalLM, Qwen3ForCausalLM"):
        convert_hf_to_megatron(d, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}, r"'yarn' is not supported"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, r"'linear' is not supported"),
    (dict(LLAMA["rope_parameters"], low_freq_factor=2.0), r"low_freq_factor=2.0 is not supported.*hard-codes"),
    (dict(LLAMA["rope_parameters"], original_max_position_embeddings=4096), r"original_max_position_embeddings=4096"),
])
def test_unsupported_rope_scaling_is_refused(rope, match):
    with pytest.raises(ConversionError, match=match):
        model_config_from_hf(dict(LLAMA, rope_parameters=rope))


def test_legacy_rope_scaling_spelling_is_read():
    config = {k: v for k, v in LLAMA.items() if k != "rope_parameters"}
    config.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg, arch = model_config_from_hf(config)
    assert arch == "LlamaForCausalLM" and cfg.rotary_base == 500000.0 and cfg.rope_scaling["factor"] == 32.0


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=true"),
    ("mlp_bias", True, "mlp_bias=true"),
])
def test_unsupported_features_are_named(field, value, match):
    with pytest.raises(ConversionError, match=match):
        model_config_from_hf(dict(LLAMA, **{field: value}))


@pytest.mark.parametrize("shards", [1, 3])
def test_missing_tensor_names_tensor_and_file(tmp_path, shards):
    d = write_hf(tmp_path, LLAMA, drop=["model.layers.1.self_attn.k_proj.weight"], shards=shards)
    file = "model.safetensors" if shards == 1 else "model.safetensors.index.json"
    with pytest.raises(ConversionError, match=rf"'model.layers.1.self_attn.k_proj.weight' is missing from .*{file}"):
        convert_hf_to_megatron(d, str(tmp_path / "out"))


def test_tensor_missing_from_the_shard_its_index_names(tmp_path):
    d = write_hf(tmp_path, LLAMA, shards=3)
    path = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(path))
    name = "model.layers.0.mlp.up_proj.weight"
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    json.dump(index, open(path, "w"))
    with pytest.raises(ConversionError, match=rf"'{name}' is missing from .*{wrong} \(named there by model.safetensors.index.json\)"):
        convert_hf_to_megatron(d, str(tmp_path / "out"))


def test_shape_mismatch_names_tensor(tmp_path):
    d = write_hf(tmp_path, LLAMA, reshape=("model.layers.0.mlp.gate_proj.weight", (40, 32)))
    with pytest.raises(ConversionError, match=r"'model.layers.0.mlp.gate_proj.weight' in .*model.safetensors has "
                                              r"shape \[40, 32\], config.json implies \[48, 32\]"):
        convert_hf_to_megatron(d, str(tmp_path / "out"))


def test_unexpected_tensors_are_refused(tmp_path):
    d = write_hf(tmp_path, LLAMA, reshape=("model.layers.0.self_attn.o_proj.bias", (32,)))
    with pytest.raises(ConversionError, match=r"not covered by the converter.*o_proj.bias"):
        convert_hf_to_megatron(d, str(tmp_path / "out"))


def test_template_mismatch_is_named():
    cfg, _ = model_config_from_hf(LLAMA)
    with pytest.raises(ConversionError, match="num_layers: template 3 vs checkpoint 2"):
        hf_config_from_model(cfg, template=dict(LLAMA, num_hidden_layers=3))


def test_hf_config_round_trips_through_model_config():
    for config in (LLAMA, dict(LLAMA, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e6})):
        cfg, arch = model_config_from_hf(config)
        again, arch2 = model_config_from_hf(hf_config_from_model(cfg))
        assert again == cfg and arch2 == arch


def test_qkv_layout_is_grouped_and_invertible():
    nh, ng, hd, h = 6, 2, 3, 5
    q, k, v = torch.randn(nh * hd, h), torch.randn(ng * hd, h), torch.randn(ng * hd, h)
    qkv = mapping.qkv_merge(q, k, v, ng)
    r = nh // ng
    group1 = qkv[(r + 2) * hd:]  # [q heads of group 1, k1, v1]
    assert torch.equal(group1[: r * hd], q[r * hd:]) and torch.equal(group1[r * hd: (r + 1) * hd], k[hd:])
    assert torch.equal(group1[(r + 1) * hd:], v[hd:])
    for a, b in zip(mapping.qkv_split(qkv, nh, ng, hd), (q, k, v)):
        assert torch.equal(a, b)
    bias = mapping.qkv_merge(q[:, 0], k[:, 0], v[:, 0], ng)
    assert torch.equal(bias, qkv[:, 0])
    gate, up = torch.randn(4, h), torch.randn(4, h)
    assert [torch.equal(a, b) for a, b in zip(mapping.fc1_split(mapping.fc1_merge(gate, up)), (gate, up))] == [True, True]
    assert torch.equal(mapping.unpad_vocab(mapping.pad_vocab(gate, 8), 4), gate)


def test_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    from tools import convert_hf_to_megatron

    d = write_hf(tmp_path, LLAMA)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(LLAMA, rope_parameters={"rope_type": "dynamic"})))
    assert convert_hf_to_megatron.main(["--hf-dir", d, "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys) == (f"conversion error: {d}/config.json: rope scaling type 'dynamic' is not supported: "
                                "megatron-core implements only 'llama3' (and no scaling)")
    from tools import convert_megatron_to_hf

    assert convert_megatron_to_hf.parse_size("60KB") == 60 * 1024


# ----------------------------------------------------------------------------- one line per bad input
def one_line(capsys) -> str:
    """The tool's stderr, checked to be exactly one line and no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _fake_megatron_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (d / "model.yaml").write_text("model: {}\n")
    return str(d)


def _hf_dir(tmp_path):
    return write_hf(tmp_path, LLAMA)


@pytest.mark.parametrize("make,expect", [
    (lambda t: str(t / "nope"), "--hf-dir {p}: no such directory (expected a Hugging Face model directory with "
                                "config.json)"),
    (lambda t: (t / "f.bin").write_bytes(b"x") and str(t / "f.bin"), "--hf-dir {p}: a file, not a directory"),
    (_fake_megatron_dir, "--hf-dir {p} is a megatron checkpoint, not a Hugging Face model directory; export it "
                         "with: python tools/convert_megatron_to_hf.py --ckpt {p}"),
    (lambda t: (t / "empty").mkdir() or str(t / "empty"), "--hf-dir {p}: no config.json (not a Hugging Face model "
                                                          "directory)"),
], ids=["missing", "file", "megatron-checkpoint", "no-config"])
def test_import_names_what_the_path_is(tmp_path, capsys, make, expect):
    from tools import convert_hf_to_megatron

    path = make(tmp_path)
    assert convert_hf_to_megatron.main(["--hf-dir", path, "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys).startswith("conversion error: " + expect.format(p=path))
    assert not (tmp_path / "out").exists()


def _trainer_dir_without_latest(tmp_path):
    (tmp_path / "checkpoints" / "iter_0000010").mkdir(parents=True)
    return str(tmp_path / "checkpoints")


@pytest.mark.parametrize("make,expect", [
    (lambda t: str(t / "nope"), "conversion error: --ckpt {p}: no such directory (expected a megatron checkpoint "
                                "directory, or a trainer's checkpoints/ directory)"),
    (lambda t: (t / "f.pt").write_bytes(b"x") and str(t / "f.pt"), "conversion error: --ckpt {p}: a file, not a "
                                                                   "directory"),
    (_hf_dir, "checkpoint error: --ckpt {p}: a Hugging Face model directory, not a megatron checkpoint; convert it "
              "first: python tools/convert_hf_to_megatron.py --hf-dir {p}"),
    (lambda t: (t / "empty").mkdir() or str(t / "empty"), "checkpoint error: --ckpt {p}: not a megatron distributed "
                                                          "checkpoint (no metadata.json)"),
    (_trainer_dir_without_latest, "conversion error: --ckpt {p}: a trainer's checkpoints/ directory without a "
                                  "'latest' file (no save completed); name one of its checkpoints, e.g. --ckpt "
                                  "{p}/iter_0000010"),
    (lambda t: (t / "run" / "checkpoints").mkdir(parents=True) or str(t / "run"),
     "conversion error: --ckpt {p} is a training run's directory; pass its checkpoints: --ckpt {p}/checkpoints"),
], ids=["missing", "file", "hf-directory", "no-metadata", "no-latest", "run-directory"])
def test_export_names_what_the_path_is(tmp_path, capsys, make, expect):
    from tools import convert_megatron_to_hf

    path = make(tmp_path)
    assert convert_megatron_to_hf.main(["--ckpt", path, "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys).startswith(expect.format(p=path))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,expect", [
    ("--config", "--config {p}: no such file"),
    ("--hf-template", "--hf-template {p}: no such directory (expected an HF model directory with config.json)"),
    ("--tokenizer", "--tokenizer {p}: a file, not a directory (expected a directory with Hugging Face tokenizer files)"),
])
def test_export_options_name_a_bad_path_first(tmp_path, capsys, option, expect):
    from tools import convert_megatron_to_hf

    path = str(tmp_path / "nope")
    if option == "--tokenizer":
        (tmp_path / "nope").write_text("")
    assert convert_megatron_to_hf.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "out"), option, path]) == 2
    assert one_line(capsys) == "conversion error: " + expect.format(p=path)


@pytest.mark.parametrize("shards", [1, 3])
def test_truncated_safetensors_names_the_file(tmp_path, capsys, shards):
    from tools import convert_hf_to_megatron

    d = write_hf(tmp_path, LLAMA, shards=shards)
    victim = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[-1]
    path = os.path.join(d, victim)
    os.truncate(path, os.path.getsize(path) - 100)
    assert convert_hf_to_megatron.main(["--hf-dir", d, "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys) == (f"conversion error: {path}: not a readable safetensors file (incomplete metadata, file "
                                "not fully covered); it is truncated or damaged (copy or download it again)")


@pytest.mark.parametrize("name,text,expect", [
    ("config.json", '{"architectures": ["LlamaForCausalLM"],\n  "hidden_size": 32,,\n}',
     "invalid JSON at line 2, column 21: Expecting property name enclosed in double quotes"),
    ("config.json", "[1, 2]", "expected the model config (a JSON object), found a JSON list"),
    ("model.safetensors.index.json", '{"weight_map": ', "invalid JSON at line 1, column 16: Expecting value"),
    ("model.safetensors.index.json", '{"metadata": {}}', "no 'weight_map' object (tensor name -> shard file)"),
])
def test_invalid_json_names_file_line_and_column(tmp_path, capsys, name, text, expect):
    from tools import convert_hf_to_megatron

    d = write_hf(tmp_path, LLAMA, shards=3)
    (tmp_path / "hf" / name).write_text(text)
    assert convert_hf_to_megatron.main(["--hf-dir", d, "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys) == f"conversion error: {d}/{name}: {expect}"


@pytest.mark.parametrize("change,expect", [
    ({"num_attention_heads": None}, "LlamaForCausalLM: config.json num_attention_heads=null must be an integer >= 1"),
    ({"hidden_size": "32"}, "LlamaForCausalLM: config.json hidden_size='32' must be an integer >= 1"),
    ({"rms_norm_eps": "small"}, "LlamaForCausalLM: config.json rms_norm_eps='small' must be a number"),
])
def test_bad_config_values_name_the_key(tmp_path, capsys, change, expect):
    from tools import convert_hf_to_megatron

    d = write_hf(tmp_path, LLAMA)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(LLAMA, **change)))
    assert convert_hf_to_megatron.main(["--hf-dir", d, "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys) == f"conversion error: {d}/config.json: {expect}"


def test_missing_config_key_is_named(tmp_path, capsys):
    from tools import convert_hf_to_megatron

    d = write_hf(tmp_path, LLAMA)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({k: v for k, v in LLAMA.items() if k != "vocab_size"}))
    assert convert_hf_to_megatron.main(["--hf-dir", d, "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys) == f"conversion error: {d}/config.json: LlamaForCausalLM: config.json has no 'vocab_size'"


@pytest.mark.parametrize("value", ["0", "-16"])
def test_vocab_multiple_must_be_positive(tmp_path, capsys, value):
    from tools import convert_hf_to_megatron

    d = write_hf(tmp_path, LLAMA)
    assert convert_hf_to_megatron.main(["--hf-dir", d, "--out", str(tmp_path / "out"),
                                        "--make-vocab-size-divisible-by", value]) == 2
    assert one_line(capsys) == (f"conversion error: --make-vocab-size-divisible-by {value}: must be a positive integer "
                                "(megatron pads the vocab to a multiple of it times TP; Megatron-LM's default is 128)")


def test_vocab_multiple_recorded_by_an_export_is_checked(tmp_path, capsys):
    from tools import convert_hf_to_megatron

    d = write_hf(tmp_path, LLAMA)
    (tmp_path / "hf" / "conversion.json").write_text(json.dumps({"make_vocab_size_divisible_by": 0}))
    assert convert_hf_to_megatron.main(["--hf-dir", d, "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys).startswith(f"conversion error: {d}/conversion.json: make_vocab_size_divisible_by 0: must be "
                                       "a positive integer")


@pytest.mark.parametrize("tool", ["import", "export"])
def test_used_output_directory_is_refused_before_reading(tmp_path, capsys, tool):
    from tools import convert_hf_to_megatron, convert_megatron_to_hf

    d = write_hf(tmp_path, LLAMA)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("a user's file")
    (tmp_path / "file").write_text("")
    main = convert_hf_to_megatron.main if tool == "import" else convert_megatron_to_hf.main
    flag = "--hf-dir" if tool == "import" else "--ckpt"
    assert main([flag, d, "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys) == (f"conversion error: --out {tmp_path}/out: the output directory is not empty (the "
                                "converters write only into a new or empty directory)")
    assert main([flag, d, "--out", str(tmp_path / "file")]) == 2
    assert one_line(capsys) == f"conversion error: --out {tmp_path}/file: a file, not a directory"
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_staged_output_appears_only_when_complete(tmp_path):
    from psft_megatron.convert.paths import staged_output

    out = tmp_path / "a" / "out"
    with pytest.raises(RuntimeError, match="midway"):
        with staged_output(str(out)) as staging:
            assert os.path.dirname(staging) == str(tmp_path / "a") and os.path.basename(staging).startswith(".out.")
            open(os.path.join(staging, ".shard-00000.data"), "w").close()
            raise RuntimeError("midway")
    assert os.listdir(tmp_path / "a") == []  # neither the output nor the staging directory
    out.mkdir()  # an empty output directory is replaced
    with staged_output(str(out)) as staging:
        open(os.path.join(staging, "config.json"), "w").close()
    assert os.listdir(tmp_path / "a") == ["out"] and os.listdir(out) == ["config.json"]
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_yaml_errors_name_file_line_and_column(tmp_path):
    from psft_megatron.convert.model_yaml import model_section

    bad = tmp_path / "train.yaml"
    bad.write_text("model:\n  num_layers: 2\n   hidden_size: 4\n")
    with pytest.raises(ConversionError, match=rf"^{bad}: invalid YAML at line 3, column 15: mapping values are not "
                                              "allowed here$"):
        model_section(str(bad))
    bad.write_text("trainer: {}\n")
    with pytest.raises(ConversionError, match=rf"^{bad}: no top-level 'model:' section$"):
        model_section(str(bad))


# ----------------------------------------------------------------------------- RoPE for transformers 4 and 5
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("family", ["llama3", "default"])
def test_export_writes_rope_for_transformers_4_and_5(family):
    """A generated config.json carries both spellings with the same values: transformers 4 reads
    ``rope_theta`` / ``rope_scaling`` (its llama3 validation needs the four keys below), and
    transformers 5's backward-compatible reading of a 4.x-only config gives the same
    ``rope_parameters`` as the 5.x key written beside it."""
    import transformers

    config = LLAMA if family == "llama3" else dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg, _ = model_config_from_hf(config)
    hf = hf_config_from_model(cfg)
    theta = 500000.0 if family == "llama3" else 1e6
    assert hf["rope_theta"] == theta and isinstance(hf["rope_theta"], float)
    assert hf["rope_scaling"] == (LLAMA3_SCALING if family == "llama3" else None)
    assert hf["rope_parameters"] == (dict(LLAMA3_SCALING, rope_theta=theta) if family == "llama3"
                                     else {"rope_type": "default", "rope_theta": theta})
    assert hf["torch_dtype"] == hf["dtype"] == "float32"
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}  # what a transformers 4 config class reads
    for keys in (legacy, hf):
        loaded = transformers.LlamaConfig.from_dict(json.loads(json.dumps(keys)))
        assert {k: v for k, v in loaded.rope_parameters.items()} == hf["rope_parameters"], keys
        assert model_config_from_hf(keys)[0] == cfg  # and the importer reads either spelling back


def test_export_with_a_template_adds_the_missing_rope_spelling():
    cfg, _ = model_config_from_hf(LLAMA)
    hf = hf_config_from_model(cfg, template=LLAMA)  # the template has only rope_parameters (transformers 5)
    assert hf["rope_theta"] == 500000.0 and hf["rope_scaling"] == LLAMA3_SCALING
    assert hf["rope_parameters"] == dict(LLAMA3_SCALING, rope_theta=500000.0)
