"""NeMo's prompt-template SFT data: ``{"input": ..., "output": ...}`` records and a template
such as ``"{input} {output}"`` or ``"Q: {input}\\nA: {output}"``.

Keys (``model.data.train_ds`` / ``validation_ds``, as in NeMo's ``megatron_gpt_finetuning_config``):

- ``prompt_template``: text with ``{field}`` placeholders (dotted paths into the record allowed);
  ``{label_key}`` must be the last thing in it. ``\\n``, ``\\t`` and ``\\r`` written as two
  characters (a command-line override, a single-quoted YAML string) are read as the control
  characters, as NeMo does.
- ``label_key`` (default ``output``): the field that is trained.
- ``add_bos`` (default false), ``add_sep`` (default false), ``add_eos`` (default true): BOS
  before everything, the tokenizer's SEP token between prompt and label, EOS after the label.
- ``truncation_field`` (comma-separated placeholders) and ``truncation_method`` (``right``
  default: cut the end of the field; ``left``: cut its start): a sample longer than
  ``max_seq_length`` is first shortened inside these fields (the overflow is split evenly over
  them; what a too-short field cannot give comes from the others), then the ``length_policy``
  handles what is still too long. Cuts are counted (``field_truncated``).

Each template piece is tokenised on its own: literal text, every field value (with the spaces
written right before its placeholder) and the label, so a token never straddles the
prompt/label boundary. Output per sample, as every formatter here::

    input_ids int32 [n] = [BOS] pieces... [SEP] label [EOS]
    loss_mask uint8 [n] = 1 on the label tokens and the EOS, 0 elsewhere

The tokenizer's chat template is not used for template data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from psft_megatron.data.errors import ConfigError, DataError, Location
from psft_megatron.data.conversation import get_path

_PLACEHOLDER = re.compile(r"( *)\{([^{}]*)\}")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` written as backslash + letter -> the control character."""
    return re.sub(r"\\([ntr])", lambda m: _ESCAPES[m.group(1)], text)


@dataclass(frozen=True)
class Piece:
    """A part of the template: literal ``text``, or a ``field`` (record key) with the
    ``spaces`` written before its placeholder; ``label`` marks the trained field."""

    text: str = ""
    field: Optional[str] = None
    spaces: str = ""
    label: bool = False


class PromptTemplate:
    """A parsed ``prompt_template``; raises ValueError (the caller names the key) when the
    template has no ``{label_key}`` at its end or an empty placeholder."""

    def __init__(self, template: str, label_key: str = "output"):
        if not isinstance(template, str) or not template:
            raise ValueError(f"must be a non-empty string, got {template!r}")
        self.text = unescape(template)
        self.label_key = label_key
        pieces: List[Piece] = []
        at = 0
        for m in _PLACEHOLDER.finditer(self.text):
            if m.start() > at:
                pieces.append(Piece(text=self.text[at:m.start()]))
            name = m.group(2).strip()
            if not name:
                raise ValueError(f"empty placeholder '{{}}' in {template!r}")
            pieces.append(Piece(field=name, spaces=m.group(1), label=name == label_key))
            at = m.end()
        if at < len(self.text):
            pieces.append(Piece(text=self.text[at:]))
        labels = [p for p in pieces if p.label]
        if not labels or not pieces[-1].label:
            raise ValueError(f"{{{label_key}}} (label_key) must be at the end of the template, got {template!r}")
        if len(labels) > 1:
            raise ValueError(f"{{{label_key}}} (label_key) appears {len(labels)} times in {template!r}; once, at the end")
        self.pieces = pieces
        #: the placeholders before the label, in template order (unique)
        self.fields = list(dict.fromkeys(p.field for p in pieces if p.field is not None and not p.label))


# A part of a sample before tokenisation: (text or None, fixed ids or None, trained, field name or None)
Part = Tuple[Optional[str], Optional[List[int]], int, Optional[str]]


class TemplateFormatter:
    """Records + ``prompt_template`` -> ``(input_ids int32 [n], loss_mask uint8 [n])``.

    ``convert(record, loc)`` checks the record and returns its parts; ``format_batch(parts,
    locs)`` tokenises many samples in one batched call and applies the field truncation.
    ``stats`` counts ``field_truncated`` samples and ``field_truncated_tokens`` (and the first
    location, ``first_field_truncated``). Attributes used by the cache key: ``use_chat``
    (False), ``bos``, ``eot_id`` (the EOS, or None without ``add_eos``).
    """

    use_chat = False

    def __init__(self, tokenizer, data_cfg):
        prefix = data_cfg.prefix
        self.tok = tokenizer
        self.template = PromptTemplate(data_cfg.prompt_template, data_cfg.label_key or "output")
        self.bos: List[int] = []
        if data_cfg.add_bos:
            if tokenizer.bos_id is None:
                raise ConfigError(f"{prefix}.add_bos: the tokenizer has no BOS token; set add_bos: false")
            self.bos = [tokenizer.bos_id]
        self.sep: List[int] = []
        if data_cfg.add_sep:
            sep = getattr(tokenizer, "sep_id", None)
            if sep is None:
                raise ConfigError(f"{prefix}.add_sep: the tokenizer has no SEP token; set add_sep: false")
            self.sep = [sep]
        add_eos = True if data_cfg.add_eos is None else bool(data_cfg.add_eos)
        if add_eos and tokenizer.eos_id is None:
            raise ConfigError(f"{prefix}.add_eos: the tokenizer has no EOS token; set add_eos: false")
        self.eot_id = tokenizer.eos_id if add_eos else None
        self.max_len = data_cfg.max_seq_length
        self.trunc_fields = set(data_cfg.truncation_fields())
        self.trunc_left = (data_cfg.truncation_method or "right") == "left"
        self.stats = {"field_truncated": 0, "field_truncated_tokens": 0}

    # ------------------------------------------------------------------ records
    def convert(self, record: Mapping, loc: Location) -> List[Part]:
        """One record -> its parts; a missing key, a non-string value or an empty label is a
        DataError naming file, line/row and key."""
        parts: List[Part] = []
        if self.bos:
            parts.append((None, list(self.bos), 0, None))
        for piece in self.template.pieces:
            if piece.field is None:
                parts.append((piece.text, None, 0, None))
                continue
            value: Any = get_path(record, piece.field, loc)
            if not isinstance(value, str):
                raise DataError(f"{piece.field!r} must be a string, got {type(value).__name__}", loc)
            if piece.label:
                if not value.strip():
                    raise DataError(f"empty response: {piece.field!r} is empty", loc)
                if self.sep:
                    parts.append((None, list(self.sep), 0, None))
                parts.append((piece.spaces + value, None, 1, None))
            elif piece.spaces + value:
                parts.append((piece.spaces + value, None, 0, piece.field))
        if self.eot_id is not None:
            parts.append((None, [self.eot_id], 1, None))
        return parts

    # ------------------------------------------------------------------ ids + mask
    def format_batch(self, samples: Sequence[List[Part]], locs: Sequence[Location]):
        """Many samples at once (one batched tokenizer call); list of (ids, mask)."""
        texts = [text for parts in samples for text, fixed, _, _ in parts if fixed is None]
        enc_batch = getattr(self.tok, "encode_batch", None)
        encoded = iter(enc_batch(texts) if (enc_batch and texts) else [self.tok.encode(t) for t in texts])
        out = []
        for parts, loc in zip(samples, locs):
            pieces = [(list(fixed) if fixed is not None else list(next(encoded)), kind, name)
                      for _, fixed, kind, name in parts]
            self._truncate_fields(pieces, loc)
            ids = [i for p, _, _ in pieces for i in p]
            mask = [kind for p, kind, _ in pieces for _ in p]
            out.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)))
        return out

    def _truncate_fields(self, pieces: List[Tuple[List[int], int, Optional[str]]], loc: Location) -> None:
        """Shorten the truncation fields (in place) until the sample fits in max_seq_length:
        an even share of the overflow from each, then the rest from whichever still has tokens."""
        overflow = sum(len(p) for p, _, _ in pieces) - self.max_len
        cuttable = [i for i, (_, _, name) in enumerate(pieces) if name in self.trunc_fields]
        if overflow <= 0 or not cuttable:
            return
        share, extra = divmod(overflow, len(cuttable))
        cuts = {i: min(len(pieces[i][0]), share + (1 if j < extra else 0)) for j, i in enumerate(cuttable)}
        left = overflow - sum(cuts.values())
        for i in cuttable:
            more = min(left, len(pieces[i][0]) - cuts[i])
            cuts[i] += more
            left -= more
        total = 0
        for i, cut in cuts.items():
            if cut:
                ids, kind, name = pieces[i]
                pieces[i] = (ids[cut:] if self.trunc_left else ids[: len(ids) - cut], kind, name)
                total += cut
        if total:
            self.stats["field_truncated"] += 1
            self.stats["field_truncated_tokens"] += total
            self.stats.setdefault("first_field_truncated", str(loc))
