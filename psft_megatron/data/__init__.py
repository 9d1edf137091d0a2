"""SFT data pipeline: readers, schemas, tokenizers, formatting, lengths, packing, sampler,
cache and collate. See docs/data.md. Entry points::

    from psft_megatron.data import (DataConfig, TokenizerConfig, build_tokenizer, SFTDataset,
                                    SFTSampler, microbatch_iterator, required_multiple)
"""

from psft_megatron.data.cache import TokenizedStore
from psft_megatron.data.collate import collate_packed, collate_unpacked, per_sample_sum
from psft_megatron.data.config import DataConfig, TokenizerConfig
from psft_megatron.data.dataset import SFTDataset, load_or_tokenize, microbatch_iterator, tokenize_files
from psft_megatron.data.errors import ConfigError, DataError, Location
from psft_megatron.data.formatting import SampleFormatter
from psft_megatron.data.lengths import LengthStats, required_multiple
from psft_megatron.data.packing import pack, packed_row_length
from psft_megatron.data.sampler import SFTSampler
from psft_megatron.data.tokenizers import Tokenizer, build_tokenizer

__all__ = [
    "ConfigError", "DataConfig", "DataError", "LengthStats", "Location", "SFTDataset", "SFTSampler",
    "SampleFormatter", "TokenizedStore", "Tokenizer", "TokenizerConfig", "build_tokenizer", "collate_packed",
    "collate_unpacked", "load_or_tokenize", "microbatch_iterator", "pack", "packed_row_length",
    "per_sample_sum", "required_multiple", "tokenize_files",
]
