"""Weighted mixing of several data files (``concat_sampling_probabilities``), without epochs.

Sources k = 0..S-1 (the ``file_names`` entries) hold ``n_k`` items each and have weights
``p_k`` (summing to 1). The global item stream t = 0, 1, 2, ... picks its source
deterministically: slot t goes to the source that is furthest behind its share,

    k(t) = argmax_k (p_k * (t + 1) - c_k(t))      (ties: the lowest k)

where ``c_k(t)`` counts the slots given to source k before t. After any T slots no source is
ahead of its share by a whole item (``c_k < p_k * T + 1``: the chosen source has
``p_k * (t + 1) - c_k >= 1 / S > 0``), so none is behind by S - 1 items or more (in practice
about one item): the proportions hold within every global batch, not only on average. Inside source k the items come in passes over a permutation drawn from
``numpy.random.default_rng([seed, k, pass])`` (identity without ``shuffle``); a source that is
used up starts its next pass on its own, so nothing is dropped or repeated before every item
of the source has been seen once more. There are no epochs over the union and no partial
batches.

Global batches of ``global_batch_size`` slots are sharded over DP ranks and micro-batches
exactly as :class:`psft_megatron.data.sampler.SFTSampler` does. The whole position is the
vector ``c`` (``state_dict()["source_consumed"]``): restoring it resumes with exactly the
batches of an uninterrupted run.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence

import numpy as np

from psft_megatron.data.errors import ConfigError
from psft_megatron.data.sampler import split_for_rank


class MixtureSampler:
    """Iterating yields, per optimizer step, this rank's micro-batches: ``List[List[int]]``
    (``num_microbatches`` lists of ``micro_batch_size`` item indices). ``source_items[k]``:
    int64 item indices of source k (into the dataset); ``probabilities``: one per source."""

    kind = "mixture"

    def __init__(self, source_items: Sequence[np.ndarray], probabilities: Sequence[float], global_batch_size: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 1234, shuffle: bool = True):
        if len(source_items) != len(probabilities) or not source_items:
            raise ValueError("one probability per source, at least one source")
        if any(len(items) == 0 for items in source_items):
            raise ValueError("every source needs at least one item")
        if micro_batch_size < 1 or global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"micro_batch_size * dp_size = {micro_batch_size} * {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} not in [0, {dp_size})")
        self.source_items = [np.asarray(items, dtype=np.int64) for items in source_items]
        self.probabilities = [float(p) for p in probabilities]
        self._p = np.asarray(self.probabilities, dtype=np.float64)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self.source_consumed = np.zeros(len(source_items), dtype=np.int64)  # c_k: global slots given to k
        self._orders = {}  # (source, pass) -> permutation

    # ------------------------------------------------------------------ position
    @property
    def consumed_samples(self) -> int:
        """Global items drawn so far (all ranks)."""
        return int(self.source_consumed.sum())

    @property
    def num_sources(self) -> int:
        return len(self.source_items)

    def epochs(self) -> List[float]:
        """Passes over each source so far (fractional)."""
        return [float(c) / len(items) for c, items in zip(self.source_consumed, self.source_items)]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "source_consumed": [int(c) for c in self.source_consumed],
                "consumed_samples": self.consumed_samples, "seed": self.seed,
                "num_samples": [len(items) for items in self.source_items],
                "probabilities": list(self.probabilities), "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; one of another layout of sources, weights, seed or batch size is
        a :class:`ConfigError` (the batches would not be reproduced)."""
        if state.get("kind") != self.kind:
            raise ConfigError("the saved data position is of a sampler without concat_sampling_probabilities; "
                              "this run mixes files, so resuming would not reproduce the batches")
        mine = self.state_dict()
        for key in ("num_samples", "probabilities", "seed", "global_batch_size"):
            if key in state and state[key] != mine[key]:
                raise ConfigError(f"the saved data position has {key}={state[key]} but this run has {mine[key]}; "
                                  "resuming would not reproduce the batches")
        consumed = np.asarray(state["source_consumed"], dtype=np.int64)
        if consumed.shape != self.source_consumed.shape:
            raise ConfigError(f"the saved data position has {len(consumed)} sources, this run {self.num_sources}")
        self.source_consumed = consumed.copy()

    # ------------------------------------------------------------------ order
    def _order(self, k: int, pass_: int) -> np.ndarray:
        key = (k, pass_)
        if key not in self._orders:
            n = len(self.source_items[k])
            order = np.random.default_rng([self.seed, k, pass_]).permutation(n) if self.shuffle else np.arange(n)
            self._orders = {kk: v for kk, v in self._orders.items() if kk[0] != k}  # keep one pass per source
            self._orders[key] = order
        return self._orders[key]

    def next_global_batch(self) -> np.ndarray:
        """Draw the next global batch: item indices int64 [global_batch_size] (all ranks);
        advances the position."""
        out = np.empty(self.global_batch_size, dtype=np.int64)
        c = self.source_consumed
        for slot in range(self.global_batch_size):
            t = int(c.sum())
            k = int(np.argmax(self._p * (t + 1) - c))  # first maximum: ties go to the lowest k
            n = len(self.source_items[k])
            pass_, pos = divmod(int(c[k]), n)
            out[slot] = self.source_items[k][self._order(k, pass_)[pos]]
            c[k] += 1
        return out

    def rank_microbatches(self, batch: np.ndarray) -> List[List[int]]:
        """This rank's micro-batches of a global batch."""
        return split_for_rank(batch, self.micro_batch_size, self.dp_rank, self.dp_size, self.num_microbatches)

    def __iter__(self) -> Iterator[List[List[int]]]:
        while True:
            yield self.rank_microbatches(self.next_global_batch())
