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
