"""Old import paths of modules that moved, kept working for one release with a warning."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make module ``old`` the module ``new`` (same object, private names included) and warn
    once that the old path goes away in the next release."""
    warnings.warn(f"{old} moved to {new}; the old import path will be removed in the next release",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
