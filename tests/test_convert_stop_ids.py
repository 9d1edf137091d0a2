"""The stop token ids an export writes (psft_megatron/convert/generation.py), in-process.

Tiny word-level tokenizers in the ChatML (Qwen) and Llama-3 formats: the end-of-turn token is
found as the trainer finds it, comes first in ``eos_token_id``, and a template's own stop ids
are kept. ``generate()`` itself stopping on an export is checked end to end in
tests/test_convert.py (test_export_generates_until_the_end_of_turn_token).
"""

import pytest

from psft_megatron.convert import ConversionError
from psft_megatron.convert.generation import apply_ids, merged_ids, tokenizer_stop_ids
from tests.parallel.convert_chat import WORDS, make_chatml_tokenizer

LLAMA3_WORDS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|eom_id|>", "user", "assistant", "hello"]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _word_tokenizer(out, words, template=None, **special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    make_chatml_tokenizer(str(root / "chatml"))
    return {
        "chatml": str(root / "chatml"),
        "llama3": _word_tokenizer(root / "llama3", LLAMA3_WORDS, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                                  eos_token="<|end_of_text|>",
                                  additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                                             "<|eom_id|>"]),
        "plain": _word_tokenizer(root / "plain", ["<unk>", "<eos>", "hello"], eos_token="<eos>"),
    }


def test_chatml_stops_at_im_end_then_the_tokenizers_eos(tokenizers):
    ids = tokenizer_stop_ids(tokenizers["chatml"], {})
    im_end, endoftext = WORDS.index("<|im_end|>"), WORDS.index("<|endoftext|>")
    assert (ids.end_of_turn, ids.eos, ids.bos, ids.pad) == (im_end, [im_end, endoftext], None, endoftext)
    assert merged_ids(ids, {}, {}) == {"bos_token_id": None, "eos_token_id": [im_end, endoftext],
                                       "pad_token_id": endoftext}


def test_llama3_stops_at_eot_id_and_keeps_the_templates_stop_list(tokenizers):
    w = LLAMA3_WORDS.index
    ids = tokenizer_stop_ids(tokenizers["llama3"], {})
    assert (ids.end_of_turn, ids.eos, ids.bos, ids.pad) == (w("<|eot_id|>"), [w("<|eot_id|>"), w("<|end_of_text|>")],
                                                           w("<|begin_of_text|>"), None)
    # Llama-3.1-Instruct's generation_config already stops at eot_id: its list is kept as it is
    instruct = {"eos_token_id": [w("<|end_of_text|>"), w("<|eom_id|>"), w("<|eot_id|>")], "do_sample": True}
    assert merged_ids(ids, {"pad_token_id": 0}, instruct) == {
        "bos_token_id": w("<|begin_of_text|>"), "eos_token_id": instruct["eos_token_id"], "pad_token_id": 0}
    # a base model's (eos = end_of_text only): the trained end of turn comes first
    assert merged_ids(ids, {"eos_token_id": w("<|end_of_text|>")}, {})["eos_token_id"] == [w("<|eot_id|>"),
                                                                                            w("<|end_of_text|>")]


def test_recorded_end_of_turn_token_wins(tokenizers):
    ids = tokenizer_stop_ids(tokenizers["llama3"], {"end_of_turn_token": "<|eom_id|>", "model": "/elsewhere"})
    assert ids.end_of_turn == LLAMA3_WORDS.index("<|eom_id|>") and ids.eos[0] == ids.end_of_turn


def test_without_chat_template_the_eos_ends_a_turn(tokenizers):
    ids = tokenizer_stop_ids(tokenizers["plain"], {})
    assert (ids.end_of_turn, ids.eos) == (1, [1])
    assert merged_ids(ids, {}, {})["eos_token_id"] == 1  # one id: an int, as HF writes it


def test_unknown_end_of_turn_token_is_one_error(tokenizers):
    with pytest.raises(ConversionError, match=r"the exported tokenizer \(.*chatml\) cannot give the stop token ids: "
                                              r"model.tokenizer.end_of_turn_token='<\|eot\|>' is not in the vocabulary"):
        tokenizer_stop_ids(tokenizers["chatml"], {"end_of_turn_token": "<|eot|>"})


def test_without_a_tokenizer_ids_are_the_templates_or_null():
    ids = merged_ids(None, {"bos_token_id": 5}, {"eos_token_id": [6, 7]})
    assert ids == {"bos_token_id": 5, "eos_token_id": [6, 7], "pad_token_id": None}
    hf, gen = {"eos_token_id": 2}, {"pad_token_id": 3, "temperature": 0.7}
    apply_ids(hf, gen, {"bos_token_id": None, "eos_token_id": 9, "pad_token_id": None})
    # config.json says null (no per-class default such as LlamaConfig's eos 2 stands in); the
    # generation config leaves unknown ids out and keeps its other settings
    assert hf == {"bos_token_id": None, "eos_token_id": 9, "pad_token_id": None}
    assert gen == {"eos_token_id": 9, "temperature": 0.7}
