"""Importing the package needs neither CUDA, Transformer Engine, apex nor NeMo."""

import subprocess
import sys

import pytest

from psft_megatron.optional import MissingOptionalDependency, require
from tests.parallel.launch import REPO

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('transformer_engine', 'apex', 'nemo'):
            raise ModuleNotFoundError('blocked for the test: ' + name)
sys.meta_path.insert(0, Block())
import psft_megatron, psft_megatron.distributed.runtime, psft_megatron.model.builder, psft_megatron.checkpointing.dist_checkpoint
import psft_megatron.training.setup, psft_megatron.ops, psft_megatron.losses
print('OK')
"""


def test_import_without_optional_dependencies():
    proc = subprocess.run([sys.executable, "-c", BLOCK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_missing_optional_dependency_says_what_to_install():
    with pytest.raises(MissingOptionalDependency, match="pip install psft_no_such_pkg"):
        require("psft_no_such_pkg", "a feature")
