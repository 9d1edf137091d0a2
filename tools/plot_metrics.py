"""Draw loss / entropy / clip-fraction curves of one or several runs to a PNG.

    python tools/plot_metrics.py runs/sft/metrics.jsonl runs/psft/metrics.jsonl -o sft_vs_psft.png

Reads the ``metrics.jsonl`` files written by pretrain_psft.py (training records only) and draws
one panel per metric, one line per run, each labelled by its run directory (as much of its path as
tells the runs apart: ``a/run`` and ``b/run``). Uses Pillow (a requirement of the package), no
matplotlib. A file that cannot be read or written is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Sequence, Tuple

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]
PANEL_W, PANEL_H, MARGIN = 420, 300, 56


def run_labels(paths: Sequence[str]) -> List[str]:
    """One label per metrics file: the shortest trailing part of its run directory's path that
    no other file's shares (``runs/a/x`` and ``runs/b/x`` -> ``a/x``, ``b/x``); a file given
    twice gets `` (2)``."""
    parts = [os.path.dirname(os.path.abspath(p)).strip(os.sep).split(os.sep) for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        for n in range(1, len(mine) + 1):
            if all(other[-n:] != mine[-n:] for j, other in enumerate(parts) if j != i and other != mine):
                break
        labels.append("/".join(mine[-n:]) if mine and mine != [""] else paths[i])
    seen: Dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} ({seen[label]})"
    return labels


def read_runs(paths: Sequence[str]) -> Dict[str, List[dict]]:
    """``{run label: [training record, ...]}`` in the order given (labels from
    :func:`run_labels`); a bad line raises naming the file and line."""
    runs = {}
    for path, label in zip(paths, run_labels(paths)):
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
                if record.get("split", "train") == "train":
                    records.append(record)
        runs[label] = records
    return runs


def _ticks(lo: float, hi: float, count: int = 4) -> List[float]:
    return [lo + (hi - lo) * i / count for i in range(count + 1)]


def _panel(draw, origin: Tuple[int, int], metric: str, runs: Dict[str, List[dict]]) -> None:
    x0, y0 = origin
    left, top, right, bottom = x0 + MARGIN, y0 + 28, x0 + PANEL_W - 12, y0 + PANEL_H - 32
    series = {label: [(r["step"], r[metric]) for r in records if metric in r and math.isfinite(r[metric])]
              for label, records in runs.items()}
    points = [p for pts in series.values() for p in pts]
    draw.text((left, y0 + 8), metric, fill=(0, 0, 0))
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    if not points:
        draw.text((left + 10, top + 10), "no data", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ylo, yhi = min(ys), max(ys)
    if yhi - ylo < 1e-12:
        ylo, yhi = ylo - 0.5, yhi + 0.5
    pad = (yhi - ylo) * 0.05
    ylo, yhi = ylo - pad, yhi + pad

    def to_px(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - xlo) / (xhi - xlo) * (right - left), bottom - (y - ylo) / (yhi - ylo) * (bottom - top))

    for y in _ticks(ylo, yhi):
        _, py = to_px(xlo, y)
        draw.line([left - 4, py, left, py], fill=(0, 0, 0))
        draw.text((x0 + 4, py - 6), f"{y:.3g}", fill=(0, 0, 0))
    for x in _ticks(xlo, xhi):
        px, _ = to_px(x, ylo)
        draw.line([px, bottom, px, bottom + 4], fill=(0, 0, 0))
        draw.text((px - 8, bottom + 6), f"{x:.0f}", fill=(0, 0, 0))
    for i, (label, pts) in enumerate(series.items()):
        if len(pts) > 1:
            draw.line([to_px(x, y) for x, y in pts], fill=COLOURS[i % len(COLOURS)], width=2)
        elif pts:
            px, py = to_px(*pts[0])
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=COLOURS[i % len(COLOURS)])


def plot(runs: Dict[str, List[dict]], metrics: Sequence[str], out: str) -> None:
    from PIL import Image, ImageDraw

    legend_h = 18 * len(runs) + 10
    image = Image.new("RGB", (PANEL_W * len(metrics), PANEL_H + legend_h), "white")
    draw = ImageDraw.Draw(image)
    for i, metric in enumerate(metrics):
        _panel(draw, (i * PANEL_W, 0), metric, runs)
    for i, label in enumerate(runs):
        y = PANEL_H + 4 + 18 * i
        draw.line([MARGIN, y + 6, MARGIN + 24, y + 6], fill=COLOURS[i % len(COLOURS)], width=3)
        draw.text((MARGIN + 30, y), label, fill=(0, 0, 0))
    image.save(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics_files", nargs="+", help="metrics.jsonl of each run")
    parser.add_argument("-o", "--out", default="metrics.png")
    parser.add_argument("--metrics", default="loss,nll,entropy,clip_frac", help="comma-separated keys")
    args = parser.parse_args(argv)
    try:
        import PIL  # noqa: F401
    except ImportError:
        print("error: tools/plot_metrics.py needs Pillow: pip install pillow (or pip install -e . in this repository)",
              file=sys.stderr)
        return 2
    try:
        runs = read_runs(args.metrics_files)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        plot(runs, args.metrics.split(","), args.out)
    except (OSError, ValueError) as exc:  # PIL: unwritable path, or an extension it cannot write
        print(f"error: cannot write {args.out}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}",
              file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
