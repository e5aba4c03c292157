"""Deep recall's batched graph walks (``VectorIndex.search_many_unit``: one hnswlib ``knn_query``
for every rewrite), attacked: the answers must be one walk per query's, under deletions (rows
that cannot find k neighbours), masks, a graph built in the background, writers adding to the
graph meanwhile (hnswlib's add_items beside a knn_query is unsafe: the index's lock must cover
every walk), and from run to run."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import umi.index as index_mod
from umi.index import VectorIndex

DIM = 16


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def built(n: int, seed: int = 0) -> VectorIndex:
    idx = VectorIndex(DIM, hnsw_threshold=10, M=8, ef_construction=40, ef_search=16, seed=seed)
    idx.add([f"v{i}" for i in range(n)], unit_rows(np.random.default_rng(seed), n))
    idx.build_graph()
    assert idx.graph_built
    return idx


def one_walk_each(idx: VectorIndex, qs: np.ndarray, k: int, mask: np.ndarray | None = None) -> list:
    return [idx.search_unit(q, k, mask) for q in qs]


def test_batched_walks_answer_as_one_walk_per_query_under_deletions_and_masks() -> None:
    idx = built(1500)
    qs = unit_rows(np.random.default_rng(7), 24)
    for k in (1, 10, 64):
        assert idx.search_many_unit(qs, k, None) == one_walk_each(idx, qs, k)
    idx.remove([f"v{i}" for i in range(0, 1500, 3)])  # marked deleted in the graph
    mask = np.zeros(idx.capacity, np.bool_)
    mask[::2] = True
    for k in (5, 40):
        assert idx.search_many_unit(qs, k, None) == one_walk_each(idx, qs, k)
        assert idx.search_many_unit(qs, k, mask) == one_walk_each(idx, qs, k, mask)

def test_batched_walks_that_cannot_find_k_neighbours_fall_back_as_one_walk_does() -> None:
    """A sparse graph (M=2) with most nodes deleted: hnswlib's walks cannot find k live
    neighbours and raise; each row must then go its own way, as one walk's."""
    idx = VectorIndex(DIM, hnsw_threshold=10, M=2, ef_construction=4, ef_search=16)
    idx.add([f"v{i}" for i in range(1500)], unit_rows(np.random.default_rng(0), 1500))
    idx.build_graph()
    idx.remove([f"v{i}" for i in range(1500) if i % 20])
    qs = unit_rows(np.random.default_rng(7), 24)
    assert len(idx) == 75 and idx.path_for(None, 75) == "hnsw"
    idx._graph.set_ef(75)
    with pytest.raises(RuntimeError):
        idx._graph.knn_query(qs, k=75, num_threads=1)  # the path under test
    got = idx.search_many_unit(qs, 75, None)
    assert got == one_walk_each(idx, qs, 75) and [len(r) for r in got] == [75] * 24


def test_batched_walks_are_the_same_from_run_to_run_and_index_to_index() -> None:
    qs = unit_rows(np.random.default_rng(3), 16)
    first = built(1200).search_many_unit(qs, 12, None)
    for _ in range(3):
        assert built(1200).search_many_unit(qs, 12, None) == first


def test_batched_walks_during_a_background_build_answer_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_mod, "BACKGROUND_BUILD_MIN", 200)
    idx = VectorIndex(DIM, hnsw_threshold=10, M=8, ef_construction=40, ef_search=16)
    rows = unit_rows(np.random.default_rng(1), 1500)
    idx.add([f"v{i}" for i in range(1500)], rows)
    qs = unit_rows(np.random.default_rng(2), 8)
    exact = VectorIndex(DIM, hnsw_threshold=10**9)
    exact.add([f"v{i}" for i in range(1500)], rows)
    got = idx.search_many_unit(qs, 10, None)  # starts the build; exact meanwhile
    assert got == [exact.search_unit(q, 10) for q in qs]
    idx.wait_for_graph()
    assert idx.graph_built
    assert idx.search_many_unit(qs, 10, None) == one_walk_each(idx, qs, 10)


class _Watched:
    """An hnswlib index that records whether a walk and a change ever overlapped."""

    def __init__(self, graph: object, owner: VectorIndex) -> None:
        self._g, self._owner = graph, owner
        self.walking = 0
        self.overlaps = 0
        self.walks = 0
        self.unlocked = 0

    def knn_query(self, *a: object, **kw: object) -> object:
        if not self._owner._lock._is_owned():  # type: ignore[attr-defined]
            self.unlocked += 1
        self.walking += 1
        self.walks += 1
        try:
            return self._g.knn_query(*a, **kw)  # type: ignore[attr-defined]
        finally:
            self.walking -= 1

    def _change(self, name: str, *a: object, **kw: object) -> object:
        if self.walking:
            self.overlaps += 1
        return getattr(self._g, name)(*a, **kw)

    def add_items(self, *a: object, **kw: object) -> object:
        return self._change("add_items", *a, **kw)

    def mark_deleted(self, *a: object, **kw: object) -> object:
        return self._change("mark_deleted", *a, **kw)

    def resize_index(self, *a: object, **kw: object) -> object:
        return self._change("resize_index", *a, **kw)

    def __getattr__(self, name: str) -> object:
        return getattr(self._g, name)


def test_writers_adding_to_the_graph_never_run_beside_a_batched_walk() -> None:
    idx = built(1000)
    watched = _Watched(idx._graph, idx)
    idx._graph = watched
    qs = unit_rows(np.random.default_rng(5), 12)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        rng = np.random.default_rng(100 + w)
        i = 0
        try:
            while not stop.is_set() and i < 400:
                idx.add([f"w{w}-{i}"], unit_rows(rng, 1))  # grows past the capacity: resize_index too
                if i % 7 == 0:
                    idx.remove([f"v{(w * 131 + i) % 1000}"])
                i += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ws = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in ws:
        t.start()
    try:
        for _ in range(60):
            res = idx.search_many_unit(qs, 10, None)
            assert [len(r) for r in res] == [10] * len(qs)
    finally:
        stop.set()
        for t in ws:
            t.join()
    assert errors == []
    assert idx._graph is watched  # no change failed (a failed one drops the graph)
    assert watched.walks > 0 and watched.unlocked == 0 and watched.overlaps == 0
    # once quiet, the batched answers are one walk's
    assert idx.search_many_unit(qs, 10, None) == one_walk_each(idx, qs, 10)
