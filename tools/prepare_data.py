#!/usr/bin/env python
"""Turn common SFT sources into our JSONL and print length statistics.

    python tools/prepare_data.py SRC [SRC ...] --out train.jsonl \\
        [--tokenizer DIR_OR_.model] [--max-seq-length 16384] [--schema auto|messages|prompt_response]

SRC: a Hugging Face ``save_to_disk`` directory (Dataset or DatasetDict, ``--split``), a
Parquet file, or a JSONL file. Columns are detected as in OpenR1-Math, LIMO, NuminaMath:

- ``messages`` (OpenAI-style list with an assistant turn) -> ``{"messages": [...]}``
- prompt column ``question`` | ``problem`` | ``prompt`` | ``instruction`` | ``input`` and response
  column ``solution`` | ``response`` | ``answer`` | ``output`` | ``completion``
  -> ``{"prompt": ..., "response": ...}`` (``--prompt-key`` / ``--response-key`` override;
  dotted paths into nested fields work).

``--schema auto`` prefers ``messages`` when the column exists. Rows that cannot be converted
stop the run with file + row + problem, unless ``--skip-bad`` (then they are counted and the
first few reported). With ``--tokenizer`` the output is tokenised with the data pipeline
(chat template when the tokenizer has one) and the script prints samples, token-length
percentiles and how many samples exceed ``--max-seq-length``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

from psft_megatron.data.errors import DataError, Location  # noqa: E402
from psft_megatron.data.readers import iter_records, iter_hf_dir  # noqa: E402
from psft_megatron.data.conversation import get_path, to_conversation  # noqa: E402

PROMPT_KEYS = ("question", "problem", "prompt", "instruction", "input")
RESPONSE_KEYS = ("solution", "response", "answer", "output", "completion")


def detect_keys(record: Dict[str, Any], schema: str, prompt_key: Optional[str], response_key: Optional[str],
                loc: Location) -> Tuple[str, Optional[str], Optional[str]]:
    """(schema, prompt_key, response_key) for a source, from its first record."""
    if schema in ("auto", "messages") and not (prompt_key or response_key) and "messages" in record:
        return "messages", None, None
    if schema == "messages":
        raise DataError(f"no 'messages' column; columns present: {sorted(record)}", loc)
    p = prompt_key or next((k for k in PROMPT_KEYS if k in record), None)
    r = response_key or next((k for k in RESPONSE_KEYS if k in record), None)
    if p is None or r is None:
        raise DataError(
            f"cannot find a prompt column ({'|'.join(PROMPT_KEYS)}) and a response column "
            f"({'|'.join(RESPONSE_KEYS)}); columns present: {sorted(record)}; use --prompt-key/--response-key", loc)
    return "prompt_response", p, r


def convert(sources: List[str], out: str, schema: str = "auto", prompt_key: Optional[str] = None,
            response_key: Optional[str] = None, split: str = "train", skip_bad: bool = False) -> dict:
    """Write ``out`` (JSONL); returns {"written", "skipped", "first_errors", "sources"}."""
    written, skipped, first_errors, used = 0, 0, [], []
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for src in sources:
            records = iter_hf_dir(src, split) if os.path.isdir(src) else iter_records(src)
            keys = None
            for record, loc in records:
                if keys is None:
                    keys = detect_keys(record, schema, prompt_key, response_key, loc)
                    used.append({"source": src, "schema": keys[0], "prompt_key": keys[1], "response_key": keys[2]})
                kind, pk, rk = keys
                try:
                    conv = to_conversation(record, loc, kind, pk or "prompt", rk or "response", "messages")
                    if kind == "messages":
                        row = {"messages": conv.messages}
                    else:
                        prompt = get_path(record, pk, loc)
                        row = {"prompt": prompt, "response": get_path(record, rk, loc)}
                except DataError as exc:
                    if not skip_bad:
                        raise
                    skipped += 1
                    if len(first_errors) < 5:
                        first_errors.append(str(exc))
                    continue
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
    return {"written": written, "skipped": skipped, "first_errors": first_errors, "sources": used}


def length_stats(path: str, tokenizer: str, max_seq_length: int) -> dict:
    """Token-length percentiles of ``path`` tokenised with the pipeline, and the overflow count."""
    import numpy as np

    from psft_megatron.data.config import DataConfig, TokenizerConfig
    from psft_megatron.data.dataset import load_or_tokenize
    from psft_megatron.data.tokenizers import build_tokenizer

    library = "sentencepiece" if tokenizer.endswith(".model") else "huggingface"
    tok_cfg = TokenizerConfig(library=library, model=tokenizer)
    tok = build_tokenizer(tok_cfg)
    store, _ = load_or_tokenize(DataConfig(file_names=[path], max_seq_length=max_seq_length), tok, tok_cfg)
    n = store.lengths()
    pct = {f"p{q}": int(np.percentile(n, q)) for q in (50, 90, 95, 99)}
    over = int((n > max_seq_length).sum())
    return {"samples": int(len(n)), "tokens": int(n.sum()), "mean": round(float(n.mean()), 1), **pct,
            "max": int(n.max()), "max_seq_length": max_seq_length, "would_truncate": over,
            "would_truncate_pct": round(100.0 * over / max(1, len(n)), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--schema", default="auto", choices=("auto", "messages", "prompt_response"))
    ap.add_argument("--prompt-key")
    ap.add_argument("--response-key")
    ap.add_argument("--split", default="train", help="split of a DatasetDict directory")
    ap.add_argument("--skip-bad", action="store_true", help="count and skip rows that cannot be converted")
    ap.add_argument("--tokenizer", help="HF tokenizer dir or SentencePiece .model for length stats")
    ap.add_argument("--max-seq-length", type=int, default=4096)
    args = ap.parse_args(argv)
    try:
        info = convert(args.sources, args.out, args.schema, args.prompt_key, args.response_key, args.split,
                       args.skip_bad)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {info['written']} samples to {args.out}; skipped {info['skipped']} bad rows")
    for s in info["sources"]:
        print(f"  {s['source']}: schema={s['schema']} prompt={s['prompt_key']} response={s['response_key']}")
    for e in info["first_errors"]:
        print(f"  skipped: {e}")
    if args.tokenizer:
        stats = length_stats(args.out, args.tokenizer, args.max_seq_length)
        print("token lengths: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        info["lengths"] = stats
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
