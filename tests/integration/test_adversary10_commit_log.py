"""Adversary 10: the commit log and a commit interrupted while its record is written.

A journaled commit (a remember of new facts) appends one record to the commit log and syncs it.
An interrupt there (Ctrl-C: a KeyboardInterrupt in the thread writing, as in a program that calls
the store from its main thread) rolled the commit back in the process, but only an ``OSError``
cut the record back: the whole record stayed in the file. The next commit took the same
generation and was appended after it, and after a crash the open applied both: the commit the
caller was told had failed came back. Now any exception there cuts the record back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import umi.storage._commit_log as cl
from umi.storage.duckdb import DuckDBStorageBackend

from logged_store import crash, fact, logged


@pytest.mark.parametrize("where", ["write", "sync"])
def test_a_commit_interrupted_in_its_log_append_stays_rolled_back_after_a_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    path = tmp_path / "s.duckdb"
    b = logged(path, 1, "interrupted")
    name = "_write_all" if where == "write" else "_sync"
    real = getattr(cl, name)

    def interrupted(*args: object) -> None:  # the log is open (a record in it): this is the new record's
        monkeypatch.setattr(cl, name, real)
        if where == "write":
            real(*args)  # the whole record is in the file, then Ctrl-C
        raise KeyboardInterrupt
    monkeypatch.setattr(cl, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        b.upsert([fact(5, "interrupted")])
    monkeypatch.undo()
    assert sorted(e.name for e in b.list()) == ["n0", "n100"]  # rolled back here
    b.upsert([fact(6, "interrupted")])
    crash(b)
    with DuckDBStorageBackend.connect(path, dim=4) as again:
        assert sorted(e.name for e in again.list()) == ["n0", "n100", "n6"]  # was: n5 back too
