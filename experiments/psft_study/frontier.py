"""Compare runs at equal in-domain gain: the drift a run has when its accuracy first reaches a level.

A run is a list of evaluated checkpoints ``[(step, metrics), ...]`` with the base model as step 0.
Along the steps, accuracy rises (not monotonically); at the first segment where it crosses a
level ``a`` the OOD drift (``ood_kl_from_base``, ``ood_nll``) and the step are interpolated
linearly in accuracy. Runs of one method (several seeds) are summarised as mean, sample
standard deviation and range; a run that never reaches ``a`` is counted, not averaged.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

Point = Tuple[int, Dict]


def at_level(points: Sequence[Point], level: float, keys: Sequence[str], acc_key: str = "indomain_acc"
             ) -> Optional[Dict[str, float]]:
    """``{key: value, "step": s}`` where the accuracy first reaches ``level``, else None.

    ``points`` in step order, the base model first. Between checkpoints ``(s0, m0)`` and
    ``(s1, m1)`` with ``acc0 < level <= acc1`` every value is ``v0 + t (v1 - v0)``, ``t =
    (level - acc0) / (acc1 - acc0)``; a checkpoint already at or above ``level`` gives its own values.
    """
    prev = None
    for step, m in points:
        acc = m.get(acc_key)
        if acc is None:
            continue
        if acc >= level:
            if prev is None or prev[1][acc_key] >= level:
                t, (s0, m0), (s1, m1) = 1.0, (step, m), (step, m)
            else:
                (s0, m0), (s1, m1) = prev, (step, m)
                t = (level - m0[acc_key]) / (m1[acc_key] - m0[acc_key])
            out = {"step": s0 + t * (s1 - s0)}
            for k in keys:
                if m0.get(k) is None or m1.get(k) is None:
                    out[k] = float("nan")
                else:
                    out[k] = m0[k] + t * (m1[k] - m0[k])
            return out
        prev = (step, m)
    return None


def summary(values: Sequence[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (0 for one value) and range of finite ``values``."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan")}
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"n": len(v), "mean": mean, "sd": sd, "min": min(v), "max": max(v)}


def fmt(s: Dict[str, float], digits: int = 3) -> str:
    """``mean ± sd`` (``mean`` alone for one run, ``-`` for none)."""
    if not s["n"]:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def by_method(runs: Dict[str, Tuple[str, List[Point]]]) -> Dict[str, List[List[Point]]]:
    """``runs[name] = (method, points)`` grouped: ``{method: [points of each run]}`` in run order."""
    out: Dict[str, List[List[Point]]] = {}
    for method, points in runs.values():
        out.setdefault(method, []).append(points)
    return out


def level_table(runs: Dict[str, Tuple[str, List[Point]]], levels: Sequence[float],
                keys: Sequence[Tuple[str, str]] = (("ood_kl_from_base", "KL from base"), ("ood_nll", "OOD NLL"),
                                                   ("step", "step"))) -> str:
    """Markdown: per accuracy level and method, each key's mean ± sd over the runs that reach it."""
    groups = by_method(runs)
    head = "| in-domain acc | method | runs reaching it | " + " | ".join(n for _, n in keys) + " |"
    lines = [head, "|---:|---|---:|" + "---:|" * len(keys)]
    for a in levels:
        for method, per_run in groups.items():
            hits = [at_level(p, a, [k for k, _ in keys if k != "step"]) for p in per_run]
            got = [h for h in hits if h is not None]
            cells = [fmt(summary([h[k] for h in got]), 1 if k == "step" else 3) for k, _ in keys]
            lines.append(f"| {a:.2f} | {method} | {len(got)}/{len(per_run)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_table(runs: Dict[str, Tuple[str, List[Point]]], keys: Sequence[Tuple[str, str]]) -> str:
    """Markdown: per method, each key at the run's last checkpoint, mean ± sd over its runs (seeds)."""
    groups = by_method(runs)
    lines = ["| method | runs | step | " + " | ".join(n for _, n in keys) + " |", "|---|---:|---:|" + "---:|" * len(keys)]
    for method, per_run in groups.items():
        last = [p[-1] for p in per_run if p]
        steps = sorted({s for s, _ in last})
        cells = [fmt(summary([m.get(k, float("nan")) for _, m in last])) for k, _ in keys]
        lines.append(f"| {method} | {len(last)} | {','.join(map(str, steps))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
