"""The model a YAML file describes: the ``model:`` section of a training config or of a
checkpoint's ``model.yaml`` (:mod:`psft_megatron.checkpointing.model_record`), as the
converters read it.

``model:`` keys that are not ModelConfig fields (``tokenizer``, ``data``, the parallel layout,
... of a training config) are ignored; NeMo spellings of the architecture keys
(``layernorm_epsilon``, ``kv_channels``, ...) are accepted as the trainer accepts them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from psft_megatron.convert.errors import ConversionError
from psft_megatron.model.config import ModelConfig


def model_section(path: str) -> Dict[str, Any]:
    """The top-level ``model:`` mapping of the YAML file ``path``.

    Raises:
        ConversionError: the file is missing or unreadable, is not valid YAML (line and column
            named), or has no ``model:`` mapping.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConversionError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConversionError(f"{path}: no top-level 'model:' section")
    return data["model"]


def model_yaml_values(path: str) -> Dict[str, Any]:
    """The ModelConfig fields set in the YAML file's ``model:`` section (see the module doc)."""
    try:
        from psft_megatron.config.schema import MODEL_KEY_ALIASES
    except ImportError:  # the training config package is optional here
        MODEL_KEY_ALIASES = {}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {}
    for key, value in model_section(path).items():
        name = MODEL_KEY_ALIASES.get(key, key)
        if name in fields:
            values[name] = value
    return values


def tokenizer_settings(path: str) -> Dict[str, Any]:
    """The ``model.tokenizer`` keys of the YAML file (empty when it has none)."""
    tok = model_section(path).get("tokenizer")
    return dict(tok) if isinstance(tok, dict) else {}


def model_config_from_values(values: Dict[str, Any], where: str) -> ModelConfig:
    """ModelConfig from plain values; a missing or bad key is a ConversionError naming ``where``."""
    missing = ModelConfig.missing_keys(values)
    if missing:
        raise ConversionError(f"{where}: the model config lacks {', '.join('model.' + k for k in missing)}")
    try:
        return ModelConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{where}: {exc}") from None


def read_model_yaml(path: str) -> ModelConfig:
    """ModelConfig from a YAML file with a top-level ``model:`` section."""
    return model_config_from_values(model_yaml_values(path), path)
