"""Archival storage: the protocol and its backends.

``DuckDBStorageBackend`` (the default, one file) and ``SimStorageBackend`` (in memory,
with fault injection) import eagerly. ``PostgresStorageBackend`` and ``LanceStorageBackend``
import too, but their drivers (psycopg, lancedb) load only in ``connect()``, which raises
:class:`umi.BackendNotInstalledError` naming the extra when a driver is missing.
"""

from .base import (
    CoreBlockRecord,
    CoreHistoryRecord,
    HistoryRecord,
    SearchFilters,
    Source,
    StorageBackend,
    source_id_for,
    text_hash,
    tombstone,
)
from .duckdb import DuckDBStorageBackend
from .lance import LanceStorageBackend
from .postgres import PostgresStorageBackend
from .sim import SimStorageBackend

__all__ = [
    "StorageBackend",
    "SearchFilters",
    "Source",
    "HistoryRecord",
    "CoreBlockRecord",
    "CoreHistoryRecord",
    "tombstone",
    "source_id_for",
    "text_hash",
    "DuckDBStorageBackend",
    "SimStorageBackend",
    "PostgresStorageBackend",
    "LanceStorageBackend",
]
