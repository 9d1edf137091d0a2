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
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

from psft_megatron.data.errors import ConfigError

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


def _from_dict(cls, data: Optional[Mapping], prefix: str):
    data = dict(_to_plain(data) or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + '.' + k for k in unknown)}; known: {sorted(names)}")
    obj = cls(**data)
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


@dataclass
class DataConfig:
    """``model.data.train_ds`` / ``validation_ds``: files, schema, lengths, packing.

    file_names: JSONL files, Parquet files, or HF ``save_to_disk`` directories (local).
    split: the split read from a ``DatasetDict`` directory (default ``train``).
    schema: ``messages`` | ``prompt_response`` | ``auto`` (messages if ``messages_key`` present).
    prompt_key / response_key / messages_key: dotted paths into the record
        (``extra_info.question``).
    max_seq_length: tokens per sample (unpacked) or per packed row, BEFORE the collate shift;
        a sample of n tokens gives n - 1 (input, label) pairs.
    length_policy: ``error`` | ``truncate`` | ``drop`` for samples longer than max_seq_length.
    truncation_side: ``left`` (drop the start of the prompt) or ``right`` (drop the end).
    empty_loss_policy: ``error`` | ``skip`` for a sample with no trained token (after truncation).
    packing: pack several samples per row (``max_seq_length`` tokens each).
    cache_dir: pre-tokenised cache directory; ``None`` disables the cache.
    """

    file_names: List[str] = field(default_factory=list)
    split: str = "train"
    schema: str = "auto"
    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    max_seq_length: int = 4096
    length_policy: str = "truncate"
    truncation_side: str = "left"
    empty_loss_policy: str = "skip"
    packing: bool = True
    cache_dir: Optional[str] = None
    seed: int = 1234
    shuffle: bool = True
    drop_last: bool = True

    @classmethod
    def from_dict(cls, data: Optional[Mapping], prefix: str = "model.data.train_ds") -> "DataConfig":
        data = dict(_to_plain(data) or {})
        if isinstance(data.get("file_names"), str):
            data["file_names"] = [data["file_names"]]
        return _from_dict(cls, data, prefix)

    def validate(self, prefix: str = "model.data.train_ds") -> None:
        if not self.file_names:
            raise ConfigError(f"{prefix}.file_names must list at least one file or directory")
        if self.schema not in SCHEMAS:
            raise ConfigError(f"{prefix}.schema must be one of {SCHEMAS}, got {self.schema!r}")
        if not isinstance(self.max_seq_length, int) or self.max_seq_length < 2:
            raise ConfigError(f"{prefix}.max_seq_length must be an int > 1, got {self.max_seq_length!r}")
        if self.length_policy not in LENGTH_POLICIES:
            raise ConfigError(f"{prefix}.length_policy must be one of {LENGTH_POLICIES}, got {self.length_policy!r}")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ConfigError(
                f"{prefix}.truncation_side must be one of {TRUNCATION_SIDES}, got {self.truncation_side!r}"
            )
        if self.empty_loss_policy not in EMPTY_LOSS_POLICIES:
            raise ConfigError(
                f"{prefix}.empty_loss_policy must be one of {EMPTY_LOSS_POLICIES}, got {self.empty_loss_policy!r}"
            )
        for key in ("prompt_key", "response_key", "messages_key"):
            if not getattr(self, key):
                raise ConfigError(f"{prefix}.{key} must be a non-empty (dotted) key")

    def tokenization_settings(self) -> dict:
        """The settings that change tokenised output (part of the cache key)."""
        return {k: getattr(self, k) for k in ("split", "schema", "prompt_key", "response_key", "messages_key")}


def settings_hash(*parts: Any) -> str:
    """sha256 hex of a JSON rendering of ``parts`` (sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
