"""Errors of the data pipeline: every message names where (file, line/row) and what."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from psft_megatron.errors import ConfigError as _ConfigError
from psft_megatron.errors import DataErrorBase


@dataclass(frozen=True)
class Location:
    """Where a record comes from: ``file`` and a 1-based ``line`` (JSONL) or 0-based ``row``
    (Parquet / Arrow). ``__str__`` gives ``path:line 12`` or ``path:row 7``."""

    file: str
    line: Optional[int] = None
    row: Optional[int] = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:line {self.line}"
        if self.row is not None:
            return f"{self.file}:row {self.row}"
        return self.file


class DataError(DataErrorBase):
    """Bad input data. ``location`` (may be None) names file and line/row."""

    def __init__(self, message: str, location: Optional[Location] = None):
        self.location = location
        self.problem = message
        super().__init__(f"{location}: {message}" if location is not None else message)


class ConfigError(_ConfigError):
    """Bad data/tokenizer settings; the message names the config key."""
