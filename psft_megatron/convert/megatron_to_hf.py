"""Megatron torch_dist checkpoint (any TP/PP/VPP layout) -> HF model directory, one layer at a time.

Writes ``config.json``, ``generation_config.json`` (with the stop token ids of
:mod:`psft_megatron.convert.generation`), tokenizer files, ``conversion.json`` (the checkpoint
and its vocab padding multiple, for the way back) and sharded safetensors
(``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``), vocab padding
removed. Everything is written into a hidden directory beside the output and renamed at the end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from psft_megatron.convert import generation, hf_io, mapping, paths
from psft_megatron.convert.errors import ConversionError
from psft_megatron.convert.hf_config import hf_config_from_model, set_dtype
from psft_megatron.convert.hf_to_megatron import CONVERSION_JSON, HF_CONFIG_DIR, MODEL_YAML
from psft_megatron.convert.model_yaml import model_config_from_values, model_yaml_values, tokenizer_settings

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}


@dataclass
class _Sources:
    """Where the export's pieces come from besides the weights.

    Attributes:
        template: HF directory whose config.json / generation config / tokenizer are reused, or None.
        template_config: its config.json.
        has_lm_head: write ``lm_head.weight`` for tied embeddings (the HF source shipped one).
        tokenizer: directory whose tokenizer files override the template's, or None.
        tokenizer_settings: the ``model.tokenizer`` keys the checkpoint was trained with.
    """

    template: Optional[str] = None
    template_config: Optional[Dict[str, Any]] = None
    has_lm_head: bool = False
    tokenizer: Optional[str] = None
    tokenizer_settings: Optional[Dict[str, Any]] = None


def _export_model_config(ckpt_dir: str, config: Optional[str], log):
    """The model to export: ``<ckpt>/model.yaml`` (every checkpoint this package writes has
    one), with the ``model:`` keys of ``config`` (a YAML) overriding it, each override logged.
    Returns (ModelConfig, ModelRecord or None)."""
    from psft_megatron.checkpointing.model_record import read_model_record

    record = read_model_record(ckpt_dir)
    if record is None and config is None:
        raise ConversionError(f"{ckpt_dir}: no {MODEL_YAML} (a checkpoint written by an older version); pass the "
                              "training YAML with --config (its model: section describes the architecture)")
    values = dict(record.architecture) if record else {}
    if config is not None:
        for key, value in model_yaml_values(config).items():
            if record is not None and key in values and values[key] != value:
                log(f"note: --config {config} overrides model.{key}: {values[key]!r} in the checkpoint -> {value!r}")
            values[key] = value
    return model_config_from_values(values, config or record.path), record


def _template_has_lm_head(template: str) -> bool:
    """Whether the HF model behind ``template`` shipped ``lm_head.weight`` (its conversion.json
    says, else its safetensors do)."""
    info = os.path.join(template, CONVERSION_JSON)
    if os.path.exists(info):
        return bool(hf_io.read_json(info).get("has_lm_head"))
    if any(os.path.exists(os.path.join(template, n)) for n in (hf_io.INDEX_NAME, hf_io.SINGLE_NAME)):
        return mapping.HF_LM_HEAD in hf_io.SafetensorsReader(template).names()
    return False


def _recorded_tokenizer_dir(config: Optional[str], record) -> Optional[str]:
    """The tokenizer directory of the training YAML's ``model.tokenizer``, else the checkpoint's record."""
    for settings in ((tokenizer_settings(config) if config else {}), (record.tokenizer if record else {})):
        path = settings.get("model") or settings.get("type")
        if isinstance(path, str) and os.path.isdir(path):
            return path
    return None


def _sources(ckpt_dir: str, record, hf_template: Optional[str], config: Optional[str],
             tokenizer: Optional[str]) -> _Sources:
    """The template (``--hf-template``, else the checkpoint's or its origin's ``hf_config/``) and
    the tokenizer (``--tokenizer``, else the training YAML's, else the recorded one)."""
    if hf_template is None and record is not None:
        hf_template = record.hf_config_dir
    if hf_template is None and os.path.isdir(os.path.join(ckpt_dir, HF_CONFIG_DIR)):
        hf_template = os.path.join(ckpt_dir, HF_CONFIG_DIR)
    src = _Sources(template=hf_template, tokenizer=tokenizer or _recorded_tokenizer_dir(config, record))
    src.tokenizer_settings = dict(record.tokenizer if record else {}, **(tokenizer_settings(config) if config else {}))
    if hf_template is not None:
        src.template_config = hf_io.read_config(hf_template)
        src.has_lm_head = _template_has_lm_head(hf_template)
    return src


def _write_weights(cfg, ckpt_dir: str, out_dir: str, dtype: Optional[str], max_shard_bytes: int,
                   lm_head: bool) -> Tuple[torch.dtype, List[str], int]:
    """The HF safetensors shards of the checkpoint, read one layer at a time; returns (dtype,
    shard names, padded vocab rows stored in the checkpoint)."""
    from psft_megatron.convert.megatron_io import CheckpointReader

    reader = CheckpointReader(cfg, ckpt_dir)
    out_dtype = _DTYPES[dtype] if dtype else reader.stored_dtype()
    writer = hf_io.ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    for group in mapping.rules_by_layer(cfg):
        tensors = reader.read([rule.megatron for rule in group])
        for rule in group:
            for name, tensor in mapping.megatron_to_hf(rule, tensors.pop(rule.megatron), cfg).items():
                writer.add(name, tensor.to(out_dtype))
                if name == mapping.HF_EMBEDDING and cfg.tie_word_embeddings and lm_head:
                    writer.add(mapping.HF_LM_HEAD, tensor.to(out_dtype).clone())
    return out_dtype, writer.close(), reader.stored_padded_vocab()


def _copy_side_files(src: _Sources, out_dir: str) -> List[str]:
    """The template's generation config and tokenizer files, then the tokenizer's over them."""
    copied = hf_io.copy_side_files(src.template, out_dir) if src.template else []
    if src.tokenizer:
        copied += hf_io.copy_side_files(src.tokenizer, out_dir, hf_io.TOKENIZER_FILES)
    return sorted(set(copied) - {hf_io.GENERATION_CONFIG})


def _stop_ids(src: _Sources, out_dir: str, hf: Dict[str, Any], gen: Dict[str, Any], log) -> Dict[str, Any]:
    """bos / eos / pad ids from the tokenizer now in ``out_dir`` (:mod:`~psft_megatron.convert.generation`)."""
    ids = None
    if generation.has_tokenizer(out_dir):
        ids = generation.tokenizer_stop_ids(out_dir, src.tokenizer_settings or {})
    else:
        log("warning: the export has no tokenizer (no template, no --tokenizer, none recorded in model.yaml), so "
            "its end-of-turn token is unknown and generate() will not stop at it; pass --tokenizer DIR")
    return generation.merged_ids(ids, src.template_config or {}, gen)


def _write_configs(cfg, src: _Sources, out_dir: str, hf: Dict[str, Any], ckpt_dir: str, log) -> Dict[str, Any]:
    """config.json, generation_config.json (stop ids from the tokenizer) and conversion.json."""
    gen_path = os.path.join(out_dir, hf_io.GENERATION_CONFIG)
    gen = hf_io.read_json(gen_path) if os.path.exists(gen_path) else {}
    with open(os.path.join(out_dir, "config.json"), "w") as f:  # the tokenizer may look at model_type
        json.dump(hf, f, indent=2, sort_keys=True)
    ids = _stop_ids(src, out_dir, hf, gen, log)
    generation.apply_ids(hf, gen, ids)
    for name, data in (("config.json", hf), (hf_io.GENERATION_CONFIG, gen), (CONVERSION_JSON, {
            "checkpoint": os.path.abspath(ckpt_dir), "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
            "has_lm_head": bool(src.has_lm_head or not cfg.tie_word_embeddings), **ids})):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(data, f, indent=2, sort_keys=name == "config.json")
    return ids


def _check_option_paths(config: Optional[str], hf_template: Optional[str], tokenizer: Optional[str]) -> None:
    """The optional inputs exist (checked before the checkpoint is looked at)."""
    if config is not None and not os.path.isfile(config):
        raise ConversionError(f"--config {config}: no such file")
    if hf_template is not None:
        paths.existing_dir(hf_template, "--hf-template", "an HF model directory with config.json")
    if tokenizer is not None:
        paths.existing_dir(tokenizer, "--tokenizer", "a directory with Hugging Face tokenizer files")


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
    """Export ``ckpt_dir`` to an HF model directory ``out_dir`` (written beside it, renamed at the end).

    Args:
        ckpt_dir: a megatron checkpoint directory, or a trainer's ``checkpoints/`` directory
            (:func:`psft_megatron.convert.paths.checkpoint_to_export` picks the checkpoint).
        hf_template: HF directory whose config.json / generation_config.json / tokenizer are
            used (default ``<ckpt>/hf_config`` when present). Its architecture must match.
        config: YAML whose ``model:`` keys override the checkpoint's ``model.yaml`` (every
            checkpoint this package writes has one; needed only for older checkpoints); a
            training config's ``model.tokenizer`` supplies tokenizer files and settings.
        tokenizer: directory to copy tokenizer files from (overrides the template's).
        architecture: HF architecture when there is no template (default: from the config).
        dtype: output dtype; default the checkpoint's stored dtype (bit-exact).
        max_shard_bytes: safetensors shard size.
        verify: compare HF and megatron logits afterwards.
    Raises:
        ConversionError, CheckpointError: bad input (named); nothing is left in or beside ``out_dir``.
    """
    start = time.time()
    _check_option_paths(config, hf_template, tokenizer)
    paths.check_output(out_dir)
    ckpt_dir = paths.checkpoint_to_export(ckpt_dir, log)
    cfg, record = _export_model_config(ckpt_dir, config, log)
    src = _sources(ckpt_dir, record, hf_template, config, tokenizer)
    hf = hf_config_from_model(cfg, architecture, src.template_config)
    with paths.staged_output(out_dir) as staging:
        out_dtype, files, stored_vocab = _write_weights(cfg, ckpt_dir, staging, dtype, max_shard_bytes, src.has_lm_head)
        set_dtype(hf, str(out_dtype).replace("torch.", ""))
        tokenizer_files = _copy_side_files(src, staging)
        ids = _write_configs(cfg, src, staging, hf, ckpt_dir, log)
    summary = {"out": out_dir, "architecture": hf["architectures"][0], "shards": files, "dtype": hf["dtype"],
               "tokenizer_files": tokenizer_files, "stop_ids": ids, "stored_padded_vocab": stored_vocab,
               "seconds": round(time.time() - start, 2)}
    log(f"{ckpt_dir} -> {out_dir}: {hf['architectures'][0]}, {len(files)} shard(s), {hf['dtype']}, vocab "
        f"{stored_vocab} -> {cfg.vocab_size}, tokenizer files: {tokenizer_files or 'none'}, eos_token_id "
        f"{ids['eos_token_id']}, {summary['seconds']} s")
    if verify:
        from psft_megatron.convert.verify import verify as run_verify

        summary["verify"] = run_verify(cfg, out_dir, ckpt_dir)
        log("verify: max |logit diff| {max_abs_diff:.3g}, argmax agreement {argmax_agreement:.4f}".format(**summary["verify"]))
    return summary
