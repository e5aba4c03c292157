"""Adversary 10: forget, then compact, leaves nothing of the forgotten fact on disk — its vector
in the HNSW graph file too.

The README promises that a compact after a forget rewrites the store's files *and the index
caches beside them*, so that nothing of the fact remains on disk (an erasure request). The
vector index removes a fact by marking its graph node deleted (``hnswlib.mark_deleted``), which
keeps the node's vector in the graph until its slot is reused; compact saved that graph again,
so the forgotten fact's embedding stayed in ``<db>.umiidx.<token>.hnsw`` after the compact (and
after close and reopen). Now compact drops such a graph before saving (the next search that
needs a graph builds it from the live vectors; exact results meanwhile).
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
        assert "n7" not in nearest(b, vecs[7]) and nearest(b, vecs[8])[0] == "n8"
    finally:
        b.close()
    assert files_holding(tmp_path, stored) == []
    with open_store(path) as again:
        assert len(again.list(limit=N)) == N - 1
        assert "n7" not in nearest(again, vecs[7]) and nearest(again, vecs[8])[0] == "n8"


def test_a_background_build_from_before_a_removal_is_dropped_not_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph being built from a snapshot taken before a removal would adopt the removed node
    (marked deleted, its vector kept): drop_removed discards that build too."""
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
    assert index.drop_removed()
    go.set()
    assert index.wait_for_graph(30)
    assert index._graph is None  # the build from before the removal was discarded
    index.build_graph()
    assert not (index._in_graph & ~index._live).any()  # the graph built now has no removed node
    assert "n7" not in [i for i, _ in index.search(vecs[7], 5)]
