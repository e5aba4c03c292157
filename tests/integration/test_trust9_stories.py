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
3. A long database file name: the files umi keeps beside it (commit log, index caches and
   their temp files, a compact's copy, DuckDB's write-ahead log) add bytes to its name, so a
   name near NAME_MAX failed at open (or silently lost its caches). Now a name too long for them
   is refused up front with :class:`~umi.InvalidConfigError` saying the limit, and creates no file.
4. ``forget_scope`` and working memory: forgetting a session (or a user, an agent) forgets
   what this process's working memories of the covered sessions hold too ("forget forgets");
   another session's stays.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

import umi
import umi.storage._commit_log as cl
from umi.errors import InvalidConfigError, StorageError, StorageLockedError
from umi.storage._sidecars import NAME_EXTRA_MAX, name_max
from umi.storage.duckdb import DuckDBStorageBackend
from umi.providers.sim import SimEmbeddingProvider
from umi.storage.sim import SimStorageBackend
from umi.types import Entity

from logged_store import crash, logged
from logged_store import fact as _fact


def fact(i: int) -> Entity:
    return _fact(i, "trust9")


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
    b = logged(path, 2, "trust9")  # n100 in the tables; n0, n1 (generations 2, 3) in the log
    head = Path(str(path) + cl.LOG_SUFFIX).read_bytes()
    b.checkpoint()  # moved in (and the log cut)
    b.upsert([fact(2)])  # generation 4, in the log
    tail = Path(str(path) + cl.LOG_SUFFIX).read_bytes()[len(cl.MAGIC) + 36:]
    crash(b)
    Path(str(path) + cl.LOG_SUFFIX).write_bytes(head + tail)  # 2, 3 (held), 4 (not)
    with DuckDBStorageBackend.connect(path) as b:
        assert names(b) == ["n0", "n1", "n100", "n2"] and b.generation == 4
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


# --- 3. long file names ----------------------------------------------------------------------


def test_the_longest_name_the_files_beside_it_allow_works_and_one_byte_more_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limit = name_max(str(tmp_path)) - NAME_EXTRA_MAX
    assert limit > 20
    home = tmp_path / "home"
    home.mkdir()
    stem = "é" * 10  # 20 bytes: the limit counts bytes, not characters
    longest = home / (stem + "a" * (limit - len(stem.encode()) - len(".duckdb")) + ".duckdb")
    assert len(longest.name.encode()) == limit
    caplog.set_level(logging.WARNING, logger="umi")
    b = DuckDBStorageBackend.connect(longest, dim=4, hnsw_threshold=2)
    b.upsert([fact(0), fact(1), fact(2)])
    b.checkpoint()
    assert b.build_vector_index()  # the graph: its file and temp file carry the longest names
    b.upsert([fact(3)])  # logged
    assert b.compact()
    b.upsert([fact(4)])
    b.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text  # every cache saved
    with DuckDBStorageBackend.connect(longest, hnsw_threshold=2) as b:
        assert names(b) == [f"n{i}" for i in range(5)] and b.index_load_status == "loaded"
        assert b.search_vector(fact(4).embedding, 1)[0][0] == fact(4).id  # type: ignore[arg-type]
    empty = tmp_path / "empty"
    empty.mkdir()
    one_more = empty / ("b" + longest.name)
    for read_only in (False, True):
        with pytest.raises(InvalidConfigError) as info:
            DuckDBStorageBackend.connect(one_more, read_only=read_only)
        msg = str(info.value)
        assert f"{limit + 1} bytes" in msg and f"at most {limit} bytes" in msg, msg
    with pytest.raises(InvalidConfigError):
        umi.Memory(one_more, embedder=SimEmbeddingProvider(1, 4))  # the Memory's own open: the same rule
    assert os.listdir(empty) == []  # refused before anything was written


# --- 4. forget_scope and working memory --------------------------------------------------------


def _memory() -> umi.Memory:
    return umi.Memory._from_parts(storage=SimStorageBackend(), llm=None, embedder=None, clock=None)


def test_forgetting_a_session_forgets_its_working_memory_and_no_other() -> None:
    with _memory() as m:
        s1, s2 = m.scoped(user_id="alice", session_id="s1"), m.scoped(user_id="alice", session_id="s2")
        s1.working.set("cart", b"tea")
        s2.working.set("cart", b"coffee")
        bob = m.scoped(user_id="bob", session_id="s1")
        bob.working.set("cart", b"milk")
        alice = m.scoped(user_id="alice")
        alice.working.set("mood", b"fine")
        held = s1.working
        assert m.scoped(user_id="alice").forget_scope_sync(session_id="s1") == 0
        assert held.get("cart") is None and len(held) == 0  # the session forgotten: its working memory too
        assert m.scoped(user_id="alice", session_id="s1").working.get("cart") is None
        assert s2.working.get("cart") == b"coffee"  # another session's stays
        assert bob.working.get("cart") == b"milk"  # another user's session of the same name stays
        assert alice.working.get("mood") == b"fine"  # the user's own (wider) scope is not the session
        assert m.forget_scope_sync(user_id="alice") == 0  # the user: every session of theirs
        assert s2.working.get("cart") is None and alice.working.get("mood") is None
        assert bob.working.get("cart") == b"milk"
