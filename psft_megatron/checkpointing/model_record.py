"""The model a checkpoint carries: ``model.yaml`` beside the weights.

Every checkpoint this package writes (a converted HF model, every training checkpoint) holds
``<ckpt>/model.yaml``::

    model:                       # psft_megatron.model.ModelConfig fields
      num_layers: 24
      ...
      tokenizer:                 # how to tokenise for this model (model.tokenizer keys)
        library: huggingface
        model: hf_config         # a relative path is relative to the checkpoint directory
    source:                      # where the weights came from (informational)
      kind: converted | trained
      ...

With ``model.restore_from_path`` the run takes its architecture from here; an architecture key
also set in the YAML must agree (:func:`merge_architecture`). The export
(``tools/convert_megatron_to_hf.py``) reads the same file. Only the keys in
:data:`NOT_ARCHITECTURE` may differ from the run's: they say how weights are stored and
initialised, not what the model computes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from psft_megatron.errors import CheckpointError, ConfigError

MODEL_YAML = "model.yaml"
#: the converted HF side files (config, generation config, tokenizer) inside a checkpoint
HF_CONFIG_DIR = "hf_config"
#: ModelConfig fields a run may set differently from its checkpoint: how weights are stored and
#: initialised, and how an MoE model is trained (load-balancing losses, token dispatch, the
#: router's precision), none of which changes what the trained weights compute
NOT_ARCHITECTURE = ("params_dtype", "init_method_std", "moe_aux_loss_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                    "moe_token_dispatcher_type", "moe_router_dtype")


@dataclass
class ModelRecord:
    """What ``<ckpt>/model.yaml`` says.

    Attributes:
        path: the model.yaml file.
        architecture: ModelConfig fields (plain values).
        tokenizer: ``model.tokenizer`` keys, paths made absolute; empty if none recorded.
        source: where the weights came from (free-form).
    """

    path: str
    architecture: Dict[str, Any]
    tokenizer: Dict[str, Any] = field(default_factory=dict)
    source: Dict[str, Any] = field(default_factory=dict)

    @property
    def hf_config_dir(self) -> Optional[str]:
        """The checkpoint's HF side files (converted checkpoints), else the one of the checkpoint
        it was trained from, if it still exists."""
        for candidate in (os.path.join(os.path.dirname(self.path), HF_CONFIG_DIR), self.source.get("hf_config")):
            if candidate and os.path.isdir(candidate):
                return candidate
        return None


def write_model_record(ckpt_dir: str, model: Mapping[str, Any], *, tokenizer: Optional[Mapping[str, Any]] = None,
                       source: Optional[Mapping[str, Any]] = None, header: str = "") -> str:
    """Write ``<ckpt_dir>/model.yaml``; ``model``: a ModelConfig or its fields. Returns the path."""
    import yaml

    values = dataclasses.asdict(model) if dataclasses.is_dataclass(model) else dict(model)
    body: Dict[str, Any] = {"model": dict(values)}
    if tokenizer:
        body["model"]["tokenizer"] = dict(tokenizer)
    if source:
        body["source"] = dict(source)
    path = os.path.join(ckpt_dir, MODEL_YAML)
    with open(path, "w", encoding="utf-8") as f:
        if header:
            f.write("".join(f"# {line}\n" for line in header.splitlines()))
        yaml.safe_dump(body, f, sort_keys=False)
    return path


def read_model_record(ckpt_dir: str) -> Optional[ModelRecord]:
    """``<ckpt_dir>/model.yaml`` as a :class:`ModelRecord`; None if the checkpoint has none.

    Raises CheckpointError naming the file if it cannot be read or has no ``model:`` section.
    """
    import yaml

    from psft_megatron.model.config import ModelConfig

    path = os.path.join(ckpt_dir, MODEL_YAML)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: no 'model:' section")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    tokenizer = dict(model.get("tokenizer") or {})
    for key in ("model", "type"):
        value = tokenizer.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value) \
                and os.path.exists(os.path.join(ckpt_dir, value)):
            tokenizer[key] = os.path.abspath(os.path.join(ckpt_dir, value))
    return ModelRecord(path=path, architecture={k: v for k, v in model.items() if k in fields},
                       tokenizer=tokenizer, source=dict(data.get("source") or {}))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def merge_architecture(record: ModelRecord, yaml_arch: Mapping[str, Any]) -> Dict[str, Any]:
    """The run's architecture: the checkpoint's, with the YAML's keys checked against it.

    Args:
        record: the checkpoint's model.yaml.
        yaml_arch: architecture keys set in the run's YAML (``model.<key>``, NeMo aliases
            resolved).
    Returns:
        the checkpoint's fields, plus the YAML's :data:`NOT_ARCHITECTURE` keys.
    Raises:
        ConfigError naming the first key whose value differs, with both values.
    """
    merged = dict(record.architecture)
    for key, value in yaml_arch.items():
        if key in NOT_ARCHITECTURE:
            merged[key] = value
            continue
        if key not in record.architecture:
            raise ConfigError(f"model.{key}={value!r} is set in the YAML, but the checkpoint {record.path} does not "
                              f"record it; remove the key (the architecture comes from the checkpoint)")
        stored = record.architecture[key]
        if not _same(stored, value):
            raise ConfigError(f"model.{key}={value!r} in the YAML, but the checkpoint was trained with {stored!r} "
                              f"({record.path}); remove the key to use the checkpoint's value")
    return merged
