"""One command for the whole study: ``python tools/run_study.py [--quick]`` (or ``make experiment``).

Stages run in order; each one that finishes writes ``<out>/state/<stage>.json`` and a rerun skips
it, so an interrupted study resumes where it stopped (an interrupted training run resumes from
its latest checkpoint). A progress line with the elapsed time and an ETA is printed at every
stage and every training step. Outputs: ``<out>/report/results.md`` (table) and PNG curves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from . import data as D
from .evaluate import EvalConfig
from .runs import METHODS, TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class StudyConfig:
    name: str
    n_train: int
    n_test: int
    n_ood: int
    n_if: int
    train: TrainConfig
    eval: EvalConfig
    methods: List[str] = field(default_factory=lambda: list(STUDY_METHODS))
    seed: int = 1234                      # the data's seed
    task: str = "add2"                    # data.TASKS
    seeds: List[int] = field(default_factory=lambda: [1234])          # training seeds (model.seed, data order)
    seeded_methods: List[str] = field(default_factory=lambda: ["sft", "psft"])   # run once per seed; others: seeds[0]
    levels: List[float] = field(default_factory=lambda: [0.2, 0.4, 0.5, 0.6])    # accuracies compared (frontier)


# the methods of the study (psft_frozen, the v1 ablation, stays available through --methods)
STUDY_METHODS = ["sft", "psft", "dft", "sft_kl", "asft", "eaft"]


def full_config() -> StudyConfig:
    # 96 two-digit additions, batch 8: 12 steps an epoch, 36 steps = 3 epochs at lr 5e-5, a checkpoint every
    # 6 steps (the frontier's points; the last one gets the full evaluation). SFT and PSFT at 3 seeds, the other
    # methods at the first. 128 held-out problems for greedy accuracy (standard error <= 0.045).
    return StudyConfig("full", n_train=96, n_test=128, n_ood=len(D.OOD_PROMPTS), n_if=len(D.IF_PROBES),
                       train=TrainConfig(steps=36, save_every=6, lr=5e-5, global_batch=8, micro_batch=4,
                                         max_seq_length=96),
                       eval=EvalConfig(n_greedy=128, n_passk=16, k=8, max_new_tokens=16, ood_max_new_tokens=64,
                                       ood_samples=2, if_max_new_tokens=48, batch_size=32),
                       seeds=[1234, 1235, 1236])


def quick_config() -> StudyConfig:
    # every stage at tiny sizes (its numbers mean nothing): 8 problems, batch 4, 4 steps, two checkpoints per
    # run, two seeds for SFT and PSFT, short generations.
    return StudyConfig("quick", n_train=8, n_test=4, n_ood=2, n_if=2,
                       train=TrainConfig(steps=4, save_every=2, lr=5e-5, global_batch=4, micro_batch=2,
                                         max_seq_length=96, warmup_steps=1),
                       eval=EvalConfig(n_greedy=4, n_passk=1, k=2, max_new_tokens=16, ood_max_new_tokens=16,
                                       ood_samples=2, if_max_new_tokens=16, batch_size=4),
                       seeds=[1234, 1235])


def early_config() -> StudyConfig:
    # The full study's first 12 steps (one epoch) with a checkpoint every 2 steps, SFT and PSFT at the same three
    # seeds, DFT at the first: the frontier where SFT crosses the low accuracy levels inside the full study's first
    # 6-step checkpoint interval. Everything else is the full config's, so with the constant schedule these runs
    # are the first 12 steps of the full study's runs (their steps 6 and 12 reproduce its numbers).
    cfg = full_config()
    cfg.name = "early"
    cfg.train.steps, cfg.train.save_every = 12, 2
    cfg.methods = ["sft", "psft", "dft"]
    return cfg


def study_runs(cfg: StudyConfig) -> List[Tuple[str, str, int]]:
    """``(run name, method, seed)`` for every training run: ``<method>_seed<seed>``."""
    return [(f"{m}_seed{s}", m, s) for m in cfg.methods
            for s in (cfg.seeds if m in cfg.seeded_methods else cfg.seeds[:1])]


# rough seconds per stage on 2 quiet cores, only for the ETA before anything has been timed
def stage_estimate(name: str, cfg: StudyConfig) -> float:
    if name.startswith("train_"):
        # SmolLM2-135M, ~60-token samples: ~0.4 s a sample (fwd + bwd), +0.15 s with a forward-only pass
        per_sample = 0.55 if any(m in name for m in ("psft", "sft_kl", "asft")) else 0.4
        saves = cfg.train.steps // cfg.train.save_every
        return 30 + per_sample * cfg.train.global_batch * cfg.train.steps + 5 * saves
    if name.startswith("export_"):
        return 15 + 5.0 * max(1, cfg.train.steps // cfg.train.save_every)
    if name.startswith("eval_"):
        e = cfg.eval
        light = 5 + 0.12 * (e.n_greedy * e.max_new_tokens + cfg.n_ood * e.ood_max_new_tokens) / 8
        if name.endswith(f"_step{cfg.train.steps}") or name == "eval_base":
            return light + 0.12 * (e.n_passk * e.k * e.max_new_tokens + cfg.n_ood * e.ood_samples * e.ood_max_new_tokens
                                   + cfg.n_if * e.if_max_new_tokens) / 8
        return light
    return {"data": 1, "hf_base": 30, "megatron_base": 40, "ood_refs": 30, "report": 5}.get(name, 10)


def fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Study:
    """The stage list and its state files; ``stages`` maps a name to a callable returning a JSON-able dict."""

    def __init__(self, out: str, cfg: StudyConfig, log: Callable[[str], None] = print):
        self.out, self.cfg, self.log = out, cfg, log
        self.state_dir = os.path.join(out, "state")
        self.stages: List[tuple] = []
        self.t0 = time.time()
        self._spent_est = 0.0      # estimated seconds of the stages finished in this process
        self._spent_actual = 0.0   # and their measured seconds
        self._base = None

    def add(self, name: str, fn: Callable[[], Dict]) -> None:
        self.stages.append((name, fn))

    def state_path(self, name: str) -> str:
        return os.path.join(self.state_dir, f"{name}.json")

    def done(self, name: str) -> bool:
        return os.path.exists(self.state_path(name))

    def eta(self, remaining_est: float) -> float:
        """Remaining estimate scaled by (measured / estimated) over the stages finished in this process."""
        scale = self._spent_actual / self._spent_est if self._spent_est > 30 else 1.0
        return remaining_est * scale

    def progress(self, i: int, name: str, note: str = "", within: float = 0.0) -> None:
        """``within``: the fraction of stage ``i`` already done (training steps)."""
        todo = [n for n, _ in self.stages[i:] if not self.done(n)]
        remaining = sum(stage_estimate(n, self.cfg) for n in todo)
        if todo and todo[0] == name:
            remaining -= within * stage_estimate(name, self.cfg)
        self.log(f"[study] {i + 1}/{len(self.stages)} {name} {note}  elapsed {fmt_s(time.time() - self.t0)}"
                 f"  eta {fmt_s(self.eta(remaining))}".rstrip())

    def run(self) -> Dict[str, Dict]:
        os.makedirs(self.state_dir, exist_ok=True)
        results = {}
        for i, (name, fn) in enumerate(self.stages):
            if self.done(name):
                with open(self.state_path(name), encoding="utf-8") as f:
                    results[name] = json.load(f)["result"]
                continue
            self.progress(i, name, "start")
            t = time.time()
            self._current = i
            result = fn() or {}
            record = {"stage": name, "seconds": round(time.time() - t, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "result": result}
            tmp = self.state_path(name) + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
            os.replace(tmp, self.state_path(name))
            results[name] = result
            self._spent_est += stage_estimate(name, self.cfg)
            self._spent_actual += record["seconds"]
            self.progress(i, name, f"done in {fmt_s(record['seconds'])}")
        self.log(f"[study] all {len(self.stages)} stages done; {fmt_s(time.time() - self.t0)} in this session")
        return results


def eval_steps(cfg: StudyConfig) -> List[int]:
    return list(range(cfg.train.save_every, cfg.train.steps + 1, cfg.train.save_every)) or [cfg.train.steps]


def build(out: str, cfg: StudyConfig, log: Callable[[str], None] = print) -> Study:
    from . import evaluate as E
    from . import gguf_export as G
    from . import runs as R

    st = Study(out, cfg, log)
    p = lambda *a: os.path.join(out, *a)  # noqa: E731
    data_dir, hf_base, mg_base = p("data"), p("hf_base"), p("megatron_base")

    def stage_data():
        return D.generate(data_dir, n_train=cfg.n_train, n_test=cfg.n_test, n_ood=cfg.n_ood, n_if=cfg.n_if,
                          seed=cfg.seed, task=cfg.task)

    def stage_hf_base():
        shutil.rmtree(hf_base, ignore_errors=True)
        return G.gguf_to_hf(G.find_gguf(), hf_base)

    def stage_megatron_base():
        shutil.rmtree(mg_base, ignore_errors=True)
        s = G.convert_to_megatron(hf_base, mg_base, p("convert.json"))
        if s["verify"]["argmax_agreement"] < 0.99 or s["verify"]["max_abs_diff"] > 1e-3:
            raise RuntimeError(f"converted logits disagree with transformers: {s['verify']}")
        return s

    def base_model():
        if st._base is None:
            st._base = E.load_model(hf_base)
        return st._base

    def stage_ood_refs():
        return {"path": E.make_ood_references(hf_base, data_dir, cfg.eval)}

    def eval_stage(model_dir, out_dir, light=False):
        def fn():
            is_base = model_dir == hf_base
            return E.evaluate_model(model_dir, data_dir, out_dir, cfg.eval, base=base_model(),
                                    model_and_tok=base_model() if is_base else None, light=light)
        return fn

    st.add("data", stage_data)
    st.add("hf_base", stage_hf_base)
    st.add("megatron_base", stage_megatron_base)
    st.add("ood_refs", stage_ood_refs)
    st.add("eval_base", eval_stage(hf_base, p("evals", "base")))

    steps = eval_steps(cfg)
    for run, m, seed in study_runs(cfg):
        run_dir = p("train", run)

        def train(run=run, m=m, seed=seed, run_dir=run_dir):
            cmd = R.train_command(m, ckpt=mg_base, train_file=os.path.join(data_dir, "train.jsonl"),
                                  run_dir=run_dir, cfg=cfg.train, seed=seed)
            i = st._current
            R.run_training(cmd, os.path.join(run_dir, "train.log"),
                           on_step=lambda s, n: st.progress(i, f"train_{run}", f"step {s}/{n}", within=s / n))
            return {"steps": R.checkpoint_steps(os.path.join(run_dir, "checkpoints")), "cmd": cmd}

        def export(run=run, run_dir=run_dir):
            root = os.path.join(run_dir, "checkpoints")
            have = R.checkpoint_steps(root)
            todo, out_dirs = [], {}
            for s in steps:
                dst = p("hf", f"{run}_step{s}")
                if not os.path.isdir(dst):
                    if s not in have:
                        raise RuntimeError(f"{root}: no checkpoint of step {s} (have {have})")
                    todo.append((os.path.join(root, f"iter_{s:07d}"), dst))
                out_dirs[s] = dst
            R.export_checkpoints(todo, os.path.join(run_dir, "export.log"))
            for s in have:   # exported, and the run has finished: nothing resumes from them
                shutil.rmtree(os.path.join(root, f"iter_{s:07d}"), ignore_errors=True)
            return {"exported": out_dirs}

        st.add(f"train_{run}", train)
        st.add(f"export_{run}", export)
        for s in steps:
            st.add(f"eval_{run}_step{s}", eval_stage(p("hf", f"{run}_step{s}"), p("evals", f"{run}_step{s}"),
                                                     light=s != steps[-1]))

    def report():
        return write_report(out, cfg)

    st.add("report", report)
    return st


def collect(out: str, cfg: StudyConfig):
    """``(base metrics, {run: {step: metrics}})`` from the evaluations present."""
    def load(d):
        f = os.path.join(out, "evals", d, "metrics.json")
        return json.load(open(f, encoding="utf-8")) if os.path.exists(f) else None
    base = load("base")
    results = {run: {s: r for s in eval_steps(cfg) if (r := load(f"{run}_step{s}"))} for run, _, _ in study_runs(cfg)}
    return base, results


def train_series(out: str, run: str, key: str) -> List[Tuple[float, float]]:
    """``(step, value)`` of a training metric from the run's metrics.jsonl (training records only)."""
    path = os.path.join(out, "train", run, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    last = {r["step"]: r[key] for r in recs if "split" not in r and r.get(key) is not None}   # a resumed step: the last
    return sorted(last.items())


IF_MIN_BASE_RATE = 0.25


def if_note(base: Optional[Dict]) -> str:
    """Whether the instruction-following column is worth reading: only if the base model passes a real share."""
    if not base or base.get("if_pass_rate") is None:
        return "Instruction following: no base-model evaluation."
    r = base["if_pass_rate"]
    if r < IF_MIN_BASE_RATE:
        return (f"Instruction following: the base model passes {r:.0%} of the probes (< {IF_MIN_BASE_RATE:.0%}); "
                "the IF column is not read.")
    return f"Instruction following: the base model passes {r:.0%} of the probes; the IF column is read."


FINAL_KEYS = [("indomain_acc", "acc (greedy)"), ("indomain_nll", "NLL ID"), ("indomain_entropy", "entropy ID"),
              ("ood_entropy", "entropy OOD"), ("ood_nll", "OOD NLL"), ("ood_kl_from_base", "KL from base"),
              ("ood_distinct2", "distinct-2"), ("if_pass_rate", "IF pass")]


def write_report(out: str, cfg: StudyConfig) -> Dict:
    import subprocess
    from . import frontier as F
    from . import plot as P
    base, results = collect(out, cfg)
    rep = os.path.join(out, "report")
    os.makedirs(rep, exist_ok=True)
    k = cfg.eval.k
    method_of = {run: m for run, m, _ in study_runs(cfg)}
    # every run as step-ordered points with the base model as step 0 (the frontier's origin)
    runs = {run: (method_of[run], ([(0, base)] if base else []) + sorted(by_step.items()))
            for run, by_step in results.items() if by_step}
    keys = ["indomain_acc", "indomain_nll", "indomain_entropy", "ood_entropy", "ood_nll", "ood_kl_from_base",
            "ood_distinct2", "if_pass_rate"]
    P.curves(results, keys, os.path.join(rep, "eval_curves.png"), base=base)

    def xy(xk, yk):
        return {r: (m, [(pm[xk], pm[yk]) for _, pm in pts if pm.get(xk) is not None and pm.get(yk) is not None])
                for r, (m, pts) in runs.items()}
    P.runs_panels([("in-domain accuracy vs KL from base", "KL(tuned || base), OOD", xy("ood_kl_from_base", "indomain_acc")),
                   ("in-domain accuracy vs OOD NLL", "NLL of the base model's OOD answers", xy("ood_nll", "indomain_acc"))],
                  os.path.join(rep, "frontier.png"))
    P.runs_panels([("token entropy, training batches", "step",
                    {r: (m, train_series(out, r, "entropy")) for r, (m, _) in runs.items()}),
                   ("token entropy, held-out answers", "step",
                    {r: (m, [(s, pm.get("indomain_entropy")) for s, pm in pts]) for r, (m, pts) in runs.items()}),
                   ("greedy accuracy, held-out", "step",
                    {r: (m, [(s, pm.get("indomain_acc")) for s, pm in pts]) for r, (m, pts) in runs.items()})],
                  os.path.join(rep, "entropy.png"))
    metrics_files = [os.path.join(out, "train", r, "metrics.jsonl") for r in runs]
    metrics_files = [f for f in metrics_files if os.path.exists(f)]
    if metrics_files:
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), *metrics_files,
                        "-o", os.path.join(rep, "train_curves.png")], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = sum(json.load(open(os.path.join(out, "state", f), encoding="utf-8"))["seconds"]
               for f in os.listdir(os.path.join(out, "state")) if f.endswith(".json"))
    rows = {"base": {0: base}, **results} if base else dict(results)
    md = [f"# PSFT study ({cfg.name}): results", "",
          f"Stage time, summed over stages: {fmt_s(wall)}. Config: `{json.dumps(asdict(cfg))}`", "",
          "## At equal in-domain accuracy (first time a run reaches it; mean ± sd over the runs that do)", "",
          F.level_table(runs, cfg.levels), "",
          "## Last checkpoint (mean ± sd over seeds)", "",
          F.final_table(runs, FINAL_KEYS + [(f"indomain_pass@{k}", f"pass@{k}")]), "",
          "## Every checkpoint", "",
          P.table(rows, k=k), "", if_note(base), "",
          "![frontier](frontier.png)", "", "![entropy](entropy.png)", "", "![eval curves](eval_curves.png)", "",
          "![training curves](train_curves.png)", ""]
    with open(os.path.join(rep, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return {"report": os.path.join(rep, "results.md"), "stage_seconds": wall}


def check_config(out: str, cfg: StudyConfig) -> None:
    """Record the config in ``out/study_config.json``; a rerun with another config is refused
    (finished stages would otherwise mix two configs)."""
    path = os.path.join(out, "study_config.json")
    now = json.loads(json.dumps(asdict(cfg)))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if before != now:
            diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise SystemExit(f"{out} holds a study with another config (differs in: {', '.join(diff)}); "
                             f"remove it or pass another --out")
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(now, f, indent=1)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    variant = ap.add_mutually_exclusive_group()
    variant.add_argument("--quick", action="store_true", help="tiny sizes, every stage (< 15 min on 2 cores)")
    variant.add_argument("--early", action="store_true", help="the first 12 steps of SFT, PSFT (3 seeds) and DFT "
                         "with a checkpoint every 2 steps (~40 min on 2 cores)")
    ap.add_argument("--out", default=None, help="output directory (default runs/study/full, runs/study/quick or runs/study/early)")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: " + ",".join(STUDY_METHODS)
                    + "; known: " + ",".join(METHODS) + ")")
    ap.add_argument("--list", action="store_true", help="print the stages and whether each is done, then stop")
    a = ap.parse_args(argv)
    cfg = quick_config() if a.quick else early_config() if a.early else full_config()
    if a.methods:
        cfg.methods = [m.strip() for m in a.methods.split(",")]
        unknown = set(cfg.methods) - set(METHODS)
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}")
    out = a.out or os.path.join(REPO, "runs", "study", cfg.name)
    check_config(out, cfg)
    st = build(out, cfg)
    if a.list:
        for n, _ in st.stages:
            print(("done  " if st.done(n) else "todo  ") + n)
        return 0
    st.run()
    print(f"report: {os.path.join(out, 'report', 'results.md')}")
    return 0
