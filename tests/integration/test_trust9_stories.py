"""User stories (trust 9): gaps the last closing note left open.

1. A user restores an OLDER backup of a crashed store's ``.duckdb`` file and leaves its commit log
   (``.umilog``, same database uuid) beside it. The log's commits were written against a later
   state (its first commit the tables lack is not the one after theirs): they were applied
   anyway, on top of the wrong state. Now the open (read_only too) is refused with a
   :class:`~umi.StorageError` naming the log, both generations and what to do; a legitimate log
   (one following the tables, even after a write that changed nothing) still opens.
2. One file through two paths (a hard link, a symlink) in one process: the "already open"
   check knew a file by its real path only, so a hard link opened a second DuckDB database over
   the same file beside the first (two caches, two writers). Now it knows the file by device and
   inode too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import umi.storage._commit_log as cl
from umi.errors import StorageError, StorageLockedError
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

T0 = 1_700_000_000_000


def fact(i: int) -> Entity:
    return Entity("note", f"n{i}", f"trust9 fact {i} walrus{i}", embedding=np.full(4, i + 1, np.float32) + np.arange(4),
                  created_at=T0 + i)


def crash(b: DuckDBStorageBackend) -> None:
    """Leave ``b`` as a crash would: the log stays as it is, nothing pending is moved in."""
    raw = b._durable  # type: ignore[attr-defined]
    raw = getattr(raw, "inner", raw)
    if raw._log is not None:
        raw._log.close()
    raw._log, raw._pending = None, []
    b.close()


def names(b: DuckDBStorageBackend) -> list[str]:
    return sorted(e.name for e in b.list())


# --- 1. a restored backup and a leftover commit log ------------------------------------------


def test_an_older_backup_restored_beside_a_crashed_stores_log_is_refused_not_patched(tmp_path: Path) -> None:
    path = tmp_path / "notes.duckdb"
    log = Path(str(path) + cl.LOG_SUFFIX)
    with DuckDBStorageBackend.connect(path, dim=4) as b:
        b.upsert([fact(0)])  # generation 1
    backup = tmp_path / "backup" / "notes.duckdb"
    backup.parent.mkdir()
    shutil.copy(path, backup)  # the nightly backup: generation 1
    b = DuckDBStorageBackend.connect(path)
    b.upsert([fact(1)])
    b.checkpoint()  # generation 2, in the tables
    b.upsert([fact(2)])
    b.upsert([fact(3)])  # generations 3 and 4: in the log only
    assert b.generation == 4
    crash(b)
    kept = log.read_bytes()
    shutil.copy(backup, path)  # the user restores the backup; the log of the crash stays
    db = path.read_bytes()
    for read_only in (True, False):
        with pytest.raises(StorageError) as info:
            DuckDBStorageBackend.connect(path, read_only=read_only)
        msg = str(info.value)
        assert str(log) in msg, msg
        assert "generation 1" in msg and "generation 3" in msg, msg
        assert "remove" in msg and "backup" in msg, msg
    assert log.read_bytes() == kept and path.read_bytes() == db  # nothing was touched
    # the backup is meant to win: the user moves the log away, and the backup opens as it was
    os.rename(log, str(log) + ".old")
    with DuckDBStorageBackend.connect(path) as b:
        assert names(b) == ["n0"] and b.generation == 1


def test_a_log_following_its_tables_still_opens_after_writes_that_changed_nothing(tmp_path: Path) -> None:
    # a write that changed nothing (an empty restore) counted a generation it never stored: the
    # next logged commit was two past the tables', which the check above would take for a backup
    path = tmp_path / "noop.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)
    b.upsert([fact(0)])
    b.checkpoint()
    g = b.generation
    b.restore([], [], [], [])  # nothing to restore: nothing committed
    with b.transaction():
        pass
    assert b.generation == g
    b.upsert([fact(1)])  # logged
    b.upsert([fact(2)])  # logged
    crash(b)
    for read_only in (True, False):
        with DuckDBStorageBackend.connect(path, read_only=read_only) as b:
            assert names(b) == ["n0", "n1", "n2"] and b.generation == g + 2


def test_a_log_whose_head_the_tables_already_hold_applies_only_its_tail(tmp_path: Path) -> None:
    # a crash after the log was moved in but before it was cut leaves commits the tables hold:
    # skipped, and the rest (the next generation on) applied; not a gap
    path = tmp_path / "head.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)
    b.upsert([fact(0)])
    b.checkpoint()
    b.upsert([fact(1)])
    b.upsert([fact(2)])  # generations 2, 3 in the log
    head = Path(str(path) + cl.LOG_SUFFIX).read_bytes()
    b.checkpoint()  # moved in (and the log cut)
    b.upsert([fact(3)])  # generation 4, in the log
    tail = Path(str(path) + cl.LOG_SUFFIX).read_bytes()[len(cl.MAGIC) + 36:]
    crash(b)
    Path(str(path) + cl.LOG_SUFFIX).write_bytes(head + tail)  # 2, 3 (held), 4 (not)
    with DuckDBStorageBackend.connect(path) as b:
        assert names(b) == ["n0", "n1", "n2", "n3"] and b.generation == 4
        assert [h.op for h in b.history(fact(1).id)] == ["create"]


# --- 2. one file through two paths -----------------------------------------------------------


def test_one_file_through_a_hard_link_or_a_symlink_is_refused_while_open(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    with DuckDBStorageBackend.connect(path, dim=4) as b:
        b.upsert([fact(0)])
    hard, soft = tmp_path / "hard.duckdb", tmp_path / "soft.duckdb"
    os.link(path, hard)
    os.symlink(path, soft)
    (tmp_path / "sub").mkdir()
    dotted = tmp_path / "sub" / ".." / "store.duckdb"
    b = DuckDBStorageBackend.connect(path)
    for other in (hard, soft, dotted):
        for read_only in (False, True):
            with pytest.raises(StorageLockedError, match="already open in this process"):
                DuckDBStorageBackend.connect(other, read_only=read_only)
    b.upsert([fact(1)])
    b.close()
    with DuckDBStorageBackend.connect(hard) as h:  # closed: the link opens, and holds the file now
        assert names(h) == ["n0", "n1"]
        with pytest.raises(StorageLockedError, match="already open in this process"):
            DuckDBStorageBackend.connect(path)


def test_a_link_made_after_the_store_created_its_file_or_compacted_it_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)  # no file yet when it was claimed
    b.upsert([fact(0)])
    os.link(path, tmp_path / "after-create.duckdb")
    with pytest.raises(StorageLockedError, match="already open in this process"):
        DuckDBStorageBackend.connect(tmp_path / "after-create.duckdb")
    assert b.compact()  # a new file (a new inode) renamed over the old one
    os.link(path, tmp_path / "after-compact.duckdb")
    with pytest.raises(StorageLockedError, match="already open in this process"):
        DuckDBStorageBackend.connect(tmp_path / "after-compact.duckdb")
    b.close()
    with DuckDBStorageBackend.connect(tmp_path / "after-compact.duckdb", read_only=True) as r:
        assert names(r) == ["n0"]
