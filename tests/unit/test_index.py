"""umi.index.VectorIndex: slots, validation, both search paths, masks, persistence.

Exact-path results are compared with a plain-Python model (a dict id -> vector) on
vectors whose dot products are exact in float32, so scores and tie order must match
to the bit. HNSW recall is measured on clustered vectors (never on uniform random
ones, where every HNSW library looks broken).
"""

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from umi.errors import (
    IndexCacheError,
    InvalidConfigError,
    InvalidLimitError,
    StorageError,
    ValidationError,
)
from umi.index import EXACT_SELECTIVITY, SEARCH_K_MAX, VectorIndex

DIM = 16


def exact_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """Unit rows with 1, 4 or 16 entries of +-1/sqrt(nnz): all dot products are exact."""
    out = np.zeros((n, dim), np.float32)
    for r in range(n):
        nnz = int(rng.choice([1, 4, 16]))
        cols = rng.choice(dim, size=nnz, replace=False)
        out[r, cols] = rng.choice([-1.0, 1.0], size=nnz)
        out[r] /= np.sqrt(nnz)
    return out


def clustered(
    rng: np.random.Generator, n: int, dim: int, centroids: np.ndarray, noise: float
) -> np.ndarray:
    v = centroids[rng.integers(0, len(centroids), n)] + noise * rng.standard_normal((n, dim))
    v = v.astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def model_topk(model: dict, q: np.ndarray, k: int, allowed=None):
    items = [
        (i, float(np.dot(v.astype(np.float64), q.astype(np.float64))))
        for i, v in model.items()
        if allowed is None or i in allowed
    ]
    items.sort(key=lambda p: (-p[1], p[0]))
    return items[:k]


def mask_for(index: VectorIndex, allowed, extra: int = 3) -> np.ndarray:
    mask = np.zeros(index.capacity + extra, bool)
    for i in allowed:
        s = index.slot_of(i)
        if s >= 0:
            mask[s] = True
    return mask


# --- construction and validation ------------------------------------------------------


def test_constructor_validates():
    with pytest.raises(InvalidConfigError, match="dim must be"):
        VectorIndex(0)
    with pytest.raises(TypeError, match="dim must be an int"):
        VectorIndex("16")
    with pytest.raises(InvalidConfigError, match="M must be"):
        VectorIndex(8, M=1)
    with pytest.raises(InvalidConfigError, match="ef_search must be"):
        VectorIndex(8, ef_search=0)
    with pytest.raises(InvalidConfigError, match="hnsw_threshold"):
        VectorIndex(8, hnsw_threshold=-1)
    idx = VectorIndex(8)
    assert (idx.dim, len(idx), idx.capacity, idx.graph_built) == (8, 0, 0, False)


def test_add_validates_and_leaves_state_unchanged():
    idx = VectorIndex(4)
    idx.add(["a"], np.eye(4, dtype=np.float32)[:1])
    before = (len(idx), idx.capacity, idx.get_vector("a").tolist())
    bad = [
        (["b"], np.ones((1, 5), np.float32), ValidationError, r"shape \(n, 4\)"),
        (["b", "c"], np.ones((1, 4), np.float32), ValidationError, "2 ids but 1 vectors"),
        (["b"], np.array([[1, np.nan, 0, 0]], np.float32), ValidationError, "finite"),
        (
            ["b", "c"],
            np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32),
            ValidationError,
            "row 1 is all zeros",
        ),
        (["b"], np.full((1, 4), 1e300), ValidationError, "row 0 overflows"),
        (["b"], np.ones((1, 4), np.int64), TypeError, "float dtype"),
        (["b"], [[1.0, 0.0, 0.0, 0.0]], TypeError, "numpy array"),
        ("b", np.ones((1, 4), np.float32), TypeError, "sequence of str"),
        ([1], np.ones((1, 4), np.float32), TypeError, "must be a str"),
        ([""], np.ones((1, 4), np.float32), ValidationError, "non-empty"),
    ]
    for ids, vecs, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            idx.add(ids, vecs)
    assert (len(idx), idx.capacity, idx.get_vector("a").tolist()) == before
    assert idx.slot_of("b") == -1


def test_add_normalises_and_returns_slots():
    idx = VectorIndex(3)
    slots = idx.add(["x", "y"], np.array([[3, 4, 0], [0, 0, 2]], np.float64))
    assert slots.dtype == np.int64 and slots.tolist() == [0, 1]
    assert idx.get_vector("x").tolist() == pytest.approx([0.6, 0.8, 0.0])
    assert idx.get_vector("x").dtype == np.float32
    assert idx.get_vector("y").tolist() == [0.0, 0.0, 1.0]
    assert idx.get_vector("nope") is None
    assert (idx.slot_of("y"), idx.id_at(1), idx.id_at(2), idx.id_at(-1)) == (1, "y", None, None)
    assert idx.add([], np.zeros((0, 3), np.float32)).tolist() == []


def test_re_adding_a_stored_vector_is_bit_identical():
    rng = np.random.default_rng(8)
    raw = rng.standard_normal((50, 384)).astype(np.float32)
    idx = VectorIndex(384)
    idx.add([f"r{i}" for i in range(50)], raw)
    stored = np.stack([idx.get_vector(f"r{i}") for i in range(50)])
    np.testing.assert_allclose(np.linalg.norm(stored.astype(np.float64), axis=1), 1.0, atol=4e-7)
    twin = VectorIndex(384)
    twin.add([f"r{i}" for i in range(50)], stored)
    assert all(twin.get_vector(f"r{i}").tobytes() == stored[i].tobytes() for i in range(50))


def test_replace_keeps_slot_and_duplicates_last_wins():
    idx = VectorIndex(2)
    idx.add(["a", "b"], np.eye(2, dtype=np.float32))
    slots = idx.add(["b", "c", "b"], np.array([[1, 1], [1, 0], [-1, 0]], np.float32))
    assert slots.tolist() == [1, 2, 1]
    assert len(idx) == 3
    assert idx.get_vector("b").tolist() == [-1.0, 0.0]
    assert idx.search(np.array([-1.0, 0.0], np.float32), 1) == [("b", 1.0)]


def test_remove_frees_lowest_slot_first_and_never_returns_removed():
    idx = VectorIndex(2)
    idx.add([f"i{n}" for n in range(6)], np.tile(np.array([[1, 0]], np.float32), (6, 1)))
    assert idx.remove(["i4", "i1", "i1", "missing"]) == 2
    assert len(idx) == 4 and idx.slot_of("i1") == -1 and idx.id_at(1) is None
    hits = idx.search(np.array([1.0, 0.0], np.float32), 10)
    assert [i for i, _ in hits] == ["i0", "i2", "i3", "i5"]
    assert idx.add(["new1", "new2", "new3"], np.eye(2, dtype=np.float32)[[0, 1, 0]]).tolist() == [
        1,
        4,
        6,
    ]
    with pytest.raises(TypeError):
        idx.remove("i0")


def test_search_ties_break_by_id_even_across_the_k_boundary():
    idx = VectorIndex(2)
    # slot order is the reverse of id order; all score 1.0 against the query
    idx.add(["e", "d", "c", "b", "a", "z"], np.array([[1, 0]] * 5 + [[0, 1]], np.float32))
    q = np.array([1.0, 0.0], np.float32)
    assert idx.search(q, 1) == [("a", 1.0)]
    assert idx.search(q, 3) == [("a", 1.0), ("b", 1.0), ("c", 1.0)]
    assert idx.search(q, 10)[-1] == ("z", 0.0)
    assert idx.search_many(np.stack([q, q]), 2) == [[("a", 1.0), ("b", 1.0)]] * 2


def test_search_validates():
    idx = VectorIndex(2)
    idx.add(["a"], np.eye(2, dtype=np.float32)[:1])
    q = np.array([1.0, 0.0], np.float32)
    for k in (0, -3, SEARCH_K_MAX + 1):
        with pytest.raises(InvalidLimitError) as err:
            idx.search(q, k)
        assert err.value.limit == (1, SEARCH_K_MAX)
    with pytest.raises(TypeError):
        idx.search(q, 1.5)
    with pytest.raises(ValidationError, match="non-zero"):
        idx.search(np.zeros(2, np.float32), 1)
    with pytest.raises(ValidationError, match="finite"):
        idx.search(np.array([np.inf, 0.0], np.float32), 1)
    with pytest.raises(ValidationError, match="finite"):
        idx.search(np.array([np.nan, 1.0]), 1)
    # read-only and strided inputs are accepted (copied), float64 queries are normalised
    ro = np.ones(idx.capacity * 2, bool)[::2]
    q_ro = np.array([2.0, 0.0])
    q_ro.flags.writeable = False
    assert idx.search(q_ro, 1, ro) == [("a", 1.0)]
    with pytest.raises(ValidationError, match=r"shape \(2,\)"):
        idx.search(np.ones(3, np.float32), 1)
    with pytest.raises(TypeError, match="bool"):
        idx.search(q, 1, np.ones(idx.capacity, np.int8))
    with pytest.raises(ValidationError, match="length >= capacity"):
        idx.search(q, 1, np.ones(idx.capacity - 1, bool))
    with pytest.raises(ValidationError, match=r"shape \(n, 2\)"):
        idx.search_many(np.ones((2, 3), np.float32), 1)
    assert idx.search_many(np.zeros((0, 2), np.float32), 1) == []


def test_empty_index_and_empty_mask():
    idx = VectorIndex(3)
    q = np.array([1.0, 0.0, 0.0], np.float32)
    assert idx.search(q, 5) == []
    assert idx.search(q, 5, np.zeros(0, bool)) == []
    idx.add(["a"], q[None, :])
    assert idx.search(q, 5, np.zeros(idx.capacity, bool)) == []
    assert idx.search_many(np.stack([q]), 5, np.zeros(idx.capacity, bool)) == [[]]


def test_capacity_grows_geometrically():
    idx = VectorIndex(2)
    caps = []
    for n in range(300):
        idx.add([f"i{n}"], np.array([[1.0, n]], np.float32))
        caps.append(idx.capacity)
    assert sorted(set(caps)) == [64, 128, 256, 512]
    assert len(idx) == 300


# --- path selection and HNSW --------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered_pair():
    """One index on the HNSW path and one on the exact path, same 4000 clustered vectors."""
    rng = np.random.default_rng(20261101)
    dim = 48
    centroids = rng.standard_normal((300, dim))
    data = clustered(rng, 4000, dim, centroids, noise=0.35)
    queries = clustered(rng, 200, dim, centroids, noise=0.35)
    ids = [f"doc-{i:05d}" for i in range(len(data))]
    hnsw = VectorIndex(dim, hnsw_threshold=1000, seed=3)
    exact = VectorIndex(dim, hnsw_threshold=10**9)
    hnsw.add(ids, data)
    exact.add(ids, data)
    return hnsw, exact, queries, ids


def recall(got, want):
    return np.mean(
        [len({i for i, _ in g} & {i for i, _ in w}) / max(1, len(w)) for g, w in zip(got, want)]
    )


def test_hnsw_recall_at_10_on_clustered_vectors(clustered_pair):
    hnsw, exact, queries, _ = clustered_pair
    assert hnsw.path_for() == "hnsw" and exact.path_for() == "exact"
    got = hnsw.search_many(queries, 10)
    want = exact.search_many(queries, 10)
    assert hnsw.graph_built and not exact.graph_built
    assert recall(got, want) >= 0.95
    for q, g in zip(queries, got):
        assert len(g) == 10
        assert g == sorted(g, key=lambda p: (-p[1], p[0]))
        for i, s in g:  # re-scored exactly from the stored vectors, not hnswlib's distance
            assert s == pytest.approx(float(np.dot(hnsw.get_vector(i), q)), abs=2e-6)


@pytest.mark.parametrize("threshold", [10**9, 1000])  # the exact and the HNSW path
def test_a_store_checked_query_searches_unchecked_with_the_same_answer(threshold):
    """A store checks and normalises the query at its boundary (check_query_vector) and hands it to
    search_unit / search_many_unit, which check nothing more: the answer is search's, bit for bit."""
    from umi.storage._common import check_query_vector

    rng = np.random.default_rng(7)
    idx = VectorIndex(32, hnsw_threshold=threshold, seed=1)
    idx.add([f"i{n:04d}" for n in range(3000)], rng.standard_normal((3000, 32)).astype(np.float32))
    for scale in (1e-3, 1.0, 7.5, 1e4):
        for raw in rng.standard_normal((20, 32)) * scale:
            q = check_query_vector(raw, 32)
            assert idx.search_unit(q, 10) == idx.search(q, 10)
    qs = np.stack([check_query_vector(raw, 32) for raw in rng.standard_normal((5, 32)) * 3.0])
    assert idx.search_many_unit(qs, 10) == idx.search_many(qs, 10)
    assert idx.search_many_unit(qs, 10) == [idx.search(q, 10) for q in qs]


def test_hnsw_results_respect_mask_and_selective_masks_go_exact(clustered_pair):
    hnsw, exact, queries, ids = clustered_pair
    rng = np.random.default_rng(11)
    allowed = {i for i in ids if rng.random() < 0.5}
    mask = mask_for(hnsw, allowed)
    assert hnsw.path_for(mask) == "hnsw"
    got = [hnsw.search(q, 10, mask) for q in queries[:100]]
    want = [exact.search(q, 10, mask_for(exact, allowed)) for q in queries[:100]]
    assert all(i in allowed for g in got for i, _ in g)
    assert all(len(g) == 10 for g in got)
    assert recall(got, want) >= 0.95
    # a mask letting through fewer than hnsw_threshold slots is served exactly
    few = set(ids[::8])  # 500 of 4000: 12.5 % of the vectors, but fewer than hnsw_threshold (1000)
    few_mask = mask_for(hnsw, few)
    assert hnsw.path_for(few_mask) == "exact"
    assert [hnsw.search(q, 10, few_mask) for q in queries[:20]] == [
        exact.search(q, 10, mask_for(exact, few)) for q in queries[:20]
    ]


def test_selectivity_rule():
    rng = np.random.default_rng(2)
    data = rng.standard_normal((400, 8)).astype(np.float32)
    idx = VectorIndex(8, hnsw_threshold=10)
    idx.add([f"i{n}" for n in range(400)], data)
    assert idx.path_for() == "hnsw"
    mask = np.zeros(idx.capacity, bool)
    mask[: int(EXACT_SELECTIVITY * 400) - 1] = True
    assert idx.path_for(mask) == "exact"
    mask[: int(EXACT_SELECTIVITY * 400)] = True
    assert idx.path_for(mask) == "hnsw"
    assert idx.path_for(k=256) == "hnsw"  # k up to 256 never forces the exact path
    assert idx.path_for(k=300) == "exact"  # a large k would walk most of the graph
    small = VectorIndex(8, hnsw_threshold=401)
    small.add([f"i{n}" for n in range(400)], data)
    assert small.path_for() == "exact"


def test_hnsw_search_is_deterministic_and_search_many_matches_search(clustered_pair, tmp_path):
    hnsw, _, queries, ids = clustered_pair
    twin = VectorIndex(hnsw.dim, hnsw_threshold=1000, seed=3)
    twin.add(ids, np.stack([hnsw.get_vector(i) for i in ids]))
    assert twin.search_many(queries[:50], 10) == hnsw.search_many(queries[:50], 10)
    assert hnsw.search_many(queries[:20], 7) == [hnsw.search(q, 7) for q in queries[:20]]
    hnsw.save(tmp_path / "a.idx", 1)
    twin.save(tmp_path / "b.idx", 1)
    ga = [p for p in os.listdir(tmp_path) if p.startswith("a.idx.") and p.endswith(".hnsw")]
    gb = [p for p in os.listdir(tmp_path) if p.startswith("b.idx.") and p.endswith(".hnsw")]
    assert (tmp_path / ga[0]).read_bytes() == (tmp_path / gb[0]).read_bytes()


def test_hnsw_incremental_updates_replace_remove_reuse():
    rng = np.random.default_rng(5)
    dim = 24
    centroids = rng.standard_normal((40, dim))
    data = clustered(rng, 600, dim, centroids, 0.3)
    ids = [f"v{i:04d}" for i in range(600)]
    idx = VectorIndex(dim, hnsw_threshold=100, seed=1)
    idx.add(ids, data)
    q = data[17].copy()
    assert idx.search(q, 1) == [("v0017", pytest.approx(1.0, abs=1e-6))]
    assert idx.graph_built
    # replace v0017's vector with a different one: the old position no longer matches
    idx.add(["v0017"], -data[17:18])
    assert idx.search(q, 1)[0][0] != "v0017"
    assert idx.search(-q, 1)[0][0] == "v0017"
    # remove, then reuse the slot for a new id with the old vector
    idx.remove(["v0017", "v0018"])
    assert all(i not in ("v0017", "v0018") for i, _ in idx.search(-q, 50))
    slot = idx.add(["fresh"], q[None, :])[0]
    assert slot == 17
    assert idx.search(q, 1)[0][0] == "fresh"


# --- model-based property tests ----------------------------------------------------------

POOL_IDS = [f"k{n:02d}" for n in range(14)]
POOL_VECS = exact_vectors(np.random.default_rng(99), 30)


class IndexModel(RuleBasedStateMachine):
    """The index against a dict id -> vector, on the exact path (threshold never reached)."""

    threshold = 10**9

    @initialize()
    def setup(self):
        self.index = VectorIndex(DIM, hnsw_threshold=self.threshold, seed=0)
        self.model: dict[str, np.ndarray] = {}

    @rule(
        batch=st.lists(
            st.tuples(st.sampled_from(POOL_IDS), st.integers(0, len(POOL_VECS) - 1)), max_size=5
        )
    )
    def add(self, batch):
        ids = [i for i, _ in batch]
        vecs = POOL_VECS[[v for _, v in batch]] if batch else np.zeros((0, DIM), np.float32)
        slots = self.index.add(ids, vecs)
        for (i, v), s in zip(batch, slots.tolist()):
            self.model[i] = POOL_VECS[v]
            assert self.index.id_at(s) == i

    @rule(ids=st.lists(st.sampled_from(POOL_IDS), max_size=4))
    def remove(self, ids):
        expected = len(set(ids) & set(self.model))
        assert self.index.remove(ids) == expected
        for i in ids:
            self.model.pop(i, None)

    @rule(
        q=st.integers(0, len(POOL_VECS) - 1),
        k=st.integers(1, 16),
        allowed=st.none() | st.sets(st.sampled_from(POOL_IDS)),
        junk_free_slots=st.booleans(),
    )
    def search(self, q, k, allowed, junk_free_slots):
        query = POOL_VECS[q]
        mask = None
        if allowed is not None:
            mask = mask_for(self.index, allowed)
            if junk_free_slots:  # mask bits on free slots must not resurrect anything
                for s in range(self.index.capacity):
                    if self.index.id_at(s) is None:
                        mask[s] = True
        got = self.index.search(query, k, mask)
        self.check(got, model_topk(self.model, query, k, allowed), allowed)
        many = self.index.search_many(
            np.stack([query, POOL_VECS[(q + 1) % len(POOL_VECS)]]), k, mask
        )
        assert many[0] == got

    def check(self, got, want, allowed):
        assert got == want

    @invariant()
    def agrees(self):
        assert len(self.index) == len(self.model)
        assert self.index.capacity >= len(self.model)
        for i, v in self.model.items():
            assert self.index.get_vector(i).tolist() == v.tolist()
            assert self.index.id_at(self.index.slot_of(i)) == i
        assert sorted(self.index.ids()) == sorted(self.model)


class HnswIndexModel(IndexModel):
    """Same operations with the HNSW path always eligible (threshold 0)."""

    threshold = 0

    def check(self, got, want, allowed):
        # Always exactly min(k, eligible) results, in order, masked, exactly scored.
        assert len(got) == len(want)
        assert got == sorted(got, key=lambda p: (-p[1], p[0]))
        for i, _ in got:
            assert i in self.model and (allowed is None or i in allowed)
        assert [s for _, s in got] == [s for _, s in want]
        # ids strictly above the k-th score are forced; ties at the k-th score may differ
        if want:
            cut = want[-1][1]
            assert [p for p in got if p[1] > cut] == [p for p in want if p[1] > cut]


TestIndexModel = IndexModel.TestCase
TestIndexModel.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHnswIndexModel = HnswIndexModel.TestCase
TestHnswIndexModel.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- persistence -----------------------------------------------------------------------------


def small_index(threshold=10**9, n=200, seed=4):
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((10, 12))
    idx = VectorIndex(12, hnsw_threshold=threshold, M=8, ef_construction=50, ef_search=40, seed=9)
    idx.add([f"s{i:03d}" for i in range(n)], clustered(rng, n, 12, centroids, 0.3))
    idx.remove(["s005", "s010"])
    return idx, clustered(rng, 10, 12, centroids, 0.3)


@pytest.mark.parametrize("with_graph", [False, True])
def test_save_load_round_trip(tmp_path, with_graph):
    idx, queries = small_index(threshold=50 if with_graph else 10**9)
    before = idx.search_many(queries, 5)
    assert idx.graph_built == with_graph
    path = tmp_path / "vec.idx"
    idx.save(path, 42)
    loaded, generation = VectorIndex.load(path, dim=12)
    assert generation == 42
    assert loaded.graph_built == with_graph
    assert (loaded.dim, len(loaded), loaded.capacity) == (12, len(idx), idx.capacity)
    assert (
        loaded.M,
        loaded.ef_construction,
        loaded.ef_search,
        loaded.seed,
        loaded.hnsw_threshold,
    ) == (
        8,
        50,
        40,
        9,
        idx.hnsw_threshold,
    )
    assert loaded.ids() == idx.ids()
    for i in idx.ids():
        assert loaded.slot_of(i) == idx.slot_of(i)
        assert loaded.get_vector(i).tolist() == idx.get_vector(i).tolist()
    assert loaded.search_many(queries, 5) == before
    # freed slots survive the round trip and are reused lowest first
    assert loaded.add(["new"], queries[:1]).tolist() == [5]
    leftovers = sorted(p for p in os.listdir(tmp_path))
    assert leftovers[0] == "vec.idx" and all(p.endswith(".hnsw") for p in leftovers[1:])
    assert len(leftovers) == (2 if with_graph else 1)


def test_graph_is_built_lazily_after_loading_a_file_without_one(tmp_path):
    idx, queries = small_index(threshold=10**9)
    idx.save(tmp_path / "v.idx", 1)
    loaded, _ = VectorIndex.load(tmp_path / "v.idx")
    loaded.hnsw_threshold = 50  # as if opened with a lower threshold
    assert not loaded.graph_built
    assert [i for i, _ in loaded.search(queries[0], 3)] == [i for i, _ in idx.search(queries[0], 3)]
    assert loaded.graph_built


def test_load_builds_a_missing_graph_above_the_threshold_unless_told_not_to(tmp_path):
    idx, queries = small_index(threshold=50)
    assert not idx.graph_built  # no search yet, so nothing built and nothing saved
    idx.save(tmp_path / "v.idx", 1)
    assert not any(p.endswith(".hnsw") for p in os.listdir(tmp_path))
    eager, _ = VectorIndex.load(tmp_path / "v.idx")
    assert eager.graph_built
    lazy, _ = VectorIndex.load(tmp_path / "v.idx", build_graph=False)
    assert not lazy.graph_built
    assert eager.search_many(queries, 4) == lazy.search_many(queries, 4)
    with pytest.raises(TypeError, match="build_graph"):
        VectorIndex.load(tmp_path / "v.idx", build_graph=1)


def _graph_files(d):
    return sorted(p for p in os.listdir(d) if p.endswith(".hnsw"))


def test_deferred_graph_is_read_on_first_need_with_the_writes_made_meanwhile(tmp_path):
    """load(defer_graph=True) checks the saved graph and reads it when a search walks it: the
    results, and those after writes made before that search, equal an eagerly loaded index's;
    a save before any search keeps the graph (with the writes) rather than dropping it."""
    idx, queries = small_index(threshold=50)
    idx.build_graph()
    idx.save(tmp_path / "v.idx", 1)
    eager, _ = VectorIndex.load(tmp_path / "v.idx")
    lazy, _ = VectorIndex.load(tmp_path / "v.idx", defer_graph=True)
    assert lazy.graph_built and lazy._graph is None  # not read yet
    added = queries[:2] + 0.01  # near the queries: they rank in the results
    for ix in (eager, lazy):  # a new id into a freed slot, a rewrite, a removal
        ix.add(["fresh", "s001"], added)
        ix.remove(["s002"])
    assert lazy._graph is None
    assert lazy.search_many(queries, 6) == eager.search_many(queries, 6)
    assert lazy._graph is not None and lazy.path_for() == "hnsw"
    # a save with the graph still on disk writes it back, writes included
    again, _ = VectorIndex.load(tmp_path / "v.idx", defer_graph=True)
    again.add(["fresh", "s001"], added)
    again.remove(["s002"])
    again.save(tmp_path / "w.idx", 2)
    assert any(p.startswith("w.idx.") for p in _graph_files(tmp_path))
    reread, _ = VectorIndex.load(tmp_path / "w.idx")
    assert reread._graph is not None and reread.search_many(queries, 6) == eager.search_many(queries, 6)


@pytest.mark.parametrize("damage", ["a flipped bit", "cut short", "missing"])
def test_deferred_graph_that_is_damaged_is_built_again(tmp_path, caplog, damage):
    """The graph file is checked when first read: a damaged one is logged and built again."""
    idx, queries = small_index(threshold=50)
    idx.build_graph()
    before = idx.search_many(queries, 5)
    idx.save(tmp_path / "v.idx", 1)
    lazy, _ = VectorIndex.load(tmp_path / "v.idx", defer_graph=True)
    (graph,) = _graph_files(tmp_path)
    data = bytearray((tmp_path / graph).read_bytes())
    if damage == "missing":
        (tmp_path / graph).unlink()
    else:
        data[len(data) // 3] ^= 0x01
        (tmp_path / graph).write_bytes(bytes(data if damage == "a flipped bit" else data[:-8]))
    with caplog.at_level("WARNING", logger="umi.index"):
        assert lazy.search_many(queries, 5) == before  # a small index builds it at once
    assert "saved HNSW graph unusable" in caplog.text
    assert lazy._graph is not None and lazy.path_for() == "hnsw"
    with pytest.raises(TypeError, match="defer_graph"):
        VectorIndex.load(tmp_path / "v.idx", defer_graph=1)


def test_resave_replaces_graph_file_and_leaves_no_temp_files(tmp_path):
    idx, _ = small_index(threshold=50)
    idx.build_graph()
    idx.save(tmp_path / "v.idx", 1)
    first = set(os.listdir(tmp_path))
    idx.add(["extra"], np.ones((1, 12), np.float32))
    idx.save(tmp_path / "v.idx", 2)
    second = set(os.listdir(tmp_path))
    assert len(first) == len(second) == 2 and first != second
    assert not any(p.startswith(".") for p in second)
    loaded, gen = VectorIndex.load(tmp_path / "v.idx")
    assert gen == 2 and "extra" in loaded


def test_load_rejects_missing_truncated_corrupt_and_wrong_dim(tmp_path):
    idx, _ = small_index(threshold=50)
    idx.build_graph()
    path = tmp_path / "v.idx"
    idx.save(path, 3)
    good = path.read_bytes()
    (graph_name,) = [p for p in os.listdir(tmp_path) if p.endswith(".hnsw")]

    with pytest.raises(IndexCacheError, match="holds 12-d vectors, expected 13-d") as err:
        VectorIndex.load(path, dim=13)
    assert isinstance(err.value, StorageError) and err.value.path == str(path)

    with pytest.raises(IndexCacheError, match="no index cache"):
        VectorIndex.load(tmp_path / "absent.idx")

    for cut in (0, 4, 12, 40, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(IndexCacheError):
            VectorIndex.load(path)

    for pos in (len(good) // 2, len(good) - 20, 30):
        corrupt = bytearray(good)
        corrupt[pos] ^= 0x40
        path.write_bytes(bytes(corrupt))
        with pytest.raises(IndexCacheError):
            VectorIndex.load(path)

    path.write_bytes(good)
    graph = tmp_path / graph_name
    graph_bytes = graph.read_bytes()
    corrupt = bytearray(graph_bytes)
    corrupt[len(corrupt) // 3] ^= 0x01
    graph.write_bytes(bytes(corrupt))
    with pytest.raises(IndexCacheError, match="checksum"):
        VectorIndex.load(path)
    graph.unlink()
    with pytest.raises(IndexCacheError, match="missing"):
        VectorIndex.load(path)
    graph.write_bytes(graph_bytes)
    assert VectorIndex.load(path)[1] == 3


def test_save_validates(tmp_path):
    idx, _ = small_index()
    with pytest.raises(ValidationError, match="generation must be"):
        idx.save(tmp_path / "v.idx", -1)
    with pytest.raises(TypeError):
        idx.save(tmp_path / "v.idx", "1")
    with pytest.raises(IndexCacheError, match="does not exist"):
        idx.save(tmp_path / "no" / "such" / "v.idx", 1)
    assert os.listdir(tmp_path) == []


def test_empty_index_round_trip(tmp_path):
    idx = VectorIndex(5)
    idx.save(tmp_path / "e.idx", 0)
    loaded, gen = VectorIndex.load(tmp_path / "e.idx", dim=5)
    assert (len(loaded), loaded.capacity, gen) == (0, 0, 0)
    assert loaded.search(np.ones(5, np.float32), 3) == []


def test_graph_build_reads_the_stored_vectors_without_copying_them():
    """A 1M-row build must not hold a second 1.5 GB copy of the vectors: with no removed slot
    the graph is built from a view (numpy copies show in tracemalloc, hnswlib's own memory not)."""
    import tracemalloc

    rng = np.random.default_rng(11)
    data = exact_vectors(rng, 6_000, 64)
    ids = [f"v{i:05d}" for i in range(6_000)]
    idx = VectorIndex(64, hnsw_threshold=100, seed=1)
    idx.add(ids, data)
    tracemalloc.start()
    try:
        idx.build_graph()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < data.nbytes // 4
    assert idx.search(data[123], 1)[0][0] == "v00123"
    # with a removed slot the live rows are gathered (a copy), and the graph still leaves it out
    idx.remove(["v00123"])
    idx._graph = None
    idx.build_graph()
    assert idx.search(data[123], 1)[0][0] != "v00123"
    assert idx.search(data[124], 1)[0][0] == "v00124"


def test_bulk_add_normalises_in_chunks_same_bits_bounded_memory():
    """Adding 65k rows at once (an index rebuilt from a store) gives the bits of the one-shot
    float64 formula, reports a bad row by its position in the whole matrix, and holds no float64
    copy of the whole matrix (two of them were 6 GB at 1M x 384)."""
    import tracemalloc

    from umi.index import _NORMALISE_CHUNK_ROWS, _UNIT_TOLERANCE

    rng = np.random.default_rng(3)
    n = 8 * _NORMALISE_CHUNK_ROWS + 123
    raw = (rng.standard_normal((n, 64)) * 3).astype(np.float32)
    raw[5] /= np.linalg.norm(raw[5])  # an already-unit row is kept bit for bit
    v64 = raw.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", v64, v64))
    want = (v64 / np.where(np.abs(norms - 1.0) <= _UNIT_TOLERANCE, 1.0, norms)[:, None]).astype(np.float32)
    idx = VectorIndex(64, hnsw_threshold=10**9)
    ids = [f"r{i}" for i in range(n)]
    tracemalloc.start()
    try:
        idx.add(ids, raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    got = np.stack([idx.get_vector(f"r{i}") for i in (0, 5, n // 2, n - 1)])
    assert np.array_equal(got, want[[0, 5, n // 2, n - 1]])
    assert peak < 3 * n * 64 * 4  # the index's matrix + the normalised rows, no float64 copy of all
    bad = raw.copy()
    bad[_NORMALISE_CHUNK_ROWS + 7, 3] = np.nan
    with pytest.raises(ValidationError, match=f"row {_NORMALISE_CHUNK_ROWS + 7} "):
        VectorIndex(64).add(ids, bad)


def test_atomic_write_replaces_the_file_whole_or_leaves_the_old_one(tmp_path: Path) -> None:
    """The one write-temp / fsync / replace sequence (index file, keyword cache, Lance state,
    export): a writer failing half-way leaves the old file and no temp file beside it."""
    from umi._index_file import atomic_write

    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def half(f: Any) -> None:
        f.write(b"new, half of it")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    atomic_write(target, lambda f: f.write("né\n"), text=True)
    assert target.read_bytes() == "né\n".encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
