"""Imports of optional dependencies with an error that says what to install.

Core dependencies (torch, megatron-core, ...) are imported directly. Optional ones
(transformer-engine, apex, nemo-toolkit) go through :func:`require` so that a missing
package fails with the pip command that provides it, not with a bare ImportError deep
inside a stack trace.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: module name -> (what it is for, how to install it)
_INSTALL_HINTS = {
    "transformer_engine": (
        "the 'te' layer spec and FP8 training",
        "pip install -e '.[te]'  (or use an NGC PyTorch container, which ships it)",
    ),
    "apex": ("apex fused kernels", "install NVIDIA apex from source (optional)"),
    "nemo": ("NeMo integration", "pip install -e '.[nemo]'"),
    "pyarrow": ("reading Parquet files and Hugging Face datasets directories", "pip install -e '.[data]'"),
}


class MissingOptionalDependency(ImportError):
    """An optional dependency needed by the requested feature is not installed."""


def is_available(module: str) -> bool:
    """True if ``module`` can be imported (the import error, if any, is swallowed)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - broken installs count as unavailable
        return False
    return True


def require(module: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingOptionalDependency` naming the install step."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001
        top = module.split(".")[0]
        purpose, how = _INSTALL_HINTS.get(top, (feature or module, f"pip install {top}"))
        raise MissingOptionalDependency(
            f"{feature or purpose} needs the optional package '{top}', which could not be "
            f"imported ({type(exc).__name__}: {exc}). Install it with: {how}"
        ) from exc
