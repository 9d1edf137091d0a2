"""Records -> token ids and loss masks, streamed into a token cache, on a pool of processes.

:func:`tokenize_files` reads ``data_cfg.file_names`` in chunks of :data:`CHUNK_RECORDS`
records (:func:`psft_megatron.data.readers.iter_chunks`: raw JSONL lines or Arrow batches), has
them parsed, formatted and tokenised - in this process (``workers`` 0) or by ``workers``
processes - and writes the results IN ORDER into a :class:`~psft_megatron.data.cache.StoreWriter`.
At most ``2 * workers`` chunks are in flight, so memory does not grow with the data: the
samples go to disk as they come. The first bad record in file order is the error reported,
as in a single process. The worker processes are forked (see :class:`_Pool`).

:func:`default_workers` is what ``num_workers: null`` means: the CPUs this process may use
(its affinity), at least 1 and at most 32.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import time
from typing import Callable, Dict, Optional, Tuple

from psft_megatron.data.cache import StoreWriter, TokenChunk, TokenizedStore
from psft_megatron.data.config import DataConfig, TokenizerConfig
from psft_megatron.data.conversation import to_conversation
from psft_megatron.data.errors import DataError, Location
from psft_megatron.data.formatting import SampleFormatter
from psft_megatron.data.readers import RecordChunk, iter_chunks
from psft_megatron.data.template import TemplateFormatter
from psft_megatron.data.tokenizers import Tokenizer

#: records per chunk handed to a worker
CHUNK_RECORDS = 256
#: below this many bytes of data files, ``num_workers: null`` tokenises in this process
#: (starting workers costs a few seconds)
POOL_MIN_BYTES = 16 << 20


def make_formatter(data_cfg: DataConfig, tokenizer: Tokenizer, tok_cfg: TokenizerConfig):
    """The formatter of ``data_cfg``'s records: NeMo template data, or conversations."""
    if data_cfg.uses_template:
        return TemplateFormatter(tokenizer, data_cfg)
    return SampleFormatter(tokenizer, tok_cfg)


def default_workers(ranks_sharing_the_node: int = 1) -> int:
    """Worker processes for ``num_workers: null``: this process's CPUs (affinity) shared by
    ``ranks_sharing_the_node`` tokenising processes, in [1, 32] (the reading and writing
    process does little: it mostly waits for the workers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(32, cpus // max(1, ranks_sharing_the_node)))


def resolve_workers(data_cfg: DataConfig, ranks_sharing_the_node: int = 1) -> int:
    """Worker processes to start for ``data_cfg`` (0: tokenise in this process)."""
    if data_cfg.num_workers is not None:
        return data_cfg.num_workers
    size = 0
    for path in data_cfg.file_names:
        for d, _, fs in (os.walk(path) if os.path.isdir(path) else [("", None, [path])]):
            size += sum(os.path.getsize(os.path.join(d, f)) for f in fs if os.path.exists(os.path.join(d, f)))
    return default_workers(ranks_sharing_the_node) if size >= POOL_MIN_BYTES else 0


# ---------------------------------------------------------------------------- one chunk
def format_chunk(chunk: RecordChunk, formatter, data_cfg: DataConfig) -> Tuple[TokenChunk, Dict]:
    """Parse, format and tokenise one chunk: (its TokenChunk, the formatter's counts for it)."""
    template = isinstance(formatter, TemplateFormatter)
    formatter.stats = {k: 0 for k, v in formatter.stats.items() if not isinstance(v, str)}
    convs, locs = [], []
    for record, loc in chunk.records():
        convs.append(formatter.convert(record, loc) if template else
                     to_conversation(record, loc, data_cfg.schema, data_cfg.prompt_key, data_cfg.response_key,
                                     data_cfg.messages_key))
        locs.append(loc)
    samples = formatter.format_batch(convs, locs) if convs else []
    return TokenChunk.from_samples(samples, locs), dict(formatter.stats)


_worker: Dict[str, object] = {}


def _start_worker(formatter, data_cfg: DataConfig) -> None:
    _worker["formatter"], _worker["cfg"] = formatter, data_cfg


def _work(chunk: RecordChunk) -> Tuple[TokenChunk, Dict]:
    return format_chunk(chunk, _worker["formatter"], _worker["cfg"])


class _InProcess:
    """The executor of ``workers`` 0: a chunk is formatted when its result is asked for."""

    def __init__(self, formatter, data_cfg: DataConfig):
        self.formatter, self.cfg = formatter, data_cfg

    def submit(self, chunk: RecordChunk):
        return _Deferred(lambda: format_chunk(chunk, self.formatter, self.cfg))

    def close(self, ok: bool) -> None:
        pass


class _Deferred:
    def __init__(self, fn: Callable):
        self.fn = fn

    def get(self):
        return self.fn()


class _Pool:
    """``workers`` forked processes running the caller's formatter (as torch's DataLoader
    workers are forked from a training process). Fork copies the tokenizer with no pickling
    and no re-import of the caller's main module; the workers use neither torch nor CUDA.
    ``TOKENIZERS_PARALLELISM=false`` while they start: one thread each (the pool is the
    parallelism), and no fork warning from the Rust tokenizers."""

    def __init__(self, workers: int, formatter, data_cfg: DataConfig):
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            self.pool = multiprocessing.get_context("fork").Pool(workers, initializer=_start_worker,
                                                                 initargs=(formatter, data_cfg))
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved

    def submit(self, chunk: RecordChunk):
        return self.pool.apply_async(_work, (chunk,))

    def close(self, ok: bool) -> None:
        if ok:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()


# ---------------------------------------------------------------------------- progress
class _Progress:
    """Progress of tokenising: a line per file, and one every ``every_s`` seconds inside a long
    one; printed by global rank 0 only (``RANK`` unset: a single process)."""

    def __init__(self, num_files: int, prefix: str, every_s: float = 10.0):
        self.enabled = os.environ.get("RANK", "0") == "0"
        self.num_files, self.prefix, self.every_s = num_files, prefix, every_s
        self.start = self.last = time.perf_counter()

    def tick(self, index: int, path: str, records: int) -> None:
        if self.enabled and time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            rate = records / max(self.last - self.start, 1e-9)
            print(f"tokenising {self.prefix} [{index + 1}/{self.num_files}] {path}: {records} records so far "
                  f"({self.last - self.start:.0f} s, {rate:.0f} records/s)", flush=True)

    def done(self, index: int, path: str, records: int) -> None:
        if self.enabled:
            print(f"tokenised {self.prefix} [{index + 1}/{self.num_files}] {path}: {records} records "
                  f"({time.perf_counter() - self.start:.1f} s)", flush=True)


# ---------------------------------------------------------------------------- all files
class _Tally:
    """What the writer has taken so far: samples per file, the formatter's merged counts."""

    def __init__(self, data_cfg: DataConfig, formatter):
        self.cfg = data_cfg
        self.counts = [0] * len(data_cfg.file_names)
        self.stats = {k: 0 for k, v in formatter.stats.items() if not isinstance(v, str)}
        self.progress = _Progress(len(data_cfg.file_names), data_cfg.prefix)

    def add(self, index: int, chunk: TokenChunk, stats: Dict) -> None:
        self.counts[index] += len(chunk.lengths)
        for key, value in stats.items():
            if isinstance(value, str):
                self.stats.setdefault(key, value)  # the first location in file order
            else:
                self.stats[key] = self.stats.get(key, 0) + value
        self.progress.tick(index, self.cfg.file_names[index], self.counts[index])

    def file_done(self, index: int) -> None:
        path = self.cfg.file_names[index]
        if self.counts[index] == 0:
            raise DataError("no records: the file is empty; add data or remove it from "
                            f"{self.cfg.prefix}.file_names", Location(path))
        self.progress.done(index, path, self.counts[index])


def tokenize_files(data_cfg: DataConfig, formatter, directory: Optional[str] = None, workers: int = 0,
                   meta: Optional[dict] = None) -> TokenizedStore:
    """Read and tokenise every record of ``data_cfg.file_names`` with ``formatter`` into the
    cache ``directory`` (None: a private temporary one) and return the store memory-mapped
    from it; ``meta``: recorded in its meta.json. ``workers`` > 0: that many worker processes.

    Errors name file and line/row; a file without a single record is an error naming it (an
    empty file is almost always a mistake, and a weighted source needs samples).
    """
    executor = _Pool(workers, formatter, data_cfg) if workers > 0 else _InProcess(formatter, data_cfg)
    tally, pending = _Tally(data_cfg, formatter), collections.deque()
    ok = False
    try:
        with StoreWriter(directory, data_cfg.file_names) as writer:

            def settle(limit: int) -> None:
                while len(pending) > limit:
                    index, result = pending.popleft()
                    if result is None:  # the end of file ``index``
                        tally.file_done(index)
                        continue
                    chunk, stats = result.get()
                    writer.add(chunk)
                    tally.add(index, chunk, stats)

            for index, path in enumerate(data_cfg.file_names):
                try:
                    for chunk in iter_chunks(path, data_cfg.split, CHUNK_RECORDS):
                        pending.append((index, executor.submit(chunk)))
                        settle(2 * max(workers, 1))
                except DataError:
                    settle(0)  # an earlier bad record is the first error
                    raise
                pending.append((index, None))
            settle(0)
            store = writer.finish(dict(meta or {}), tally.counts, tally.stats)
        ok = True
    finally:
        executor.close(ok)
    formatter.stats = dict(tally.stats)
    return store
