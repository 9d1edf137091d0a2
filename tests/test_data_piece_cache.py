"""The word-piece memo (psft_megatron.data.piece_cache) gives the tokenizer's own ids: texts,
chat / plain / NeMo-template records (token ids AND loss masks) against the same formatter
encoding whole texts; byte-level tokenizers with GPT-2's expression and with Llama-3 / Qwen
``Split`` expressions; and every tokenizer it cannot vouch for is refused (encoded whole)."""

import json
import os
import random
import shutil

import numpy as np
import pytest

from psft_megatron.data import DataConfig, SampleFormatter, TokenizerConfig
from psft_megatron.data.conversation import to_conversation
from psft_megatron.data.errors import DataError, Location
from psft_megatron.data.piece_cache import SPLIT_PATTERNS, PieceCache, split_pieces
from psft_megatron.data.template import TemplateFormatter
from psft_megatron.data.tokenizers import HFTokenizer
from tests.data_fixtures.helpers import HF_TOKENIZER

# pieces of text that stress the cuts: spaces before digits, quotes, other spaces; unicode
# letters, marks, CJK, emoji, no-break and ideographic spaces; contractions; CR/LF, tabs; the
# tokenizer's added tokens inside content
ATOMS = (["hello", "The", "cat's", "don't", "I'LL", "x1", "3.14", "2026", "naïve", "über", "日本語", "—", "…",
          "e\u0301", "😀", "Ωmega", "ا", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "'s", "'ll", "\"q\"",
          "(a)", "[b]", "-c", "_d", "#", "http://x.y/z?q=1"]
         + list(" \n\t\r.,;:!?'\"`0123456789") + [" ", "  ", "   ", "\n\n", "\r\n", "\u00a0", "\u3000", " \n "])


def random_text(rng: random.Random, atoms: int = 40) -> str:
    return "".join(rng.choice(ATOMS) if rng.random() < 0.7 else " " for _ in range(rng.randint(0, atoms)))


def with_pre_tokenizer(tmp_path, name: str, edit) -> str:
    """A copy of the bundled tokenizer with ``edit(tokenizer_json)`` applied; its directory."""
    d = tmp_path / name
    shutil.copytree(HF_TOKENIZER, d)
    j = json.loads((d / "tokenizer.json").read_text())
    edit(j)
    (d / "tokenizer.json").write_text(json.dumps(j))
    return str(d)


def split_then_bytes(pattern: str):
    def edit(j):
        j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return edit


@pytest.fixture(scope="module", params=["gpt2", "llama3", "qwen2", "qwen3.5"])
def accepted(request, tmp_path_factory):
    """An HF tokenizer the memo accepts: the bundled byte-level one (GPT-2's expression) or it
    re-cut by a known Split expression."""
    if request.param == "gpt2":
        tok = HFTokenizer(HF_TOKENIZER)
    else:
        edit = split_then_bytes(SPLIT_PATTERNS[["llama3", "qwen2", "qwen3.5"].index(request.param)])
        tok = HFTokenizer(with_pre_tokenizer(tmp_path_factory.mktemp(request.param), "tok", edit))
    tok.pieces.max_new_share = 1.0  # random text is mostly new words: use the memo all the same
    return tok


def test_split_pieces_cuts_only_before_space_letter_after_ascii():
    assert split_pieces("Hi there, said  the cat 42 'x' é y\nz .w") == [
        "Hi", " there,", " said  the", " cat 42 'x' é y\nz .w"]
    rng = random.Random(0)
    for _ in range(200):
        t = random_text(rng)
        assert "".join(split_pieces(t)) == t


def test_texts_encode_as_the_tokenizer_does(accepted):
    tok = accepted
    assert tok.pieces is not None and tok.pieces_off is None
    rng = random.Random(1)
    tok.pieces.max_entries = 300  # the memo fills and starts again within the test
    for _ in range(12):
        texts = [random_text(rng) for _ in range(40)] + ["", " ", "a", " b", "\n"]
        assert tok.encode_batch(texts) == tok._encode_whole(texts)
    assert tok.pieces.hits > 0 and tok.pieces.misses > 0 and tok.pieces.whole_batches == 0


def test_batches_of_mostly_new_words_are_encoded_whole():
    tok = HFTokenizer(HF_TOKENIZER)
    texts = [f"alpha{i} beta{i}, gamma{i}" for i in range(40)]
    assert tok.encode_batch(texts) == tok._encode_whole(texts)
    assert tok.pieces.whole_batches == 1 and tok.pieces.hits == 0 and not tok.pieces.memo
    again = ["the cat" + " the cat" * 9]  # 20 pieces, 3 of them distinct
    assert tok.encode_batch(again) == tok._encode_whole(again)
    assert tok.pieces.whole_batches == 1 and tok.pieces.hits == 17 and len(tok.pieces.memo) == 3


def records(rng: random.Random, n: int):
    """Varied chat records: system prompts, multi-turn, assistant-first, prompt/response."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 3:
            out.append({"prompt": random_text(rng) or "p", "response": random_text(rng).strip() or "ok"})
            continue
        msgs = [{"role": "system", "content": random_text(rng, 10)}] if kind == 1 else []
        if kind == 2:
            msgs.append({"role": "assistant", "content": random_text(rng).strip() or "x"})
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng) + "z"}]
        if rng.random() < 0.3:
            msgs.append({"role": "user", "content": random_text(rng)})  # untrained tail
        out.append({"messages": msgs})
    return out


def formatted(fmt, recs, fast: bool, template: bool = False):
    """Samples of ``recs`` in chunks of 64; ``fast`` False: the straightforward path instead (no
    memo, each chat prefix rendered alone, each text encoded alone by ``encode``)."""
    tok = fmt.tok
    if not fast:
        tok.pieces = None
        tok.render_chats = lambda convs, add_generation_prompt=False: [
            tok.render_chat(m, add_generation_prompt) for m in convs]
        tok.encode_batch = lambda texts: [tok.encode(t) for t in texts]
    try:
        locs = [Location("r.jsonl", line=i + 1) for i in range(len(recs))]
        convs = [fmt.convert(r, l) if template else to_conversation(r, l, "auto", "prompt", "response", "messages")
                 for r, l in zip(recs, locs)]
        return [s for i in range(0, len(convs), 64) for s in fmt.format_batch(convs[i:i + 64], locs[i:i + 64])]
    finally:
        for name in ("render_chats", "encode_batch"):
            tok.__dict__.pop(name, None)
        if tok.pieces is None and tok.pieces_off is None:
            tok.pieces = PieceCache(tok._encode_whole, tok._encode_offsets)
            tok.pieces.max_new_share = 1.0


def assert_same(a, b):
    assert len(a) == len(b)
    for (ids_a, mask_a), (ids_b, mask_b) in zip(a, b):
        assert ids_a.dtype == ids_b.dtype and mask_a.dtype == mask_b.dtype
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(mask_a, mask_b)


@pytest.mark.parametrize("chat", [True, False])
def test_records_identical_ids_and_masks(accepted, chat):
    cfg = TokenizerConfig(library="huggingface", model=HF_TOKENIZER, chat_template=chat)
    fmt = SampleFormatter(accepted, cfg)
    recs = records(random.Random(2), 96)
    new, plain = formatted(fmt, recs, True), formatted(fmt, recs, False)
    assert_same(new, plain)
    assert sum(int(m.sum()) for _, m in plain) > 0


def test_nemo_template_records_identical(accepted):
    data_cfg = DataConfig(file_names=["r.jsonl"], prompt_template="{system}\n\nQ: {input} A: {output}",
                          label_key="output")
    fmt = TemplateFormatter(accepted, data_cfg)
    rng = random.Random(3)
    recs = [{"system": random_text(rng, 8), "input": random_text(rng), "output": random_text(rng).strip() or "y"}
            for _ in range(64)]
    assert_same(formatted(fmt, recs, True, template=True), formatted(fmt, recs, False, template=True))


#: an expression that puts a word's FOLLOWING space with it: not piecewise at the memo's cuts
TRAILING_SPACE = r"\S+\s*|\s+"


def _prepend(j):
    j["normalizer"] = {"type": "Prepend", "prepend": "\u2581"}


def _added_lstrip(j):
    j["added_tokens"][2]["lstrip"] = True


def _prefix_space(j):
    j["pre_tokenizer"]["add_prefix_space"] = True


REFUSED = {
    "ByteLevel pre-tokenizer without its expression or with add_prefix_space": _prefix_space,
    "normalizer Lowercase": lambda j: j.update(normalizer={"type": "Lowercase"}),
    "normalizer Prepend": _prepend,
    "not a BPE model without dropout": lambda j: j["model"].update(dropout=0.1),
    "added token '<|im_end|>' holds or strips whitespace": _added_lstrip,
    "pre-tokenizer {\"type\": \"Sequence\"": split_then_bytes(TRAILING_SPACE),
    "pre-tokenizer {\"type\": \"Whitespace\"": lambda j: j.update(pre_tokenizer={"type": "Whitespace"}),
    "truncation or padding is set": lambda j: j.update(truncation={"direction": "Right", "max_length": 512,
                                                                   "strategy": "LongestFirst", "stride": 0}),
}


@pytest.mark.parametrize("why", list(REFUSED))
def test_refused_tokenizers_encode_whole(tmp_path, why):
    tok = HFTokenizer(with_pre_tokenizer(tmp_path, "tok", REFUSED[why]))
    assert tok.pieces is None and tok.pieces_off.startswith(why)
    texts = [random_text(random.Random(4)) for _ in range(20)]
    if "dropout" not in why:  # BPE dropout: random cuts, the same call twice differs
        assert tok.encode_batch(texts) == tok._encode_whole(texts)


def test_refusal_is_needed_and_the_comparison_sees_it(tmp_path):
    """Forced onto a refused tokenizer (a normaliser that prepends to each text), the memo's ids
    differ: the identity tests above can fail."""
    tok = HFTokenizer(with_pre_tokenizer(tmp_path, "tok", _prepend))
    forced = PieceCache(tok._encode_whole, tok._encode_offsets)
    forced.max_new_share = 1.0
    texts = ["Hello there, said the cat."]
    assert forced.encode_batch(texts) != tok._encode_whole(texts)
    assert HFTokenizer(HF_TOKENIZER, piece_cache=False).pieces_off == "turned off"


def test_a_failing_template_names_its_record_in_order():
    tok = HFTokenizer(HF_TOKENIZER)
    tok.hf.chat_template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
                            "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = SampleFormatter(tok, TokenizerConfig(library="huggingface", model=HF_TOKENIZER))
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "boom"}]}
    locs = [Location("r.jsonl", line=i + 1) for i in range(3)]
    convs = [to_conversation(r, l, "auto", "prompt", "response", "messages") for r, l in zip([ok, bad, bad], locs)]
    with pytest.raises(DataError, match=r"r\.jsonl:line 2: the chat template fails on this record: no boom"):
        fmt.format_batch(convs, locs)
    assert len(fmt.format_batch(convs[:1], locs[:1])) == 1
