"""Shared by the commit-log suites: a small fact with a 4-d vector, and a DuckDB store left as a
crash leaves it (its commit log as it is, nothing pending moved into the tables)."""

from __future__ import annotations

import numpy as np

from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

T0 = 1_700_000_000_000


def fact(i: int, label: str = "logged") -> Entity:
    return Entity("note", f"n{i}", f"{label} fact {i} walrus{i}", embedding=np.full(4, i + 1, np.float32) + np.arange(4),
                  created_at=T0 + i)


def crash(b: DuckDBStorageBackend) -> None:
    """Leave ``b`` as a crash would: the log stays as it is, nothing pending is moved in."""
    raw = b._durable  # type: ignore[attr-defined]
    raw = getattr(raw, "inner", raw)
    if raw._log is not None:
        raw._log.close()
    raw._log, raw._pending = None, []
    b.close()


def logged(path: object, n: int, label: str = "logged") -> DuckDBStorageBackend:
    """An open store at ``path`` (4-d) holding ``fact(100)`` in its tables (written, then
    checkpointed) and ``fact(0)`` .. ``fact(n - 1)`` in its commit log only."""
    b = DuckDBStorageBackend.connect(path, dim=4)  # type: ignore[arg-type]
    b.upsert([fact(100, label)])
    b.checkpoint()
    for i in range(n):
        b.upsert([fact(i, label)])
    raw = b._durable  # type: ignore[attr-defined]
    assert getattr(raw, "inner", raw)._journal_n == n
    return b
