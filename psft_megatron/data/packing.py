"""Packing plan: several samples per row of a fixed length, no sample split across rows.

Lengths here are in MODEL POSITIONS: a sample of n tokens occupies n - 1 positions after the
collate shift (tokens = ids[:-1], labels = ids[1:]), rounded up to ``segment_multiple``
(2*CP when CP > 1, so every sample can be cut into 2*CP load-balanced chunks; else 1).
Rows hold ``packed_row_length(max_seq_length, multiple)`` positions, so every sample that
passed the length policy fits.

Algorithm: best-fit decreasing (longest first, ties by index; each sample goes to the fullest
row it fits in), deterministic; samples inside a row are ordered by dataset index.
"""

from __future__ import annotations

import bisect
from typing import List, Sequence

from psft_megatron.data.lengths import round_up


def packed_row_length(max_seq_length: int, multiple: int = 1) -> int:
    """Positions per packed row: ``round_up(max_seq_length - 1, multiple)``."""
    return round_up(max_seq_length - 1, multiple)


def segment_length(num_tokens: int, segment_multiple: int = 1) -> int:
    """Positions a sample of ``num_tokens`` tokens takes in a row (after shift and padding)."""
    return round_up(num_tokens - 1, segment_multiple)


def pack(num_tokens: Sequence[int], row_length: int, segment_multiple: int = 1) -> List[List[int]]:
    """Indices into ``num_tokens`` grouped into rows of at most ``row_length`` positions.

    Returns a list of rows, each a sorted list of sample indices; rows sorted by first index.
    """
    seg = [segment_length(int(n), segment_multiple) for n in num_tokens]
    for i, s in enumerate(seg):
        if s > row_length:
            raise ValueError(f"sample {i} needs {s} positions > packed row length {row_length}")
    order = sorted(range(len(seg)), key=lambda i: (-seg[i], i))
    rows: List[List[int]] = []
    free: List[tuple] = []  # sorted (remaining capacity, row id)
    for i in order:
        k = bisect.bisect_left(free, (seg[i], -1))
        if k < len(free):
            cap, r = free.pop(k)
        else:
            rows.append([])
            cap, r = row_length, len(rows) - 1
        rows[r].append(i)
        bisect.insort(free, (cap - seg[i], r))
    for r in rows:
        r.sort()
    rows.sort(key=lambda r: r[0])
    return rows


def packing_efficiency(num_tokens: Sequence[int], rows: Sequence[Sequence[int]], row_length: int) -> float:
    """Fraction of row positions that hold real (shifted) tokens."""
    used = sum(int(num_tokens[i]) - 1 for r in rows for i in r)
    return used / max(1, len(rows) * row_length)
