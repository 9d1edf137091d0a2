"""Length policy (error | truncate | drop), the empty-loss check, and padding multiples.

All counts go into :class:`LengthStats`; nothing is dropped or truncated silently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np

from psft_megatron.data.errors import DataError, Location


def required_multiple(tp: int = 1, cp: int = 1, sequence_parallel: bool = False, align: int = 1) -> int:
    """Sequence-length multiple megatron needs: lcm of TP (if SP) and 2*CP (if CP > 1); else 1.

    SP splits the sequence over TP ranks; CP cuts it into 2*CP load-balanced chunks. With
    ``align`` > 1 (FP8: 16, or 32 for MXFP8, :attr:`psft_megatron.model.fp8.FP8Config.align_size`)
    every rank's share of the sequence - s / CP, and s / (CP * TP) under SP, the shard TE casts
    before its all-gather - is also a multiple of ``align``, as TE's FP8 GEMMs need.
    """
    m = 1
    if sequence_parallel and tp > 1:
        m = math.lcm(m, tp)
    if cp > 1:
        m = math.lcm(m, 2 * cp)
    if align > 1:
        m = math.lcm(m, align * cp * (tp if sequence_parallel and tp > 1 else 1))
    return m


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def has_target(mask: np.ndarray) -> bool:
    """True if some token after the first is a target (the collate drops mask[0])."""
    return bool(mask[1:].any())


@dataclass
class LengthStats:
    """Counts of what the length policy did (reported by the dataset builder)."""

    seen: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    skipped_empty_loss: int = 0
    truncated_tokens: int = 0
    dropped_too_short: int = 0  # fewer tokens than min_seq_length
    field_truncated: int = 0  # template data: samples shortened inside truncation_field(s) while tokenising
    field_truncated_tokens: int = 0
    examples: Dict[str, str] = field(default_factory=dict)  # reason -> first location

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = (f"{self.seen} samples: {self.kept} kept, {self.truncated} truncated "
                f"({self.truncated_tokens} tokens cut), {self.dropped_too_long} dropped as too long, "
                f"{self.skipped_empty_loss} skipped with an all-zero loss mask")
        if self.dropped_too_short:
            text += f", {self.dropped_too_short} dropped as shorter than min_seq_length"
        if self.field_truncated:
            text += (f"; {self.field_truncated} shortened inside truncation_field "
                     f"({self.field_truncated_tokens} tokens cut)")
        return text


def apply_length_policy(ids: np.ndarray, mask: np.ndarray, loc: Location, max_len: int, policy: str,
                        side: str, empty_loss_policy: str, stats: LengthStats
                        ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Apply ``policy`` to one sample; returns (ids, mask) or None (dropped/skipped, counted).

    ids int32 [n], mask uint8 [n] -> ids [<= max_len], mask [<= max_len].
    Raises DataError for policy ``error`` (too long) or ``empty_loss_policy`` ``error``.
    """
    stats.seen += 1
    n = len(ids)
    if n > max_len:
        if policy == "error":
            raise DataError(
                f"sample has {n} tokens > max_seq_length={max_len} (length_policy=error; "
                "use truncate or drop)", loc)
        if policy == "drop":
            stats.dropped_too_long += 1
            stats.examples.setdefault("dropped_too_long", str(loc))
            return None
        cut = n - max_len
        ids, mask = (ids[cut:], mask[cut:]) if side == "left" else (ids[:max_len], mask[:max_len])
        stats.truncated += 1
        stats.truncated_tokens += cut
        stats.examples.setdefault("truncated", str(loc))
    if not has_target(mask):
        what = "after truncation " if n > max_len else ""
        if empty_loss_policy == "error":
            raise DataError(
                f"loss mask is all zero {what}(no trained token; {n} tokens, max_seq_length={max_len}); "
                "set empty_loss_policy=skip to skip such samples", loc)
        stats.skipped_empty_loss += 1
        stats.examples.setdefault("skipped_empty_loss", str(loc))
        return None
    stats.kept += 1
    return ids, mask
