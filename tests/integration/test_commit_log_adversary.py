"""Adversarial review of the DuckDB commit log (``<path>.umilog``, ``umi.storage._commit_log``).

A small insert-only commit is appended to the log and synced; its rows wait in memory and are
moved into the tables later. Each test here pins a way an acknowledged write was lost, or a
store could not be opened, with the log in play. A crash is simulated as in
tests/unit/test_commit_log.py (:func:`crash`: the log closed where it is, nothing moved in);
tests/sim/test_crash_log_adversary.py kills real processes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import umi.storage._commit_log as cl
from umi.errors import StorageError
from umi.storage.duckdb import DuckDBStorageBackend

from logged_store import crash, fact, logged


def test_a_store_opened_by_a_relative_path_keeps_its_log_beside_its_file_after_a_chdir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the log was opened by the path as given, on the first append: a process that changed its
    # working directory in between wrote its acknowledged commits to a log in the other directory
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    with DuckDBStorageBackend.connect("rel.duckdb", dim=4) as b:
        b.upsert([fact(0)])
    b = DuckDBStorageBackend.connect("rel.duckdb")
    monkeypatch.chdir(tmp_path / "elsewhere")  # before the first append, which opens the log
    b.upsert([fact(1)])
    b.upsert([fact(2)])
    crash(b)
    assert not (tmp_path / "elsewhere" / ("rel.duckdb" + cl.LOG_SUFFIX)).exists()
    monkeypatch.chdir(tmp_path)
    with DuckDBStorageBackend.connect("rel.duckdb") as b:
        assert sorted(e.name for e in b.list()) == ["n0", "n1", "n2"]


def test_a_relative_path_compacts_its_own_file_after_a_chdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # compact() copied to, renamed over and reopened the path as given: after a chdir it wrote a
    # new database in the other directory and went on writing there
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    b = DuckDBStorageBackend.connect("rel.duckdb", dim=4)
    b.upsert([fact(0), fact(1)])
    monkeypatch.chdir(tmp_path / "elsewhere")
    b.delete(fact(0).id)
    assert b.compact()
    b.upsert([fact(2)])
    b.close()
    assert os.listdir(tmp_path / "elsewhere") == []
    monkeypatch.chdir(tmp_path)
    with DuckDBStorageBackend.connect("rel.duckdb") as b:
        assert sorted(e.name for e in b.list()) == ["n1", "n2"]


def test_a_read_only_open_of_a_file_named_memory_moves_a_left_log_into_a_copy(tmp_path: Path) -> None:
    # DuckDB names a file's database after its stem: the check "already an in-memory copy?" was
    # current_database() == 'memory', so memory.duckdb was written to read_only, which DuckDB refused
    path = tmp_path / "memory.duckdb"
    crash(logged(path, 1))  # n100 in the tables, n0 in the log
    log = Path(str(path) + cl.LOG_SUFFIX)
    kept = log.read_bytes()
    with DuckDBStorageBackend.connect(path, read_only=True) as b:
        assert sorted(e.name for e in b.list()) == ["n0", "n100"]
    assert log.read_bytes() == kept  # a read_only open leaves the files as they are
    with DuckDBStorageBackend.connect(path) as b:
        assert sorted(e.name for e in b.list()) == ["n0", "n100"]


def test_an_append_that_fails_and_cannot_be_cut_back_loses_no_earlier_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a failed append is cut back; when the cut itself failed the log was closed, and the next
    # append started the file again from nothing: the acknowledged entries before the failed one,
    # not yet in the tables, were gone from it
    path = tmp_path / "cut.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)
    b.upsert([fact(0)])  # acknowledged: in the log only
    real_sync, real_truncate = cl._sync, os.ftruncate

    def eio(*_: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cl, "_sync", eio)
    monkeypatch.setattr(cl.os, "ftruncate", eio)
    with pytest.raises(StorageError, match="cannot write the commit log"):
        b.upsert([fact(1)])
    monkeypatch.setattr(cl, "_sync", real_sync)
    monkeypatch.setattr(cl.os, "ftruncate", real_truncate)
    b.upsert([fact(2)])  # acknowledged
    assert b.get(fact(1).id) is None
    crash(b)
    with DuckDBStorageBackend.connect(path) as b:
        assert sorted(e.name for e in b.list()) == ["n0", "n2"]


def test_a_log_left_empty_by_a_crash_does_not_keep_a_new_database_from_opening(tmp_path: Path) -> None:
    # a crash after the log was moved into the tables leaves it cut back to its header; a user who
    # then removed the database to start again could not open the path ("belongs to another
    # database"), though the log holds no commit. One that holds a commit is still refused (see
    # tests/unit/test_commit_log.py)
    path = tmp_path / "reset.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)
    b.upsert([fact(0)])
    b.checkpoint()  # moved in: the log is its header alone
    log = Path(str(path) + cl.LOG_SUFFIX)
    crash(b)
    assert log.stat().st_size == len(cl.MAGIC) + 36
    for p in (path, Path(str(path) + ".wal")):
        if p.exists():
            p.unlink()
    with DuckDBStorageBackend.connect(path, read_only=False) as b:
        assert b.count() == 0
        b.upsert([fact(1)])
    assert not log.exists()
    with DuckDBStorageBackend.connect(path) as b:
        assert [e.name for e in b.list()] == ["n1"]
