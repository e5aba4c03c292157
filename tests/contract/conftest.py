"""Fixtures of the storage contract suite: every backend, one suite.

To add a backend, add an entry to :data:`BACKEND_FACTORIES`: a name and a function
``factory(tmp_path) -> StorageBackend`` returning a fresh, empty store. A factory that
cannot run here (a server or an optional package missing) calls ``pytest.skip(reason)``.
The whole suite then runs against it unchanged.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterator

import pytest

from umi.storage.base import StorageBackend
from umi.storage.duckdb import DuckDBStorageBackend
from umi.storage.sim import SimStorageBackend

BackendFactory = Callable[[Path], StorageBackend]


def _duckdb_file(tmp: Path) -> StorageBackend:
    return DuckDBStorageBackend.connect(tmp / "umi.duckdb")


def _duckdb_memory(tmp: Path) -> StorageBackend:
    return DuckDBStorageBackend.connect(":memory:")


def _sim(tmp: Path) -> StorageBackend:
    return SimStorageBackend(seed=0)


def _postgres(tmp: Path) -> StorageBackend:
    # one throwaway PostgreSQL + pgvector server per session (tests/pg_server.py), a fresh schema per store;
    # skips when no server can be had, and fails instead when $CI is set
    import pg_server

    from umi.storage.postgres import PostgresStorageBackend

    server = pg_server.require_server()
    return PostgresStorageBackend.connect(server.url, schema=server.new_schema_name(), pool_size=2)


def _lance(tmp: Path) -> StorageBackend:
    pytest.importorskip("lancedb", reason="the lance extra (lancedb) is not installed")
    from umi.storage.lance import LanceStorageBackend

    return LanceStorageBackend.connect(tmp / "lance")


#: name -> factory(tmp_path). Append new backends here.
BACKEND_FACTORIES: dict[str, BackendFactory] = {
    "duckdb-file": _duckdb_file,
    "duckdb-memory": _duckdb_memory,
    "sim": _sim,
    "postgres": _postgres,
    "lance": _lance,
}


@pytest.fixture(params=list(BACKEND_FACTORIES))
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_backend(backend_name: str, tmp_path: Path) -> Iterator[Callable[[], StorageBackend]]:
    """Makes fresh, empty stores of the parametrised kind (each in its own directory);
    closes them all at the end of the test."""
    made: list[StorageBackend] = []
    counter = itertools.count()

    def make() -> StorageBackend:
        d = tmp_path / f"store{next(counter)}"
        d.mkdir()
        b = BACKEND_FACTORIES[backend_name](d)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()
    made.clear()  # `make` may outlive the test (hypothesis caches state machine classes)


@pytest.fixture
def backend(make_backend: Callable[[], StorageBackend]) -> StorageBackend:
    return make_backend()
