"""Tokenizers: Hugging Face (local directory, with its chat template) and SentencePiece.

``build_tokenizer(TokenizerConfig)`` returns a :class:`Tokenizer` with one interface:
``encode(text) -> list[int]`` (no special tokens added), ``bos_id`` / ``eos_id`` / ``pad_id`` /
``sep_id`` (may be None except eos), ``vocab_size``, ``has_chat_template``,
``render_chat(messages, add_generation_prompt) -> str``, ``token_to_id``, ``special_ids`` and
``fingerprint()`` (sha256 over the tokenizer files, for the cache key). Nothing is ever
downloaded: HF tokenizers load with ``local_files_only=True``.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

from psft_megatron.data.config import TokenizerConfig
from psft_megatron.data.errors import ConfigError
from psft_megatron.data.fingerprint import HashMemo, hash_files
from psft_megatron.data.piece_cache import PieceCache, piecewise_problem


def _hash_paths(paths: Sequence[str], memo: Optional[HashMemo] = None) -> str:
    """Fingerprint of tokenizer files: their names (not directories) and bytes."""
    return hash_files(sorted((os.path.basename(p), p) for p in paths), memo)


class Tokenizer:
    """Common interface; see the module docstring."""

    library = ""
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None
    sep_id: Optional[int] = None
    vocab_size: int = 0
    has_chat_template = False

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    @property
    def special_ids(self) -> set:
        return {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    def render_chat(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        raise ConfigError(f"model.tokenizer: the {self.library} tokenizer has no chat template")

    def render_chats(self, conversations: List[List[dict]], add_generation_prompt: bool = False) -> List[str]:
        return [self.render_chat(m, add_generation_prompt) for m in conversations]

    def fingerprint(self, memo: Optional[HashMemo] = None) -> str:
        """sha256 over the tokenizer's files (``memo``: remembered per-file hashes)."""
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer from a local directory."""

    library = "huggingface"

    def __init__(self, path: str, piece_cache: bool = True):
        if not os.path.isdir(path):
            raise ConfigError(f"model.tokenizer.model: {path!r} is not a directory (HF tokenizers load from a local dir)")
        from transformers import AutoTokenizer

        self.path = path
        try:
            self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"model.tokenizer.model: cannot load a Hugging Face tokenizer from {path!r}: {first}") \
                from None
        self.bos_id = self.hf.bos_token_id
        self.eos_id = self.hf.eos_token_id
        self.pad_id = self.hf.pad_token_id
        self.sep_id = self.hf.sep_token_id
        self.vocab_size = len(self.hf)
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))
        #: the word memo in front of encode_batch (None: every text goes to the tokenizer whole)
        self.pieces: Optional[PieceCache] = None
        #: why there is no word memo (None when there is one)
        self.pieces_off: Optional[str] = "turned off"
        backend = getattr(self.hf, "backend_tokenizer", None)
        if piece_cache:
            self.pieces_off = "not a fast tokenizer" if backend is None else piecewise_problem(backend)
            if self.pieces_off is None:
                self.pieces = PieceCache(self._encode_whole, self._encode_offsets)

    def encode(self, text: str) -> List[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """Token ids of each text (no special tokens added), through the word memo where the
        tokenizer allows it (:mod:`psft_megatron.data.piece_cache`): the same ids, cheaper."""
        return self.pieces.encode_batch(texts) if self.pieces is not None else self._encode_whole(texts)

    def _encode_whole(self, texts: List[str]) -> List[List[int]]:
        backend = getattr(self.hf, "backend_tokenizer", None)  # fast tokenizers: skip the Python wrapper
        if backend is not None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def _encode_offsets(self, texts: List[str]) -> List[Tuple[List[int], List[Tuple[int, int]]]]:
        """(ids, character offsets of each token) per text (fast tokenizers only)."""
        return [(e.ids, e.offsets) for e in self.hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.hf.decode(list(ids))

    def token_to_id(self, token: str) -> Optional[int]:
        tid = self.hf.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.hf.unk_token_id else tid

    @property
    def special_ids(self) -> set:
        return set(self.hf.all_special_ids)

    def render_chat(self, messages, add_generation_prompt=False) -> str:
        if not self.has_chat_template:
            return super().render_chat(messages, add_generation_prompt)
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def render_chats(self, conversations: List[List[dict]], add_generation_prompt: bool = False) -> List[str]:
        """:meth:`render_chat` of many conversations in one template call (the same texts)."""
        if not self.has_chat_template:
            return super().render_chats(conversations, add_generation_prompt)
        return self.hf.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)

    def fingerprint(self, memo: Optional[HashMemo] = None) -> str:
        files = [os.path.join(self.path, f) for f in os.listdir(self.path)
                 if os.path.isfile(os.path.join(self.path, f)) and not f.endswith((".safetensors", ".bin", ".pt"))]
        return _hash_paths(files, memo)


class SPTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file."""

    library = "sentencepiece"

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise ConfigError(f"model.tokenizer.model: SentencePiece model file {path!r} not found")
        import sentencepiece as spm

        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as exc:  # noqa: BLE001 - a corrupt or non-SentencePiece file
            raise ConfigError(f"model.tokenizer.model: cannot load SentencePiece model {path!r}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        if self.eos_id is None:
            raise ConfigError(f"model.tokenizer.model: SentencePiece model {path!r} has no EOS piece")

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts):
        return self.sp.encode(texts)

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def token_to_id(self, token: str) -> Optional[int]:
        tid = self.sp.piece_to_id(token)
        return None if tid == self.sp.unk_id() and token != self.sp.id_to_piece(tid) else tid

    def fingerprint(self, memo: Optional[HashMemo] = None) -> str:
        return _hash_paths([self.path], memo)


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer named by ``model.tokenizer.library`` and ``.model`` / ``.type``."""
    cfg.validate()
    if cfg.library == "huggingface":
        return HFTokenizer(cfg.path)
    return SPTokenizer(cfg.path)
