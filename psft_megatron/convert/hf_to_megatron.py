"""HF model directory -> megatron torch_dist checkpoint (+ model YAML, + HF side files), streaming.

Output directory ``out``::

    out/metadata.json, .metadata, __0_0.distcp, common.pt   the megatron checkpoint (model under "model")
    out/model.yaml                                          {"model": ModelConfig fields}
    out/hf_config/                                          config.json, generation_config.json, tokenizer
                                                            files, conversion.json (for the export)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import torch

from psft_megatron.checkpointing.model_record import HF_CONFIG_DIR, MODEL_YAML, write_model_record  # noqa: F401
from psft_megatron.convert import hf_io, mapping, paths
from psft_megatron.convert.errors import ConversionError
from psft_megatron.convert.hf_config import model_config_from_hf
from psft_megatron.convert.model_yaml import model_config_from_values, model_yaml_values, read_model_yaml  # noqa: F401
from psft_megatron.model.config import ModelConfig

#: how a directory was converted: in a converted checkpoint's hf_config/ (the HF source, its
#: tensor names, whether it shipped lm_head.weight) and in an exported HF directory (the
#: checkpoint, its vocab padding multiple, whether lm_head.weight was written, the stop ids)
CONVERSION_JSON = "conversion.json"
DEFAULT_VOCAB_MULTIPLE = 128
_HF_DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def _default_dtype(hf: Dict[str, Any]) -> str:
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
    return _HF_DTYPES.get(name, "float32")


def check_tensors(reader: hf_io.SafetensorsReader, cfg: ModelConfig) -> bool:
    """Validate names and shapes before anything is written; returns whether ``lm_head.weight`` exists.

    Raises:
        ConversionError: a missing tensor (name + file), a shape mismatch (name, file, shapes),
            or tensors of features the converter does not support (names).
    """
    expected = mapping.hf_shapes(cfg)
    present = set(reader.names())
    fused = sorted(n for n in present if n.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")))
    if fused:
        raise ConversionError(
            f"tensor {fused[0]!r} in {os.path.join(reader.dir, reader.file_of(fused[0]))} holds all experts of a "
            "layer in one 3-D tensor; the converter reads the per-expert layout (mlp.experts.<e>.gate_proj/up_proj/"
            "down_proj.weight) that Hugging Face checkpoints and transformers' save_pretrained use"
        )
    for name in expected:
        if name not in present:
            raise ConversionError(
                f"tensor {name!r} is missing from {os.path.join(reader.dir, reader.source)}"
            )
    shapes = reader.shapes()
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise ConversionError(
                f"tensor {name!r} in {os.path.join(reader.dir, reader.file_of(name))} has shape "
                f"{list(shapes[name])}, config.json implies {list(shape)}"
            )
    has_lm_head = mapping.HF_LM_HEAD in present
    if has_lm_head and tuple(shapes[mapping.HF_LM_HEAD]) != (cfg.vocab_size, cfg.hidden_size):
        raise ConversionError(f"tensor 'lm_head.weight' has shape {list(shapes[mapping.HF_LM_HEAD])}, "
                              f"config.json implies {[cfg.vocab_size, cfg.hidden_size]}")
    extra = sorted(n for n in present - set(expected) - {mapping.HF_LM_HEAD}
                   if not n.endswith(mapping.IGNORED_HF_SUFFIXES))
    if extra:
        raise ConversionError(
            f"{reader.dir}: tensors not covered by the converter (unsupported feature?): "
            + ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        )
    return has_lm_head


def write_model_yaml(cfg: ModelConfig, ckpt_dir: str, hf_dir: Optional[str] = None, tokenizer: bool = False) -> None:
    """``<ckpt_dir>/model.yaml`` (:mod:`psft_megatron.checkpointing.model_record`): the architecture and, when
    the HF side files include a tokenizer, ``model.tokenizer`` pointing at them."""
    tok = {"library": "huggingface", "model": HF_CONFIG_DIR} if tokenizer else None
    source = {"kind": "converted", "hf_dir": os.path.abspath(hf_dir)} if hf_dir else None
    write_model_record(ckpt_dir, cfg, tokenizer=tok, source=source,
                       header="Model written by tools/convert_hf_to_megatron.py" + (f" from {hf_dir}" if hf_dir else ""))


def vocab_multiple(hf_dir: str, requested: Optional[int], log) -> int:
    """The vocab padding multiple: ``requested`` (``--make-vocab-size-divisible-by``), else the
    one recorded in ``<hf_dir>/conversion.json`` by an export (so that HF -> Megatron -> HF ->
    Megatron keeps the training YAML's value), else 128.

    Raises:
        ConversionError: ``requested`` (or the recorded value) is not a positive integer.
    """
    where = "--make-vocab-size-divisible-by"
    value = requested
    if value is None:
        record = os.path.join(hf_dir, CONVERSION_JSON)
        value = hf_io.read_json(record).get("make_vocab_size_divisible_by") if os.path.isfile(record) else None
        if value is not None:
            where = f"{record}: make_vocab_size_divisible_by"
            log(f"note: vocab padding multiple {value} from {record} (the checkpoint this model was exported from)")
    value = DEFAULT_VOCAB_MULTIPLE if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(f"{where} {value!r}: must be a positive integer (megatron pads the vocab to a "
                              "multiple of it times TP; Megatron-LM's default is 128)")
    return value


def convert_hf_to_megatron(
    hf_dir: str,
    out_dir: str,
    *,
    dtype: Optional[str] = None,
    make_vocab_size_divisible_by: Optional[int] = None,
    verify: bool = False,
    log=print,
) -> Dict[str, Any]:
    """Convert ``hf_dir`` into a megatron checkpoint in ``out_dir`` (see the module doc).

    The checkpoint is written into a hidden directory beside ``out_dir`` and renamed to it at
    the end (:func:`psft_megatron.convert.paths.staged_output`): a failed run leaves nothing.

    Args:
        dtype: "bf16" | "fp32" | "fp16" (or the long names); default the HF config's dtype.
        make_vocab_size_divisible_by: vocab padding multiple (times TP), stored in the YAML;
            default :func:`vocab_multiple`. The checkpoint holds the TP=1 padding; megatron
            loads the embedding / output layer with ``allow_shape_mismatch`` (zero rows past the
            stored ones), so it loads at any TP.
        verify: run :func:`psft_megatron.convert.verify.verify` afterwards.
    Returns:
        summary: architecture, model config, seconds, padded vocab, TP sizes it loads at, verify numbers.
    Raises:
        ConversionError: bad input (named); nothing is written.
    """
    start = time.time()
    paths.hf_model_dir(hf_dir)
    paths.check_output(out_dir)
    multiple = vocab_multiple(hf_dir, make_vocab_size_divisible_by, log)
    hf = hf_io.read_config(hf_dir)
    try:
        cfg, arch = model_config_from_hf(hf, dtype=dtype or _default_dtype(hf), make_vocab_size_divisible_by=multiple)
    except ConversionError as exc:
        raise ConversionError(f"{os.path.join(hf_dir, 'config.json')}: {exc}") from None
    reader = hf_io.SafetensorsReader(hf_dir)
    has_lm_head = check_tensors(reader, cfg)
    with paths.staged_output(out_dir) as staging:
        _write(cfg, arch, reader, has_lm_head, hf_dir, staging)
    p1 = cfg.padded_vocab_size(1)
    summary = {
        "architecture": arch, "out": out_dir, "params_dtype": cfg.params_dtype, "padded_vocab": p1,
        "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
        "seconds": round(time.time() - start, 2),
    }
    log(f"{arch} -> {out_dir}: {cfg.num_layers} layers, vocab {cfg.vocab_size} padded to {p1} (at TP=1), "
        f"{cfg.params_dtype}, {summary['seconds']} s")
    if verify:
        from psft_megatron.convert.verify import verify as run_verify

        summary["verify"] = run_verify(cfg, hf_dir, out_dir)
        log("verify: max |logit diff| {max_abs_diff:.3g}, argmax agreement {argmax_agreement:.4f}".format(**summary["verify"]))
    return summary


def _write(cfg: ModelConfig, arch: str, reader: hf_io.SafetensorsReader, has_lm_head: bool, hf_dir: str,
           out_dir: str) -> None:
    """The megatron checkpoint, ``model.yaml`` and ``hf_config/`` of the validated HF model, into ``out_dir``."""
    from psft_megatron.convert import megatron_io

    rules = {rule.megatron: rule for rule in mapping.all_rules(cfg)}

    def tensor_fn(name: str) -> torch.Tensor:
        return mapping.hf_to_megatron(rules[name], reader.get, cfg).to(cfg.torch_dtype)

    megatron_io.write_checkpoint(cfg, out_dir, tensor_fn)
    side = os.path.join(out_dir, HF_CONFIG_DIR)
    copied = hf_io.copy_side_files(hf_dir, side, hf_io.TOKENIZER_FILES + (hf_io.GENERATION_CONFIG, "config.json"))
    write_model_yaml(cfg, out_dir, hf_dir, tokenizer=bool(set(copied) & set(hf_io.TOKENIZER_FILES)))
    with open(os.path.join(side, CONVERSION_JSON), "w") as f:
        json.dump({"architecture": arch, "source": os.path.abspath(hf_dir), "has_lm_head": has_lm_head,
                   "hf_tensors": sorted(reader.names()), "side_files": copied}, f, indent=2)
