"""The study's table (markdown) and curves (PNG, Pillow only) from the evaluations' metrics.json files."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]
W, H, MARGIN = 380, 260, 50

TABLE_COLUMNS = [("indomain_acc", "acc (greedy)"), ("indomain_pass@8", "pass@8"), ("indomain_entropy", "entropy ID"),
                 ("ood_entropy", "entropy OOD"), ("ood_nll", "OOD NLL"), ("ood_kl_from_base", "KL from base"),
                 ("ood_distinct2", "distinct-2"), ("if_pass_rate", "IF pass")]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table(results: Dict[str, Dict[int, Dict]], k: int = 8) -> str:
    """Markdown: one row per (method, step); ``results[method][step] = metrics``."""
    cols = [(key.replace("@8", f"@{k}"), name.replace("@8", f"@{k}")) for key, name in TABLE_COLUMNS]
    lines = ["| method | step | " + " | ".join(n for _, n in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for method, by_step in results.items():
        for step in sorted(by_step):
            m = by_step[step]
            lines.append(f"| {method} | {step} | " + " | ".join(_fmt(m.get(key)) for key, _ in cols) + " |")
    return "\n".join(lines)


def _panel(draw: ImageDraw.ImageDraw, ox: int, oy: int, title: str,
           series: Dict[str, List[Tuple[float, float]]], colours: Dict[str, Tuple[int, int, int]],
           keep_order: bool = False, xlabel: str = "") -> None:
    """One panel; ``series[name]`` points joined by a line in x order (or as given: ``keep_order``);
    ``colours`` is keyed by series name."""
    draw.rectangle([ox, oy, ox + W - 1, oy + H - 1], outline=(200, 200, 200))
    draw.text((ox + MARGIN, oy + 8), title, fill=(0, 0, 0))
    pts = [p for s in series.values() for p in s if p[1] is not None and not math.isnan(p[1])]
    if not pts:
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pw, ph = W - 2 * MARGIN, H - 2 * MARGIN

    def xy(x, y):
        return ox + MARGIN + (x - x0) / (x1 - x0) * pw, oy + H - MARGIN - (y - y0) / (y1 - y0) * ph

    draw.line([ox + MARGIN, oy + H - MARGIN, ox + W - MARGIN, oy + H - MARGIN], fill=(0, 0, 0))
    draw.line([ox + MARGIN, oy + MARGIN, ox + MARGIN, oy + H - MARGIN], fill=(0, 0, 0))
    for v in (y0, y1):
        draw.text((ox + 2, xy(x0, v)[1] - 6), f"{v:.3g}", fill=(0, 0, 0))
    for v in (x0, x1):
        draw.text((xy(v, y0)[0] - 8, oy + H - MARGIN + 4), f"{v:.3g}", fill=(0, 0, 0))
    if xlabel:
        draw.text((ox + W // 2 - 3 * len(xlabel), oy + H - MARGIN + 18), xlabel, fill=(0, 0, 0))
    for name, s in series.items():
        s = [p for p in s if p[1] is not None and not math.isnan(p[1])]
        s = s if keep_order else sorted(s)
        c = colours[name]
        pix = [xy(x, y) for x, y in s]
        if len(pix) > 1:
            draw.line(pix, fill=c, width=2)
        for px, py in pix:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)


def curves(results: Dict[str, Dict[int, Dict]], keys: Sequence[str], path: str, base: Dict = None) -> str:
    """One panel per metric key, x = training step, one line per method (the base model at step 0)."""
    methods = list(results)
    colours = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(methods)}
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    legend_h = 24
    img = Image.new("RGB", (cols * W, rows * H + legend_h), "white")
    d = ImageDraw.Draw(img)
    for i, key in enumerate(keys):
        series = {}
        for m in methods:
            pts = [(0, base.get(key))] if base and base.get(key) is not None else []
            pts += [(s, r.get(key)) for s, r in results[m].items()]
            series[m] = pts
        _panel(d, (i % cols) * W, (i // cols) * H, key, series, colours)
    x = 10
    for m in methods:
        d.rectangle([x, rows * H + 8, x + 12, rows * H + 18], fill=colours[m])
        d.text((x + 16, rows * H + 6), m, fill=(0, 0, 0))
        x += 30 + 7 * len(m)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)
    return path


def _legend(d: ImageDraw.ImageDraw, y: int, colours: Dict[str, Tuple[int, int, int]]) -> None:
    x = 10
    for m, c in colours.items():
        d.rectangle([x, y + 8, x + 12, y + 18], fill=c)
        d.text((x + 16, y + 6), m, fill=(0, 0, 0))
        x += 30 + 7 * len(m)


def runs_panels(panels: Sequence[Tuple[str, str, Dict[str, Tuple[str, List[Tuple[float, float]]]]]], path: str,
                keep_order: bool = True) -> str:
    """A row of panels ``(title, xlabel, {run: (method, points)})``; one line per run, coloured by method
    (the seeds of a method share its colour)."""
    methods: List[str] = []
    for _, _, runs in panels:
        for m, _ in runs.values():
            if m not in methods:
                methods.append(m)
    colours = {m: COLOURS[i % len(COLOURS)] for i, m in enumerate(methods)}
    legend_h = 24
    img = Image.new("RGB", (len(panels) * W, H + legend_h), "white")
    d = ImageDraw.Draw(img)
    for i, (title, xlabel, runs) in enumerate(panels):
        _panel(d, i * W, 0, title, {r: pts for r, (_, pts) in runs.items()},
               {r: colours[m] for r, (m, _) in runs.items()}, keep_order=keep_order, xlabel=xlabel)
    _legend(d, H, colours)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)
    return path
