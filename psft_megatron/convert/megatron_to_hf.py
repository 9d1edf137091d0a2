"""Megatron torch_dist checkpoint (any TP/PP/VPP layout) -> HF model directory, one layer at a time.

Writes ``config.json``, ``generation_config.json``, tokenizer files and sharded safetensors
(``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``), vocab padding removed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import torch

from psft_megatron.convert import hf_io, mapping
from psft_megatron.convert.errors import ConversionError
from psft_megatron.convert.hf_config import hf_config_from_model
from psft_megatron.convert.hf_to_megatron import (CONVERSION_JSON, HF_CONFIG_DIR, MODEL_YAML, model_config_from_values,
                                                  model_yaml_values)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}


def _tokenizer_dir_from_config(config_path: str) -> Optional[str]:
    """``model.tokenizer.model`` (or ``.type``) of a training YAML, when it is a directory."""
    import yaml

    with open(config_path) as f:
        data = yaml.safe_load(f) or {}
    tok = (data.get("model") or {}).get("tokenizer") or {}
    path = tok.get("model") or tok.get("type")
    return path if path and os.path.isdir(path) else None


def _export_model_config(ckpt_dir: str, config: Optional[str], log):
    """The model to export: ``<ckpt>/model.yaml`` (every checkpoint this package writes has
    one), with the ``model:`` keys of ``config`` (a YAML) overriding it, each override logged.
    Returns (ModelConfig, ModelRecord or None)."""
    from psft_megatron.errors import CheckpointError
    from psft_megatron.checkpointing.model_record import read_model_record

    try:
        record = read_model_record(ckpt_dir)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    if record is None and config is None:
        raise ConversionError(f"{ckpt_dir}: no {MODEL_YAML} (a checkpoint written by an older version?); pass "
                              "--config with a YAML that has the model: section")
    values = dict(record.architecture) if record else {}
    if config is not None:
        for key, value in model_yaml_values(config).items():
            if record is not None and key in values and values[key] != value:
                log(f"note: --config {config} overrides model.{key}: {values[key]!r} in the checkpoint -> {value!r}")
            values[key] = value
    return model_config_from_values(values, config or record.path), record


def convert_megatron_to_hf(
    ckpt_dir: str,
    out_dir: str,
    *,
    hf_template: Optional[str] = None,
    config: Optional[str] = None,
    tokenizer: Optional[str] = None,
    architecture: Optional[str] = None,
    dtype: Optional[str] = None,
    max_shard_bytes: int = 2 * 1024**3,
    verify: bool = False,
    log=print,
) -> Dict[str, Any]:
    """Export ``ckpt_dir`` to an HF model directory ``out_dir``.

    Args:
        ckpt_dir: a megatron checkpoint directory, or a trainer's ``checkpoints/`` directory
            (its ``latest`` file names the checkpoint to export).
        hf_template: HF directory whose config.json / generation_config.json / tokenizer are
            used (default ``<ckpt>/hf_config`` when present). Its architecture must match.
        config: YAML whose ``model:`` keys override the checkpoint's ``model.yaml`` (every
            checkpoint this package writes has one; needed only for older checkpoints); a
            training config's ``model.tokenizer.model`` directory supplies tokenizer files.
        tokenizer: directory to copy tokenizer files from (overrides the template's).
        architecture: HF architecture when there is no template (default: from the config).
        dtype: output dtype; default the checkpoint's stored dtype (bit-exact).
        max_shard_bytes: safetensors shard size.
        verify: compare HF and megatron logits afterwards.
    """
    start = time.time()
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(os.path.join(ckpt_dir, "metadata.json")) and os.path.isfile(latest):
        with open(latest) as f:  # a trainer's checkpoints/ directory: take the newest complete one
            ckpt_dir = os.path.join(ckpt_dir, f.read().strip())
        log(f"using {ckpt_dir} (named by {latest})")
    if config is not None and not os.path.exists(config):
        raise ConversionError(f"--config {config} does not exist")
    cfg, record = _export_model_config(ckpt_dir, config, log)
    if hf_template is None and record is not None:
        hf_template = record.hf_config_dir
    if hf_template is None and os.path.isdir(os.path.join(ckpt_dir, HF_CONFIG_DIR)):
        hf_template = os.path.join(ckpt_dir, HF_CONFIG_DIR)
    template_cfg, has_lm_head = None, False
    if hf_template is not None:
        template_cfg = hf_io.read_config(hf_template)
        info_path = os.path.join(hf_template, CONVERSION_JSON)
        if os.path.exists(info_path):
            with open(info_path) as f:
                has_lm_head = bool(json.load(f).get("has_lm_head"))
        else:
            index = os.path.join(hf_template, hf_io.INDEX_NAME)
            if os.path.exists(index) or os.path.exists(os.path.join(hf_template, hf_io.SINGLE_NAME)):
                has_lm_head = mapping.HF_LM_HEAD in hf_io.SafetensorsReader(hf_template).names()
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"{out_dir}: output directory is not empty")

    from psft_megatron.convert.megatron_io import CheckpointReader

    reader = CheckpointReader(cfg, ckpt_dir)
    out_dtype = _DTYPES[dtype] if dtype else reader.stored_dtype()
    hf = hf_config_from_model(cfg, architecture, template_cfg)
    hf["dtype"] = str(out_dtype).replace("torch.", "")

    writer = hf_io.ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    for group in mapping.rules_by_layer(cfg):
        tensors = reader.read([rule.megatron for rule in group])
        for rule in group:
            for name, tensor in mapping.megatron_to_hf(rule, tensors.pop(rule.megatron), cfg).items():
                writer.add(name, tensor.to(out_dtype))
                if name == mapping.HF_EMBEDDING and cfg.tie_word_embeddings and has_lm_head:
                    writer.add(mapping.HF_LM_HEAD, tensor.to(out_dtype).clone())
    files = writer.close()

    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    recorded_tokenizer = (record.tokenizer.get("model") or record.tokenizer.get("type")) if record else None
    side_src = tokenizer or (_tokenizer_dir_from_config(config) if config else None) or (
        recorded_tokenizer if recorded_tokenizer and os.path.isdir(recorded_tokenizer) else None)
    copied = []
    if hf_template is not None:
        copied += hf_io.copy_side_files(hf_template, out_dir)
    if side_src:
        copied += hf_io.copy_side_files(side_src, out_dir, hf_io.TOKENIZER_FILES)
    if not os.path.exists(os.path.join(out_dir, hf_io.GENERATION_CONFIG)):
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
        with open(os.path.join(out_dir, hf_io.GENERATION_CONFIG), "w") as f:
            json.dump(gen, f, indent=2)
    summary = {"out": out_dir, "architecture": hf["architectures"][0], "shards": files, "dtype": hf["dtype"],
               "tokenizer_files": sorted(set(copied) - {hf_io.GENERATION_CONFIG}),
               "stored_padded_vocab": reader.stored_padded_vocab(), "seconds": round(time.time() - start, 2)}
    log(f"{ckpt_dir} -> {out_dir}: {hf['architectures'][0]}, {len(files)} shard(s), {hf['dtype']}, vocab "
        f"{reader.stored_padded_vocab()} -> {cfg.vocab_size}, tokenizer files: {summary['tokenizer_files'] or 'none'}, "
        f"{summary['seconds']} s")
    if verify:
        from psft_megatron.convert.verify import verify as run_verify

        summary["verify"] = run_verify(cfg, out_dir, ckpt_dir)
        log("verify: max |logit diff| {max_abs_diff:.3g}, argmax agreement {argmax_agreement:.4f}".format(**summary["verify"]))
    return summary
