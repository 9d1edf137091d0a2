"""Seeded data for the study: arithmetic (in-domain), OOD prompts, instruction-following probes.

Nothing is downloaded. Two in-domain tasks (``TASKS``):

- ``add2`` (the study's, v2): two-digit addition answered in one line, ``Answer: N``. The base
  model scores 0 (it answers in prose); SFT on 96 problems reaches ~0.6 greedy accuracy within
  36 steps, so in-domain gain is measurable and graded.
- ``worked`` (v1): multi-digit addition, subtraction and multiplication by one digit in a fixed
  step-by-step format with the carries or borrows written out and a final ``Answer: N`` line.
  Too hard for 135M parameters in 48 steps (greedy accuracy ~0).

The OOD prompts are general instructions
that are never trained on; their reference answers are the base model's own greedy answers
(made later by the evaluation code and cached). The instruction-following probes carry
programmatic checks (``metrics.check_constraint``).
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Dict, List, Optional, Tuple

SYSTEM = "You are a careful calculator. Work digit by digit."   # the worked task's system prompt
SYSTEM_ADD2 = "You are a careful calculator."
TASKS = ("add2", "worked")
PLACE = ["Units", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands"]
ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


def _digits(n: int) -> List[int]:
    return [int(c) for c in reversed(str(n))]


def worked_addition(a: int, b: int) -> str:
    da, db = _digits(a), _digits(b)
    lines, carry, out = [], 0, []
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{PLACE[i]}: {x} + {y} + {carry} = {s}, write {s % 10}, carry {s // 10}.")
        out.append(s % 10)
        carry = s // 10
    if carry:
        lines.append(f"Final carry: write {carry}.")
    lines.append(f"Answer: {a + b}")
    return "\n".join(lines)


def worked_subtraction(a: int, b: int) -> str:
    """``a - b`` with ``a >= b``, borrows written out."""
    assert a >= b
    da, db = _digits(a), _digits(b)
    lines, borrow = [], 0
    for i in range(len(da)):
        x = da[i]
        y = db[i] if i < len(db) else 0
        top = x - borrow
        if top < y:
            lines.append(f"{PLACE[i]}: {x} - {borrow} = {top}, less than {y}, borrow: {top + 10} - {y} = {top + 10 - y}.")
            borrow = 1
        else:
            lines.append(f"{PLACE[i]}: {x} - {borrow} = {top}, {top} - {y} = {top - y}.")
            borrow = 0
    lines.append(f"Answer: {a - b}")
    return "\n".join(lines)


def worked_multiplication(a: int, d: int) -> str:
    """``a * d`` for a one-digit ``d``, carries written out."""
    assert 0 <= d <= 9
    lines, carry = [], 0
    for i, x in enumerate(_digits(a)):
        p = x * d + carry
        lines.append(f"{PLACE[i]}: {x} * {d} + {carry} = {p}, write {p % 10}, carry {p // 10}.")
        carry = p // 10
    if carry:
        lines.append(f"Final carry: write {carry}.")
    lines.append(f"Answer: {a * d}")
    return "\n".join(lines)


def make_problem(rng: random.Random) -> Dict:
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        return {"kind": kind, "question": f"What is {a} + {b}?", "answer": a + b, "solution": worked_addition(a, b)}
    if kind == "sub":
        a, b = rng.randint(100, 9999), rng.randint(100, 9999)
        a, b = max(a, b), min(a, b)
        return {"kind": kind, "question": f"What is {a} - {b}?", "answer": a - b, "solution": worked_subtraction(a, b)}
    a, d = rng.randint(100, 9999), rng.randint(2, 9)
    return {"kind": kind, "question": f"What is {a} * {d}?", "answer": a * d, "solution": worked_multiplication(a, d)}


def make_direct_addition(rng: random.Random) -> Dict:
    """Two-digit addition, the answer in one line (``add2``)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"kind": "add2", "question": f"What is {a} + {b}?", "answer": a + b, "solution": f"Answer: {a + b}",
            "system": SYSTEM_ADD2}


def make_arithmetic(n_train: int, n_test: int, seed: int, task: str = "worked") -> Tuple[List[Dict], List[Dict]]:
    """Disjoint train / test problems (no question appears in both) of ``task`` (``TASKS``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    make = make_direct_addition if task == "add2" else make_problem
    rng = random.Random(seed)
    seen, items = set(), []
    while len(items) < n_train + n_test:
        p = make(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            items.append(p)
    return items[:n_train], items[n_train:]


def parse_answer(text: str) -> Optional[int]:
    """The last ``Answer: N`` in a generation, else None."""
    found = ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


def chat_record(problem: Dict) -> Dict:
    return {"messages": [{"role": "system", "content": problem.get("system", SYSTEM)},
                         {"role": "user", "content": problem["question"]},
                         {"role": "assistant", "content": problem["solution"]}]}


def prompt_messages(question: str, system: Optional[str] = SYSTEM) -> List[Dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


# General instructions (knowledge, writing, lists, advice); reference answers = the base model's.
OOD_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Explain what photosynthesis is in two sentences.",
    "Name three fruits that are red.",
    "Write a haiku about the sea.",
    "Give me two tips for sleeping better.",
    "What does a thermometer measure?",
    "List four colours of the rainbow.",
    "Write one sentence describing a rainy morning.",
    "Why do people brush their teeth?",
    "What is the largest planet in the solar system?",
    "Suggest a name for a small bakery.",
    "How many days are there in a week? Explain briefly.",
    "Give one reason why exercise is healthy.",
    "Write a short thank-you note to a teacher.",
    "What is the opposite of 'cold'?",
    "Describe a cat in one sentence.",
    "Name three musical instruments.",
    "What should I pack for a day at the beach?",
    "Explain what a computer keyboard is used for.",
    "Write a two-line poem about autumn.",
    "What language is spoken in Spain?",
    "Give me a simple breakfast idea.",
    "What is water made of?",
    "How can I stay focused while studying?",
]

# Instruction-following probes: (prompt, [constraint, ...]); constraints in metrics.check_constraint.
IF_PROBES = [
    ("Name three animals. Answer with a numbered list.", [("numbered_list", 3)]),
    ("Describe the moon in fewer than 20 words.", [("max_words", 20)]),
    ("Write a sentence about dogs that includes the word 'happy'.", [("includes", "happy")]),
    ("Reply in all capital letters: what colour is grass?", [("all_caps", None)]),
    ("Give one word that means 'big'. Answer with a single word.", [("max_words", 1)]),
    ("List three vegetables, separated by commas, and nothing else.", [("comma_items", 3)]),
    ("Write a sentence about the sun that includes the word 'warm'.", [("includes", "warm")]),
    ("Describe a tree in fewer than 15 words.", [("max_words", 15)]),
    ("Name two oceans. Answer with a numbered list.", [("numbered_list", 2)]),
    ("Say hello in lowercase letters only.", [("all_lower", None)]),
    ("Write a short sentence about rain that includes the word 'umbrella'.", [("includes", "umbrella")]),
    ("Answer in fewer than 10 words: what is ice?", [("max_words", 10)]),
    ("Name four countries, separated by commas, and nothing else.", [("comma_items", 4)]),
    ("Write about books in exactly two sentences.", [("sentences", 2)]),
    ("Describe winter in fewer than 25 words and include the word 'snow'.", [("max_words", 25), ("includes", "snow")]),
    ("Name three colours. Answer with a numbered list.", [("numbered_list", 3)]),
]


def write_jsonl(path: str, records: List[Dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> List[Dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate(out_dir: str, *, n_train: int, n_test: int, n_val: int = 16, n_ood: int = len(OOD_PROMPTS),
             n_if: int = len(IF_PROBES), seed: int = 1234, task: str = "worked") -> Dict[str, str]:
    """Write train.jsonl / valid.jsonl (chat records), test.jsonl, ood.jsonl, if.jsonl into ``out_dir``."""
    train, rest = make_arithmetic(n_train, n_test + n_val, seed, task)
    test, val = rest[:n_test], rest[n_test:]
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("train", "valid", "test", "ood", "if")}
    write_jsonl(paths["train"], [chat_record(p) for p in train])
    write_jsonl(paths["valid"], [chat_record(p) for p in val])
    write_jsonl(paths["test"], test)
    write_jsonl(paths["ood"], [{"prompt": p} for p in OOD_PROMPTS[:n_ood]])
    write_jsonl(paths["if"], [{"prompt": p, "constraints": [list(c) for c in cs]} for p, cs in IF_PROBES[:n_if]])
    return paths


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-train", type=int, default=96)
    ap.add_argument("--n-test", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--task", choices=TASKS, default="add2")
    a = ap.parse_args()
    print(generate(a.out, n_train=a.n_train, n_test=a.n_test, seed=a.seed, task=a.task))
