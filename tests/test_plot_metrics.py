"""tools/plot_metrics.py: one line per run, each run labelled apart from the others, and every
file problem one line with exit status 2 (no traceback)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.parallel.launch import REPO, worker_env

TOOL = os.path.join(REPO, "tools", "plot_metrics.py")


def _tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(directory, losses):
    os.makedirs(directory)
    path = os.path.join(directory, "metrics.jsonl")
    with open(path, "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "loss": loss, "nll": loss + 7}) + "\n")
        f.write(json.dumps({"step": len(losses), "split": "val", "nll": 1.0}) + "\n")
    return path


def test_runs_whose_directories_share_a_name_are_both_drawn_and_labelled_apart(tmp_path, capsys):
    tool = _tool()
    a = _run(str(tmp_path / "sft" / "run"), [-1.0, -1.1])
    b = _run(str(tmp_path / "psft" / "run"), [-1.0, -1.2, -1.3])
    c = _run(str(tmp_path / "other"), [-0.5])
    runs = tool.read_runs([a, b, c])
    assert list(runs) == ["sft/run", "psft/run", "other"]
    assert [len(records) for records in runs.values()] == [2, 3, 1]  # training records only
    assert tool.run_labels([a, a]) == ["run", "run (2)"]  # the same file twice: told apart by number
    out = str(tmp_path / "both.png")
    assert tool.main([a, b, "-o", out]) == 0 and os.path.getsize(out) > 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"


@pytest.mark.parametrize("target,reason", [("no_such_dir/x.png", "No such file or directory"),
                                           ("x.unknown_format", "unknown file extension")])
def test_an_unwritable_output_is_one_line(tmp_path, capsys, target, reason):
    metrics = _run(str(tmp_path / "run"), [-1.0, -1.1])
    out = str(tmp_path / target)
    assert _tool().main([metrics, "-o", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {out}: ") and reason in err[0], err


def test_a_missing_pillow_is_one_line_with_the_install_command(tmp_path):
    metrics = _run(str(tmp_path / "run"), [-1.0])
    code = (f"import sys, runpy; sys.modules['PIL'] = None; sys.argv = ['plot_metrics.py', {metrics!r}, '-o', "
            f"{str(tmp_path / 'x.png')!r}]\ntry:\n    runpy.run_path({TOOL!r}, run_name='__main__')\n"
            "except SystemExit as exc:\n    sys.exit(exc.code)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=worker_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: tools/plot_metrics.py needs Pillow: pip install pillow (or pip install -e . in this repository)"]
