"""Settings of the data pipeline and the tokenizer, validated, NeMo-style keys.

:class:`DataConfig` mirrors ``model.data.train_ds`` (and ``validation_ds``) and
:class:`TokenizerConfig` mirrors ``model.tokenizer``. Build them with ``from_dict`` from a
plain dict or an OmegaConf node; a bad value raises :class:`ConfigError` naming the full key,
e.g. ``model.data.train_ds.max_seq_length must be > 1, got 0``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

from psft_megatron.data.errors import ConfigError
from psft_megatron.errors import ConfigError as _BaseConfigError

LENGTH_POLICIES = ("error", "truncate", "drop")
TRUNCATION_SIDES = ("left", "right")
EMPTY_LOSS_POLICIES = ("error", "skip")
SCHEMAS = ("auto", "prompt_response", "messages")
TOKENIZER_LIBRARIES = ("huggingface", "sentencepiece")


def _to_plain(node: Any) -> Any:
    try:  # OmegaConf node -> plain containers, without importing omegaconf when absent
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return node


def _user_fields(cls) -> dict:
    """The dataclass fields a config may set (internal ones excluded)."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _as_mapping(data: Any, prefix: str, what: str) -> Mapping:
    """``data`` (a dict, an OmegaConf node or None) as a plain mapping; anything else is a
    ConfigError naming ``prefix``."""
    data = _to_plain(data)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}: must be a mapping of {what}, got {data!r}")
    return data


def _from_dict(cls, data: Optional[Mapping], prefix: str, extra: Optional[Mapping] = None):
    """``cls(**data)``: unknown keys are errors with the closest valid key, wrong types name the
    key (the run config's rules, :mod:`psft_megatron.config.loader`). ``extra``: internal
    fields set by the caller."""
    from psft_megatron.config.loader import _check_type, _closest

    data = _as_mapping(data, prefix, "keys")
    fields = _user_fields(cls)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}.{key}'" + _closest(str(key), fields))
        default = fields[key].default if fields[key].default is not dataclasses.MISSING else None
        try:
            values[key] = _check_type(value, default, hints[key], f"{prefix}.{key}")
        except _BaseConfigError as exc:
            raise ConfigError(str(exc)) from None
    obj = cls(**values, **(extra or {}))
    obj.validate(prefix)
    return obj


@dataclass
class TokenizerConfig:
    """``model.tokenizer``: which tokenizer and how to format samples.

    library: ``huggingface`` (a local directory with tokenizer.json / tokenizer_config.json and
        its chat template) or ``sentencepiece`` (a ``.model`` file).
    model: path of the HF directory or the ``.model`` file. ``type`` is accepted as an alias
        (NeMo puts the HF path there); ``model`` wins when both are set.
    chat_template: apply the tokenizer's chat template (HF only; needs one in the dir).
        ``None`` = use it when the tokenizer has one.
    prompt_template: plain template when no chat template is applied; ``{prompt}`` is replaced
        by the user text (the response follows directly, then the EOS token).
    system_template: plain template for a system message (``{system}``).
    end_of_turn_token: the trained terminator; default: detected from the chat template (the
        first special token after the assistant content), else the tokenizer's EOS. With a
        chat template it must be a token the template writes after the content (if it does not
        appear, it is appended after the template's text and counted in
        ``end_of_turn_appended``).
    add_bos: prepend BOS when the tokenizer has one (plain templates only; chat templates
        carry their own). ``None`` = yes for SentencePiece, no for HF.
    """

    library: str = "huggingface"
    model: Optional[str] = None
    type: Optional[str] = None
    chat_template: Optional[bool] = None
    prompt_template: str = "{prompt}\n"
    system_template: str = "{system}\n\n"
    end_of_turn_token: Optional[str] = None
    add_bos: Optional[bool] = None

    @classmethod
    def from_dict(cls, data: Optional[Mapping], prefix: str = "model.tokenizer") -> "TokenizerConfig":
        return _from_dict(cls, data, prefix)

    @property
    def path(self) -> Optional[str]:
        return self.model or self.type

    def validate(self, prefix: str = "model.tokenizer") -> None:
        if self.library not in TOKENIZER_LIBRARIES:
            raise ConfigError(f"{prefix}.library must be one of {TOKENIZER_LIBRARIES}, got {self.library!r}")
        if not self.path:
            raise ConfigError(f"{prefix}.model (or {prefix}.type) must name a local tokenizer path")
        if "{prompt}" not in self.prompt_template:
            raise ConfigError(f"{prefix}.prompt_template must contain '{{prompt}}', got {self.prompt_template!r}")
        if "{system}" not in self.system_template:
            raise ConfigError(f"{prefix}.system_template must contain '{{system}}', got {self.system_template!r}")
        if self.library == "sentencepiece" and self.chat_template:
            raise ConfigError(f"{prefix}.chat_template=true needs library=huggingface (SentencePiece has none)")


#: NeMo data keys that mean nothing here (memory pinning, index files, generation, dataset
#: names): accepted and reported once as ignored. (``num_workers`` is a key here: the
#: tokenising processes.)
NEMO_IGNORED_KEYS = ("memmap_workers", "pin_memory", "index_mapping_dir", "names",
                     "tokens_to_generate", "output_file_path_prefix")
#: NeMo keys accepted only at the value that matches what this pipeline does.
NEMO_FIXED_KEYS = {"write_predictions_to_file": False, "global_sample_mapping": False}
PROBABILITY_TOLERANCE = 1e-6


@dataclass
class DataConfig:
    """``model.data.train_ds`` / ``validation_ds``: files, schema, lengths, packing, order.

    file_names: JSONL files, Parquet files, or HF ``save_to_disk`` directories (local).
    split: the split read from a ``DatasetDict`` directory (default ``train``).
    schema: ``messages`` | ``prompt_response`` | ``prompt_template`` | ``auto`` (``prompt_template``
        when ``prompt_template`` is set, else ``messages`` if ``messages_key`` is in the record,
        else ``prompt_response``).
    prompt_key / response_key / messages_key: dotted paths into the record
        (``extra_info.question``).
    max_seq_length: tokens per sample (unpacked) or per packed row, BEFORE the collate shift;
        a sample of n tokens gives n - 1 (input, label) pairs.
    min_seq_length: samples with fewer tokens are dropped (counted).
    length_policy: ``error`` | ``truncate`` | ``drop`` for samples longer than max_seq_length.
    truncation_side: ``left`` (drop the start of the prompt) or ``right`` (drop the end).
    empty_loss_policy: ``error`` | ``skip`` for a sample with no trained token (after truncation).
    packing: pack several samples per row (``max_seq_length`` tokens each).
    cache_dir: pre-tokenised cache directory; ``None``: the trainer uses
        ``<run dir>/token_cache`` (used directly, ``None`` tokenises into a temporary directory).
    num_workers: processes that tokenise (``None``: the node's CPUs, for data of
        16 MiB or more, else 0); 0 tokenises in the rank's own process.
    seed: the data order's seed (``None``: ``model.seed``).
    shuffle: a new order every epoch (``None``: true for training, false for validation).
    drop_last: the last partial global batch of an epoch is left out (``True``) or filled up
        from the start of the same epoch's order (``False``); for validation, left out or
        evaluated as a partial batch. ``None``: true for training, false for validation.
    concat_sampling_probabilities: one weight per ``file_names`` entry (summing to 1): global
        batches draw from the files in these proportions, each file reshuffled when used up
        (no epochs over the union).
    global_batch_size / micro_batch_size: NeMo's copies of the model's batch sizes; for
        training they must equal ``model.global_batch_size`` / ``model.micro_batch_size``, for
        validation they set its batch sizes.
    prompt_template, label_key, add_bos, add_eos, add_sep, truncation_field,
        truncation_method: NeMo's template data (``{"input": ..., "output": ...}`` records),
        see :mod:`psft_megatron.data.template`.
    """

    file_names: List[str] = field(default_factory=list)
    split: str = "train"
    schema: str = "auto"
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    max_seq_length: int = 4096
    min_seq_length: int = 1
    length_policy: str = "truncate"
    truncation_side: str = "left"
    empty_loss_policy: str = "skip"
    packing: bool = True
    cache_dir: Optional[str] = None
    num_workers: Optional[int] = None
    seed: Optional[int] = None
    shuffle: Optional[bool] = None
    drop_last: Optional[bool] = None
    concat_sampling_probabilities: Optional[List[float]] = None
    global_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    prompt_template: Optional[str] = None
    label_key: Optional[str] = None
    add_bos: Optional[bool] = None
    add_eos: Optional[bool] = None
    add_sep: Optional[bool] = None
    truncation_field: Optional[str] = None
    truncation_method: Optional[str] = None
    #: NeMo keys that were given and have no effect here (full key names)
    ignored_keys: List[str] = field(default_factory=list, repr=False, compare=False, metadata={"internal": True})
    #: the config key of this section, for messages
    prefix: str = field(default="model.data.train_ds", repr=False, compare=False, metadata={"internal": True})

    @classmethod
    def from_dict(cls, data: Optional[Mapping], prefix: str = "model.data.train_ds") -> "DataConfig":
        """Validated config from a dict / OmegaConf node; ``prefix`` names the keys in errors.
        A ``prefix`` ending in ``validation_ds`` gives validation defaults (no shuffle, no
        drop_last)."""
        data = dict(_as_mapping(data, prefix, "data keys"))
        if isinstance(data.get("file_names"), str):
            data["file_names"] = [data["file_names"]]
        ignored = []
        for key in NEMO_IGNORED_KEYS:
            if key in data:
                data.pop(key)
                ignored.append(f"{prefix}.{key}")
        for key, supported in NEMO_FIXED_KEYS.items():
            if key in data:
                value = data.pop(key)
                if value not in (None, supported):
                    raise ConfigError(f"{prefix}.{key}: only {str(supported).lower()} is supported here, got {value!r}")
                ignored.append(f"{prefix}.{key}")
        if "metric" in data:
            metric = data.pop("metric")
            name = metric.get("name", "loss") if isinstance(metric, Mapping) else metric
            if name not in (None, "loss"):
                raise ConfigError(f"{prefix}.metric.name: validation reports the loss (NLL and entropy) only, "
                                  f"got {name!r}; set it to loss or remove it")
            ignored.append(f"{prefix}.metric")
        cfg = _from_dict(cls, data, prefix, extra={"ignored_keys": ignored, "prefix": prefix})
        validation = prefix.rsplit(".", 1)[-1] == "validation_ds"
        if cfg.shuffle is None:
            cfg.shuffle = not validation
        if cfg.drop_last is None:
            cfg.drop_last = not validation
        return cfg

    # ------------------------------------------------------------------ derived
    @property
    def mixing(self) -> bool:
        """True when ``concat_sampling_probabilities`` blends the files."""
        return self.concat_sampling_probabilities is not None

    @property
    def uses_template(self) -> bool:
        """True for NeMo prompt-template data."""
        return self.prompt_template is not None and self.schema in ("auto", "prompt_template")

    def validate(self, prefix: str = "model.data.train_ds") -> None:
        files = self.file_names
        if not isinstance(files, list) or not files:
            raise ConfigError(f"{prefix}.file_names: must list at least one file or directory")
        for i, path in enumerate(files):
            if not isinstance(path, str) or not path:
                raise ConfigError(f"{prefix}.file_names[{i}]: must be a path, got {path!r}")
            if path == "???":
                raise ConfigError(f"{prefix}.file_names[{i}]: '???' is a placeholder for a required value; "
                                  "give the data file paths")
        schemas = SCHEMAS + ("prompt_template",)
        if self.schema not in schemas:
            raise ConfigError(f"{prefix}.schema: must be one of {schemas}, got {self.schema!r}")
        if not isinstance(self.max_seq_length, int) or self.max_seq_length < 2:
            raise ConfigError(f"{prefix}.max_seq_length: must be an int > 1, got {self.max_seq_length!r}")
        if not isinstance(self.min_seq_length, int) or not 1 <= self.min_seq_length <= self.max_seq_length:
            raise ConfigError(f"{prefix}.min_seq_length: must be an int in [1, max_seq_length={self.max_seq_length}],"
                              f" got {self.min_seq_length!r}")
        if self.length_policy not in LENGTH_POLICIES:
            raise ConfigError(f"{prefix}.length_policy: must be one of {LENGTH_POLICIES}, got {self.length_policy!r}")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ConfigError(
                f"{prefix}.truncation_side: must be one of {TRUNCATION_SIDES}, got {self.truncation_side!r}")
        if self.empty_loss_policy not in EMPTY_LOSS_POLICIES:
            raise ConfigError(
                f"{prefix}.empty_loss_policy: must be one of {EMPTY_LOSS_POLICIES}, got {self.empty_loss_policy!r}")
        for key in ("prompt_key", "response_key", "messages_key"):
            if not getattr(self, key):
                raise ConfigError(f"{prefix}.{key}: must be a non-empty (dotted) key")
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or self.num_workers < 0):
            raise ConfigError(f"{prefix}.num_workers: must be null (automatic) or an int >= 0, got {self.num_workers!r}")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"{prefix}.seed: must be >= 0, got {self.seed}")
        for key in ("global_batch_size", "micro_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}: must be >= 1, got {getattr(self, key)}")
        self._validate_mixing(prefix)
        self._validate_template(prefix)

    def _validate_mixing(self, prefix: str) -> None:
        probs = self.concat_sampling_probabilities
        if probs is None:
            return
        key = f"{prefix}.concat_sampling_probabilities"
        if len(probs) != len(self.file_names):
            raise ConfigError(f"{key}: {len(probs)} values for {len(self.file_names)} file_names; give one per file")
        for i, p in enumerate(probs):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
                raise ConfigError(f"{key}[{i}]: must be a number > 0, got {p!r} (remove the file instead of "
                                  "giving it weight 0)")
        total = float(sum(probs))
        if abs(total - 1.0) > PROBABILITY_TOLERANCE:
            raise ConfigError(f"{key}: must sum to 1, got {total:.6g}")
        if self.drop_last is False:
            raise ConfigError(f"{prefix}.drop_last: false has no effect with concat_sampling_probabilities "
                              "(the files are drawn from without epochs, no batch is partial); remove it")

    def _validate_template(self, prefix: str) -> None:
        nemo_keys = ("label_key", "add_bos", "add_eos", "add_sep", "truncation_field", "truncation_method")
        if self.prompt_template is None:
            if self.schema == "prompt_template":
                raise ConfigError(f"{prefix}.schema: prompt_template needs {prefix}.prompt_template "
                                  "(e.g. \"{input} {output}\")")
            for key in nemo_keys:
                if getattr(self, key) is not None:
                    raise ConfigError(f"{prefix}.{key}: applies to prompt_template data only; set "
                                      f"{prefix}.prompt_template (e.g. \"{{input}} {{output}}\") or remove it")
            return
        if self.schema not in ("auto", "prompt_template"):
            raise ConfigError(f"{prefix}.prompt_template: set, but {prefix}.schema={self.schema!r}; use schema "
                              "auto (or prompt_template), or remove prompt_template")
        from psft_megatron.data.template import PromptTemplate

        try:
            template = PromptTemplate(self.prompt_template, self.label_key or "output")
        except ValueError as exc:
            raise ConfigError(f"{prefix}.prompt_template: {exc}") from None
        if self.truncation_method not in (None,) + TRUNCATION_SIDES:
            raise ConfigError(f"{prefix}.truncation_method: must be one of {TRUNCATION_SIDES}, "
                              f"got {self.truncation_method!r}")
        for name in self.truncation_fields():
            if name not in template.fields:
                raise ConfigError(f"{prefix}.truncation_field: {name!r} is not a placeholder of prompt_template "
                                  f"before {{{template.label_key}}}; choose from {template.fields}")

    def truncation_fields(self) -> List[str]:
        """The template fields that are cut first when a sample is too long (comma-separated
        ``truncation_field``)."""
        return [f.strip() for f in (self.truncation_field or "").split(",") if f.strip()]

    def tokenization_settings(self) -> dict:
        """The settings that change tokenised output (part of the cache key)."""
        out = {k: getattr(self, k) for k in ("split", "schema", "prompt_key", "response_key", "messages_key")}
        out["store_layout"] = 3  # the cache format (3: has_target.npy, streamed writes; 2: per-file counts)
        if self.uses_template:
            out.update({k: getattr(self, k) for k in ("prompt_template", "label_key", "add_bos", "add_eos", "add_sep",
                                                       "truncation_field", "truncation_method")})
            if self.truncation_fields():  # field truncation runs while tokenising
                out["max_seq_length"] = self.max_seq_length
        return out


def settings_hash(*parts: Any) -> str:
    """sha256 hex of a JSON rendering of ``parts`` (sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
