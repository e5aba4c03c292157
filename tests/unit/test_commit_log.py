"""The DuckDB store's commit log (``umi.storage._commit_log``): what a crash leaves in it is read
back exactly up to the last whole record; a log of another database is refused; a failed append
leaves nothing behind and the store as it was; a read_only open leaves the files as they are."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import umi.storage._commit_log as cl
from umi.errors import StorageError
from umi.storage.duckdb import DuckDBStorageBackend

from logged_store import T0, crash, fact, logged


def crashed_store(path: Path, n: int) -> list[str]:
    """A store at ``path`` whose last ``n`` commits are only in the log, closed as a crash leaves it."""
    crash(logged(path, n))
    return [fact(i).id for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2**40), st.text(max_size=40), st.binary(max_size=24)), max_size=6),
       st.data())
def test_a_log_cut_anywhere_reads_back_the_whole_records_before_the_cut(tmp_path_factory, entries, data) -> None:
    """The model: a list of the entries appended; a crash cuts the file at any byte; reading gives
    exactly the entries whose record ends before the cut, in order (a record cut short is the
    tail of an append that never returned)."""
    path = str(tmp_path_factory.mktemp("log") / "db.umilog")
    db = str(uuid.uuid4())
    log = cl.CommitLog(path, db)
    ends = []
    for gen, text, vec in entries:
        log.append(gen, text, vec or None)
        ends.append(os.path.getsize(path))
    log.close()
    size = os.path.getsize(path) if entries else 0
    cut = data.draw(st.integers(0, size))
    if entries:
        with open(path, "r+b") as f:
            f.truncate(cut)
    got, good = cl.read_log(path, db)
    want = [(g, t, v or None) for (g, t, v), end in zip(entries, ends) if end <= cut]
    assert got == want
    assert good == (max([e for e in ends if e <= cut], default=len(cl.MAGIC) + 36) if cut >= len(cl.MAGIC) + 36 else 0)


def test_a_record_failing_its_checksum_ends_the_log(tmp_path: Path) -> None:
    path, db = str(tmp_path / "x.umilog"), str(uuid.uuid4())
    log = cl.CommitLog(path, db)
    for g in (1, 2, 3):
        log.append(g, f"entry {g}", b"v" * g)
    log.close()
    with open(path, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        f.write(b"\x00\x00")  # a byte of the last record's payload changed
    assert [g for g, _, _ in cl.read_log(path, db)[0]] == [1, 2]


def test_commits_left_in_the_log_are_moved_in_at_open_and_a_torn_tail_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "crash.duckdb"
    ids = crashed_store(path, 3)
    log = str(path) + cl.LOG_SUFFIX
    with open(log, "ab") as f:
        f.write(b"\x40\x00\x00\x00garbage")  # an append cut short by the crash (never acknowledged)
    with DuckDBStorageBackend.connect(path, read_only=True) as b:  # read_only: seen, files untouched
        before = Path(log).read_bytes()
        assert [b.get(i).content for i in ids] == [fact(i).content for i in range(3)]  # type: ignore[union-attr]
        assert b.search_text("walrus2", 1)[0][0] == ids[2]
        assert b.count() == 4 and b.generation == 4
    assert Path(log).read_bytes() == before
    with DuckDBStorageBackend.connect(path) as b:
        assert not os.path.exists(log)  # moved in, and removed
        assert b.count() == 4 and b.generation == 4
        assert [h.op for h in b.history(ids[0])] == ["create"]
        b.upsert([fact(3)])
        assert b.count() == 5
    with DuckDBStorageBackend.connect(path, read_only=True) as b:
        assert b.count() == 5 and b.search_vector(fact(1).embedding, 1)[0][0] == ids[1]  # type: ignore[arg-type]


def test_a_log_of_another_database_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "mine.duckdb"
    crashed_store(path, 2)
    log = str(path) + cl.LOG_SUFFIX
    kept = Path(log).read_bytes()
    os.unlink(path)  # the database file replaced by a new one, its log left behind
    with pytest.raises(StorageError, match="belongs to another database"):
        DuckDBStorageBackend.connect(path)
    assert Path(log).read_bytes() == kept
    os.rename(log, log + ".old")
    with DuckDBStorageBackend.connect(path) as b:
        assert b.count() == 0


def test_a_failed_append_writes_nothing_and_the_store_stays_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "full.duckdb"
    with DuckDBStorageBackend.connect(path, dim=4) as b:
        b.upsert([fact(0)])
        size = os.path.getsize(str(path) + cl.LOG_SUFFIX)
        real = cl._sync

        def disk_full(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(cl, "_sync", disk_full)
        with pytest.raises(StorageError, match="cannot write the commit log.*No space left"):
            b.upsert([fact(1)])
        assert os.path.getsize(str(path) + cl.LOG_SUFFIX) == size  # cut back: no half entry
        assert b.get(fact(1).id) is None and b.count() == 1 and b.search_text("walrus1", 5) == []
        monkeypatch.setattr(cl, "_sync", real)
        b.upsert([fact(2)])
        gen = b.generation
    with DuckDBStorageBackend.connect(path) as b:
        assert sorted(e.name for e in b.list()) == ["n0", "n2"] and b.generation == gen


def test_relating_a_new_fact_to_one_written_in_the_session_leaves_the_journal_pending(tmp_path: Path) -> None:
    """A remember that relates its fact to an earlier fact of the same session (evolution) read
    the earlier fact's stored relations, which moved the whole journal into the tables (with
    extraction: 30 moves in 300 remembers). A fact new to the store has no stored relation (a
    forgotten fact's relations go with it), so none is read; the relation is there after a reopen,
    and one to a fact forgotten and told again is not doubled or lost."""
    from umi.types import EvolutionRelation

    path = tmp_path / "rels.duckdb"
    with DuckDBStorageBackend.connect(path, dim=4) as b:
        b.upsert([fact(0)])
        b.checkpoint()
        for i in (1, 2):
            with b.transaction():
                b.upsert([fact(i)])
                b.add_relations([EvolutionRelation(fact(i - 1).id, fact(i).id, "extend", id=f"r{i}", created_at=T0 + i)])
        raw = b._durable  # type: ignore[attr-defined]
        assert raw._journal_n == 2  # neither relation read the tables
        assert [r.id for r in b.relations_for(fact(1).id)] == ["r1", "r2"]
        assert b.delete(fact(1).id)  # forgets r1 and r2 with it
        b.upsert([fact(1)])  # told again: new to the store, with no relation
        assert b.relations_for(fact(1).id) == []
        b.add_relations([EvolutionRelation(fact(1).id, fact(2).id, "extend", id="r3", created_at=T0 + 9)])
    with DuckDBStorageBackend.connect(path) as b:
        assert [r.id for r in b.relations_for(fact(1).id)] == ["r3"]
        assert [r.id for r in b.relations_for(fact(0).id)] == []
        assert sorted(r.id for r in b.iter_relations()) == ["r3"]


def test_a_full_journal_is_moved_in_beside_the_caller_not_on_its_path(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit that fills the journal returns at once; a thread of the store's moves the entries
    into the tables (the log is cut back to its header) — the caller's next commit does not."""
    import threading

    import umi.storage._duckdb_io as io

    monkeypatch.setattr(io, "JOURNAL_ENTRIES_MAX", 8)
    path = tmp_path / "s.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)
    raw = b._durable  # type: ignore[attr-defined]
    moved_on: list[str] = []
    real = raw.materialise

    def materialise() -> None:
        moved_on.append(threading.current_thread().name)
        real()

    monkeypatch.setattr(raw, "materialise", materialise)
    for i in range(8):
        b.upsert([fact(i)])
    b._mover.join()  # type: ignore[attr-defined,union-attr]
    assert moved_on == ["umi-journal-move-in"]
    assert raw._journal_n == 0 and os.path.getsize(str(path) + cl.LOG_SUFFIX) == cl._HEADER
    b.upsert([fact(8)])  # journaled again: nothing moved on the caller's thread
    assert moved_on == ["umi-journal-move-in"] and raw._journal_n == 1
    rows = raw._con.execute("SELECT count(*) FROM entities").fetchall()[0][0]
    assert rows == 8  # the eight moved in; the ninth waits in the log
    b.close()
    again = DuckDBStorageBackend.connect(path, dim=4)
    assert sorted(e.id for e in again.list(limit=20)) == sorted(fact(i).id for i in range(9))
    again.close()


def test_a_move_in_failing_beside_the_caller_changes_nothing_and_the_next_commit_moves_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import umi.storage._duckdb_io as io

    monkeypatch.setattr(io, "JOURNAL_ENTRIES_MAX", 4)
    path = tmp_path / "s.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)
    raw = b._durable  # type: ignore[attr-defined]
    real = io.move_in
    fails = [1]

    def move_in(con, entries, **kw):  # type: ignore[no-untyped-def]
        if fails:
            fails.pop()
            raise OSError("disk full (injected)")
        return real(con, entries, **kw)

    monkeypatch.setattr(io, "move_in", move_in)
    for i in range(4):
        b.upsert([fact(i)])
    b._mover.join()  # type: ignore[attr-defined,union-attr]
    assert "could not move the commit log" in caplog.text and "disk full (injected)" in caplog.text
    assert raw._journal_n == 4 and os.path.getsize(str(path) + cl.LOG_SUFFIX) > cl._HEADER
    assert b.get(fact(2).id) is not None  # the cache and the log still hold every commit
    b.upsert([fact(4)])  # finds the journal full: moves it in first, on the caller's path
    assert raw._con.execute("SELECT count(*) FROM entities").fetchall()[0][0] >= 4
    b.close()
    again = DuckDBStorageBackend.connect(path, dim=4)
    assert sorted(e.id for e in again.list(limit=20)) == sorted(fact(i).id for i in range(5))
    again.close()


_EXIT_CHILD = """
import sys
import numpy as np
import umi.storage._duckdb_io as io
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity
io.JOURNAL_ENTRIES_MAX = 64
b = DuckDBStorageBackend.connect(sys.argv[1], dim=4)
for i in range(64):
    b.upsert([Entity("note", f"n{i}", f"fact {i} walrus{i} " + "word " * 50,
                     embedding=np.arange(4, dtype=np.float32) + i, created_at=1_700_000_000_000 + i)])
print("acknowledged", flush=True)
"""  # and exits without closing the store: its journal mover may be inside DuckDB now


def test_a_program_exiting_while_the_journal_moves_in_exits_cleanly_and_loses_nothing(tmp_path: Path) -> None:
    """A daemon thread inside DuckDB while Python finalises aborts the process ("terminate
    called", exit 134): exit waits for a mover that is moving, and one that has not started leaves
    the journal in the log, which the next open moves in."""
    import subprocess
    import sys

    from child_process import child_env

    for run in range(4):
        path = tmp_path / f"exit{run}.duckdb"
        proc = subprocess.run([sys.executable, "-c", _EXIT_CHILD, str(path)], capture_output=True, text=True,
                              timeout=120, env=child_env(), cwd=tmp_path)
        assert proc.returncode == 0 and "acknowledged" in proc.stdout, proc.stderr
        assert "terminate" not in proc.stderr and "could not move" not in proc.stderr, proc.stderr
        b = DuckDBStorageBackend.connect(path, dim=4)
        assert b.count() == 64
        b.close()
