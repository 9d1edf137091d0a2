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

import heapq
import itertools
from typing import Dict, List, Sequence

import numpy as np

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
    Best fit: a sample goes to the row with the least room that still fits it (the lowest row
    id among equals), else to a new row. Rows are kept by their room, one heap of row ids per
    room value, and the rooms in use as bits of an integer: finding the least room >= s is a
    shift and a lowest-set-bit, so a million samples pack in seconds.
    """
    n = np.asarray(num_tokens, dtype=np.int64).reshape(-1)
    seg = -(-(n - 1) // segment_multiple) * segment_multiple
    too_long = np.flatnonzero(seg > row_length)
    if len(too_long):
        i = int(too_long[0])
        raise ValueError(f"sample {i} needs {int(seg[i])} positions > packed row length {row_length}")
    order = np.lexsort((np.arange(len(seg)), -seg))  # longest first, ties by index
    row_of = np.empty(len(seg), dtype=np.int64)
    rooms: Dict[int, List[int]] = {}  # room -> heap of row ids with that room
    used = 0  # bit r set: some row has room r
    num_rows = 0
    for i, s in zip(order.tolist(), seg[order].tolist()):
        above = used >> s
        if above:
            room = s + ((above & -above).bit_length() - 1)
            heap = rooms[room]
            r = heapq.heappop(heap)
            if not heap:
                used &= ~(1 << room)
        else:
            room, r = row_length, num_rows
            num_rows += 1
        row_of[i] = r
        left = room - s
        heapq.heappush(rooms.setdefault(left, []), r)
        used |= 1 << left
    members = np.lexsort((np.arange(len(seg)), row_of))  # by row, then index
    bounds = np.flatnonzero(np.diff(row_of[members])) + 1
    rows = [part.tolist() for part in np.split(members, bounds)] if len(seg) else []
    rows.sort(key=lambda r: r[0])
    return rows


def packing_efficiency(num_tokens: Sequence[int], rows: Sequence[Sequence[int]], row_length: int) -> float:
    """Fraction of row positions that hold real (shifted) tokens."""
    members = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64)
    used = int((np.asarray(num_tokens, dtype=np.int64)[members] - 1).sum()) if len(members) else 0
    return used / max(1, len(rows) * row_length)
