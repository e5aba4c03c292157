"""Archival storage: the protocol and its backends.

The protocol and its value types import eagerly. The backends load on first use
(``umi.storage.DuckDBStorageBackend`` imports DuckDB and pyarrow then), so that
``import umi`` and every module that only needs :mod:`umi.storage.base` stay light.
``PostgresStorageBackend`` and ``LanceStorageBackend`` load their drivers (psycopg,
lancedb) only in ``connect()``, which raises :class:`umi.BackendNotInstalledError`
naming the extra when a driver is missing.
"""

from importlib import import_module as _import_module
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .duckdb import DuckDBStorageBackend
    from .lance import LanceStorageBackend
    from .postgres import PostgresStorageBackend
    from .sim import SimStorageBackend

_BACKENDS = {
    "DuckDBStorageBackend": ".duckdb",
    "LanceStorageBackend": ".lance",
    "PostgresStorageBackend": ".postgres",
    "SimStorageBackend": ".sim",
}


def __getattr__(name: str) -> Any:
    module = _BACKENDS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_module(module, __name__), name)
    globals()[name] = value
    return value

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
