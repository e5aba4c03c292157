"""Archival storage: the protocol and its backends.

``DuckDBStorageBackend`` (the default, one file) and ``SimStorageBackend`` (in memory,
with fault injection) import eagerly; backends with optional dependencies (Postgres,
Lance) are imported from their own modules.
"""

from .base import HistoryRecord, SearchFilters, Source, StorageBackend, source_id_for, text_hash
from .duckdb import DuckDBStorageBackend
from .sim import SimStorageBackend

__all__ = [
    "StorageBackend",
    "SearchFilters",
    "Source",
    "HistoryRecord",
    "source_id_for",
    "text_hash",
    "DuckDBStorageBackend",
    "SimStorageBackend",
]
