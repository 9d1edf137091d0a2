"""Version-gated changes to megatron-core: one entry, one registry, shared by the three modules
that change megatron-core at run time.

- :mod:`psft_megatron.compat.cpu` (CPU runs only: CUDA calls made to work on CPU and gloo),
- :mod:`psft_megatron.compat.distopt_fixes` (DistributedOptimizer checkpoint bugs, every device),
- :mod:`psft_megatron.compat.moe_fixes` (Mixture-of-Experts bugs, every device).

Each change (:class:`GatedChange`) names the megatron-core releases that need it as a PEP 440
range, checked with :func:`psft_megatron.compat.releases.version_in`, and knows how to apply
and revert itself. A :class:`Registry` holds one module's changes: :meth:`Registry.install`
applies those the installed release needs, once per process, except the names listed in
``$PSFT_PATCHES_OFF`` (comma-separated, tests and diagnostics only), and
:meth:`Registry.disabled` reverts named changes inside a ``with`` block, which is how every
test shows the failure a change is for.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

#: environment variable naming changes to leave out at install (comma-separated; tests only)
PATCHES_OFF_ENV = "PSFT_PATCHES_OFF"


@dataclass(frozen=True)
class GatedChange:
    """One change to megatron-core, applied only on the releases that need it.

    Subclasses add how the change is applied: ``apply()`` and ``revert()``, as methods or as
    callable fields.

    Attributes:
        name: what ``$PSFT_PATCHES_OFF`` and :meth:`Registry.disabled` take.
        summary: what it fixes or does, one line.
        megatron: the megatron-core releases that need it (PEP 440 range, e.g. ``">=0.16.1,<0.19"``).
    """

    name: str
    summary: str
    megatron: str

    def needed(self) -> bool:
        """Whether the installed megatron-core release needs this change."""
        from psft_megatron.compat.releases import version_in

        return version_in(self.megatron)


class Registry:
    """The changes of one module (``kind`` names it in errors), and which are in effect."""

    def __init__(self, kind: str, changes: Sequence[GatedChange]):
        self.kind = kind
        self.changes: List[GatedChange] = list(changes)
        self.by_name: Dict[str, GatedChange] = {change.name: change for change in self.changes}
        self.applied: List[str] = []  # names in effect, in declaration order
        self.installed = False

    def off_from_env(self) -> List[str]:
        """The names in ``$PSFT_PATCHES_OFF`` that belong to this registry."""
        names = [n.strip() for n in os.environ.get(PATCHES_OFF_ENV, "").split(",") if n.strip()]
        return [n for n in names if n in self.by_name]

    def install(self) -> None:
        """Apply every change this release needs and ``$PSFT_PATCHES_OFF`` does not name.
        Idempotent; callers that need a lock or a device check hold it around this call."""
        if self.installed:
            return
        off = set(self.off_from_env())
        for change in self.changes:
            if change.needed() and change.name not in off:
                change.apply()
                self.applied.append(change.name)
        self.installed = True

    @contextlib.contextmanager
    def disabled(self, *names: str) -> Iterator[None]:
        """Revert the named changes inside the block and re-apply them after it.

        Names not in effect (not needed by this release, or left out) are ignored, so a change
        this release does not need can be "disabled" to show megatron-core working without it.

        Raises:
            KeyError: a name this registry does not have.
        """
        unknown = [n for n in names if n not in self.by_name]
        if unknown:
            raise KeyError(f"unknown {self.kind} {unknown}; known: {sorted(self.by_name)}")
        reverted = [n for n in names if n in self.applied]
        for name in reverted:
            self.by_name[name].revert()
        try:
            yield
        finally:
            for name in reverted:
                self.by_name[name].apply()
