"""Pure metric functions: pass@k, distinct-n, instruction-following checks, accuracy from saved generations."""

from __future__ import annotations

import json
import re
from math import comb
from typing import Dict, Iterable, List, Sequence

from .data import parse_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over ``texts`` (0 when there are none)."""
    grams = []
    for t in texts:
        w = t.split()
        grams.extend(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0


def _words(text: str) -> List[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def check_constraint(text: str, kind: str, arg) -> bool:
    text = text.strip()
    if kind == "max_words":
        return 0 < len(_words(text)) <= int(arg) if int(arg) > 1 else len(_words(text)) == 1
    if kind == "includes":
        return re.search(r"\b" + re.escape(str(arg)) + r"\b", text, re.IGNORECASE) is not None
    if kind == "all_caps":
        letters = [c for c in text if c.isalpha()]
        return bool(letters) and all(c.isupper() for c in letters)
    if kind == "all_lower":
        letters = [c for c in text if c.isalpha()]
        return bool(letters) and all(c.islower() for c in letters)
    if kind == "numbered_list":
        items = re.findall(r"^\s*\d+[.)]\s+\S", text, re.MULTILINE)
        return len(items) == int(arg)
    if kind == "comma_items":
        parts = [p.strip() for p in text.rstrip(".").split(",")]
        return "\n" not in text and len(parts) == int(arg) and all(p and len(p.split()) <= 3 for p in parts)
    if kind == "sentences":
        return len([s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]) == int(arg)
    raise ValueError(f"unknown constraint {kind!r}")


def check_all(text: str, constraints: Iterable) -> bool:
    return all(check_constraint(text, kind, arg) for kind, arg in constraints)


def accuracy_from_generations(path: str) -> Dict[str, float]:
    """Greedy accuracy recomputed from a saved ``generations_indomain.jsonl`` (answers parsed again)."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    greedy = [r for r in rows if r["mode"] == "greedy"]
    correct = sum(parse_answer(r["text"]) == r["answer"] for r in greedy)
    return {"n": len(greedy), "correct": correct, "accuracy": correct / len(greedy) if greedy else 0.0}


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
