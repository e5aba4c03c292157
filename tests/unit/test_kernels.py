"""umi.kernels: exact top-k against the numpy reference, masks, ties, limits, batch."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from umi import kernels
from umi.errors import InvalidLimitError, ValidationError

DIM = 16


def exact_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """Unit vectors whose dot products are exact in float32 (so any summation order agrees).

    Each row has 1, 4 or 16 entries of +-1 and is divided by 1, 2 or 4: every entry
    and every partial sum of products is a small multiple of 1/16. Many rows share a
    score, which exercises the tie rules.
    """
    out = np.zeros((n, dim), np.float32)
    for r in range(n):
        nnz = int(rng.choice([1, 4, 16]))
        cols = rng.choice(dim, size=nnz, replace=False)
        out[r, cols] = rng.choice([-1.0, 1.0], size=nnz)
        out[r] /= np.sqrt(nnz)
    return out


def gaussian_unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def select_reference(scores: np.ndarray, k: int, eligible: np.ndarray):
    """Plain selection over given scores: score descending, then row ascending."""
    rows = np.flatnonzero(eligible)
    order = np.lexsort((rows, -scores[rows]))[:k]
    return rows[order], scores[rows][order]


@pytest.fixture(params=["serial", "parallel"])
def path(request, monkeypatch):
    """Run each test on the one-thread kernel and on the prange kernel."""
    monkeypatch.setattr(kernels, "PARALLEL_MIN_FLOATS", 1 << 40 if request.param == "serial" else 0)
    monkeypatch.setattr(kernels, "THREADS", "all")
    return request.param


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (50, 10), (50, 50), (50, 80), (300, 25)])
def test_topk_equals_reference_exactly_on_exact_data(path, n, k):
    rng = np.random.default_rng(n * 1000 + k)
    vecs = exact_vectors(rng, n)
    q = exact_vectors(rng, 1)[0]
    for mask in (None, rng.random(n) < 0.4):
        rows, scores = kernels.topk(vecs, q, k, mask)
        ref_rows, ref_scores = kernels.topk_reference(vecs, q, k, mask)
        assert rows.dtype == np.int64 and scores.dtype == np.float32
        assert rows.tolist() == ref_rows.tolist()
        assert scores.tolist() == ref_scores.tolist()
        eligible = n if mask is None else int(mask.sum())
        assert len(rows) == min(k, eligible)


def test_ties_break_by_lowest_row(path):
    vecs = np.tile(np.eye(4, dtype=np.float32)[0], (10, 1))  # ten identical rows
    vecs[3] = np.eye(4, dtype=np.float32)[1]
    rows, scores = kernels.topk(vecs, np.eye(4, dtype=np.float32)[0], 4)
    assert rows.tolist() == [0, 1, 2, 4]
    assert scores.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_topk_on_gaussian_data_matches_selection_over_its_own_scores(path):
    rng = np.random.default_rng(7)
    vecs = gaussian_unit(rng, 3000, 96)
    q = gaussian_unit(rng, 1, 96)[0]
    all_scores = kernels.dot_rows(vecs, q, np.arange(3000))
    # the fused arithmetic agrees with numpy's dot to float32 rounding
    np.testing.assert_allclose(all_scores, vecs @ q, rtol=0, atol=2e-6)
    mask = rng.random(3000) < 0.5
    for m in (None, mask):
        elig = np.ones(3000, bool) if m is None else m
        for k in (1, 10, 100, 3000):
            rows, scores = kernels.topk(vecs, q, k, m)
            ref_rows, ref_scores = select_reference(all_scores, k, elig)
            assert rows.tolist() == ref_rows.tolist()
            assert scores.tolist() == ref_scores.tolist()
            _, ref2_scores = kernels.topk_reference(vecs, q, k, m)
            np.testing.assert_allclose(scores, ref2_scores, atol=2e-6)


def test_valid_and_mask_are_combined(path):
    rng = np.random.default_rng(3)
    vecs = exact_vectors(rng, 40)
    q = vecs[5].copy()
    valid = np.ones(40, bool)
    valid[5] = False
    mask = np.zeros(45, bool)  # longer than n is allowed: the tail is ignored
    mask[:20] = True
    rows, _ = kernels.topk(vecs, q, 40, mask, valid=valid)
    assert set(rows.tolist()) == set(range(20)) - {5}
    ref_rows, _ = kernels.topk_reference(vecs, q, 40, mask, valid=valid)
    assert rows.tolist() == ref_rows.tolist()


def test_nothing_eligible_and_empty_input(path):
    rng = np.random.default_rng(4)
    vecs = exact_vectors(rng, 10)
    rows, scores = kernels.topk(vecs, vecs[0], 5, np.zeros(10, bool))
    assert rows.shape == (0,) and scores.shape == (0,)
    rows, scores = kernels.topk(np.zeros((0, DIM), np.float32), vecs[0], 5)
    assert rows.shape == (0,) and scores.shape == (0,)
    rows, scores = kernels.topk_many(np.zeros((0, DIM), np.float32), vecs[:2], 5)
    assert rows.shape == (2, 0)


@pytest.mark.parametrize("k", [0, -1, kernels.TOPK_K_MAX + 1])
def test_k_out_of_range_is_rejected(k):
    vecs = np.eye(4, dtype=np.float32)
    with pytest.raises(InvalidLimitError) as err:
        kernels.topk(vecs, vecs[0], k)
    assert err.value.limit == (1, kernels.TOPK_K_MAX)
    assert str(kernels.TOPK_K_MAX) in str(err.value)
    with pytest.raises(InvalidLimitError):
        kernels.topk_many(vecs, vecs[:1], k)


def test_wrong_types_and_shapes():
    vecs = np.eye(4, dtype=np.float32)
    with pytest.raises(TypeError, match="k must be an int"):
        kernels.topk(vecs, vecs[0], True)
    with pytest.raises(TypeError, match="float32"):
        kernels.topk(vecs.astype(np.float64), vecs[0], 1)
    with pytest.raises(TypeError, match="float32"):
        kernels.topk(vecs, vecs[0].astype(np.float64), 1)
    with pytest.raises(TypeError, match="numpy array"):
        kernels.topk(vecs.tolist(), vecs[0], 1)
    with pytest.raises(ValidationError, match=r"shape \(4,\)"):
        kernels.topk(vecs, np.ones(5, np.float32), 1)
    with pytest.raises(ValidationError, match="2-D"):
        kernels.topk(vecs[0], vecs[0], 1)
    with pytest.raises(TypeError, match="bool"):
        kernels.topk(vecs, vecs[0], 1, np.ones(4, np.uint8))
    with pytest.raises(ValidationError, match="length >= 4"):
        kernels.topk(vecs, vecs[0], 1, np.ones(3, bool))
    with pytest.raises(ValidationError, match=r"rows must be in \[0, 4\)"):
        kernels.dot_rows(vecs, vecs[0], np.array([4]))


def test_non_contiguous_input_is_accepted(path):
    rng = np.random.default_rng(5)
    big = exact_vectors(rng, 60)
    vecs = big[::2]  # strided view
    rows, scores = kernels.topk(vecs, big[0], 5)
    ref_rows, ref_scores = kernels.topk_reference(np.ascontiguousarray(vecs), big[0], 5)
    assert rows.tolist() == ref_rows.tolist() and scores.tolist() == ref_scores.tolist()


def test_topk_many_agrees_with_topk(path):
    rng = np.random.default_rng(6)
    vecs = gaussian_unit(rng, 2000, 48)
    six = gaussian_unit(rng, 6, 48)  # a group of four and a pair; three: a pair and a single
    mask = rng.random(2000) < 0.3
    for m, queries in ((None, six), (mask, six), (None, six[:3]), (mask, six[:3])):
        rows, scores = kernels.topk_many(vecs, queries, 12, m)
        assert rows.shape == (len(queries), 12) and scores.shape == (len(queries), 12)
        for i, q in enumerate(queries):
            r1, s1 = kernels.topk(vecs, q, 12, m)
            np.testing.assert_allclose(scores[i], s1, rtol=0, atol=48 * 2.0**-24)
            # rows agree except where two scores are within rounding of each other
            close = np.abs(s1[:, None] - s1[None, :]) <= 48 * 2.0**-23
            differ = rows[i] != r1
            assert not differ.any() or all(
                close[j].sum() > 1 or j == 11 for j in np.flatnonzero(differ)
            )
    rows, _ = kernels.topk_many(vecs, six[:0], 3)
    assert rows.shape == (0, 3)


def test_topk_many_equals_reference_on_exact_data(path):
    rng = np.random.default_rng(12)
    vecs = exact_vectors(rng, 200)
    queries = exact_vectors(rng, 9)
    mask = rng.random(200) < 0.5
    for m in (None, mask):
        rows, scores = kernels.topk_many(vecs, queries, 15, m)
        for i, q in enumerate(queries):
            ref_rows, ref_scores = kernels.topk_reference(vecs, q, 15, m)
            assert rows[i].tolist() == ref_rows.tolist()
            assert scores[i].tolist() == ref_scores.tolist()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 120),
    k=st.integers(1, 130),
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0.0, 1.0),
    parallel=st.booleans(),
)
def test_property_topk_matches_reference(n, k, seed, density, parallel):
    rng = np.random.default_rng(seed)
    vecs = exact_vectors(rng, n)
    q = exact_vectors(rng, 1)[0]
    mask = rng.random(n) < density
    old = kernels.PARALLEL_MIN_FLOATS, kernels.THREADS
    kernels.PARALLEL_MIN_FLOATS = 0 if parallel else 1 << 40
    kernels.THREADS = "all"
    try:
        rows, scores = kernels.topk(vecs, q, k, mask)
        many_rows, many_scores = kernels.topk_many(vecs, np.stack([q] * 5), k, mask)
    finally:
        kernels.PARALLEL_MIN_FLOATS, kernels.THREADS = old
    ref_rows, ref_scores = kernels.topk_reference(vecs, q, k, mask)
    assert rows.tolist() == ref_rows.tolist()
    assert scores.tolist() == ref_scores.tolist()
    assert all(r.tolist() == ref_rows.tolist() for r in many_rows)
    assert all(s.tolist() == ref_scores.tolist() for s in many_scores)


def test_thread_choice_follows_measured_cost(monkeypatch):
    monkeypatch.setattr(kernels, "THREADS", "auto")
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: 2)
    t = kernels._Threads()
    big = kernels.PARALLEL_MIN_FLOATS
    assert t.blocks(big - 1, 10_000) == 1  # small scans never go parallel
    assert t.blocks(big, 10_000) == 1  # first measure one thread ...
    t.record(1, big, 2.0)
    assert t.blocks(big, 10_000) == 2  # ... then all threads
    t.record(2, big, 1.0)
    picks = [t.blocks(big, 10_000) for _ in range(2 * t.PROBE_EVERY)]
    assert picks.count(1) == 2 and picks.count(2) == 2 * t.PROBE_EVERY - 2  # probes only
    for _ in range(20):  # the parallel scan gets slow (busy cores): one thread takes over
        t.record(2, big, 5.0)
    assert t.blocks(big, 10_000) == 1 or t.calls % t.PROBE_EVERY == 0
    assert t.blocks(big, 1) == 1  # never more blocks than rows
    monkeypatch.setattr(kernels, "THREADS", "all")
    assert t.blocks(big, 10_000) == 2
    monkeypatch.setattr(kernels, "THREADS", "one")
    assert t.blocks(big, 10_000) == 1
