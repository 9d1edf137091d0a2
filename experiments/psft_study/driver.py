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
from typing import Callable, Dict, List, Optional

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
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    seed: int = 1234


def full_config() -> StudyConfig:
    # 96 training problems, batch 8: 12 steps an epoch, 48 steps = 4 epochs; evaluated at 24 and 48 (and the
    # base model at 0). Estimated on 2 quiet cores: training ~55 min, 11 evaluations ~18 min, exports ~2 min.
    return StudyConfig("full", n_train=96, n_test=48, n_ood=len(D.OOD_PROMPTS), n_if=len(D.IF_PROBES),
                       train=TrainConfig(steps=48, save_every=24, lr=2e-5, global_batch=8, micro_batch=4,
                                         max_seq_length=192),
                       eval=EvalConfig(n_greedy=32, n_passk=8, k=8, max_new_tokens=128, ood_max_new_tokens=64,
                                       ood_samples=2, if_max_new_tokens=48, batch_size=32))


def quick_config() -> StudyConfig:
    # every stage at tiny sizes (its numbers mean nothing): 8 problems, batch 4, 4 steps (2 epochs),
    # one evaluated checkpoint per method, short generations.
    return StudyConfig("quick", n_train=8, n_test=4, n_ood=2, n_if=2,
                       train=TrainConfig(steps=4, save_every=4, lr=2e-5, global_batch=4, micro_batch=2,
                                         max_seq_length=256),
                       eval=EvalConfig(n_greedy=2, n_passk=1, k=2, max_new_tokens=48, ood_max_new_tokens=16,
                                       ood_samples=2, if_max_new_tokens=16, batch_size=4))


# rough seconds per stage on 2 quiet cores, only for the ETA before anything has been timed
def stage_estimate(name: str, cfg: StudyConfig) -> float:
    if name.startswith("train_"):
        # measured with SmolLM2-135M, ~150-token samples: 1.4 s a sample (fwd + bwd), +0.45 s with a forward-only pass
        per_sample = 1.85 if any(m in name for m in ("psft", "sft_kl")) else 1.4
        return 30 + per_sample * cfg.train.global_batch * cfg.train.steps
    if name.startswith("export_"):
        return 25.0 * max(1, cfg.train.steps // cfg.train.save_every)
    if name.startswith("eval_"):
        e = cfg.eval
        return 10 + 0.12 * (e.n_greedy * e.max_new_tokens + e.n_passk * e.k * e.max_new_tokens
                            + cfg.n_ood * e.ood_samples * e.ood_max_new_tokens + cfg.n_if * e.if_max_new_tokens) / 8
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
    from . import plot as P
    from . import runs as R

    st = Study(out, cfg, log)
    p = lambda *a: os.path.join(out, *a)  # noqa: E731
    data_dir, hf_base, mg_base = p("data"), p("hf_base"), p("megatron_base")

    def stage_data():
        return D.generate(data_dir, n_train=cfg.n_train, n_test=cfg.n_test, n_ood=cfg.n_ood, n_if=cfg.n_if, seed=cfg.seed)

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

    def eval_stage(model_dir, out_dir):
        def fn():
            is_base = model_dir == hf_base
            return E.evaluate_model(model_dir, data_dir, out_dir, cfg.eval, base=base_model(),
                                    model_and_tok=base_model() if is_base else None)
        return fn

    st.add("data", stage_data)
    st.add("hf_base", stage_hf_base)
    st.add("megatron_base", stage_megatron_base)
    st.add("ood_refs", stage_ood_refs)
    st.add("eval_base", eval_stage(hf_base, p("evals", "base")))

    steps = eval_steps(cfg)
    for m in cfg.methods:
        run_dir = p("train", m)

        def train(m=m, run_dir=run_dir):
            cmd = R.train_command(m, ckpt=mg_base, train_file=os.path.join(data_dir, "train.jsonl"),
                                  run_dir=run_dir, cfg=cfg.train)
            i = st._current
            R.run_training(cmd, os.path.join(run_dir, "train.log"),
                           on_step=lambda s, n: st.progress(i, f"train_{m}", f"step {s}/{n}", within=s / n))
            return {"steps": R.checkpoint_steps(os.path.join(run_dir, "checkpoints")), "cmd": cmd}

        def export(m=m, run_dir=run_dir):
            root = os.path.join(run_dir, "checkpoints")
            have = R.checkpoint_steps(root)
            out_dirs = {}
            for s in steps:
                dst = p("hf", f"{m}_step{s}")
                if not os.path.isdir(dst):
                    if s not in have:
                        raise RuntimeError(f"{root}: no checkpoint of step {s} (have {have})")
                    R.export_checkpoint(os.path.join(root, f"iter_{s:07d}"), dst, os.path.join(run_dir, "export.log"))
                out_dirs[s] = dst
            for s in have[:-1]:   # exported; the newest stays for a resume
                shutil.rmtree(os.path.join(root, f"iter_{s:07d}"), ignore_errors=True)
            return {"exported": out_dirs}

        st.add(f"train_{m}", train)
        st.add(f"export_{m}", export)
        for s in steps:
            st.add(f"eval_{m}_step{s}", eval_stage(p("hf", f"{m}_step{s}"), p("evals", f"{m}_step{s}")))

    def report():
        return write_report(out, cfg)

    st.add("report", report)
    return st


def collect(out: str, cfg: StudyConfig):
    def load(d):
        f = os.path.join(out, "evals", d, "metrics.json")
        return json.load(open(f, encoding="utf-8")) if os.path.exists(f) else None
    base = load("base")
    results = {m: {s: r for s in eval_steps(cfg) if (r := load(f"{m}_step{s}"))} for m in cfg.methods}
    return base, results


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


def write_report(out: str, cfg: StudyConfig) -> Dict:
    import subprocess
    from . import plot as P
    base, results = collect(out, cfg)
    rep = os.path.join(out, "report")
    os.makedirs(rep, exist_ok=True)
    k = cfg.eval.k
    keys = ["indomain_acc", f"indomain_pass@{k}", "indomain_entropy", "ood_entropy", "ood_nll", "ood_kl_from_base",
            "ood_distinct2", "if_pass_rate"]
    P.curves(results, keys, os.path.join(rep, "eval_curves.png"), base=base)
    rows = dict(results)
    if base:
        rows = {"base": {0: base}, **rows}
    metrics_files = [os.path.join(out, "train", m, "metrics.jsonl") for m in cfg.methods]
    metrics_files = [f for f in metrics_files if os.path.exists(f)]
    if metrics_files:
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), *metrics_files,
                        "-o", os.path.join(rep, "train_curves.png")], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = sum(json.load(open(os.path.join(out, "state", f), encoding="utf-8"))["seconds"]
               for f in os.listdir(os.path.join(out, "state")) if f.endswith(".json"))
    md = [f"# PSFT study ({cfg.name}): results", "",
          f"Stage time, summed over stages: {fmt_s(wall)}. Config: `{json.dumps(asdict(cfg))}`", "",
          P.table(rows, k=k), "", if_note(base), "", "![eval curves](eval_curves.png)", "", "![training curves](train_curves.png)", ""]
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
    ap.add_argument("--quick", action="store_true", help="tiny sizes, every stage (< 15 min on 2 cores)")
    ap.add_argument("--out", default=None, help="output directory (default runs/study/full or runs/study/quick)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--list", action="store_true", help="print the stages and whether each is done, then stop")
    a = ap.parse_args(argv)
    cfg = quick_config() if a.quick else full_config()
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
