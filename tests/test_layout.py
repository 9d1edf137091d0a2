"""The package layout: the old import paths of moved modules still work, with a warning."""

import importlib
import subprocess
import sys

import pytest

from tests.parallel.launch import REPO

MOVED = [("psft_megatron.runtime", "psft_megatron.distributed.runtime", "device"),
         ("psft_megatron.cpu_compat", "psft_megatron.compat.cpu", "install")]


@pytest.mark.parametrize("old,new,name", MOVED)
def test_moved_module_resolves_with_a_deprecation_warning(old, new, name):
    code = (f"import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as w:\n    print('warned:', w)\n"
            f"warnings.simplefilter('ignore')\nimport {old} as o, {new} as n\n"
            f"assert o is n and o.{name} is n.{name}, (o, n)\nprint('same module')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"warned: {old} moved to {new}" in out.stdout and "same module" in out.stdout


def test_old_checkpointing_names_resolve_with_a_deprecation_warning():
    package = importlib.import_module("psft_megatron.checkpointing")
    new = importlib.import_module("psft_megatron.checkpointing.dist_checkpoint")
    package.__dict__.pop("load_checkpoint", None)
    with pytest.warns(DeprecationWarning, match="dist_checkpoint.load_checkpoint"):
        assert package.load_checkpoint is new.load_checkpoint
    with pytest.raises(AttributeError):
        package.no_such_name


#: the longest function body (code lines after the docstring) the package allows
MAX_FUNCTION_LINES = 60


def _long_functions(root):
    """(path:line name, code lines) of every function in ``root`` whose body after its docstring
    runs over MAX_FUNCTION_LINES lines."""
    import ast
    import pathlib

    found = []
    for path in sorted(pathlib.Path(root).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
                lines = node.end_lineno - body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append((f"{path.relative_to(root)}:{node.lineno} {node.name}", lines))
    return found


def test_no_function_body_over_60_lines(tmp_path):
    assert _long_functions(f"{REPO}/psft_megatron") == []
    # the check sees a long body (and not a long docstring)
    long_body = "def f():\n    '''doc'''\n" + "    x = 1\n" * 61
    long_doc = "def g():\n    '''\n" + "    doc\n" * 80 + "    '''\n    return 1\n"
    (tmp_path / "m.py").write_text(long_body + long_doc)
    assert [name for name, _ in _long_functions(tmp_path)] == ["m.py:1 f"]
