"""``model.restore_from_path``: the initial weights and the model they belong to.

Before distributed start, :func:`prepare_restore` checks that the path is an intact megatron
checkpoint (an HF directory gets the converter command), and takes the architecture from the
checkpoint's ``model.yaml`` (:mod:`psft_megatron.checkpointing.model_record`): the YAML needs no
architecture keys, and one it sets must agree. The tokenizer recorded there is used when the
YAML names none. The weights themselves load strictly after the model is built
(:func:`psft_megatron.checkpointing.dist_checkpoint.load_checkpoint`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from psft_megatron.errors import CheckpointError
from psft_megatron.checkpointing.model_record import ModelRecord, merge_architecture, read_model_record


def prepare_restore(model_section, announce: bool = True) -> Optional[ModelRecord]:
    """Check ``model.restore_from_path`` and fill ``model_section.architecture`` (and
    ``.tokenizer`` when the YAML has none) from its model.yaml, in place.

    Returns the checkpoint's record, or None (no restore, or an older checkpoint without
    model.yaml: then the YAML's architecture is used as it is, with a note).
    Raises CheckpointError (path not a checkpoint) or ConfigError (a YAML architecture key
    that differs from the checkpoint's). Its files are checked after distributed start, once,
    and only when its weights are read (the trainer's ``_check_restore``).
    """
    from psft_megatron.checkpointing.dist_checkpoint import not_a_checkpoint

    path = model_section.restore_from_path
    if not path:
        return None
    problem = not_a_checkpoint(path)
    if problem:
        raise CheckpointError(f"model.restore_from_path: {path}: {problem}")
    record = read_model_record(path)
    if record is None:
        if announce:
            print(f"note: {path} has no model.yaml (written by an older version): the architecture comes from the "
                  "YAML and is checked only against the checkpoint's weights", flush=True)
        return None
    model_section.architecture = merge_architecture(record, model_section.architecture)
    tokenizer = model_section.tokenizer or {}
    if not (tokenizer.get("model") or tokenizer.get("type")) and record.tokenizer:
        model_section.tokenizer = {**record.tokenizer, **tokenizer}
    return record


def describe_restore(path: str, record: Optional[ModelRecord], arch: Dict[str, Any]) -> str:
    """One line for the start of a run: what was restored and what starts fresh."""
    source = (record.source if record else {}) or {}
    origin = {"converted": f"converted from {source.get('hf_dir')}",
              "trained": f"trained to step {source.get('step')}"}.get(source.get("kind"), "origin not recorded")
    shape = (f"{arch.get('num_layers')} layers, hidden {arch.get('hidden_size')}, "
             f"heads {arch.get('num_attention_heads')}/{arch.get('num_query_groups') or arch.get('num_attention_heads')}, "
             f"vocab {arch.get('vocab_size')}")
    return (f"restored weights from {path} ({origin}; model from "
            f"{'its model.yaml' if record else 'the YAML'}: {shape}); optimizer state, LR schedule and data "
            "position start fresh")


def record_for_save(model_cfg, tokenizer: Dict[str, Any], step: int, restored_from: Optional[str],
                    restored: Optional[ModelRecord], run_id: Optional[str] = None) -> Dict[str, Any]:
    """Arguments of :func:`psft_megatron.checkpointing.model_record.write_model_record` for a training
    checkpoint at ``step``: its model, its tokenizer (paths absolute) and its origin (the run
    id included)."""
    tok = dict(tokenizer or {})
    for key in ("model", "type"):
        if isinstance(tok.get(key), str) and os.path.exists(tok[key]):
            tok[key] = os.path.abspath(tok[key])
    source = {"kind": "trained", "step": step}
    if run_id:
        source["run_id"] = run_id
    if restored_from:
        source["restored_from"] = os.path.abspath(restored_from)
    hf_config = restored.hf_config_dir if restored else None
    if hf_config:
        source["hf_config"] = os.path.abspath(hf_config)
    return {"model": model_cfg, "tokenizer": tok, "source": source}


def vocab_problem(info, model_cfg) -> Optional[str]:
    """For a restore without model.yaml: why the checkpoint's vocabulary is not the model's, in
    one line naming both sizes and the key, or None.

    The checkpoint's vocab size comes from its common state (``vocab_size``, every training
    checkpoint since run ids), else from its training config (``model.vocab_size``, when it was
    set). Without either only the stored embedding rows are known: the vocab padded at the
    saving TP, which fits any smaller vocab (TP=4 pads every vocab up to 512 to 512 rows), so
    only a model vocab larger than the stored rows is certain to differ.

    Args:
        info: the restore checkpoint's
            :class:`~psft_megatron.checkpointing.dist_checkpoint.CheckpointInfo`.
        model_cfg: the run's :class:`psft_megatron.model.ModelConfig`.
    """
    import json

    common = info.common or {}
    vocab, source = common.get("vocab_size"), "its common state"
    if vocab is None:
        try:
            vocab = (json.loads(common.get("config") or "{}").get("model") or {}).get("vocab_size")
        except (TypeError, ValueError, AttributeError):
            vocab = None
        source = "its training config"
    want = model_cfg.vocab_size
    fix = ("set model.vocab_size (default: the tokenizer's) and the tokenizer to the checkpoint's, or restore a "
           "checkpoint of this vocabulary")
    if vocab is not None:
        if int(vocab) == want:
            return None
        return (f"model.vocab_size: the checkpoint {info.path} has vocab size {vocab} ({source}), this run's model "
                f"has {want}; {fix}")
    rows = info.vocab_rows
    if rows is None or want <= rows:
        return None
    return (f"model.vocab_size: the checkpoint {info.path} stores {rows} embedding rows, fewer than this run's vocab "
            f"size {want}; {fix}")
