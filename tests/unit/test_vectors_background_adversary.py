"""Adversarial interleavings of the background vector loader of a reopened DuckDB store.

Each test parks the loader between reading a batch and putting it in (``gated``), does something
a user may do meanwhile, then lets it go: every vector a user stored comes back bit for bit, no
stale vector wins over a write of the session, nothing hangs or leaks.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import umi
from umi.errors import StorageError
from umi.sim.faults import FaultInjector, FaultType
from umi.storage import duckdb as duck
from umi.storage._duckdb_io import DuckDBDurable
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

# the existing tests' store and loader gate (``gated`` parks the loader after reading a batch,
# before it puts that batch in)
from test_storage_vectors_background import DIM, N, T0, fact, gated, path, small_batches, vec  # noqa: F401



def stored() -> dict[str, np.ndarray | None]:
    """What the ``path`` fixture stored: id -> vector."""
    return {f"e{i}": vec(i) for i in range(N)}


def finish(b: DuckDBStorageBackend, go: threading.Event, model: dict[str, np.ndarray | None]) -> None:
    """Let the parked loader go, wait for every vector, check them."""
    go.set()
    assert b.wait_for_vectors(30)
    exact(b, model)


def reopened_exact(path: Path, model: dict[str, np.ndarray | None]) -> None:
    with DuckDBStorageBackend.connect(path) as b:
        assert b.wait_for_vectors(30)
        exact(b, model)


def started(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn)
    t.start()
    return t


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "umi-vectors" and t.is_alive()]


def exact(b: DuckDBStorageBackend, model: dict[str, np.ndarray | None]) -> None:
    """Every row of ``model`` holds its vector, bit for bit, in memory and through the calls."""
    c = b._cache
    for eid, v in model.items():
        row = c._row_of[eid]
        got = b.get(eid)
        assert got is not None and got.embedding is not None and v is not None
        assert got.embedding.tobytes() == v.tobytes(), eid  # bit for bit
        if not c._vec_pending[row]:
            assert c._vecs[row].tobytes() == v.tobytes(), eid  # type: ignore[index]
        assert b.search_vector(v, 1)[0][0] == eid
    assert sorted(e.id for e in b.list(limit=10_000)) == sorted(model)


def test_rollback_of_a_write_to_a_row_read_but_not_put_in(path: Path, small_batches: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=2)  # rows e16..e23 read, not in
    model = stored()
    with DuckDBStorageBackend.connect(path) as b:
        assert at.wait(30)
        b.upsert([fact(20, "committed after the loader read it", v=vec(2020))])
        model["e20"] = vec(2020)  # what a rollback of a later change must give back, not the stale read
        with pytest.raises(StorageError, match="undo"):
            with b.transaction():
                b.upsert([fact(20, "changed again", v=np.full(DIM, 2.5, np.float32))])
                b.upsert([fact(17, "changed", v=np.full(DIM, 2.0, np.float32))])
                b.delete("e18")
                b.upsert([fact(19, "changed too", v=np.full(DIM, 3.0, np.float32))])
                b.delete("e19")
                raise RuntimeError("undo")
        finish(b, go, model)
    reopened_exact(path, model)


def test_a_failed_commit_while_loading_leaves_every_vector(path: Path, small_batches: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=1)
    faults = FaultInjector(seed=1)
    model = stored()
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
        finish(b, go, model)
    reopened_exact(path, model)


def test_the_cache_reload_after_a_failed_rollback_ends_the_loader(path: Path, small_batches: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=1)
    model = stored()
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
        finish(b, go, model)


def test_checkpoint_while_loading(path: Path, small_batches: None, monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=1)
    model = stored()
    with DuckDBStorageBackend.connect(path) as b:
        assert at.wait(30)
        b.upsert([fact(30, "new", v=np.full(DIM, 6.0, np.float32))])  # a batch still to come
        model["e30"] = np.full(DIM, 6.0, np.float32)
        # a new id: with an insert in the log, DuckDB refuses a checkpoint beside the thread's open
        # read ("other write transactions active"); checkpoint stops the thread and starts it again
        b.upsert([fact(77, "inserted", v=vec(777))])
        model["e77"] = vec(777)
        first = b._vector_loader
        failed: list[BaseException] = []

        def checkpoint() -> None:
            try:
                b.checkpoint()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failed.append(exc)

        t = started(checkpoint)
        go.set()  # the parked batch comes back to a stopping thread
        t.join(30)
        assert not t.is_alive() and failed == []
        assert first is not None and first.done.is_set() and b._vector_loader is not first
        b.save_index()
        finish(b, go, model)


def test_save_index_and_build_vector_index_while_loading(path: Path, small_batches: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    at, go = gated(monkeypatch, after_batches=1)
    model = stored()
    with DuckDBStorageBackend.connect(path, hnsw_threshold=10) as b:
        assert at.wait(30)
        assert b.build_vector_index()
        assert b.save_index()
        finish(b, go, model)


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
        exact(again, stored())
    go.set()
    assert loader.done.wait(30)


def test_reopen_right_after_close_many_times(path: Path) -> None:
    model = stored()
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
    assert not loader_threads()


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
    closing = started(b.close)
    release.set()
    closing.join(30)
    assert not closing.is_alive() and b._closed
    assert not loader_threads()  # close ended it
    with DuckDBStorageBackend.connect(path, vectors="on_demand") as b2:
        exact(b2, stored())


def test_read_only_open_loads_in_the_background(path: Path, small_batches: None) -> None:
    with DuckDBStorageBackend.connect(path, read_only=True) as b:
        assert b.wait_for_vectors(30)
        exact(b, stored())


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
        exact(b, stored())


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



def test_close_racing_a_compact_stops_the_thread_the_compact_starts(path: Path, small_batches: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """compact() restarts the loader when it ends; a close() on another thread must not slip in
    between its own stop of the loader and the closing of the connection (the new thread would
    read on a closed connection, or make DuckDB refuse the close: "connection is busy")."""
    first_at, first_go = gated(monkeypatch, after_batches=0)
    real_stream = DuckDBDurable.stream_vectors  # (the gated one)
    streams = []
    release = threading.Event()

    def stream(self: DuckDBDurable, batch: int) -> Iterator[tuple[list[str], np.ndarray]]:
        streams.append(1)
        if len(streams) > 1:  # the loader compact starts: parked until it is stopped
            assert release.wait(30)
        yield from real_stream(self, batch)

    monkeypatch.setattr(DuckDBDurable, "stream_vectors", stream)
    real_stop = duck._VectorLoader.stop

    def stop(self: duck._VectorLoader, timeout: float = 10.0) -> None:
        if len(streams) > 1:
            release.set()
        real_stop(self, timeout)

    monkeypatch.setattr(duck._VectorLoader, "stop", stop)
    compacted, proceed = threading.Event(), threading.Event()
    real_compact = DuckDBStorageBackend._compact

    def compact(self: DuckDBStorageBackend) -> bool:
        done = real_compact(self)
        compacted.set()
        proceed.wait(3)  # (never set when close waits for the whole compact)
        return done

    monkeypatch.setattr(DuckDBStorageBackend, "_compact", compact)
    b = DuckDBStorageBackend.connect(path)
    assert first_at.wait(30)
    compacting = started(b.compact)
    first_go.set()
    assert compacted.wait(30)
    real_stop_loader = DuckDBStorageBackend._stop_vector_loader

    def stop_loader(self: DuckDBStorageBackend) -> None:
        real_stop_loader(self)
        if threading.current_thread() is not compacting:  # close's: let the compact finish now
            proceed.set()
            compacting.join(0.5)

    monkeypatch.setattr(DuckDBStorageBackend, "_stop_vector_loader", stop_loader)
    try:
        b.close()
        compacting.join(30)
        assert not compacting.is_alive() and b._closed
        assert not loader_threads()
    finally:
        release.set()
        proceed.set()
        for t in threading.enumerate():
            if t.name == "umi-vectors":
                t.join(30)


# --- a property: random writes, rollbacks and failed commits interleaved with stale batches ------


HN = 24
_ids = st.integers(0, HN + 4).map(lambda i: f"e{i}")
_write = st.one_of(
    st.tuples(st.just("upsert"), _ids, st.integers(0, 10_000)),
    st.tuples(st.just("novec"), _ids, st.just(0)),
    st.tuples(st.just("delete"), _ids, st.just(0)),
    st.tuples(st.just("supersede"), _ids, st.just(0)),
)
_op = st.one_of(
    _write,
    st.tuples(st.just("install"), st.just(""), st.just(0)),
    st.tuples(st.just("read"), _ids, st.just(0)),
    st.tuples(st.sampled_from(["rollback", "commit", "fail"]), st.lists(_write, min_size=1, max_size=4), st.just(0)),
)


def _apply_write(b: DuckDBStorageBackend, model: dict[str, np.ndarray | None], op: tuple) -> None:
    kind, eid, seed = op
    i = int(eid[1:])
    if kind == "upsert":
        v = np.random.default_rng(seed + 7_000).standard_normal(DIM).astype(np.float32)
        v[: seed % 3] = [-0.0, np.float32(1e-45)][: seed % 3]  # bits array_equal alone would not tell
        b.upsert([fact(i, f"fact {eid} v{seed}", v=v)])
        model[eid] = v
    elif kind == "novec":
        b.upsert([Entity("person", f"person {i}", f"fact {eid} without a vector", created_at=T0 + i, id=eid)])
        model[eid] = None
    elif kind == "delete":
        assert b.delete(eid) == (eid in model)
        model.pop(eid, None)
    else:
        b.supersede(eid, T0 + 10_000_000)  # the vector stays


def _check(b: DuckDBStorageBackend, model: dict[str, np.ndarray | None]) -> None:
    assert sorted(e.id for e in b.list(umi.SearchFilters(include_superseded=True), limit=1000)) == sorted(model)
    got = {e.id: e.embedding for e in b.get_many(sorted(model))}
    for eid, v in model.items():
        assert (got[eid] is None) == (v is None), eid
        if v is not None:
            assert got[eid].tobytes() == v.tobytes(), eid  # type: ignore[union-attr]
            c = b._cache
            row = c._row_of[eid]
            if not c._vec_pending[row]:
                assert c._vecs[row].tobytes() == v.tobytes(), eid  # type: ignore[index]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=25), batch=st.integers(1, 9))
def test_random_writes_interleaved_with_stale_batches_match_a_dict_model(tmp_path: Path, ops: list, batch: int) -> None:
    import shutil
    import tempfile

    base = tmp_path / "base.duckdb"
    if not base.exists():
        with DuckDBStorageBackend.connect(base, dim=DIM) as b:
            b.upsert([fact(i) for i in range(HN)])
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    for suffix in ("", ".umiidx", ".umiterms"):
        shutil.copy(str(base) + suffix, str(work / "s.duckdb") + suffix)
    model: dict[str, np.ndarray | None] = {f"e{i}": vec(i) for i in range(HN)}
    faults = FaultInjector(seed=0)
    with DuckDBStorageBackend.connect(work / "s.duckdb", vectors="on_demand", faults=faults) as b:
        assert b._cache.vectors_pending() == HN
        stale = list(b._durable.stream_vectors(batch))  # what a loader read at the open
        for kind, arg, seed in ops:
            if kind == "install":
                if stale:
                    with b._lock:
                        b._cache.install_vectors(*stale.pop(0))
            elif kind == "read":
                got = b.get(arg)
                assert (got is None) == (arg not in model)
            elif kind in ("rollback", "commit", "fail"):
                trial = dict(model)
                try:
                    with b.transaction():
                        for w in arg if kind != "fail" else [*arg, ("upsert", "e0", 5)]:  # (a commit to fail)
                            _apply_write(b, trial, w)
                        if kind == "rollback":
                            raise RuntimeError("undo")
                        if kind == "fail":
                            faults.force(FaultType.STORAGE_WRITE_FAIL)
                except StorageError:
                    assert kind != "commit"
                else:
                    assert kind == "commit"
                    model = trial
            else:
                _apply_write(b, model, (kind, arg, seed))
            _check(b, model)
        with b._lock:
            for ids, mat in stale:
                b._cache.install_vectors(ids, mat)
        assert b._cache.vectors_pending() == 0
        _check(b, model)
    with DuckDBStorageBackend.connect(work / "s.duckdb", vectors="on_demand") as b:
        _check(b, model)
    shutil.rmtree(work)


_EXIT_PROBE = """
import atexit, sys, threading, time
# registered first, so it runs after umi's own exit handlers (last in, first out)
atexit.register(lambda: print("loaders at exit:", sum(t.name == "umi-vectors" and t.is_alive()
                                                      for t in threading.enumerate()), flush=True))
from umi.storage import duckdb as duck
from umi.storage._duckdb_io import DuckDBDurable
duck.VECTOR_BATCH = 4
real = DuckDBDurable.stream_vectors
def slow(self, batch):
    for b in real(self, batch):
        time.sleep(0.2)  # still reading when the script ends
        yield b
DuckDBDurable.stream_vectors = slow
store = duck.DuckDBStorageBackend.connect(sys.argv[1])
assert store._vector_loader is not None
print("opened", flush=True)
"""


def test_a_script_that_ends_without_close_while_loading_stops_the_thread_first(path: Path) -> None:
    # a daemon thread still inside DuckDB while the interpreter finalises can abort the process
    # ("terminate called ... FATAL: exception not rethrown", exit 134): it is stopped at exit
    import subprocess
    import sys

    from child_process import child_env

    out = subprocess.run([sys.executable, "-c", _EXIT_PROBE, str(path)], env=child_env(), cwd=path.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "opened" in out.stdout and "loaders at exit: 0" in out.stdout, out.stdout + out.stderr
    assert "background failed" not in out.stderr
