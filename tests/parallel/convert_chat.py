"""A chat model through the converters: does the export stop at the end of a turn?

Run in the ``prepare`` stage of tests/parallel/convert_worker.py (a world of one). The HF
source is a tiny Qwen2 with a ChatML tokenizer (``<|im_end|>`` ends a turn, ``<|endoftext|>``
is the tokenizer's EOS) whose ``config.json`` and ``generation_config.json`` carry no token ids,
as a base model's or an older export's may. Its weights are constructed, not random: every
layer adds nothing (o_proj and down_proj are zero), each token's embedding is a one-hot vector
and ``lm_head`` maps it to the next token of a fixed chain, so greedy decoding after
``<|im_start|>assistant`` gives ``hello world <|im_end|>`` and then ``<|im_end|>`` forever: an
export that does not stop at ``<|im_end|>`` repeats it up to ``max_new_tokens``.

Steps: import with ``--make-vocab-size-divisible-by 16``, export, ``generate()`` on the export,
import the export again without the option (the multiple must come back as 16), and export a
copy of the checkpoint whose data file has random bytes over a record header (one line, exit
2, nothing left beside ``--out``), then again after restoring the file (the retry works).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

WORDS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hello", "world"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
#: greedy continuation of each token (every other token -> <|im_end|>)
NEXT = {"assistant": "hello", "hello": "world"}
PROMPT = ["<|im_start|>", "user", "hello", "<|im_end|>", "<|im_start|>", "assistant"]
HIDDEN = 16
MAX_NEW_TOKENS = 8


def make_chatml_tokenizer(out: str) -> None:
    """A word-level fast tokenizer over :data:`WORDS` with the ChatML template, saved in ``out``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(out)


def make_chain_model(out: str) -> None:
    """The tiny Qwen2 of the module doc, saved in ``out`` with the tokenizer and no token ids."""
    import transformers

    config = transformers.Qwen2Config(vocab_size=len(WORDS), hidden_size=HIDDEN, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=False,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    end = WORDS.index("<|im_end|>")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.ones_like(param) if name.endswith("norm.weight") else torch.zeros_like(param))
        for t, word in enumerate(WORDS):
            model.model.embed_tokens.weight[t, t] = 1.0
            model.lm_head.weight[WORDS.index(NEXT[word]) if word in NEXT else end, t] = 1.0
    model.save_pretrained(out)
    make_chatml_tokenizer(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({}, f)  # no stop ids, as in the reported export


def generate_reply(hf_dir: str) -> list:
    """The greedy reply (tokens) of the HF model in ``hf_dir`` to the ChatML user turn "hello"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # the ChatML prompt's tokens (the word-level vocabulary has no newline; the tokenizer class
    # transformers picks for a Qwen2 directory pre-tokenises text its own way)
    ids = torch.tensor([tok.convert_tokens_to_ids(PROMPT)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False)
    return tok.convert_ids_to_tokens(out[0, ids.shape[1]:].tolist())


def _damage_a_record_header(ckpt: str) -> tuple:
    """Random bytes over the first 32 bytes of one stored chunk (its zip record header) in the
    checkpoint's data file; returns (path, offset, original bytes)."""
    import torch.distributed.checkpoint as dcp

    storage = dcp.FileSystemReader(ckpt).read_metadata().storage_data
    info = sorted(storage.values(), key=lambda i: i.offset)[len(storage) // 2]
    path = os.path.join(ckpt, info.relative_path)
    with open(path, "r+b") as f:
        f.seek(info.offset)
        original = f.read(32)
        f.seek(info.offset)
        f.write(bytes((b + 101) % 256 for b in original))
    return path, info.offset, original


def _failed_then_retried(workdir: str, ckpt: str) -> dict:
    """Export a copy of ``ckpt`` with a damaged record header, then after repairing it."""
    from tests.parallel.convert_worker import _capture
    from tools import convert_megatron_to_hf as to_hf

    bad = os.path.join(workdir, "chat", "megatron_damaged")
    shutil.copytree(ckpt, bad)
    path, offset, original = _damage_a_record_header(bad)
    out = os.path.join(workdir, "chat", "exports", "hf")
    code, _, err = _capture(to_hf.main, ["--ckpt", bad, "--out", out])
    failed = {"code": code, "stderr": err, "damaged_file": os.path.basename(path),
              "left_beside_out": sorted(os.listdir(os.path.dirname(out))) if os.path.isdir(os.path.dirname(out)) else []}
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(original)
    code, _, err = _capture(to_hf.main, ["--ckpt", bad, "--out", out])
    return {"failed": failed, "retry": {"code": code, "stderr": err, "files": sorted(os.listdir(out))}}


def chat_export(workdir: str) -> dict:
    """The scenario of the module doc; returns what the tests check."""
    import yaml

    from tools import convert_hf_to_megatron as to_megatron
    from tools import convert_megatron_to_hf as to_hf

    hf_dir, ckpt, back, again = (os.path.join(workdir, "chat", x) for x in ("hf", "megatron", "hf_back", "megatron2"))
    make_chain_model(hf_dir)
    assert to_megatron.main(["--hf-dir", hf_dir, "--out", ckpt, "--dtype", "fp32",
                             "--make-vocab-size-divisible-by", "16"]) == 0
    assert to_hf.main(["--ckpt", ckpt, "--out", back]) == 0
    assert to_megatron.main(["--hf-dir", back, "--out", again]) == 0
    with open(os.path.join(again, "model.yaml")) as f:
        multiple = yaml.safe_load(f)["model"]["make_vocab_size_divisible_by"]
    return {
        "source_reply": generate_reply(hf_dir),
        "reply": generate_reply(back),
        "config_ids": {k: json.load(open(os.path.join(back, "config.json"))).get(k)
                       for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "generation_config": json.load(open(os.path.join(back, "generation_config.json"))),
        "ids": {w: WORDS.index(w) for w in ("<|im_end|>", "<|endoftext|>")},
        "vocab_multiple_after_round_trip": multiple,
        **_failed_then_retried(workdir, ckpt),
    }
