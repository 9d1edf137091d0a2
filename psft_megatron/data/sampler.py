"""Deterministic, resumable, DP-sharded batch sampler.

Items are dataset entries (samples, or packed rows when packing). Per epoch ``e`` the item
order is a permutation drawn from ``numpy.random.default_rng([seed, e])`` (identity when
``shuffle=False``). It is cut into global batches of ``global_batch_size`` items; each global
batch into ``num_microbatches = global_batch_size // (micro_batch_size * dp_size)`` chunks
of ``micro_batch_size * dp_size`` items, and DP rank r takes items
``[r * micro_batch_size, (r + 1) * micro_batch_size)`` of each chunk. So the DP shards of an
epoch are disjoint and together cover every item of the full global batches.

The tail ``num_items % global_batch_size`` of each epoch is dropped (``drop_last=True``,
reported as ``dropped_per_epoch``) or, with ``drop_last=False``, the last global batch is
filled up with items from the start of the same epoch's order (``repeated_per_epoch``; cycling
through it again when the dataset is smaller than half a global batch).

State: ``{"epoch", "consumed_samples", "step_in_epoch"}``, ``consumed_samples`` counting
global items over all epochs; restoring it resumes at the next optimizer step with exactly
the batches an uninterrupted run would see.
"""

from __future__ import annotations

from typing import Iterator, List

import numpy as np

from psft_megatron.data.errors import ConfigError


def split_for_rank(batch: np.ndarray, micro_batch_size: int, dp_rank: int, dp_size: int,
                   num_microbatches: int) -> List[List[int]]:
    """This DP rank's micro-batches of a global batch ``[num_microbatches * micro_batch_size *
    dp_size]`` of item indices: micro-batch ``m`` of rank ``r`` is the slice at
    ``m * mbs * dp + r * mbs``, as megatron's data-parallel split."""
    chunk = micro_batch_size * dp_size
    return [batch[m * chunk + dp_rank * micro_batch_size: m * chunk + (dp_rank + 1) * micro_batch_size].tolist()
            for m in range(num_microbatches)]


class SFTSampler:
    """Iterating yields, per optimizer step, this rank's micro-batches: ``List[List[int]]``
    (``num_microbatches`` lists of ``micro_batch_size`` item indices)."""

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 1234, shuffle: bool = True, drop_last: bool = True,
                 num_epochs: int | None = None):
        if micro_batch_size < 1 or global_batch_size < 1:
            raise ValueError("micro_batch_size and global_batch_size must be >= 1")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size * dp_size = "
                f"{micro_batch_size} * {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} not in [0, {dp_size})")
        if num_samples < global_batch_size and drop_last:
            raise ValueError(
                f"{num_samples} items are fewer than one global batch ({global_batch_size}); "
                "lower global_batch_size or add data")
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.num_epochs = num_epochs
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        full, tail = divmod(num_samples, global_batch_size)
        self.steps_per_epoch = full if (drop_last or tail == 0) else full + 1
        self.dropped_per_epoch = tail if drop_last else 0
        self.repeated_per_epoch = 0 if (drop_last or tail == 0) else global_batch_size - tail
        self.epoch = 0
        self.step_in_epoch = 0
        self.consumed_samples = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "consumed_samples": self.consumed_samples, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; a state of another dataset size, batch size or seed (or of a
        mixing sampler) is a :class:`ConfigError`: the batches would not be reproduced."""
        if state.get("kind", "epochs") != "epochs":
            raise ConfigError(f"the saved data position is of a {state.get('kind')!r} sampler, this run has "
                              "epochs over one dataset (concat_sampling_probabilities changed); resuming would not "
                              "reproduce the batches")
        for key in ("num_samples", "global_batch_size", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(f"the saved data position has {key}={state[key]} but this run has "
                                  f"{getattr(self, key)}; resuming would not reproduce the batches")
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.consumed_samples = int(state["consumed_samples"])

    # ------------------------------------------------------------------ order
    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [steps_per_epoch * global_batch_size]: the item order of ``epoch``."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        need = self.steps_per_epoch * self.global_batch_size
        if need > len(order):  # drop_last=False: fill the last batch from the start (cycling if needed)
            order = np.resize(order, need)
        return order[:need]

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """Item indices [global_batch_size] of optimizer step ``step`` of ``epoch`` (all ranks)."""
        g = self.global_batch_size
        return self.epoch_order(epoch)[step * g : (step + 1) * g]

    def rank_microbatches(self, batch: np.ndarray) -> List[List[int]]:
        """This rank's micro-batches of a global batch."""
        return split_for_rank(batch, self.micro_batch_size, self.dp_rank, self.dp_size, self.num_microbatches)

    def __iter__(self) -> Iterator[List[List[int]]]:
        order_epoch, order = None, None
        while self.num_epochs is None or self.epoch < self.num_epochs:
            if self.step_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.step_in_epoch = 0
                continue
            if order_epoch != self.epoch:
                order, order_epoch = self.epoch_order(self.epoch), self.epoch
            g = self.global_batch_size
            batch = order[self.step_in_epoch * g : (self.step_in_epoch + 1) * g]
            self.step_in_epoch += 1
            self.consumed_samples += g
            yield self.rank_microbatches(batch)

    def __len__(self) -> int:
        return self.steps_per_epoch


class EvalSampler:
    """One pass over ``num_items`` items for evaluation: no item twice, none left out unless
    asked.

    The items, in a fixed order (identity, or one permutation drawn from
    ``default_rng([seed, 0])`` with ``shuffle``), are cut into global batches of
    ``global_batch_size``; the last one may be partial. A partial batch is kept (its empty
    slots are item ``-1``: a padding row with loss mask 0, so every rank runs the same number
    of micro-batches of the same shape and the fillers add no token to any metric), or left
    out with ``drop_last`` (counted in ``dropped``). ``limit_batches`` evaluates only the
    first that many global batches (``not_evaluated`` counts the rest).

    Iterating yields, per global batch, this rank's ``num_microbatches`` lists of
    ``micro_batch_size`` item indices (-1 = filler), sharded over DP as :class:`SFTSampler`
    does. Every iteration is the same pass.
    """

    def __init__(self, num_items: int, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 1234, shuffle: bool = False, drop_last: bool = False,
                 limit_batches: int | None = None):
        if micro_batch_size < 1 or global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"micro_batch_size * dp_size = {micro_batch_size} * {dp_size}")
        if num_items < 1:
            raise ValueError("the dataset is empty")
        self.num_items, self.global_batch_size = num_items, global_batch_size
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        full, tail = divmod(num_items, global_batch_size)
        self.dropped = tail if drop_last else 0
        self.available_batches = full if (drop_last or tail == 0) else full + 1
        self.num_batches = self.available_batches if limit_batches is None else min(limit_batches,
                                                                                   self.available_batches)
        self.evaluated = min(self.num_batches * global_batch_size, num_items - self.dropped)
        self.not_evaluated = num_items - self.dropped - self.evaluated
        self.fillers = self.num_batches * global_batch_size - self.evaluated

    def order(self) -> np.ndarray:
        """int64 [num_items]: the items in evaluation order."""
        if self.shuffle:
            return np.random.default_rng([self.seed, 0]).permutation(self.num_items)
        return np.arange(self.num_items)

    def global_batches(self) -> List[np.ndarray]:
        """The evaluated global batches (all ranks): int64 [global_batch_size] each, -1 = filler."""
        order, g = self.order(), self.global_batch_size
        out = []
        for b in range(self.num_batches):
            batch = np.full(g, -1, dtype=np.int64)
            part = order[b * g : min((b + 1) * g, self.num_items)]
            batch[: len(part)] = part
            out.append(batch)
        return out

    def rank_microbatches(self, batch: np.ndarray) -> List[List[int]]:
        return split_for_rank(batch, self.micro_batch_size, self.dp_rank, self.dp_size, self.num_microbatches)

    def __iter__(self) -> Iterator[List[List[int]]]:
        for batch in self.global_batches():
            yield self.rank_microbatches(batch)

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self) -> dict:
        """Nothing to resume: every pass is the same."""
        return {"kind": "eval", "num_items": self.num_items}
