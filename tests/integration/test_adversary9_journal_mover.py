"""The DuckDB journal's background move-in (``DuckDBStorageBackend._after_commit`` starts a thread
that moves a full journal into the tables once the committing caller lets the store's lock go),
attacked: a close() from a thread that holds the lock, a thread that cannot be started, many
writers on many threads, and a SIGKILL while the thread moves the journal in (an interpreter exiting
while it runs: tests/unit/test_commit_log.py). Small journals
(``JOURNAL_ENTRIES_MAX`` patched down) keep it fast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import umi.storage._duckdb_io as io
import umi.storage.duckdb as dmod
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from child_process import child_env  # noqa: E402

T0 = 1_700_000_000_000


def fact(i: int) -> Entity:
    return Entity("note", f"n{i}", f"mover fact {i} okapi{i}", embedding=np.full(4, i + 1, np.float32) + np.arange(4),
                  created_at=T0 + i)


def movers_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "umi-journal-move-in" and t.is_alive()]


def stored_ids(path: Path) -> list[str]:
    again = DuckDBStorageBackend.connect(path, dim=4)
    try:
        return sorted(e.id for e in again.list(limit=10_000))
    finally:
        again.close()


def test_close_inside_a_transaction_while_the_mover_waits_for_the_lock_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() joins the mover; the mover waits for the store's lock; a close() inside a
    transaction (allowed: the transaction is rolled back) holds that lock while it joins. It must
    return, not wait for a thread that waits for it."""
    monkeypatch.setattr(io, "JOURNAL_ENTRIES_MAX", 4)
    path = tmp_path / "s.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)
    go = threading.Event()
    real = b._move_journal_in

    def late() -> None:  # a busy machine: the thread is scheduled after the caller took the lock again
        go.wait()
        real()

    monkeypatch.setattr(b, "_move_journal_in", late)
    for i in range(4):
        b.upsert([fact(i)])  # the 4th fills the journal: the mover starts, and waits for `go`
    assert b._mover is not None and not b._mover.done  # type: ignore[attr-defined]
    out: list[BaseException | None] = []

    def scenario() -> None:
        try:
            with b.transaction():
                b.upsert([fact(99)])
                go.set()  # the mover now wants the lock this thread holds
                b.close()
        except BaseException as exc:  # noqa: BLE001
            out.append(exc)
        else:
            out.append(None)

    t = threading.Thread(target=scenario, daemon=True)
    t.start()
    t.join(60)  # a liveness check (a deadlock never ends), not a timing one
    assert not t.is_alive(), "close() inside a transaction waited for the journal mover, which waited for it"
    assert len(out) == 1 and "closed inside the transaction" in str(out[0])
    assert movers_alive() == []
    assert stored_ids(path) == sorted(fact(i).id for i in range(4))  # the rolled-back one is not there


def test_a_mover_that_cannot_be_started_leaves_the_commit_acknowledged(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit that fills the journal is durable before its thread is started: a thread that
    cannot start (a thread limit; "can't create new thread at interpreter shutdown") must not
    turn it into a failed, rolled-back write. The next commit moves the journal in first."""
    monkeypatch.setattr(io, "JOURNAL_ENTRIES_MAX", 4)

    real = dmod.Background

    def no_thread(fn, name):  # type: ignore[no-untyped-def]
        if name == "umi-journal-move-in":
            raise RuntimeError("can't start new thread")
        return real(fn, name)

    monkeypatch.setattr(dmod, "Background", no_thread)
    path = tmp_path / "s.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)
    for i in range(4):
        b.upsert([fact(i)])  # the 4th fills the journal; no thread: it must still succeed
    assert b.get(fact(3).id) is not None and b.count() == 4
    assert b._durable._journal_n == 4  # type: ignore[attr-defined]
    b.upsert([fact(4)])  # moves the four in first, on the caller's path
    assert b._durable._journal_n == 1  # type: ignore[attr-defined]
    b.close()
    assert stored_ids(path) == sorted(fact(i).id for i in range(5))


def test_a_base_exception_inside_the_mover_is_logged_and_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A SystemExit (any BaseException) raised inside the move-in ends only the mover's thread:
    the move-in's transaction rolls back, the journal and the cache keep every commit, the next
    commit moves it in — and the failure is logged, not dropped unsaid by the thread."""
    monkeypatch.setattr(io, "JOURNAL_ENTRIES_MAX", 4)
    real = io.insert_rows
    fired: list[str] = []

    def boom(con, table, rows, **kw):  # type: ignore[no-untyped-def]
        if table == "postings" and not fired:
            fired.append(threading.current_thread().name)
            raise SystemExit("stop (injected)")
        return real(con, table, rows, **kw)

    monkeypatch.setattr(io, "insert_rows", boom)
    path = tmp_path / "s.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)
    raw = b._durable  # type: ignore[attr-defined]
    for i in range(4):
        b.upsert([fact(i)])
    b._mover.join()  # type: ignore[attr-defined,union-attr]
    assert fired == ["umi-journal-move-in"]
    assert "could not move the commit log" in caplog.text and "SystemExit: stop (injected)" in caplog.text
    assert raw._journal_n == 4 and raw._con.execute("SELECT count(*) FROM entities").fetchall()[0][0] == 0
    assert all(b.get(fact(i).id) is not None for i in range(4))
    b.upsert([fact(4)])  # finds the journal full: moves it in first
    assert raw._journal_n == 1 and raw._con.execute("SELECT count(*) FROM entities").fetchall()[0][0] == 4
    b.close()
    assert stored_ids(path) == sorted(fact(i).id for i in range(5))


def test_many_writers_fill_the_journal_many_times_nothing_lost_no_thread_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four threads write 40 facts each through a journal of 3 entries (some 50 move-ins, each on a
    mover or on a caller that found the journal still full), with a reader and a checkpoint
    beside them: at most one mover at a time, every fact stored once, no thread after close."""
    monkeypatch.setattr(io, "JOURNAL_ENTRIES_MAX", 3)
    path = tmp_path / "s.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=4)
    started: list[int] = []
    real = dmod.Background
    before = set(movers_alive())  # (another test's, if one hung)

    def counting(fn, name):  # type: ignore[no-untyped-def]
        started.append(len(set(movers_alive()) - before))
        return real(fn, name)

    monkeypatch.setattr(dmod, "Background", counting)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for i in range(40):
                b.upsert([fact(w * 1000 + i)])
                if i % 13 == 0:
                    assert b.get(fact(w * 1000 + i).id) is not None
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ts = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in ts:
        t.start()
    b.checkpoint()
    for t in ts:
        t.join()
    assert errors == []
    assert started and max(started) == 0  # a mover starts only when none is alive
    assert b.count() == 160
    b.close()
    assert set(movers_alive()) <= before
    assert stored_ids(path) == sorted(fact(w * 1000 + i).id for w in range(4) for i in range(40))


CHILD_KILL = r"""
import os, signal, sys, threading
import numpy as np
import umi.storage._duckdb_io as io
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

io.JOURNAL_ENTRIES_MAX = 8
real = io.insert_rows

def dying(con, table, rows, *, replace=False):
    # the mover has put a journal's entities in, its transaction still open
    if table == "postings" and threading.current_thread().name == "umi-journal-move-in":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(con, table, rows, replace=replace)

io.insert_rows = dying
b = DuckDBStorageBackend.connect(sys.argv[1], dim=4)
for i in range(200):
    b.upsert([Entity("note", f"n{i}", f"crash fact {i}", embedding=np.full(4, i + 1, np.float32) + np.arange(4),
                     created_at=1_700_000_000_000 + i)])
    print("ACK", i, flush=True)
print("NOT KILLED", flush=True)
"""


def test_sigkill_while_the_mover_moves_the_journal_in_keeps_every_acknowledged_commit(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    p = subprocess.run([sys.executable, "-c", CHILD_KILL, str(path)], cwd=tmp_path, env=child_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-400:]
    acked = [int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("ACK")]
    assert len(acked) >= 8 and "NOT KILLED" not in p.stdout
    for read_only in (True, False):
        b = DuckDBStorageBackend.connect(path, dim=4, read_only=read_only)
        try:
            names = sorted(int(e.name[1:]) for e in b.list(limit=10_000))
        finally:
            b.close()
        # every acknowledged commit, once; at most the one in flight beside it
        assert names[:len(acked)] == acked and len(names) - len(acked) in (0, 1), (read_only, names, acked)
