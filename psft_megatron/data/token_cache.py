"""The token cache: its key, a hit or a build, and which ranks build it under torch.distributed.

- :func:`decide_key`: the cache key from the data files, the tokenizer files and the settings,
  with the per-file content hashes remembered beside the cache
  (:class:`psft_megatron.data.fingerprint.HashMemo`): a warm start reads no data byte.
- :func:`load_or_tokenize`: the store memory-mapped from ``<cache_dir>/<key[:32]>`` if it is
  complete, else tokenised into it (:func:`psft_megatron.data.tokenize.tokenize_files`).
- :func:`distributed_store`: the same under torch.distributed. Global rank 0 computes the key
  and broadcasts it (:func:`psft_megatron.distributed.decisions.rank0_decides`); rank 0 builds
  the cache while the others wait. When ``cache_dir`` is node-local (some ranks cannot see
  rank 0's directory: :func:`~psft_megatron.distributed.decisions.ranks_seeing`), the first
  rank of every such node (``LOCAL_RANK`` 0) builds its node's copy at the same time, and the
  node's other ranks wait; then every rank memory-maps its node's cache. A data error is raised
  on every rank.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

from psft_megatron.data.cache import TokenizedStore, is_complete
from psft_megatron.data.config import DataConfig, TokenizerConfig, settings_hash
from psft_megatron.data.fingerprint import HashMemo, file_entries, hash_files
from psft_megatron.data.tokenize import make_formatter, resolve_workers, tokenize_files
from psft_megatron.data.tokenizers import Tokenizer
from psft_megatron.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheKey:
    """``key``: sha256 hex of everything the tokenised output depends on; ``tokenizer``: the
    tokenizer files' fingerprint (recorded in the cache's meta.json)."""

    key: str
    tokenizer: str


def cache_key(data_cfg: DataConfig, tokenizer: Tokenizer, tok_cfg: TokenizerConfig, formatter,
              memo: Optional[HashMemo] = None) -> CacheKey:
    """sha256 of (data file contents, tokenizer files, tokenisation settings); ``memo``:
    remembered per-file hashes (see :mod:`psft_megatron.data.fingerprint`)."""
    tok_settings = {k: getattr(tok_cfg, k) for k in ("library", "prompt_template", "system_template", "add_bos")}
    tok_settings.update(use_chat=getattr(formatter, "use_chat", None), eot=getattr(formatter, "eot_id", None),
                        bos=getattr(formatter, "bos", None))
    fingerprint = tokenizer.fingerprint(memo)
    key = settings_hash(hash_files(file_entries(data_cfg.file_names), memo), tokenizer.library, fingerprint,
                        tok_settings, data_cfg.tokenization_settings())
    return CacheKey(key, fingerprint)


def decide_key(data_cfg: DataConfig, tokenizer: Tokenizer, tok_cfg: TokenizerConfig, formatter=None) -> CacheKey:
    """The cache key, remembering file hashes in ``<cache_dir>/file_hashes.json``."""
    formatter = formatter or make_formatter(data_cfg, tokenizer, tok_cfg)
    memo = HashMemo(os.path.join(data_cfg.cache_dir, HashMemo.FILE_NAME) if data_cfg.cache_dir else None)
    key = cache_key(data_cfg, tokenizer, tok_cfg, formatter, memo)
    memo.save()
    return key


def load_or_tokenize(data_cfg: DataConfig, tokenizer: Tokenizer, tok_cfg: TokenizerConfig, formatter=None,
                     key: Optional[CacheKey] = None, workers: Optional[int] = None) -> Tuple[TokenizedStore, dict]:
    """The tokenised store, from ``data_cfg.cache_dir`` if a matching cache exists (written
    there otherwise; without a cache_dir into a temporary directory). ``key``: the decided key
    (default: computed here); ``workers``: tokenising processes (default
    :func:`~psft_megatron.data.tokenize.resolve_workers`). Returns (store, info) with info keys
    cache_hit, cache_path, seconds, workers (0 on a hit)."""
    formatter = formatter or make_formatter(data_cfg, tokenizer, tok_cfg)
    t0 = time.perf_counter()
    path = None
    if data_cfg.cache_dir:
        key = key or decide_key(data_cfg, tokenizer, tok_cfg, formatter)
        path = os.path.join(data_cfg.cache_dir, key.key[:32])
        if is_complete(path):
            store = TokenizedStore.load(path)
            store.relabel(data_cfg.file_names)  # the same bytes may have been cached from other paths
            return store, {"cache_hit": True, "cache_path": path, "seconds": time.perf_counter() - t0, "workers": 0}
    workers = resolve_workers(data_cfg) if workers is None else workers
    meta = {"key": key.key, "tokenizer": key.tokenizer, "settings": data_cfg.tokenization_settings()} if key else {}
    store = tokenize_files(data_cfg, formatter, path, workers, meta)
    return store, {"cache_hit": False, "cache_path": path, "seconds": time.perf_counter() - t0, "workers": workers}


def _world():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def distributed_store(data_cfg: DataConfig, tokenizer: Tokenizer, tok_cfg: TokenizerConfig
                      ) -> Tuple[TokenizedStore, dict]:
    """:func:`load_or_tokenize` for every rank of a torch.distributed job (see the module
    docstring); a plain call outside one. Without a ``cache_dir`` every rank tokenises on its
    own, sharing the node's CPUs."""
    from psft_megatron.distributed.decisions import rank0_decides, ranks_seeing

    dist = _world()
    if dist is None:
        return load_or_tokenize(data_cfg, tokenizer, tok_cfg)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not data_cfg.cache_dir:
        return load_or_tokenize(data_cfg, tokenizer, tok_cfg, workers=resolve_workers(data_cfg, local_ranks))
    key = rank0_decides(lambda: decide_key(data_cfg, tokenizer, tok_cfg))
    seen = ranks_seeing(data_cfg.cache_dir)
    rank = dist.get_rank()
    node_builder = rank != 0 and not seen[rank] and int(os.environ.get("LOCAL_RANK", "0")) == 0
    failure, own = None, None
    if node_builder:  # this node's copy, while rank 0 builds its own
        try:
            own = load_or_tokenize(data_cfg, tokenizer, tok_cfg, key=key, workers=resolve_workers(data_cfg))
        except UserError as exc:
            failure = exc
    # a builder has its node's CPUs to itself: the node's other ranks wait
    built = rank0_decides(lambda: load_or_tokenize(data_cfg, tokenizer, tok_cfg, key=key,
                                                   workers=resolve_workers(data_cfg))[1])
    if not all(seen):
        _raise_any(dist, failure)
    if rank == 0:
        return load_or_tokenize(data_cfg, tokenizer, tok_cfg, key=key)[0], built  # a hit: memory-mapped
    if own is not None:
        return own
    store, info = load_or_tokenize(data_cfg, tokenizer, tok_cfg, key=key,
                                   workers=resolve_workers(data_cfg, local_ranks))
    if not info["cache_hit"]:
        logger.warning("rank %d saw no token cache built for its node in %s (LOCAL_RANK 0 of every node builds "
                       "one); it tokenised on its own", rank, data_cfg.cache_dir)
    return store, info


def _raise_any(dist, failure: Optional[UserError]) -> None:
    """Raise on every rank the first error a node's builder met (one all-gather)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (type(failure), str(failure)) if failure is not None else None)
    first = next((g for g in gathered if g is not None), None)
    if first is not None:
        raise first[0](first[1])
