"""Evaluate an HF model directory with transformers: in-domain accuracy and pass@k, entropy, OOD drift,
diversity and instruction following. Every generation is saved next to the metrics.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence

import torch

from . import metrics as M
from .data import SYSTEM, parse_answer, prompt_messages, read_jsonl, write_jsonl


@dataclass
class EvalConfig:
    n_greedy: int = 48          # test problems answered greedily (accuracy)
    n_passk: int = 16           # test problems sampled k times (pass@k, temperature 1)
    k: int = 8
    max_new_tokens: int = 128   # in-domain answers (SmolLM2 tokens: 109 on average, at most ~120)
    ood_max_new_tokens: int = 64
    ood_samples: int = 2        # sampled answers per OOD prompt (distinct-n)
    if_max_new_tokens: int = 48
    batch_size: int = 16
    seed: int = 1234


def load_model(path: str, *, check_keys: bool = True):
    """(model, tokenizer) in fp32, eval mode; missing or unexpected keys are an error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    if check_keys and (info.get("missing_keys") or info.get("unexpected_keys")):
        raise RuntimeError(f"{path}: missing keys {info.get('missing_keys')}, unexpected keys {info.get('unexpected_keys')}")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def _end_ids(tok) -> List[int]:
    ids = {tok.eos_token_id}
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def _prompt_text(tok, msgs) -> str:
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tok, prompts: Sequence[List[Dict]], *, max_new_tokens: int, sample: bool = False,
             num_return: int = 1, batch_size: int = 16, seed: int = 0) -> List[List[str]]:
    """Per prompt, ``num_return`` completions (greedy: 1; sampled: temperature 1, no top-k/top-p)."""
    torch.manual_seed(seed)
    out: List[List[str]] = []
    texts = [_prompt_text(tok, m) for m in prompts]
    per_batch = max(1, batch_size // num_return)
    for i in range(0, len(texts), per_batch):
        enc = tok(texts[i:i + per_batch], return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=num_return if sample else 1,
                             eos_token_id=_end_ids(tok), pad_token_id=tok.pad_token_id, **kw)
        new = gen[:, enc["input_ids"].shape[1]:]
        dec = tok.batch_decode(new, skip_special_tokens=True)
        n = num_return if sample else 1
        out.extend([dec[j * n:(j + 1) * n] for j in range(len(dec) // n)])
    return out


def _pair_ids(tok, msgs, answer: str):
    p = tok(_prompt_text(tok, msgs), add_special_tokens=False)["input_ids"]
    end = "<|im_end|>" if "<|im_end|>" in tok.get_vocab() else (tok.eos_token or "")
    a = tok(answer + end, add_special_tokens=False)["input_ids"]
    return p, a


@torch.no_grad()
def teacher_forced(model, tok, prompts: Sequence[List[Dict]], answers: Sequence[str], *, ref_model=None,
                   batch_size: int = 8) -> Dict[str, float]:
    """Token means over the answer tokens: NLL, entropy, and KL(model || ref_model) when given."""
    tot = {"nll": 0.0, "entropy": 0.0, "kl": 0.0}
    count = 0
    pairs = [_pair_ids(tok, m, a) for m, a in zip(prompts, answers)]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        L = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), L), tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(chunk), L), dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.bool)   # positions whose NEXT token is an answer token
        for r, (p, a) in enumerate(chunk):
            seq = p + a
            ids[r, :len(seq)] = torch.tensor(seq)
            att[r, :len(seq)] = 1
            mask[r, len(p) - 1:len(seq) - 1] = True
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float(), -1)
        nxt = ids[:, 1:]
        lp = logp[:, :-1].gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        m = mask[:, :-1]
        ent = -(logp.exp() * logp).sum(-1)[:, :-1]
        tot["nll"] += float(-lp[m].sum())
        tot["entropy"] += float(ent[m].sum())
        if ref_model is not None:
            ref = torch.log_softmax(ref_model(input_ids=ids, attention_mask=att).logits.float(), -1)
            kl = (logp.exp() * (logp - ref)).sum(-1)[:, :-1]
            tot["kl"] += float(kl[m].sum())
        count += int(m.sum())
    res = {k: v / max(count, 1) for k, v in tot.items()}
    if ref_model is None:
        res.pop("kl")
    res["tokens"] = count
    return res


def make_ood_references(model_dir: str, data_dir: str, cfg: EvalConfig) -> str:
    """The base model's greedy answers to the OOD prompts, generated once into ``ood_ref.jsonl``."""
    path = os.path.join(data_dir, "ood_ref.jsonl")
    if os.path.exists(path):
        return path
    model, tok = load_model(model_dir)
    prompts = [r["prompt"] for r in read_jsonl(os.path.join(data_dir, "ood.jsonl"))]
    gens = generate(model, tok, [prompt_messages(p, None) for p in prompts],
                    max_new_tokens=cfg.ood_max_new_tokens, batch_size=cfg.batch_size)
    write_jsonl(path, [{"prompt": p, "reference": g[0]} for p, g in zip(prompts, gens)])
    return path


def evaluate_model(model_dir: str, data_dir: str, out_dir: str, cfg: EvalConfig, *, base=None,
                   model_and_tok=None, light: bool = False) -> Dict:
    """All metrics of one model into ``out_dir/metrics.json``; generations into ``out_dir/generations_*.jsonl``.

    ``base``: the (model, tokenizer) of the base model, for KL(tuned || base) on the OOD references.
    ``light``: only what the frontier needs (greedy accuracy, in-domain NLL and entropy, OOD NLL,
    entropy and KL from base); no sampling (pass@k, distinct-n) and no instruction-following probes.
    """
    os.makedirs(out_dir, exist_ok=True)
    model, tok = model_and_tok or load_model(model_dir)
    test = read_jsonl(os.path.join(data_dir, "test.jsonl"))
    res: Dict = {"model": model_dir, "eval_config": asdict(cfg)}

    # in-domain: greedy accuracy and sampled pass@k
    greedy_items = test[:cfg.n_greedy]
    g = generate(model, tok, [prompt_messages(p["question"], p.get("system", SYSTEM)) for p in greedy_items],
                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    rows = [{"mode": "greedy", "question": p["question"], "answer": p["answer"], "text": t[0],
             "parsed": parse_answer(t[0]), "correct": parse_answer(t[0]) == p["answer"]}
            for p, t in zip(greedy_items, g)]
    pk_items = [] if light else test[:cfg.n_passk]
    s = [] if not pk_items else generate(model, tok, [prompt_messages(p["question"], p.get("system", SYSTEM)) for p in pk_items], max_new_tokens=cfg.max_new_tokens,
                 sample=True, num_return=cfg.k, batch_size=cfg.batch_size, seed=cfg.seed)
    pk = []
    for p, texts in zip(pk_items, s):
        c = 0
        for t in texts:
            ok = parse_answer(t) == p["answer"]
            c += ok
            rows.append({"mode": "sample", "question": p["question"], "answer": p["answer"], "text": t,
                         "parsed": parse_answer(t), "correct": ok})
        pk.append((len(texts), c))
    gen_path = os.path.join(out_dir, "generations_indomain.jsonl")
    write_jsonl(gen_path, rows)
    res["indomain_acc"] = M.accuracy_from_generations(gen_path)["accuracy"]
    if pk:
        res[f"indomain_pass@{cfg.k}"] = M.mean([M.pass_at_k(n, c, cfg.k) for n, c in pk])
        res["indomain_pass@1_sampled"] = M.mean([M.pass_at_k(n, c, 1) for n, c in pk])
    tf = teacher_forced(model, tok, [prompt_messages(p["question"], p.get("system", SYSTEM)) for p in test[:cfg.n_greedy]],
                        [p["solution"] for p in test[:cfg.n_greedy]], batch_size=min(cfg.batch_size, 8))
    res["indomain_nll"], res["indomain_entropy"] = tf["nll"], tf["entropy"]

    # OOD: drift on the base model's own answers, entropy there, sampled diversity
    refs = read_jsonl(os.path.join(data_dir, "ood_ref.jsonl"))
    msgs = [prompt_messages(r["prompt"], None) for r in refs]
    tf = teacher_forced(model, tok, msgs, [r["reference"] for r in refs],
                        ref_model=base[0] if base else None, batch_size=min(cfg.batch_size, 8))
    res["ood_nll"], res["ood_entropy"] = tf["nll"], tf["entropy"]
    if "kl" in tf:
        res["ood_kl_from_base"] = tf["kl"]
    if not light:
        _sampled_and_if(model, tok, data_dir, out_dir, cfg, refs, msgs, res)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1)
    return res


def _sampled_and_if(model, tok, data_dir, out_dir, cfg: EvalConfig, refs, msgs, res: Dict) -> None:
    """OOD diversity of sampled answers and the instruction-following probes, into ``res``."""
    samples = generate(model, tok, msgs, max_new_tokens=cfg.ood_max_new_tokens, sample=True,
                       num_return=cfg.ood_samples, batch_size=cfg.batch_size, seed=cfg.seed)
    flat = [t for ts in samples for t in ts]
    res["ood_distinct1"], res["ood_distinct2"] = M.distinct_n(flat, 1), M.distinct_n(flat, 2)
    write_jsonl(os.path.join(out_dir, "generations_ood.jsonl"),
                [{"prompt": r["prompt"], "samples": ts} for r, ts in zip(refs, samples)])

    # instruction following (greedy)
    probes = read_jsonl(os.path.join(data_dir, "if.jsonl"))
    gi = generate(model, tok, [prompt_messages(p["prompt"], None) for p in probes],
                  max_new_tokens=cfg.if_max_new_tokens, batch_size=cfg.batch_size)
    irows = [{"prompt": p["prompt"], "constraints": p["constraints"], "text": t[0],
              "pass": M.check_all(t[0], p["constraints"])} for p, t in zip(probes, gi)]
    write_jsonl(os.path.join(out_dir, "generations_if.jsonl"), irows)
    res["if_pass_rate"] = M.mean([float(r["pass"]) for r in irows])
