"""Adversary 10: forget, then compact, leaves nothing of the forgotten fact on disk — its vector
in the HNSW graph file too.

The README promises that a compact after a forget rewrites the store's files *and the index
caches beside them*, so that nothing of the fact remains on disk (an erasure request). The
vector index removes a fact by marking its graph node deleted (``hnswlib.mark_deleted``), which
keeps the node's vector in the graph until its slot is reused; compact saved that graph again,
so the forgotten fact's embedding stayed in ``<db>.umiidx.<token>.hnsw`` after the compact (and
after close and reopen). Now compact overwrites a removed node's vector with zeros before saving
(``VectorIndex.erase_removed``): the graph is kept, and the removed node stays marked deleted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

DIM = 16
N = 60


def vectors() -> np.ndarray:
    return np.random.default_rng(10).standard_normal((N, DIM)).astype(np.float32)


def open_store(path: Path) -> DuckDBStorageBackend:
    return DuckDBStorageBackend.connect(path, dim=DIM, hnsw_threshold=10)


def files_holding(directory: Path, blob: bytes) -> list[str]:
    return sorted(f.name for f in directory.iterdir() if f.is_file() and blob in f.read_bytes())


def nearest(b: DuckDBStorageBackend, q: np.ndarray) -> list[str]:
    names = {e.id: e.name for e in b.list(limit=N)}
    return [names[i] for i, _ in b.search_vector(q, 5)]


@pytest.mark.parametrize("graph", ["in_memory", "saved_and_reopened"])
def test_a_forgotten_facts_vector_is_gone_from_every_file_after_compact(tmp_path: Path, graph: str) -> None:
    path = tmp_path / "s.duckdb"
    vecs = vectors()
    b = open_store(path)
    b.upsert([Entity("note", f"n{i}", f"fact {i}", embedding=vecs[i], created_at=1_700_000_000_000 + i)
              for i in range(N)])
    assert b.build_vector_index()
    if graph == "saved_and_reopened":  # the graph is then a file, read when first needed
        b.close()
        b = open_store(path)
    try:
        index = b._cache.index  # type: ignore[attr-defined]
        target = next(e for e in b.list(limit=N) if e.name == "n7")
        stored = index._vectors[index._slot[target.id]].tobytes()  # the vector as the index keeps it
        b.save_index()
        assert any(name.endswith(".hnsw") for name in files_holding(tmp_path, stored))  # (the setup holds)
        assert b.delete(target.id)
        assert b.compact()
        assert files_holding(tmp_path, stored) == []  # was: the graph file still held it
        assert index._graph is not None  # erased in place: the graph is kept, not built again
        assert "n7" not in nearest(b, vecs[7]) and nearest(b, vecs[8])[0] == "n8"
    finally:
        b.close()
    assert files_holding(tmp_path, stored) == []
    with open_store(path) as again:
        assert len(again.list(limit=N)) == N - 1
        assert "n7" not in nearest(again, vecs[7]) and nearest(again, vecs[8])[0] == "n8"


def test_a_background_build_from_before_a_removal_is_dropped_not_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph being built from a snapshot taken before a removal would adopt the removed node
    (marked deleted, its vector kept): erase_removed discards that build too."""
    import threading

    import umi.index as ix

    real = ix._hnswlib()
    entered, go = threading.Event(), threading.Event()

    class SlowIndex:  # hnswlib's Index, its first add_items held until the test lets it go on
        def __init__(self, **kw: object) -> None:
            self._g = real.Index(**kw)

        def add_items(self, *a: object, **kw: object) -> None:
            if threading.current_thread().name == "umi-hnsw-build":
                entered.set()
                assert go.wait(30)
            self._g.add_items(*a, **kw)

        def __getattr__(self, name: str) -> object:
            return getattr(self._g, name)

    monkeypatch.setattr(ix, "BACKGROUND_BUILD_MIN", 10)
    monkeypatch.setattr(ix, "_hnswlib", lambda: type("hnswlib", (), {"Index": SlowIndex}))
    vecs = vectors()
    index = ix.VectorIndex(DIM, hnsw_threshold=10)
    index.add([f"n{i}" for i in range(N)], vecs)
    index.search(vecs[0], 3)  # starts the background build (exact results meanwhile)
    assert entered.wait(30)
    assert index.remove(["n7"]) == 1
    assert index.erase_removed()
    go.set()
    assert index.wait_for_graph(30)
    assert index._graph is None  # the build from before the removal was discarded
    index.build_graph()
    assert not (index._in_graph & ~index._live).any()  # the graph built now has no removed node
    assert "n7" not in [i for i, _ in index.search(vecs[7], 5)]


def test_erasing_keeps_the_graph_and_its_answers_and_a_reused_slot_is_live_again() -> None:
    """The erased node stays in the graph, marked deleted, with zeros for a vector: searches
    never return it and find the same neighbours as before for every other query; a new id that
    reuses its slot is found by its own vector; a second erase with nothing removed does nothing."""
    import umi.index as ix

    vecs = vectors()
    index = ix.VectorIndex(DIM, hnsw_threshold=10)
    ids = [f"n{i}" for i in range(N)]
    index.add(ids, vecs)
    assert index.path_for() == "hnsw"
    index.search(vecs[0], 3)  # builds the graph
    assert index._graph is not None
    before = {i: index.search(vecs[i], 5) for i in range(N) if i != 7}
    slot = index._slot["n7"]
    assert index.remove(["n7"]) == 1
    graph = index._graph
    assert index.erase_removed()
    assert index._graph is graph  # the same graph, not dropped
    raw = graph.get_items([s for s in range(N) if s != slot])  # the live nodes keep their vectors
    assert np.allclose(raw, index._vectors[[s for s in range(N) if s != slot]])
    with pytest.raises(RuntimeError):  # still marked deleted
        graph.get_items([slot])
    graph.unmark_deleted(slot)
    assert not graph.get_items([slot]).any()  # its vector is zeros now
    graph.mark_deleted(slot)
    for i, hits in before.items():  # the same neighbours, less the removed one
        want = [h for h, _ in hits if h != "n7"]
        assert [h for h, _ in index.search(vecs[i], 5)][: len(want)] == want
    fresh = np.random.default_rng(99).standard_normal(DIM).astype(np.float32)
    index.add(["new"], fresh[None, :])
    assert index._slot["new"] == slot  # the lowest free slot is reused
    assert index.search(fresh, 1)[0][0] == "new"
    assert not index.erase_removed()  # nothing removed now


def test_many_removed_nodes_drop_the_graph_for_a_build_on_a_thread_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above one removed node per ERASE_IN_PLACE_SHARE live ones, erasing node by node (about a
    graph insert each, under the store's lock) costs more than a build: the graph is dropped, and
    the next search that needs one builds it from the live vectors alone."""
    import umi.index as ix

    monkeypatch.setattr(ix, "ERASE_IN_PLACE_SHARE", 10)
    vecs = vectors()
    index = ix.VectorIndex(DIM, hnsw_threshold=10)
    index.add([f"n{i}" for i in range(N)], vecs)
    assert index.path_for() == "hnsw"
    index.search(vecs[0], 3)  # builds the graph
    graph = index._graph
    assert graph is not None
    assert index.remove([f"n{i}" for i in range(5)]) == 5  # 5 removed, 55 live: 50 <= 55
    assert index.erase_removed() and index._graph is graph  # erased in place
    assert not index.erase_removed()  # erased nodes are passed by
    assert index.remove([f"n{i}" for i in range(5, 11)]) == 6  # 6 more, 49 live: 60 > 49
    assert index.erase_removed() and index._graph is None  # dropped
    index.build_graph()
    assert not (index._in_graph & ~index._live).any()  # built from the live vectors alone
    assert index.search(vecs[N - 1], 1)[0][0] == f"n{N - 1}"
    assert "n3" not in [h for h, _ in index.search(vecs[3], 10)]
