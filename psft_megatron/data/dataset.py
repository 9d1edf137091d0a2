"""The SFT dataset the trainer uses: read -> tokenise (or load the cache) -> length policy ->
optional packing -> items that the collate turns into micro-batches.

Typical use (one DP rank)::

    tok_cfg = TokenizerConfig.from_dict(cfg.model.tokenizer)
    data_cfg = DataConfig.from_dict(cfg.model.data.train_ds)
    tokenizer = build_tokenizer(tok_cfg)
    ds = SFTDataset.build(data_cfg, tokenizer, tok_cfg, tp=2, cp=1, sequence_parallel=True)
    sampler = SFTSampler(len(ds), global_batch_size, ds.micro_batch_size(mbs), dp_rank, dp_size,
                         seed=data_cfg.seed)
    for step_microbatches in microbatch_iterator(ds, sampler):   # one optimizer step
        for batch in step_microbatches: ...                      # collate output dicts

An ITEM is one sample (unpacked) or one packed row (a list of samples). ``len(ds)`` counts
items; the sampler draws items.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from psft_megatron.data.cache import TokenizedStore
from psft_megatron.data.collate import collate_packed, collate_unpacked
from psft_megatron.data.config import DataConfig, TokenizerConfig
from psft_megatron.data.errors import DataError, Location
from psft_megatron.data.lengths import LengthStats, apply_length_policy, required_multiple
from psft_megatron.data.packing import pack, packed_row_length, packing_efficiency
from psft_megatron.data.token_cache import distributed_store, load_or_tokenize  # noqa: F401 (public API)
from psft_megatron.data.tokenize import make_formatter, tokenize_files  # noqa: F401 (public API)
from psft_megatron.data.tokenizers import Tokenizer

logger = logging.getLogger(__name__)


class SFTDataset:
    """Samples after the length policy, optionally packed. See the module docstring.

    Attributes: ``store`` (TokenizedStore), ``spans`` int64 [M, 3] (store index, start, end)
    of the M kept samples, ``sample_source`` int64 [M] (``file_names`` index of each kept
    sample), ``length_stats``, ``rows`` (packing: lists of kept-sample indices),
    ``row_length`` (packed row positions), ``multiple``, ``segment_multiple``, ``pad_id``.
    With ``concat_sampling_probabilities`` every file is packed on its own and
    ``item_source`` int64 [len] gives each item's file (else None).
    """

    def __init__(self, store: TokenizedStore, data_cfg: DataConfig, pad_id: int, multiple: int = 1,
                 segment_multiple: int = 1, cache_info: Optional[dict] = None):
        self.store, self.cfg, self.pad_id = store, data_cfg, pad_id
        self.multiple, self.segment_multiple = multiple, segment_multiple
        self.cache_info = cache_info or {}
        self.length_stats = self._stats_from_tokenizing()
        self.spans = self._apply_length_policy()
        self.sample_source = store.sample_sources()[self.spans[:, 0]]
        self.row_length = packed_row_length(data_cfg.max_seq_length, multiple)
        if data_cfg.mixing:
            self._check_sources()
        self.rows, self.item_source = self._plan_items()
        for line in self.report_lines():
            logger.info(line)

    def _stats_from_tokenizing(self) -> LengthStats:
        """The length counts, starting with what tokenising did (template field cuts)."""
        stats = LengthStats()
        for key in ("field_truncated", "field_truncated_tokens"):
            setattr(stats, key, int(self.store.stats.get(key, 0)))
        if "first_field_truncated" in self.store.stats:
            stats.examples["field_truncated"] = self.store.stats["first_field_truncated"]
        return stats

    def _apply_length_policy(self) -> np.ndarray:
        """int64 [M, 3] (store index, start, end) of the kept samples, in store order.

        Samples that need nothing (length within bounds, a trained token after the first) are
        taken in bulk from the store's index arrays; the others go through
        :func:`apply_length_policy` one by one. Raises DataError when nothing survives."""
        store, cfg, stats = self.store, self.cfg, self.length_stats
        lengths = store.lengths()
        has_target = (np.asarray(store.has_target, dtype=bool) if store.has_target is not None else
                      np.fromiter((store.get(i)[1][1:].any() for i in range(len(store))), bool, len(store)))
        too_short = lengths < cfg.min_seq_length
        fast = ~too_short & (lengths <= cfg.max_seq_length) & has_target
        stats.seen += int(too_short.sum() + fast.sum())
        stats.kept += int(fast.sum())
        stats.dropped_too_short += int(too_short.sum())
        if too_short.any():
            stats.examples.setdefault("dropped_too_short", str(store.location(int(np.argmax(too_short)))))
        starts = np.asarray(store.offsets[:-1])
        spans = [np.stack([np.flatnonzero(fast), starts[fast], starts[fast] + lengths[fast]], axis=1)]
        for i in np.flatnonzero(~too_short & ~fast).tolist():
            ids, mask = store.get(i)
            out = apply_length_policy(ids, mask, store.location(i), cfg.max_seq_length, cfg.length_policy,
                                      cfg.truncation_side, cfg.empty_loss_policy, stats)
            if out is not None:  # kept, maybe truncated to a sub-span of the stored sample
                start = int(starts[i]) + (len(ids) - len(out[0]) if cfg.truncation_side == "left" else 0)
                spans.append(np.array([[i, start, start + len(out[0])]], dtype=np.int64))
        spans = np.concatenate(spans).astype(np.int64)
        if not len(spans):
            self._raise_nothing_survives()
        return spans[np.argsort(spans[:, 0], kind="stable")]

    def _raise_nothing_survives(self) -> None:
        cfg, st = self.cfg, self.length_stats
        fixes = ([f"lower {cfg.prefix}.min_seq_length"] if st.dropped_too_short else []) + \
            ([f"raise {cfg.prefix}.max_seq_length or set length_policy=truncate"] if st.dropped_too_long else []) \
            + ([f"truncation cut the trained tokens away: raise {cfg.prefix}.max_seq_length or set "
                "truncation_side=left"] if st.skipped_empty_loss else [])
        raise DataError(f"{cfg.prefix}: no sample of {cfg.file_names} survives the length policy "
                        f"({st.summary()}); {'; '.join(fixes) or 'add data'}")

    def _plan_items(self):
        """(rows, item_source): the packed rows (lists of kept-sample indices; None unpacked)
        and each item's file (mixing only, else None). With mixing, rows never mix files: each
        item belongs to one weighted source."""
        cfg = self.cfg
        if not cfg.packing:
            return None, (self.sample_source.copy() if cfg.mixing else None)
        if not cfg.mixing:
            return pack(self.num_tokens(), self.row_length, self.segment_multiple), None
        rows, sources = [], []
        n = self.num_tokens()
        for k in range(len(cfg.file_names)):
            members = np.flatnonzero(self.sample_source == k)
            for row in pack(n[members], self.row_length, self.segment_multiple):
                rows.append([int(members[j]) for j in row])
                sources.append(k)
        return rows, np.asarray(sources, dtype=np.int64)

    def _check_sources(self) -> None:
        if self.store.source_counts is None or len(self.store.source_counts) != len(self.cfg.file_names):
            raise DataError("the token cache has no per-file sample counts; delete it and it is rebuilt",
                            Location(self.cache_info.get("cache_path") or str(self.cfg.cache_dir)))
        kept = np.bincount(self.sample_source, minlength=len(self.cfg.file_names))
        for k, path in enumerate(self.cfg.file_names):
            if kept[k] == 0:
                raise DataError(f"no sample survives the length policy (max_seq_length={self.cfg.max_seq_length}, "
                                f"length_policy={self.cfg.length_policy}), but "
                                f"{self.cfg.prefix}.concat_sampling_probabilities[{k}] draws from it",
                                Location(path))

    def source_items(self, k: int) -> np.ndarray:
        """int64: the items of file ``k`` (mixing only)."""
        return np.flatnonzero(self.item_source == k)

    @classmethod
    def build(cls, data_cfg: DataConfig, tokenizer: Tokenizer, tok_cfg: TokenizerConfig, tp: int = 1, cp: int = 1,
              sequence_parallel: bool = False, align: int = 1) -> "SFTDataset":
        """Tokenise (or load the cache) and apply the length policy and packing for a TP/CP/SP layout.

        Under torch.distributed with a ``cache_dir``, global rank 0 decides the cache key and
        builds the cache while the other ranks wait; where ``cache_dir`` is node-local, the first
        rank of every other node builds that node's copy (see
        :func:`psft_megatron.data.token_cache.distributed_store`). Then every rank memory-maps it.
        Without a cache_dir every rank tokenises on its own.
        ``align``: per-rank token multiple for FP8 GEMMs (see :func:`required_multiple`).
        """
        if data_cfg.packing and cp > 1:
            logger.warning("packing with CP > 1: the CPU attention does not support it (GPU/TE only)")
        store, info = distributed_store(data_cfg, tokenizer, tok_cfg)
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        return cls(store, data_cfg, pad_id, required_multiple(tp, cp, sequence_parallel, align),
                   2 * cp if cp > 1 else 1, info)

    # ------------------------------------------------------------------ access
    def num_tokens(self) -> np.ndarray:
        """int64 [M] token counts of the kept samples."""
        return self.spans[:, 2] - self.spans[:, 1]

    def sample(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Kept sample k: (input_ids int32 [n], loss_mask uint8 [n]) (read-only views)."""
        _, lo, hi = self.spans[k]
        return self.store.ids[lo:hi], self.store.mask[lo:hi]

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.spans)

    def item_samples(self, item: int) -> List[int]:
        """Kept-sample indices of an item (one, or a packed row's)."""
        return list(self.rows[item]) if self.rows is not None else [item]

    def micro_batch_size(self, requested: int) -> int:
        """The micro-batch size in items: 1 when packing (one packed row), else ``requested``."""
        return 1 if self.rows is not None else requested

    def collate(self, items: Sequence[int], pad_to: Optional[int] = None) -> Dict[str, object]:
        """A micro-batch from item indices (see psft_megatron.data.collate). Item -1 is a
        filler: a row of padding with loss mask 0 (an empty packed row when packing)."""
        if self.rows is not None:
            if len(items) != 1:
                raise ValueError(f"packed micro-batches hold one row, got {len(items)} items")
            ks = self.rows[items[0]] if items[0] >= 0 else []
            return collate_packed([self.sample(k) for k in ks], self.row_length, self.pad_id,
                                  self.segment_multiple, sample_index=ks)
        return collate_unpacked([self.sample(k) if k >= 0 else None for k in items], self.pad_id, self.multiple,
                                pad_to=pad_to, sample_index=list(items))

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        n = self.num_tokens()
        out = {"source_samples": len(self.store), "kept_samples": len(self.spans), "items": len(self),
               "length": self.length_stats.as_dict(), "tokens": int(n.sum()),
               "cache": {k: v for k, v in self.cache_info.items()}}
        if self.rows is not None:
            out["packing"] = {"rows": len(self.rows), "row_length": self.row_length,
                              "efficiency": round(packing_efficiency(n, self.rows, self.row_length), 4)}
        return out

    def report_lines(self) -> List[str]:
        lines = [f"data {self.cfg.file_names}: {self.length_stats.summary()}"]
        for reason, where in self.length_stats.examples.items():
            lines.append(f"  first {reason}: {where}")
        if self.rows is not None:
            r = self.report()["packing"]
            per_file = " (each file packed on its own)" if self.item_source is not None else ""
            lines.append(f"  packed into {r['rows']} rows of {r['row_length']} positions ({r['efficiency']:.1%} full)"
                         + per_file)
        return lines


def microbatch_iterator(dataset: SFTDataset, sampler, pad_to: Optional[int] = None,
                        on_step: Optional[Callable[[dict], None]] = None) -> Iterator[List[Dict[str, object]]]:
    """Per optimizer step: this rank's list of collated micro-batches (sampler order)."""
    for step in sampler:
        batches = [dataset.collate(mb, pad_to=pad_to) for mb in step]
        if on_step is not None:
            on_step(sampler.state_dict())
        yield batches
