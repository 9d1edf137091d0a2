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
import os
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from psft_megatron.data.cache import TokenizedStore, hash_data_files, is_complete
from psft_megatron.data.collate import collate_packed, collate_unpacked
from psft_megatron.data.config import DataConfig, TokenizerConfig, settings_hash
from psft_megatron.data.errors import DataError, Location
from psft_megatron.data.formatting import SampleFormatter
from psft_megatron.data.lengths import LengthStats, apply_length_policy, required_multiple
from psft_megatron.data.packing import pack, packed_row_length, packing_efficiency
from psft_megatron.data.readers import iter_records
from psft_megatron.data.conversation import to_conversation
from psft_megatron.data.template import TemplateFormatter
from psft_megatron.data.tokenizers import Tokenizer
from psft_megatron.distributed.decisions import rank0_decides

logger = logging.getLogger(__name__)


def make_formatter(data_cfg: DataConfig, tokenizer: Tokenizer, tok_cfg: TokenizerConfig):
    """The formatter of ``data_cfg``'s records: NeMo template data, or conversations."""
    if data_cfg.uses_template:
        return TemplateFormatter(tokenizer, data_cfg)
    return SampleFormatter(tokenizer, tok_cfg)


class _Progress:
    """Progress of tokenising: a line per file, and one every ``every_s`` seconds inside a long
    one; printed by global rank 0 only (``RANK`` unset: a single process)."""

    def __init__(self, num_files: int, prefix: str, every_s: float = 10.0):
        self.enabled = os.environ.get("RANK", "0") == "0"
        self.num_files, self.prefix, self.every_s = num_files, prefix, every_s
        self.start = self.last = time.perf_counter()

    def tick(self, index: int, path: str, records: int) -> None:
        if self.enabled and records % 256 == 0 and time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            print(f"tokenising {self.prefix} [{index + 1}/{self.num_files}] {path}: {records} records so far "
                  f"({self.last - self.start:.0f} s)", flush=True)

    def done(self, index: int, path: str, records: int) -> None:
        if self.enabled:
            print(f"tokenised {self.prefix} [{index + 1}/{self.num_files}] {path}: {records} records "
                  f"({time.perf_counter() - self.start:.1f} s)", flush=True)


def tokenize_files(data_cfg: DataConfig, formatter, chunk: int = 256) -> TokenizedStore:
    """Read and tokenise every record of ``data_cfg.file_names``; errors name file and line/row.

    A file without a single record is an error naming it (an empty file is almost always a
    mistake, and a weighted source needs samples)."""
    samples: List[Tuple[np.ndarray, np.ndarray]] = []
    locs = []
    convs, clocs = [], []
    template = isinstance(formatter, TemplateFormatter)

    def flush():
        samples.extend(formatter.format_batch(convs, clocs))
        locs.extend(clocs)
        convs.clear()
        clocs.clear()

    counts = []
    progress = _Progress(len(data_cfg.file_names), data_cfg.prefix)
    for index, path in enumerate(data_cfg.file_names):
        before = len(samples) + len(convs)
        for record, loc in iter_records(path, data_cfg.split):
            progress.tick(index, path, len(samples) + len(convs) - before)
            if template:
                convs.append(formatter.convert(record, loc))
            else:
                convs.append(to_conversation(record, loc, data_cfg.schema, data_cfg.prompt_key,
                                             data_cfg.response_key, data_cfg.messages_key))
            clocs.append(loc)
            if len(convs) >= chunk:
                flush()
        counts.append(len(samples) + len(convs) - before)
        if counts[-1] == 0:
            raise DataError("no records: the file is empty; add data or remove it from "
                            f"{data_cfg.prefix}.file_names", Location(path))
        progress.done(index, path, counts[-1])
    if convs:
        flush()
    return TokenizedStore.from_samples(samples, locs, list(data_cfg.file_names), source_counts=counts,
                                       stats=dict(formatter.stats))


def cache_key(data_cfg: DataConfig, tokenizer: Tokenizer, tok_cfg: TokenizerConfig, formatter: SampleFormatter) -> str:
    """sha256 of (data file bytes, tokenizer files, tokenisation settings)."""
    tok_settings = {k: getattr(tok_cfg, k) for k in ("library", "prompt_template", "system_template", "add_bos")}
    tok_settings.update(use_chat=formatter.use_chat, eot=formatter.eot_id, bos=formatter.bos)
    return settings_hash(hash_data_files(data_cfg.file_names), tokenizer.library, tokenizer.fingerprint(),
                         tok_settings, data_cfg.tokenization_settings())


def load_or_tokenize(data_cfg: DataConfig, tokenizer: Tokenizer, tok_cfg: TokenizerConfig,
                     formatter: Optional[SampleFormatter] = None) -> Tuple[TokenizedStore, dict]:
    """The tokenised store, from ``data_cfg.cache_dir`` if a matching cache exists (written
    there otherwise). Returns (store, info) with info keys cache_hit, cache_path, seconds."""
    formatter = formatter or make_formatter(data_cfg, tokenizer, tok_cfg)
    t0 = time.perf_counter()
    if not data_cfg.cache_dir:
        store = tokenize_files(data_cfg, formatter)
        return store, {"cache_hit": False, "cache_path": None, "seconds": time.perf_counter() - t0}
    key = cache_key(data_cfg, tokenizer, tok_cfg, formatter)
    path = os.path.join(data_cfg.cache_dir, key[:32])
    if is_complete(path):
        store = TokenizedStore.load(path)
        return store, {"cache_hit": True, "cache_path": path, "seconds": time.perf_counter() - t0}
    store = tokenize_files(data_cfg, formatter)
    store.save(path, {"key": key, "tokenizer": tokenizer.fingerprint(), "settings": data_cfg.tokenization_settings(),
                      "stats": dict(formatter.stats)})
    return TokenizedStore.load(path), {"cache_hit": False, "cache_path": path, "seconds": time.perf_counter() - t0}


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
        self.length_stats = LengthStats()
        for key in ("field_truncated", "field_truncated_tokens"):
            setattr(self.length_stats, key, int(store.stats.get(key, 0)))
        if "first_field_truncated" in store.stats:
            self.length_stats.examples["field_truncated"] = store.stats["first_field_truncated"]
        spans = []
        max_len, min_len = data_cfg.max_seq_length, data_cfg.min_seq_length
        for i in range(len(store)):
            ids, mask = store.get(i)
            if len(ids) < min_len:
                self.length_stats.seen += 1
                self.length_stats.dropped_too_short += 1
                self.length_stats.examples.setdefault("dropped_too_short", str(store.location(i)))
                continue
            if len(ids) <= max_len and mask[1:].any():  # fast path: nothing to do
                out = _keep(ids, mask, self.length_stats)
            else:
                out = apply_length_policy(ids, mask, store.location(i), max_len, data_cfg.length_policy,
                                          data_cfg.truncation_side, data_cfg.empty_loss_policy, self.length_stats)
            if out is None:
                continue
            lo = int(store.offsets[i])
            if len(out[0]) != len(ids):  # truncated: a sub-span of the stored sample
                cut = len(ids) - len(out[0])
                start = lo + (cut if data_cfg.truncation_side == "left" else 0)
            else:
                start = lo
            spans.append((i, start, start + len(out[0])))
        if not spans:
            st = self.length_stats
            fixes = ([f"lower {data_cfg.prefix}.min_seq_length"] if st.dropped_too_short else []) + \
                ([f"raise {data_cfg.prefix}.max_seq_length or set length_policy=truncate"] if st.dropped_too_long else []) \
                + ([f"truncation cut the trained tokens away: raise {data_cfg.prefix}.max_seq_length or set "
                    "truncation_side=left"] if st.skipped_empty_loss else [])
            raise DataError(f"{data_cfg.prefix}: no sample of {data_cfg.file_names} survives the length policy "
                            f"({st.summary()}); {'; '.join(fixes) or 'add data'}")
        self.spans = np.asarray(spans, dtype=np.int64)
        self.sample_source = store.sample_sources()[self.spans[:, 0]]
        self.rows: Optional[List[List[int]]] = None
        self.item_source: Optional[np.ndarray] = None
        self.row_length = packed_row_length(data_cfg.max_seq_length, multiple)
        if data_cfg.mixing:
            self._check_sources()
        if data_cfg.packing:
            if data_cfg.mixing:  # rows never mix files: each item belongs to one weighted source
                self.rows, sources = [], []
                n = self.num_tokens()
                for k in range(len(data_cfg.file_names)):
                    members = np.flatnonzero(self.sample_source == k)
                    for row in pack(n[members], self.row_length, segment_multiple):
                        self.rows.append([int(members[j]) for j in row])
                        sources.append(k)
                self.item_source = np.asarray(sources, dtype=np.int64)
            else:
                self.rows = pack(self.num_tokens(), self.row_length, segment_multiple)
        elif data_cfg.mixing:
            self.item_source = self.sample_source.copy()
        for line in self.report_lines():
            logger.info(line)

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

        Under torch.distributed with a ``cache_dir``, global rank 0 tokenises and writes the cache
        first, all ranks meet at a barrier, then every rank memory-maps it (``cache_dir`` must be
        on a filesystem all ranks see). Without a cache_dir every rank tokenises on its own.
        ``align``: per-rank token multiple for FP8 GEMMs (see :func:`required_multiple`).
        """
        if data_cfg.packing and cp > 1:
            logger.warning("packing with CP > 1: the CPU attention does not support it (GPU/TE only)")
        _tokenize_on_rank0_first(data_cfg, tokenizer, tok_cfg)
        store, info = load_or_tokenize(data_cfg, tokenizer, tok_cfg)
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


def _tokenize_on_rank0_first(data_cfg: DataConfig, tokenizer: Tokenizer, tok_cfg: TokenizerConfig) -> None:
    import torch.distributed as dist

    if not data_cfg.cache_dir or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    rank0_decides(lambda: load_or_tokenize(data_cfg, tokenizer, tok_cfg), share_value=False)  # a data error: on every rank


def _keep(ids, mask, stats: LengthStats):
    stats.seen += 1
    stats.kept += 1
    return ids, mask


def microbatch_iterator(dataset: SFTDataset, sampler, pad_to: Optional[int] = None,
                        on_step: Optional[Callable[[dict], None]] = None) -> Iterator[List[Dict[str, object]]]:
    """Per optimizer step: this rank's list of collated micro-batches (sampler order)."""
    for step in sampler:
        batches = [dataset.collate(mb, pad_to=pad_to) for mb in step]
        if on_step is not None:
            on_step(sampler.state_dict())
        yield batches
