"""Token ids of many texts through a memo of their words: each distinct word is encoded once.

A byte-level BPE tokenizer (GPT-2, SmolLM2, Llama-3, Qwen2, ...) cuts a text into pieces with a
regular expression and runs BPE on each piece alone. So wherever the expression always cuts,
``encode(a + b) == encode(a) + encode(b)``. :class:`PieceCache` cuts texts at such places only:
before a space that follows a printable ASCII character and precedes an ASCII letter
(``"Hi| there,| said| the| cat."``; a space before a digit, a quote or another space is not a
cut). The pieces of a batch of texts are looked up in a dict; the ones not seen yet go to the
tokenizer in one batched call. On English-like text ~99 % of the pieces are hits, which makes
encoding several times cheaper than the tokenizer's own per-token work; the ids are the same.

Why those cuts are the tokenizer's cuts, for the pre-tokenizers :func:`piecewise_problem`
accepts (GPT-2's expression inside ``ByteLevel(use_regex=True)``, and :data:`SPLIT_PATTERNS`:
Llama-3's, Qwen2's and Qwen3.5's in a ``Split`` before ``ByteLevel(use_regex=False)``): in each,
no alternative that has consumed a non-whitespace character goes on to consume a space, and the
only look-ahead, ``(?!\\S)``, follows whitespace. So the match holding the character before the
space ends there (and ends there whatever follows the space), the next match starts at the
space, and a match never looks behind: the text after the cut is split as it would be alone.
``" " + letter`` opens a word in all of them. The characters involved are ASCII, which every
regex engine and Unicode version classifies alike. Added tokens (``<|im_end|>``) are cut out
first; none may contain whitespace or strip it (``lstrip``/``rstrip``/``single_word``), so no
added token spans a cut. An NFC normaliser keeps the cuts: a space starts a new composition
segment. Anything else (other normalisers or pre-tokenizers, BPE dropout, truncation or padding
set on the tokenizer): :func:`piecewise_problem` names it and the caller encodes whole texts.
"""

from __future__ import annotations

import bisect
import json
import re
from itertools import chain
from typing import Callable, Dict, List, Optional, Sequence, Tuple

#: a piece: one character (the start, or the cutting space), then up to the next cut
_PIECE = re.compile(r"(?s).[^ ]*(?:(?: (?![A-Za-z])|(?<![!-~]) )[^ ]*)*")

#: a piece that can be joined to others for encoding: a cut at each end
_JOINABLE = re.compile(r" [A-Za-z][^ ]*(?:(?: (?![A-Za-z])|(?<![!-~]) )[^ ]*)*(?<=[!-~])", re.S)
#: joinable pieces per text handed to the tokenizer
JOIN_PIECES = 256

#: ``Split`` expressions (``behavior: Isolated``) known to cut before ``" " + letter`` after
#: any non-whitespace character, and never inside ``"c "`` (see the module docstring)
SPLIT_PATTERNS = (
    # Llama-3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
    # Qwen2, Qwen2.5, Qwen3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
    # Qwen3.5
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)

#: pieces remembered at most (then the memo starts again): ~200 bytes each
MAX_ENTRIES = 1 << 16
#: longer pieces are encoded but not remembered (they rarely come back)
MAX_PIECE_CHARS = 48
#: a batch with more new pieces than this share of its pieces is encoded whole: a new piece
#: costs about twice its share of a whole-text encode, so text that rarely repeats its words
#: (random ids, hashes, unfamiliar scripts) is not made slower than the tokenizer alone
MAX_NEW_SHARE = 0.4


def split_pieces(text: str) -> List[str]:
    """``text`` cut before every space that follows a printable ASCII character and precedes an
    ASCII letter; ``"".join(split_pieces(t)) == t``."""
    return _PIECE.findall(text)


def _state(component) -> Optional[dict]:
    return None if component is None else json.loads(component.__getstate__())


def _pre_tokenizer_problem(pre: Optional[dict]) -> Optional[str]:
    if pre is None:
        return "no pre-tokenizer"
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex") and not pre.get("add_prefix_space"):
            return None
        return "ByteLevel pre-tokenizer without its expression or with add_prefix_space"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        split, byte_level = steps
        if (split.get("pattern", {}).get("Regex") in SPLIT_PATTERNS and split.get("behavior") == "Isolated"
                and not split.get("invert") and not byte_level.get("use_regex")
                and not byte_level.get("add_prefix_space")):
            return None
    return f"pre-tokenizer {json.dumps(pre)[:200]} is not one whose cuts are known"


def piecewise_problem(backend) -> Optional[str]:
    """None when ``backend`` (a ``tokenizers.Tokenizer``) encodes a text as the concatenation of
    its :func:`split_pieces`, else why not (one line)."""
    try:
        normalizer = _state(backend.normalizer)
        pre = _state(backend.pre_tokenizer)
        model = json.loads(backend.model.__getstate__())
        added = backend.get_added_tokens_decoder().values()
    except Exception as exc:  # noqa: BLE001 - an older or unusual tokenizers build
        return f"cannot inspect the tokenizer ({type(exc).__name__})"
    if normalizer is not None and normalizer.get("type") != "NFC":
        return f"normalizer {normalizer.get('type')}"
    if model.get("type") != "BPE" or model.get("dropout"):
        return "not a BPE model without dropout"
    if backend.truncation is not None or backend.padding is not None:
        return "truncation or padding is set on the tokenizer"
    for token in added:
        if token.lstrip or token.rstrip or token.single_word or any(ch.isspace() for ch in token.content):
            return f"added token {token.content!r} holds or strips whitespace"
    return _pre_tokenizer_problem(pre)


class PieceCache:
    """``encode_batch(texts)`` through a memo of pieces; ``encode_whole(texts) -> ids lists`` is
    the tokenizer's own batched call (no special tokens added), used for the pieces not seen yet.

    ``hits`` / ``misses`` count piece look-ups, ``whole_batches`` the batches encoded whole
    because most of their pieces were new (for benchmarks)."""

    def __init__(self, encode_whole: Callable[[List[str]], List[List[int]]],
                 encode_offsets: Callable[[List[str]], List[Tuple[List[int], List[Tuple[int, int]]]]],
                 max_entries: int = MAX_ENTRIES, max_piece_chars: int = MAX_PIECE_CHARS):
        self.encode_whole, self.encode_offsets = encode_whole, encode_offsets
        self.max_entries, self.max_piece_chars = max_entries, max_piece_chars
        self.max_new_share = MAX_NEW_SHARE
        self.memo: Dict[str, List[int]] = {}
        self.hits = self.misses = self.whole_batches = 0

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text, as ``encode_whole(texts)`` would give them."""
        memo = self.memo
        if len(memo) >= self.max_entries:  # bounded memory: start again (a batch may overshoot)
            memo.clear()
        split = [_PIECE.findall(t) for t in texts]
        new = set(chain.from_iterable(split)).difference(memo)
        n_pieces = sum(map(len, split))
        if len(new) > self.max_new_share * n_pieces:  # mostly new words: the memo would cost more than it saves
            self.misses += len(new)
            self.whole_batches += 1
            return self.encode_whole(list(texts))
        if new:
            memo.update(self._encode_new(new))
            self.misses += len(new)
        pick = memo.__getitem__
        out = [list(chain.from_iterable(map(pick, pieces))) for pieces in split]
        self.hits += n_pieces - len(new)
        for p in new:  # long pieces rarely come back
            if len(p) > self.max_piece_chars:
                del memo[p]
        return out

    def _encode_new(self, pieces) -> Dict[str, List[int]]:
        """Ids of pieces not seen yet. A piece that opens with ``" " + letter`` and ends in a
        printable ASCII character can follow any such piece at a cut, so those go to the
        tokenizer joined into a few long texts (a text per piece costs the tokenizer ~20 us of
        overhead, 10x a word's BPE) and are taken apart by the tokens' offsets; the others go
        one by one."""
        joinable, alone = [], []
        for p in pieces:
            (joinable if _JOINABLE.fullmatch(p) else alone).append(p)
        found = dict(zip(alone, self.encode_whole(alone))) if alone else {}
        groups = [joinable[i:i + JOIN_PIECES] for i in range(0, len(joinable), JOIN_PIECES)]
        for group, (ids, offsets) in zip(groups, self.encode_offsets(["".join(g) for g in groups])):
            split = _split_by_offsets(group, ids, offsets)
            # a token across two pieces would break the premise: encode those pieces alone
            found.update(zip(group, split if split is not None else self.encode_whole(group)))
        return found


def _split_by_offsets(group: Sequence[str], ids: List[int], offsets: List[Tuple[int, int]]) -> Optional[List[List[int]]]:
    """The ids of ``"".join(group)`` cut into each piece's tokens by the tokens' character
    offsets (a token starts inside its piece), or None if a token ends past its piece's end
    or a piece gets no token."""
    starts = [s for s, _ in offsets]
    out, at, first = [], 0, 0
    for p in group:
        at += len(p)
        last = bisect.bisect_left(starts, at, first)
        if last == first or offsets[last - 1][1] > at:
            return None
        out.append(ids[first:last])
        first = last
    return out if first == len(ids) else None
