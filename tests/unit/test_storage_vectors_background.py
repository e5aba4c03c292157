"""A reopened DuckDB store reads its vectors on a thread of its own, beside the calls it serves.

A user reopens their memory in every session. With a valid index cache the open reads no vector
(the index has a copy), so until now every recall of a reopened store read its hits' vectors from
DuckDB and took a thread hop: a 3k store's hybrid recall took 4.5 ms after a reopen against 1.1 ms
on the store that wrote it. ``vectors="background"`` (the default) reads them all on a thread
after the open; these tests tell what a user relies on: every vector comes back exactly, a write
made while the thread reads keeps what it was given, close and compact stop the thread, a failure
leaves reads working, and ``vectors="on_demand"`` keeps the old, lean behaviour.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Iterator

import duckdb
import numpy as np
import pytest

import umi
from umi.errors import InvalidConfigError
from umi.storage import duckdb as duck
from umi.storage._duckdb_io import DuckDBDurable
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

T0 = 1_700_000_000_000
DIM = 8
N = 40


def vec(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)  # not unit: kept as given


def fact(i: int, content: str | None = None, v: np.ndarray | None = None) -> Entity:
    return Entity("person", f"person {i}", content or f"person {i} likes topic {i}",
                  embedding=vec(i) if v is None else v, created_at=T0 + i, id=f"e{i}")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "v.duckdb"
    with DuckDBStorageBackend.connect(p, dim=DIM) as b:
        b.upsert([fact(i) for i in range(N)])
    return p


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(duck, "VECTOR_BATCH", 8)  # N rows: five batches


def held_vector(b: DuckDBStorageBackend, eid: str) -> np.ndarray:
    """The vector the cache holds for ``eid`` without a durable read (fails if it would need one)."""
    c = b._cache
    row = c._row_of[eid]
    assert not c._vec_pending[row]
    return np.array(c._vecs[row])


def gated(monkeypatch: pytest.MonkeyPatch, after_batches: int) -> tuple[threading.Event, threading.Event]:
    """stream_vectors that stops after ``after_batches`` batches, says so (``at``) and waits for ``go``:
    the test decides what happens between the read and the rest of the install."""
    at, go = threading.Event(), threading.Event()
    real = DuckDBDurable.stream_vectors

    def stream(self: DuckDBDurable, batch: int) -> Iterator[tuple[list[str], np.ndarray]]:
        for i, b in enumerate(real(self, batch)):
            if i == after_batches:
                at.set()
                assert go.wait(30)
            yield b

    monkeypatch.setattr(DuckDBDurable, "stream_vectors", stream)
    return at, go


def test_every_vector_comes_back_exactly_and_recall_then_reads_only_memory(path: Path, small_batches: None) -> None:
    with DuckDBStorageBackend.connect(path) as b:
        assert b.index_load_status == "loaded"
        assert b.wait_for_vectors(30)
        for i in range(N):
            assert np.array_equal(held_vector(b, f"e{i}"), vec(i))  # bit for bit, not the index's unit copy
        assert b._cache._fetch_vectors is None and b._cache._vec_read == {}
        assert b.inline_read_lock() is b._lock
        reads: list[list[str]] = []
        b._durable._fetch_vectors = lambda dim, ids: reads.append(ids)  # type: ignore[attr-defined]
        hits = b.search_vector(vec(7), 3)
        got = b.get_many([i for i, _ in hits])
        assert hits[0][0] == "e7" and np.array_equal(got[0].embedding, vec(7))
        assert reads == []  # nothing was read from the database


def test_a_write_made_while_the_thread_reads_keeps_what_it_was_given(path: Path, small_batches: None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=2)
    new = np.full(DIM, 0.5, np.float32)
    with DuckDBStorageBackend.connect(path) as b:
        assert at.wait(30)  # the thread's cursor has read the rows as they were at the open
        b.upsert([fact(30, "person 30 moved to Oslo", v=new)])  # a row of a batch not put in yet
        assert b.delete("e31")
        b.upsert([fact(100, "a new fact")])
        go.set()
        assert b.wait_for_vectors(30)
        assert np.array_equal(held_vector(b, "e30"), new)  # not the stale vector the cursor read
        assert b.get("e31") is None and b.get("e30").content == "person 30 moved to Oslo"  # type: ignore[union-attr]
        assert np.array_equal(held_vector(b, "e100"), vec(100))
        for i in (0, 9, 29, 32, 39):
            assert np.array_equal(held_vector(b, f"e{i}"), vec(i))
        assert b.search_vector(new, 1)[0][0] == "e30"
    with DuckDBStorageBackend.connect(path) as b:  # and the disk agrees
        assert b.wait_for_vectors(30)
        assert np.array_equal(held_vector(b, "e30"), new) and b.get("e31") is None


def test_close_stops_the_thread_and_a_vector_a_call_needs_first_is_read_for_it(
        path: Path, small_batches: None, monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=1)
    b = DuckDBStorageBackend.connect(path)
    assert at.wait(30)
    assert b.wait_for_vectors(0) is False
    got = b.get("e39")  # its batch is not in yet: read on demand, as before
    assert got is not None and np.array_equal(got.embedding, vec(39))
    loader = b._vector_loader
    assert loader is not None
    closing = threading.Thread(target=b.close)
    closing.start()
    go.set()  # the batch in flight comes back to a stopped thread, which drops it
    closing.join(30)
    assert not closing.is_alive() and b._closed
    assert loader.done.is_set() and not loader._thread.is_alive()
    assert b.wait_for_vectors(0) is True  # closed: nothing left to wait for


def test_compact_stops_the_thread_and_starts_it_again(path: Path, small_batches: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=1)
    with DuckDBStorageBackend.connect(path) as b:
        assert at.wait(30)
        first = b._vector_loader
        stopping = threading.Thread(target=b.compact)
        stopping.start()
        go.set()
        stopping.join(30)
        assert not stopping.is_alive()
        assert first is not None and first.done.is_set()
        assert b._vector_loader is not first  # a new thread over the new file
        assert b.wait_for_vectors(30)
        for i in range(N):
            assert np.array_equal(held_vector(b, f"e{i}"), vec(i))


def test_a_failed_read_is_logged_and_vectors_are_still_read_when_needed(
        path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: DuckDBDurable, batch: int) -> Iterator[Any]:
        raise duckdb.IOException("disk went away")
        yield  # pragma: no cover - a generator

    monkeypatch.setattr(DuckDBDurable, "stream_vectors", broken)
    with caplog.at_level(logging.WARNING, logger="umi"):
        with DuckDBStorageBackend.connect(path) as b:
            assert b._vector_loader is not None and b._vector_loader.done.wait(30)
            assert b.wait_for_vectors(0) is False
            assert np.array_equal(b.get("e5").embedding, vec(5))  # type: ignore[union-attr]
    assert any("reading the stored vectors in the background failed" in r.getMessage()
               and "disk went away" in r.getMessage() for r in caplog.records)


def test_on_demand_reads_only_what_calls_return(path: Path) -> None:
    with DuckDBStorageBackend.connect(path, vectors="on_demand") as b:
        assert b._vector_loader is None
        assert b.wait_for_vectors(0) is False
        assert np.array_equal(b.get("e3").embedding, vec(3))  # type: ignore[union-attr]
        assert b._cache.vectors_pending() == N  # read for the call, not put in the matrix
        assert b.inline_read_lock() is None  # recall keeps the thread hop


def test_a_fresh_or_in_memory_store_starts_no_thread(tmp_path: Path) -> None:
    with DuckDBStorageBackend.connect(tmp_path / "fresh.duckdb", dim=DIM) as b:
        b.upsert([fact(1)])
        assert b._vector_loader is None and b.wait_for_vectors(0)
    with DuckDBStorageBackend.connect(":memory:", dim=DIM) as b:
        assert b._vector_loader is None and b.wait_for_vectors(0)


def test_bad_arguments_are_typed_errors(path: Path) -> None:
    with pytest.raises(TypeError, match="vectors must be a str"):
        DuckDBStorageBackend.connect(path, vectors=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="'background' or 'on_demand', not 'eager'"):
        DuckDBStorageBackend.connect(path, vectors="eager")
    with DuckDBStorageBackend.connect(path) as b:  # (the refused opens left the file free)
        with pytest.raises(InvalidConfigError, match=r"timeout must be in \[0, 86400\]"):
            b.wait_for_vectors(-1)
        with pytest.raises(TypeError, match="timeout must be a number"):
            b.wait_for_vectors("soon")  # type: ignore[arg-type]


def test_a_memory_reopened_in_a_new_session_recalls_with_its_vectors(tmp_path: Path) -> None:
    # the user's story: remember, close, reopen in a new session, recall
    db = tmp_path / "m.duckdb"
    with umi.Memory(db, embedder=umi.SimEmbeddingProvider(seed=1)) as m:
        m.remember_sync("Alice works at Acme Corp in Berlin.")
        m.remember_sync("Bob lives in Paris and loves climbing.")
        before = {e.id: np.array(e.embedding) for e in m.recall_sync("Where does Alice work?")}
    store = DuckDBStorageBackend.connect(db)
    assert store.index_load_status == "loaded" and store._vector_loader is not None
    with umi.Memory(storage=store, embedder=umi.SimEmbeddingProvider(seed=1)) as m:
        assert store.wait_for_vectors(30)
        after = m.recall_sync("Where does Alice work?")
        assert "Alice works at Acme Corp in Berlin." in [e.content for e in after]
        assert {e.id for e in after} == set(before)
        for e in after:
            assert np.array_equal(e.embedding, before[e.id])
