"""Adversary 10: one open store per file while the first store is still OPENING.

Two threads of one process open the same DuckDB file at once. The "already open" check asked
the store holding the file whether it was closed (``_closed``), an attribute a store gets only
midway through its open (``_init_state`` sets it True, the end of ``__init__`` False):

- while the first store was opening DuckDB, the second open failed with ``AttributeError``
  (not a :class:`umi.UmiError`);
- while the first store was loading its cache, the second open *succeeded*: two stores, two
  caches and two commit logs over one file (the second's ``CommitLog`` cuts the first's
  acknowledged entries when it starts the log again).

Now a store holds the file from its first claim until its release: the second open gets
:class:`~umi.StorageLockedError` in both windows, and opens once the first is closed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import umi.storage.duckdb as dd
from umi.errors import StorageLockedError
from umi.storage.duckdb import DuckDBStorageBackend

from logged_store import fact


def _held_open(monkeypatch: pytest.MonkeyPatch, where: str) -> tuple[threading.Event, threading.Event]:
    """Stop an open made on a thread named "first" at ``where`` until the test lets it go on."""
    reached, go = threading.Event(), threading.Event()

    def gate() -> None:
        if threading.current_thread().name == "first":
            reached.set()
            assert go.wait(30)

    if where == "connection":
        real: Callable[..., Any] = dd.open_connection

        def slow_connection(path: Any, read_only: bool) -> Any:
            con = real(path, read_only)
            gate()
            return con
        monkeypatch.setattr(dd, "open_connection", slow_connection)
    else:
        real_cache = DuckDBStorageBackend._open_cache

        def slow_cache(self: DuckDBStorageBackend, loaded: Any) -> None:
            real_cache(self, loaded)
            gate()
        monkeypatch.setattr(DuckDBStorageBackend, "_open_cache", slow_cache)
    return reached, go


@pytest.mark.parametrize("where", ["connection", "cache"])
def test_a_second_open_while_the_first_is_still_opening_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    where: str) -> None:
    path = tmp_path / "s.duckdb"
    with DuckDBStorageBackend.connect(path, dim=4) as b:
        b.upsert([fact(1)])
    reached, go = _held_open(monkeypatch, where)
    opened: dict[str, DuckDBStorageBackend] = {}
    first = threading.Thread(target=lambda: opened.setdefault("first", DuckDBStorageBackend.connect(path, dim=4)),
                             name="first")
    first.start()
    try:
        assert reached.wait(30)
        for p in (path, tmp_path / "." / "s.duckdb"):
            with pytest.raises(StorageLockedError, match="already open in this process"):
                opened["second"] = DuckDBStorageBackend.connect(p, dim=4)
    finally:
        go.set()
        first.join(30)
    assert not first.is_alive() and "second" not in opened
    b = opened["first"]
    try:
        b.upsert([fact(2)])  # journaled: the log is the first store's alone
        assert sorted(e.name for e in b.list()) == ["n1", "n2"]
    finally:
        b.close()
    with DuckDBStorageBackend.connect(path, dim=4) as again:  # once closed, the file opens again
        assert sorted(e.name for e in again.list()) == ["n1", "n2"]
