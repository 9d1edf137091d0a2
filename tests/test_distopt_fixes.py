"""The distributed-optimizer fixes: each bug shows with its fix off on the megatron-core
releases it is declared for, and never with the fixes on.

One single-process launch (tests/parallel/fixes_worker.py) trains 3 steps with megatron's
DistributedOptimizer over torch Adam, saves, continues 2 steps, then loads the checkpoint into a
fresh model and optimizer once per fix with that fix off (and once with all on) and continues.
"""

import pytest

from psft_megatron.compat import distopt_fixes
from tests.parallel.fixes_worker import launch_once

NAMES = [fix.name for fix in distopt_fixes.FIXES]


@pytest.mark.parametrize("name", NAMES)
def test_fix_is_needed_exactly_where_declared(name):
    result = launch_once()
    entry = result["distopt_fixes"][name]
    version = result["megatron_core"]
    print(f"megatron-core {version}, {name} (declared for {entry['range']}): "
          f"off -> {entry['off']['detail']}; on -> {entry['on']['detail']}")
    assert not entry["on"]["bug"], f"{name} on, megatron-core {version}: {entry['on']['detail']}"
    assert entry["applied"] == entry["needed"], entry
    if entry["needed"]:
        assert entry["off"]["bug"], (f"megatron-core {version} does not show the bug {name} is for "
                                     f"(declared {entry['range']}): drop it for this release")
    else:
        assert not entry["off"]["bug"], (f"megatron-core {version} has the bug {name} fixes, but the fix "
                                         f"is declared only for {entry['range']}: {entry['off']['detail']}")


def test_default_distopt_format_does_not_save():
    """Why checkpoints use DISTOPT_SAVE_METADATA (fully_reshardable): the default fails."""
    entry = launch_once()["distopt_fixes"]["default_sharding_type_save"]
    assert entry["bug"], entry
