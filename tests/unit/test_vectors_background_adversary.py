"""Adversarial interleavings of the background vector loader of a reopened DuckDB store.

Each test parks the loader between reading a batch and putting it in (``gated``), does something
a user may do meanwhile, then lets it go: every vector a user stored comes back bit for bit, no
stale vector wins over a write of the session, nothing hangs or leaks.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import umi
from umi.errors import StorageError
from umi.sim.faults import FaultInjector, FaultType
from umi.storage import duckdb as duck
from umi.storage._duckdb_io import DuckDBDurable
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

T0 = 1_700_000_000_000
DIM = 8
N = 40


def vec(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


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
    monkeypatch.setattr(duck, "VECTOR_BATCH", 8)


def gated(monkeypatch: pytest.MonkeyPatch, after_batches: int) -> tuple[threading.Event, threading.Event]:
    """The loader reads ``after_batches + 1`` batches, says so (``at``) and waits for ``go`` before
    it puts the last one in."""
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


def exact(b: DuckDBStorageBackend, model: dict[str, np.ndarray]) -> None:
    """Every row of ``model`` holds its vector, bit for bit, in memory and through the calls."""
    c = b._cache
    for eid, v in model.items():
        row = c._row_of[eid]
        got = b.get(eid)
        assert got is not None and np.array_equal(got.embedding, v), eid
        if not c._vec_pending[row]:
            assert np.array_equal(c._vecs[row], v), eid  # type: ignore[index]
        assert b.search_vector(v, 1)[0][0] == eid
    assert sorted(e.id for e in b.list(limit=10_000)) == sorted(model)


def test_rollback_of_a_write_to_a_row_read_but_not_put_in(path: Path, small_batches: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=2)  # rows e16..e23 read, not in
    model = {f"e{i}": vec(i) for i in range(N)}
    with DuckDBStorageBackend.connect(path) as b:
        assert at.wait(30)
        with pytest.raises(StorageError, match="undo"):
            with b.transaction():
                b.upsert([fact(17, "changed", v=np.full(DIM, 2.0, np.float32))])
                b.delete("e18")
                b.upsert([fact(19, "changed too", v=np.full(DIM, 3.0, np.float32))])
                b.delete("e19")
                raise RuntimeError("undo")
        go.set()
        assert b.wait_for_vectors(30)
        exact(b, model)
    with DuckDBStorageBackend.connect(path) as b:
        assert b.wait_for_vectors(30)
        exact(b, model)


def test_a_failed_commit_while_loading_leaves_every_vector(path: Path, small_batches: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=1)
    faults = FaultInjector(seed=1)
    model = {f"e{i}": vec(i) for i in range(N)}
    with DuckDBStorageBackend.connect(path, faults=faults) as b:
        assert b._vector_loader is not None
        assert at.wait(30)
        faults.force(FaultType.STORAGE_WRITE_FAIL)
        with pytest.raises(StorageError, match="injected"):
            b.upsert([fact(10, "x", v=np.ones(DIM, np.float32)), fact(11, "y", v=np.ones(DIM, np.float32))])
        faults.force(FaultType.STORAGE_WRITE_FAIL)
        with pytest.raises(StorageError, match="injected"):
            b.delete("e12")
        b.upsert([fact(13, "kept", v=np.full(DIM, 4.0, np.float32))])
        model["e13"] = np.full(DIM, 4.0, np.float32)
        go.set()
        assert b.wait_for_vectors(30)
        exact(b, model)
    with DuckDBStorageBackend.connect(path) as b:
        assert b.wait_for_vectors(30)
        exact(b, model)


def test_the_cache_reload_after_a_failed_rollback_ends_the_loader(path: Path, small_batches: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=1)
    model = {f"e{i}": vec(i) for i in range(N)}
    with DuckDBStorageBackend.connect(path) as b:
        assert at.wait(30)
        first = b._cache
        b.upsert([fact(12, "committed", v=np.full(DIM, 5.0, np.float32))])  # after the loader's snapshot
        model["e12"] = np.full(DIM, 5.0, np.float32)

        def broken() -> None:
            raise StorageError("rollback broke")

        with pytest.raises(StorageError):
            with b.transaction():
                b.upsert([fact(13, "gone", v=np.ones(DIM, np.float32))])
                monkeypatch.setattr(b._cache, "rollback", broken)
                raise RuntimeError("undo")
        assert b._cache is not first  # reloaded
        go.set()
        assert b.wait_for_vectors(30)
        exact(b, model)


def test_checkpoint_while_loading(path: Path, small_batches: None, monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=1)
    model = {f"e{i}": vec(i) for i in range(N)}
    with DuckDBStorageBackend.connect(path) as b:
        assert at.wait(30)
        b.upsert([fact(3, "new", v=np.full(DIM, 6.0, np.float32))])
        model["e3"] = np.full(DIM, 6.0, np.float32)
        b.checkpoint()
        b.save_index()
        go.set()
        assert b.wait_for_vectors(30)
        exact(b, model)


def test_save_index_and_build_vector_index_while_loading(path: Path, small_batches: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=1)
    model = {f"e{i}": vec(i) for i in range(N)}
    with DuckDBStorageBackend.connect(path, hnsw_threshold=10) as b:
        assert at.wait(30)
        assert b.build_vector_index()
        assert b.save_index()
        go.set()
        assert b.wait_for_vectors(30)
        exact(b, model)


def test_a_dropped_unclosed_store_frees_its_file_for_a_reopen(path: Path, small_batches: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    at, go = gated(monkeypatch, after_batches=1)
    b = DuckDBStorageBackend.connect(path)
    assert at.wait(30)
    loader = b._vector_loader
    assert loader is not None
    del b
    gc.collect()
    with DuckDBStorageBackend.connect(path, vectors="on_demand") as again:
        exact(again, {f"e{i}": vec(i) for i in range(N)})
    go.set()
    assert loader.done.wait(30)


def test_reopen_right_after_close_many_times(path: Path) -> None:
    model = {f"e{i}": vec(i) for i in range(N)}
    for k in range(15):
        b = DuckDBStorageBackend.connect(path)
        if k % 3 == 0:
            b.upsert([fact(k, f"round {k}", v=vec(1000 + k))])
            model[f"e{k}"] = vec(1000 + k)
        b.close()
        assert b._vector_loader is None
    with DuckDBStorageBackend.connect(path) as b:
        assert b.wait_for_vectors(30)
        exact(b, model)
    assert not [t for t in threading.enumerate() if t.name == "umi-vectors"]


def test_close_while_a_batch_is_being_put_in(path: Path, small_batches: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from umi.storage._hotcache import EntityCache

    inside, release = threading.Event(), threading.Event()
    real = EntityCache.install_vectors

    def slow(self: EntityCache, ids: list[str], mat: np.ndarray) -> None:
        inside.set()
        assert release.wait(30)
        real(self, ids, mat)

    monkeypatch.setattr(EntityCache, "install_vectors", slow)
    b = DuckDBStorageBackend.connect(path)
    assert inside.wait(30)
    closing = threading.Thread(target=b.close)
    closing.start()
    release.set()
    closing.join(30)
    assert not closing.is_alive() and b._closed
    loader_threads = [t for t in threading.enumerate() if t.name == "umi-vectors"]
    for t in loader_threads:
        t.join(30)
    with DuckDBStorageBackend.connect(path, vectors="on_demand") as b2:
        exact(b2, {f"e{i}": vec(i) for i in range(N)})


def test_read_only_open_loads_in_the_background(path: Path, small_batches: None) -> None:
    with DuckDBStorageBackend.connect(path, read_only=True) as b:
        assert b.wait_for_vectors(30)
        exact(b, {f"e{i}": vec(i) for i in range(N)})


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_no_usable_index_cache_reads_vectors_at_open_and_starts_no_thread(path: Path, damage: str) -> None:
    idx = Path(str(path) + ".umiidx")
    assert idx.exists()
    if damage == "missing":
        idx.unlink()
    else:
        idx.write_bytes(b"\0garbage" * 50)
    with DuckDBStorageBackend.connect(path) as b:
        assert b._vector_loader is None and b.wait_for_vectors(0)
        exact(b, {f"e{i}": vec(i) for i in range(N)})


def test_rows_without_a_vector_and_long_passages(tmp_path: Path, small_batches: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "mixed.duckdb"
    with umi.Memory(p, embedder=umi.SimEmbeddingProvider(seed=3)) as m:
        long_text = " ".join(f"Sentence {i} tells that Carol visited city number {i} in spring." for i in range(120))
        m.remember_sync(long_text)
        m.remember_sync("Alice works at Acme Corp in Berlin.")
        before = {e.id: (e.content, None if e.embedding is None else np.array(e.embedding))
                  for e in m.recall_sync("Carol visited city number 77", umi.RecallOptions(limit=20))}
    with DuckDBStorageBackend.connect(p) as b:
        b.upsert([Entity("note", "no vector", "a note without an embedding", created_at=T0, id="nov")])
        assert b.wait_for_vectors(30)
    store = DuckDBStorageBackend.connect(p)
    at, go = gated(monkeypatch, after_batches=0)
    with umi.Memory(storage=store, embedder=umi.SimEmbeddingProvider(seed=3)) as m:
        go.set()
        assert store.wait_for_vectors(30)
        after = m.recall_sync("Carol visited city number 77", umi.RecallOptions(limit=20))
        assert {e.id for e in after} >= set(before)
        for e in after:
            if e.id in before:
                assert e.content == before[e.id][0]
                want = before[e.id][1]
                assert (e.embedding is None) == (want is None) and (want is None or np.array_equal(e.embedding, want))
        got = store.get("nov")
        assert got is not None and got.embedding is None


def _all(b: DuckDBStorageBackend) -> dict[str, tuple[str, np.ndarray | None]]:
    return {e.id: (e.content, None if e.embedding is None else np.array(e.embedding))
            for e in b.list(umi.SearchFilters(include_superseded=True), limit=100_000)}


def test_memory_verbs_while_loading_keep_every_vector(tmp_path: Path, small_batches: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    emb = umi.SimEmbeddingProvider(seed=5)
    db, other, dump = tmp_path / "m.duckdb", tmp_path / "o.duckdb", tmp_path / "o.jsonl"
    with umi.Memory(other, embedder=emb) as m:
        m.remember_sync("Zed grows tomatoes in Lisbon.")
        m.remember_sync("Yara teaches chemistry in Quito.")
        m.export_sync(dump, embeddings=True)
    with umi.Memory(db, embedder=emb) as m:
        for who in ("alice", "bob"):
            v = m.scoped(user_id=who)
            for i in range(12):
                v.remember_sync(f"{who.title()} visited city number {i} and liked museum {i}.")
        m.scoped(user_id="alice").remember_sync("Alice works at Acme Corp in Berlin.")
    with DuckDBStorageBackend.connect(db, vectors="on_demand") as b:
        stored = _all(b)
    assert len(stored) >= 24
    at, go = gated(monkeypatch, after_batches=1)
    store = DuckDBStorageBackend.connect(db)
    with umi.Memory(storage=store, embedder=emb) as m:
        assert at.wait(30)
        alice = m.scoped(user_id="alice")
        acme = [e for e in alice.recall_sync("Where does Alice work?") if "Acme" in e.content]
        alice.remember_sync("Alice now works at Initech in Munich.")
        some = sorted(i for i, (c, _) in stored.items() if "city number 3 " in c and "Alice" in c)
        assert some and m.forget_sync(some[0]) == 1
        assert m.forget_scope_sync(user_id="bob") >= 12
        nine = sorted(i for i, (c, _) in stored.items() if "city number 9 " in c and "Alice" in c)
        m.update_sync(nine[0], "Alice visited city number 99 and liked museum 99.")
        m.import_sync(dump)
        go.set()
        assert store.wait_for_vectors(30)
        held = _all(store)
        for r in alice.recall_sync("Alice visited city museum"):
            assert r.embedding is not None and np.array_equal(r.embedding, held[r.id][1])
        for eid, (content, v) in held.items():
            assert v is not None
            if eid in stored and stored[eid][0] == content:
                assert np.array_equal(v, stored[eid][1]), eid  # untouched: bit for bit as stored
        assert acme
    with DuckDBStorageBackend.connect(db, vectors="on_demand") as b:
        disk = _all(b)
    assert set(disk) == set(held)
    for eid, (content, v) in disk.items():
        assert held[eid][0] == content and np.array_equal(held[eid][1], v), eid
