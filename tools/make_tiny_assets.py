#!/usr/bin/env python
"""Generate the small bundled assets used by the demo and the tests (no downloads).

    python tools/make_tiny_assets.py            # writes examples/data/...

- ``examples/data/tiny_sft/train.jsonl``: arithmetic / copy / reverse tasks, ``messages``
  schema (system + user + assistant, some multi-turn).
- ``examples/data/tiny_sft/valid.jsonl``: the same tasks, ``prompt``/``response`` schema.
- ``examples/data/tiny_sft/nested.jsonl``: ``extra_info.question`` / ``extra_info.answer``.
- ``examples/data/tiny_tokenizer/``: a Hugging Face fast tokenizer (byte-level BPE trained on
  the data above) with ``<|im_start|>``, ``<|im_end|>`` and ``<|endoftext|>`` (EOS and pad,
  like a Qwen base model) and a ChatML (Qwen-style) chat template, saved with
  ``PreTrainedTokenizerFast.save_pretrained``.
- ``examples/data/tiny_spm/tiny.model``: a SentencePiece BPE model trained on the same text.

Deterministic for a given seed and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Dict, List

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "cat", "dog", "sun", "moon", "tree",
         "river", "stone", "bird", "fish", "apple", "lemon", "cloud", "rain"]


def _task(rng: random.Random) -> Dict[str, str]:
    kind = rng.choice(["add", "mul", "copy", "reverse"])
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return {"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}."}
    if kind == "mul":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return {"prompt": f"What is {a} * {b}?", "response": f"{a} * {b} = {a * b}."}
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    if kind == "copy":
        return {"prompt": "Copy: " + " ".join(words), "response": " ".join(words)}
    return {"prompt": "Reverse: " + " ".join(words), "response": " ".join(reversed(words))}


def make_dataset(out_dir: str, n_train: int = 300, n_valid: int = 50, seed: int = 0) -> List[str]:
    """Write train/valid/nested JSONL files; returns all texts (for tokenizer training)."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    texts = []
    with open(os.path.join(out_dir, "train.jsonl"), "w") as f:
        for i in range(n_train):
            turns = 2 if i % 5 == 0 else 1
            msgs = [{"role": "system", "content": "You are a careful calculator."}] if i % 3 == 0 else []
            for _ in range(turns):
                t = _task(rng)
                msgs += [{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": t["response"]}]
                texts += [t["prompt"], t["response"]]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with open(os.path.join(out_dir, "valid.jsonl"), "w") as f:
        for _ in range(n_valid):
            t = _task(rng)
            texts += [t["prompt"], t["response"]]
            f.write(json.dumps(t) + "\n")
    with open(os.path.join(out_dir, "nested.jsonl"), "w") as f:
        for i in range(n_valid):
            t = _task(rng)
            f.write(json.dumps({"id": i, "extra_info": {"question": t["prompt"], "answer": t["response"]}}) + "\n")
    return texts


def make_hf_tokenizer(out_dir: str, texts: List[str], vocab_size: int = 384) -> None:
    """Byte-level BPE + ChatML special tokens + chat template, saved as an HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + ["You are a helpful assistant.", "system user assistant"], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    # A tokenizer_config.json that transformers 4.45+ and 5.x both load (save_pretrained of
    # 5.x writes tokenizer_class "TokenizersBackend", unknown to 4.x), template inline as in
    # the Qwen/Llama releases.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        if os.path.exists(os.path.join(out_dir, extra)):
            os.unlink(os.path.join(out_dir, extra))


def make_sentencepiece(out_path: str, texts: List[str], vocab_size: int = 200) -> None:
    """A small SentencePiece BPE model (identity normalisation keeps the file small)."""
    import sentencepiece as spm

    import io

    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    model = io.BytesIO()  # train from an iterator into memory: no temp path stored in the model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        normalization_rule_name="identity", character_coverage=1.0, bos_id=1, eos_id=2, pad_id=3, unk_id=0,
        minloglevel=2, num_threads=1)
    with open(out_path, "wb") as f:
        f.write(model.getvalue())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "examples", "data"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    texts = make_dataset(os.path.join(args.out, "tiny_sft"), seed=args.seed)
    make_hf_tokenizer(os.path.join(args.out, "tiny_tokenizer"), texts)
    make_sentencepiece(os.path.join(args.out, "tiny_spm", "tiny.model"), texts)
    print(f"wrote {args.out}/tiny_sft, tiny_tokenizer, tiny_spm")


if __name__ == "__main__":
    main()
