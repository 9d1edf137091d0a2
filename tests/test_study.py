"""The study pipeline (experiments/psft_study) on the bundled tiny tokenizer and a tiny random Llama:
data generator, metrics, teacher-forced drift, the export-and-evaluate loop with resumable stages,
the table and the curves. No torchrun, no network: training and export are stubbed in the loop test.
"""

import itertools
import json
import os
import shutil

import pytest
import torch

from experiments.psft_study import data as D
from experiments.psft_study import metrics as M

TOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data", "tiny_tokenizer")


# ---------------------------------------------------------------- data

def _check_solution(p):
    """Re-derive the answer from the written steps, not from the final line."""
    lines = p["solution"].splitlines()
    assert lines[-1] == f"Answer: {p['answer']}"
    if p["kind"] in ("add", "mul"):
        digits = [int(l.split("write ")[1][0]) for l in lines if "write" in l and not l.startswith("Final")]
        final = [l for l in lines if l.startswith("Final")]
        value = int((final[0].split("write ")[1].rstrip(".") if final else "") + "".join(map(str, reversed(digits))))
    else:
        digits = [int(l.rsplit("= ", 1)[1].rstrip(".")) for l in lines[:-1]]
        value = int("".join(map(str, reversed(digits))))
    assert value == p["answer"], p


def test_data_generator_is_seeded_correct_and_disjoint(tmp_path):
    train, test = D.make_arithmetic(60, 30, seed=7)
    assert {p["question"] for p in train}.isdisjoint(p["question"] for p in test)
    assert {p["kind"] for p in train} == {"add", "sub", "mul"}
    for p in train + test:
        _check_solution(p)
        assert D.parse_answer(p["solution"]) == p["answer"]
    a = D.generate(str(tmp_path / "a"), n_train=8, n_test=4, n_ood=3, n_if=2, seed=7)
    b = D.generate(str(tmp_path / "b"), n_train=8, n_test=4, n_ood=3, n_if=2, seed=7)
    c = D.generate(str(tmp_path / "c"), n_train=8, n_test=4, n_ood=3, n_if=2, seed=8)
    for k in a:
        assert open(a[k]).read() == open(b[k]).read()
    assert open(a["train"]).read() != open(c["train"]).read()
    rec = D.read_jsonl(a["train"])[0]
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]
    assert len(D.read_jsonl(a["ood"])) == 3 and len(D.read_jsonl(a["if"])) == 2
    assert D.parse_answer("x Answer: 12\nAnswer: -3") == -3 and D.parse_answer("no answer") is None


def test_add2_task_is_seeded_correct_and_disjoint(tmp_path):
    train, test = D.make_arithmetic(96, 128, seed=7, task="add2")
    assert {p["question"] for p in train}.isdisjoint(p["question"] for p in test)
    for p in train + test:
        a, b = (int(x) for x in p["question"][len("What is "):-1].split(" + "))
        assert 10 <= a <= 99 and 10 <= b <= 99 and p["answer"] == a + b
        assert p["solution"] == f"Answer: {a + b}" and D.parse_answer(p["solution"]) == p["answer"]
    paths = D.generate(str(tmp_path / "d"), n_train=8, n_test=4, seed=7, task="add2")
    rec = D.read_jsonl(paths["train"])[0]
    assert rec["messages"][0] == {"role": "system", "content": D.SYSTEM_ADD2}
    assert D.read_jsonl(paths["test"])[0]["system"] == D.SYSTEM_ADD2
    with pytest.raises(ValueError, match="unknown task"):
        D.make_arithmetic(2, 2, seed=7, task="sorting")


# ---------------------------------------------------------------- frontier

def test_frontier_interpolates_at_the_first_crossing_and_summarises_seeds():
    from experiments.psft_study import frontier as F
    base = {"indomain_acc": 0.0, "ood_kl_from_base": 0.0, "ood_nll": 1.0}
    pts = [(0, base), (6, {"indomain_acc": 0.1, "ood_kl_from_base": 0.1, "ood_nll": 1.1}),
           (12, {"indomain_acc": 0.5, "ood_kl_from_base": 0.3, "ood_nll": 1.5}),
           (18, {"indomain_acc": 0.3, "ood_kl_from_base": 0.4, "ood_nll": 1.6}),
           (24, {"indomain_acc": 0.6, "ood_kl_from_base": 0.5, "ood_nll": 1.7})]
    got = F.at_level(pts, 0.3, ["ood_kl_from_base", "ood_nll"])
    # between steps 6 and 12, half way in accuracy: not the later checkpoint at exactly 0.3
    assert got == pytest.approx({"step": 9.0, "ood_kl_from_base": 0.2, "ood_nll": 1.3})
    assert F.at_level(pts, 0.6, ["ood_kl_from_base"]) == pytest.approx({"step": 24.0, "ood_kl_from_base": 0.5})
    assert F.at_level(pts, 0.7, ["ood_kl_from_base"]) is None
    assert F.at_level([(0, {"indomain_acc": 0.5, "ood_kl_from_base": 0.0})], 0.4, ["ood_kl_from_base"]) == \
        {"step": 0, "ood_kl_from_base": 0.0}
    s = F.summary([1.0, 2.0, 3.0, float("nan")])
    assert s == pytest.approx({"n": 3, "mean": 2.0, "sd": 1.0, "min": 1.0, "max": 3.0})
    assert F.fmt(s) == "2.000 ± 1.000" and F.fmt(F.summary([0.5])) == "0.500" and F.fmt(F.summary([])) == "-"
    runs = {"sft_seed1": ("sft", pts), "sft_seed2": ("sft", pts[:3]), "psft_seed1": ("psft", pts[:2])}
    table = F.level_table(runs, [0.3, 0.55])
    assert "| 0.30 | sft | 2/2 | 0.200 ± 0.000 | 1.300 ± 0.000 | 9.0 ± 0.0 |" in table
    assert "| 0.55 | sft | 1/2 | 0.483 |" in table and "| 0.30 | psft | 0/1 | - | - | - |" in table
    final = F.final_table(runs, [("indomain_acc", "acc")])
    assert "| sft | 2 | 12,24 | 0.550 ± 0.071 |" in final


# ---------------------------------------------------------------- metrics

def test_pass_at_k_matches_enumeration():
    for n, c, k in [(8, 0, 8), (8, 3, 1), (8, 3, 2), (6, 2, 4), (5, 5, 3), (4, 1, 4)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert M.pass_at_k(n, c, k) == pytest.approx(brute)
    with pytest.raises(ValueError):
        M.pass_at_k(2, 1, 3)


def test_distinct_n_and_constraints():
    assert M.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert M.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert M.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert M.distinct_n([""], 2) == 0.0
    ok = [("1. cat\n2. dog\n3. cow", "numbered_list", 3), ("The moon is bright.", "max_words", 20),
          ("I am happy today", "includes", "happy"), ("GRASS IS GREEN.", "all_caps", None),
          ("huge", "max_words", 1), ("carrot, pea, leek", "comma_items", 3), ("hello there", "all_lower", None),
          ("Books are good. I read them.", "sentences", 2)]
    bad = [("1. cat\n2. dog", "numbered_list", 3), (" ".join(["w"] * 21), "max_words", 20),
           ("I am unhappy", "includes", "happy"), ("Grass is green.", "all_caps", None),
           ("very big", "max_words", 1), ("carrot, pea", "comma_items", 3), ("Hello", "all_lower", None),
           ("One sentence only.", "sentences", 2)]
    for text, kind, arg in ok:
        assert M.check_constraint(text, kind, arg), (text, kind)
    for text, kind, arg in bad:
        assert not M.check_constraint(text, kind, arg), (text, kind)
    assert not M.check_all("snow snow", [("max_words", 1), ("includes", "snow")])


# ---------------------------------------------------------------- tiny model

def _tiny_model_dir(path, seed=0):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(TOK)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return {"a": _tiny_model_dir(root / "a", 0), "b": _tiny_model_dir(root / "b", 1), "root": root}


def test_teacher_forced_matches_per_example_reference(tiny):
    from experiments.psft_study import evaluate as E
    model, tok = E.load_model(tiny["a"])
    other, _ = E.load_model(tiny["b"])
    prompts = [D.prompt_messages("What is 12 + 5?"), D.prompt_messages("Copy: red blue green dog", None)]
    answers = ["Answer: 17", "red blue"]
    got = E.teacher_forced(model, tok, prompts, answers, ref_model=model, batch_size=2)
    nll, ent, n = 0.0, 0.0, 0
    for msgs, ans in zip(prompts, answers):
        p, a = E._pair_ids(tok, msgs, ans)
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for j, t in enumerate(a):
            row = logp[len(p) - 1 + j]
            nll -= float(row[t])
            ent -= float((row.exp() * row).sum())
            n += 1
    assert got["tokens"] == n
    assert got["nll"] == pytest.approx(nll / n, rel=1e-4)
    assert got["entropy"] == pytest.approx(ent / n, rel=1e-4)
    assert abs(got["kl"]) < 1e-6
    assert E.teacher_forced(model, tok, prompts, answers, ref_model=other)["kl"] > 1e-4


def _stub_training(steps):
    def run_training(cmd, log_path, on_step=None):
        run_dir = os.path.dirname(log_path)
        for s in steps:
            os.makedirs(os.path.join(run_dir, "checkpoints", f"iter_{s:07d}"), exist_ok=True)
            if on_step:
                on_step(s, steps[-1])
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            for s in range(1, steps[-1] + 1):
                f.write(json.dumps({"step": s, "loss": 1.0 / s, "nll": 2.0 / s, "entropy": 1.5 - 0.1 * s}) + "\n")
        with open(log_path, "a") as f:
            f.write(" ".join(cmd) + "\n")
    return run_training


def test_export_evaluate_loop_report_and_resume(tiny, tmp_path, monkeypatch):
    from experiments.psft_study import driver as DR
    from experiments.psft_study import runs as R
    from experiments.psft_study.evaluate import EvalConfig

    calls = {"export": 0, "processes": 0}

    def export(pairs, log_path):
        calls["processes"] += 1
        for _, out_dir in pairs:
            calls["export"] += 1
            shutil.copytree(tiny["b"], out_dir)
        return [o for _, o in pairs]

    monkeypatch.setattr(R, "run_training", _stub_training([2, 4]))
    monkeypatch.setattr(R, "export_checkpoints", export)
    cfg = DR.StudyConfig("test", n_train=6, n_test=3, n_ood=2, n_if=3, methods=["sft", "psft"],
                         train=R.TrainConfig(steps=4, save_every=2),
                         eval=EvalConfig(n_greedy=3, n_passk=2, k=2, max_new_tokens=6, ood_max_new_tokens=5,
                                         ood_samples=2, if_max_new_tokens=4, batch_size=4),
                         seeds=[1, 2], seeded_methods=["psft"], levels=[0.0])
    out = str(tmp_path / "study")
    shutil.copytree(tiny["a"], os.path.join(out, "hf_base"))
    os.makedirs(os.path.join(out, "state"))
    for done in ("hf_base", "megatron_base"):   # the GGUF stages need the real package: marked done
        json.dump({"result": {}, "seconds": 0}, open(os.path.join(out, "state", f"{done}.json"), "w"))
    lines = []
    res = DR.build(out, cfg, log=lines.append).run()
    # three runs (psft at two seeds, sft at the first), each exported in one process
    assert calls["export"] == 6 and calls["processes"] == 3
    assert any("eta" in l and "step 2/4" in l for l in lines)
    for seed in (1, 2):
        cmds = open(os.path.join(out, "train", f"psft_seed{seed}", "train.log")).read()
        assert "model.psft.loss=psft" in cmds and "model.psft.old_policy_interval=8" in cmds
        assert f"model.seed={seed}" in cmds
    assert not os.path.exists(os.path.join(out, "train", "sft_seed2"))
    # exported megatron checkpoints of a finished run are dropped
    assert R.checkpoint_steps(os.path.join(out, "train", "sft_seed1", "checkpoints")) == []
    # an intermediate checkpoint gets the frontier's light evaluation: no sampling, no IF probes
    light = json.load(open(os.path.join(out, "evals", "psft_seed2_step2", "metrics.json")))
    assert "ood_kl_from_base" in light and "indomain_acc" in light
    assert "if_pass_rate" not in light and "indomain_pass@2" not in light
    # greedy accuracy is recomputable from the saved generations
    ev = os.path.join(out, "evals", "psft_seed1_step4")
    metrics = json.load(open(os.path.join(ev, "metrics.json")))
    assert metrics["indomain_acc"] == M.accuracy_from_generations(os.path.join(ev, "generations_indomain.jsonl"))["accuracy"]
    rows = D.read_jsonl(os.path.join(ev, "generations_indomain.jsonl"))
    assert sum(r["mode"] == "greedy" for r in rows) == 3 and sum(r["mode"] == "sample" for r in rows) == 4
    for key in ("indomain_pass@2", "indomain_entropy", "ood_nll", "ood_entropy", "ood_kl_from_base",
                "ood_distinct2", "if_pass_rate"):
        assert key in metrics, key
    base = json.load(open(os.path.join(out, "evals", "base", "metrics.json")))
    assert abs(base["ood_kl_from_base"]) < 1e-6 and metrics["ood_kl_from_base"] > 1e-4
    # report: table rows for base and every (method, step), both PNGs
    md = open(res["report"]["report"]).read()
    assert "Instruction following: the base model passes" in md
    assert "not read" in DR.if_note({"if_pass_rate": 0.1}) and "is read" in DR.if_note({"if_pass_rate": 0.5})
    for row in ("| base | 0 |", "| sft_seed1 | 2 |", "| sft_seed1 | 4 |", "| psft_seed1 | 2 |", "| psft_seed2 | 4 |",
                "| 0.00 | psft | 2/2 |", "| psft | 2 | 4 |", "| sft | 1 | 4 |"):
        assert row in md, row
    from PIL import Image
    for png in ("eval_curves.png", "train_curves.png", "frontier.png", "entropy.png"):
        im = Image.open(os.path.join(out, "report", png))
        assert im.size[0] > 300 and len(set(im.convert("RGB").getdata())) > 3
    # a rerun does nothing; a removed state file reruns that stage only
    lines.clear()
    DR.build(out, cfg, log=lines.append).run()
    assert calls["export"] == 6 and not any(" start" in l for l in lines)
    os.remove(os.path.join(out, "state", "eval_sft_seed1_step2.json"))
    lines.clear()
    DR.build(out, cfg, log=lines.append).run()
    assert [l.split()[2] for l in lines if " start" in l] == ["eval_sft_seed1_step2"]
    # the same directory with another config is refused
    DR.check_config(out, cfg)
    DR.check_config(out, cfg)
    cfg.train.lr = 1e-4
    with pytest.raises(SystemExit, match="train"):
        DR.check_config(out, cfg)


def test_train_command_per_method(tmp_path):
    from experiments.psft_study import runs as R
    cfg = R.TrainConfig(steps=12, save_every=4, lr=3e-5)
    cmds = {m: R.train_command(m, ckpt="ck", train_file="t.jsonl", run_dir="r", cfg=cfg) for m in R.METHODS}
    for m, cmd in cmds.items():
        assert "pretrain_psft.py" in cmd[6] and "trainer.max_steps=12" in cmd and "model.optim.lr=3e-05" in cmd
        assert any(c.startswith("model.restore_from_path=") for c in cmd)
    assert "model.psft.freeze_old_policy=true" in cmds["psft_frozen"]
    assert "model.psft.kl_estimator=k3" in cmds["sft_kl"] and "model.psft.loss=dft" in cmds["dft"]
    assert "model.psft.loss=asft" in cmds["asft"] and "model.psft.loss=eaft" in cmds["eaft"]
    assert "model.seed=1234" in cmds["sft"]
    assert "model.seed=7" in R.train_command("sft", ckpt="ck", train_file="t", run_dir="r", cfg=cfg, seed=7)
    # identical apart from the method's own keys
    common = [set(c) - set(R.METHODS[m]) for m, c in cmds.items()]
    assert all(c == common[0] for c in common)
    with pytest.raises(ValueError):
        R.train_command("ppo", ckpt="ck", train_file="t", run_dir="r", cfg=cfg)
    os.makedirs(tmp_path / "iter_0000004")
    os.makedirs(tmp_path / "iter_0000012")
    os.makedirs(tmp_path / ".tmp_iter_0000016")
    assert R.checkpoint_steps(str(tmp_path)) == [4, 12]


def test_early_variant_is_the_full_study_first_epoch_at_denser_checkpoints():
    """--early must train exactly what the full study trains for its first 12 steps (same data, seeds, lr,
    warm-up, batch), so its steps 6 and 12 reproduce the full study's and its 2-step checkpoints refine the
    full frontier's first interval."""
    from dataclasses import asdict
    from experiments.psft_study import driver as DR
    early_cfg = DR.early_config()
    full, early = asdict(DR.full_config()), asdict(early_cfg)
    assert DR.eval_steps(early_cfg) == [2, 4, 6, 8, 10, 12]
    assert (early["train"]["steps"], early["train"]["save_every"]) == (12, 2)
    assert early["methods"] == ["sft", "psft", "dft"] and early["seeds"] == full["seeds"]
    assert early["train"]["steps"] <= full["train"]["steps"]
    assert full["train"]["steps"] % early["train"]["save_every"] == 0 and early["train"]["steps"] % full["train"]["save_every"] == 0
    for d in (full, early):
        d.pop("name"), d.pop("methods"), d["train"].pop("steps"), d["train"].pop("save_every")
    assert early == full
