"""The token ids an exported model needs so that ``generate()`` stops: ``bos_token_id``,
``eos_token_id`` and ``pad_token_id`` in ``config.json`` and ``generation_config.json``, taken
from the tokenizer the export ships.

``eos_token_id`` starts from the END-OF-TURN token the trainer trained as the terminator of
every assistant turn, found exactly as the trainer finds it
(:class:`psft_megatron.data.formatting.SampleFormatter`, with the checkpoint's recorded
``model.tokenizer`` settings): ``end_of_turn_token`` when set, else the chat template's
terminator (``<|im_end|>`` for ChatML / Qwen, ``<|eot_id|>`` for Llama-3), else the tokenizer's
EOS. The template's own stop ids (e.g. Llama-3.1's ``[<|end_of_text|>, <|eom_id|>,
<|eot_id|>]``) are kept, with the end-of-turn token put first when they lack it, and the
tokenizer's EOS is added when missing. ``bos`` / ``pad`` are the tokenizer's, else the
template's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional

from psft_megatron.convert.errors import ConversionError

#: files whose presence means a directory holds a Hugging Face tokenizer
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass
class StopIds:
    """Token ids of one tokenizer. ``eos``: every id that ends a reply, end-of-turn first."""

    end_of_turn: int
    eos: List[int]
    bos: Optional[int] = None
    pad: Optional[int] = None


def has_tokenizer(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_MARKERS)


def _ids(value: Any) -> List[int]:
    """An ``eos_token_id`` value (int, list of ints or None) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def tokenizer_stop_ids(tokenizer_dir: str, settings: Mapping[str, Any]) -> StopIds:
    """The end-of-turn, EOS, BOS and pad ids of the Hugging Face tokenizer in ``tokenizer_dir``.

    Args:
        settings: the recorded ``model.tokenizer`` keys (``chat_template``,
            ``end_of_turn_token``, ...); the path keys and unknown keys are ignored.
    Raises:
        ConversionError: the tokenizer cannot be loaded, or the settings name a token it does
            not have (the directory and the reason are named).
    """
    from psft_megatron.data.config import TokenizerConfig
    from psft_megatron.data.formatting import SampleFormatter
    from psft_megatron.data.tokenizers import build_tokenizer
    from psft_megatron.errors import UserError

    known = {f.name for f in dataclasses.fields(TokenizerConfig)} - {"library", "model", "type"}
    values = {k: v for k, v in dict(settings or {}).items() if k in known}
    try:
        cfg = TokenizerConfig.from_dict(dict(values, library="huggingface", model=tokenizer_dir))
        tok = build_tokenizer(cfg)
        end_of_turn = SampleFormatter(tok, cfg).eot_id
    except UserError as exc:
        raise ConversionError(f"the exported tokenizer ({tokenizer_dir}) cannot give the stop token ids: {exc}; "
                              "pass --tokenizer DIR with a working tokenizer") from None
    eos = [end_of_turn] + ([tok.eos_id] if tok.eos_id is not None and tok.eos_id != end_of_turn else [])
    return StopIds(end_of_turn=end_of_turn, eos=eos, bos=tok.bos_id, pad=tok.pad_id)


def merged_ids(ids: Optional[StopIds], hf: Mapping[str, Any], generation: Mapping[str, Any]) -> Dict[str, Any]:
    """``{bos_token_id, eos_token_id, pad_token_id}`` for the export: the tokenizer's ``ids``
    merged with what the template's ``config.json`` (``hf``) and ``generation_config.json``
    say (see the module doc). Without a tokenizer the template's values, None where it has none.
    ``eos_token_id`` is an int when there is one id, else a list."""
    def template(key):
        value = generation.get(key)
        return value if value is not None else hf.get(key)

    if ids is None:
        return {key: template(key) for key in ID_KEYS}
    eos = _ids(template("eos_token_id"))
    if ids.end_of_turn not in eos:
        eos.insert(0, ids.end_of_turn)
    eos += [i for i in ids.eos if i not in eos]
    return {"bos_token_id": ids.bos if ids.bos is not None else template("bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": ids.pad if ids.pad is not None else template("pad_token_id")}


def apply_ids(hf: Dict[str, Any], generation: Dict[str, Any], ids: Mapping[str, Any]) -> None:
    """Write ``ids`` into config.json (``hf``; None as null, so that transformers' per-class
    defaults - LlamaConfig's bos 1 / eos 2 - cannot stand in for unknown ids) and into
    generation_config.json (``generation``; unknown ids left out), in place."""
    for key in ID_KEYS:
        hf[key] = ids.get(key)
        if ids.get(key) is not None:
            generation[key] = ids[key]
        else:
            generation.pop(key, None)
