"""psft_megatron.compat.releases: version checks and the bridges between releases."""

import inspect
import os
import re

import pytest
import torch

from psft_megatron.compat import releases as megatron_compat
from psft_megatron.compat.releases import version_in
from tests.parallel.launch import REPO


def test_version_is_the_installed_megatron_cores():
    """megatron_version() against the installed distribution's metadata (pip's record, not the
    module megatron_version reads)."""
    import importlib.metadata

    import megatron.core
    from packaging.version import Version

    dist = importlib.metadata.distribution("megatron-core")
    installed = os.path.realpath(dist.locate_file("megatron/core/__init__.py"))
    if installed != os.path.realpath(megatron.core.__file__):
        pytest.skip(f"megatron.core is imported from {megatron.core.__file__}, not from the installed "
                    f"distribution ({installed}): nothing independent to compare with")
    assert megatron_compat.megatron_version() == Version(dist.version)


def test_version_is_in_the_range_setup_py_declares():
    with open(os.path.join(REPO, "setup.py")) as f:
        declared = re.findall(r'"megatron-core([<>=!~][^"]*)"', f.read())
    assert len(declared) == 1, declared
    assert version_in(declared[0]), f"megatron-core {megatron_compat.megatron_version()} outside {declared[0]}"


@pytest.mark.parametrize("version,spec,expected", [
    ("0.16.1", ">=0.16.1,<0.19", True),
    ("0.19.2", ">=0.16.1,<0.19", False),
    ("0.19.0rc1", "<0.19", False),  # a pre-release carries the release's code
    ("0.19.0+nv25.10", ">=0.19", True),  # NGC-style local tag
    ("0.16.0", ">=0.16.1", False),
])
def test_version_in(version, spec, expected):
    assert version_in(spec, version) is expected


def _fake_016(calls):
    def get_batch_on_this_cp_rank(batch, cp_group=None):
        calls.append(("0.16", cp_group))
        return batch
    return get_batch_on_this_cp_rank


def _fake_019(calls):
    def get_batch_on_this_cp_rank(batch, is_hybrid_cp, cp_group=None, hybrid_cp_group_func=None,
                                  use_per_sequence_balancing=False):
        calls.append(("0.19", is_hybrid_cp, cp_group))
        return batch
    return get_batch_on_this_cp_rank


@pytest.mark.parametrize("fake", [_fake_016, _fake_019])
def test_cp_slicing_calls_either_signature_with_the_cp_group(monkeypatch, fake):
    import megatron.core.utils as mutils

    calls = []
    group = object()
    monkeypatch.setattr(mutils, "get_batch_on_this_cp_rank", fake(calls))
    batch = {"tokens": torch.zeros(1, 4)}
    assert megatron_compat.get_batch_on_this_cp_rank(batch, cp_group=group) is batch
    # 0.18+ reads a missing group as the whole world: the group must always be passed.
    assert calls == ([("0.16", group)] if fake is _fake_016 else [("0.19", False, group)])


def test_cp_slicing_matches_the_installed_signature():
    from megatron.core.utils import get_batch_on_this_cp_rank

    takes_flag = "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters
    assert takes_flag == version_in(">=0.18"), "the signature changed in another release than recorded"
