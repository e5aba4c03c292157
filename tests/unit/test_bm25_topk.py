"""Keyword top-k with an early exit answers exactly what scoring every posting answers.

The store's BM25 top-k admits only rows that can still reach the k-th best score
(umi.storage._bm25) and breaks ties at the k-th by an id-order key column
(umi.storage._hotcache.id_order_keys). Both are held here against the exhaustive scorer:
same rows, same order, the same score bits — on small vocabularies (common words, many
tied documents), with filters, rewritten and forgotten documents, and ids that share long
prefixes (equal keys).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from umi.storage import filters as F
from umi.storage import _bm25 as K
from umi.storage._bm25 import top_by_score_then_key
from umi.storage._hotcache import id_order_keys
from umi.storage.base import SearchFilters
from umi.storage.sim import SimStorageBackend
from umi.storage.text import BM25_B, BM25_K1, query_terms
from umi.types import Entity


# The kernels called directly, as PostingsIndex.scorer calls them (term ranges of one CSR block)
_NO_SEEN = np.zeros((0, 3), np.float64)


def bm25_candidates(rows: np.ndarray, tfs: np.ndarray, term_ptr: np.ndarray, idfs: np.ndarray,
                    doc_len: np.ndarray, avgdl: float, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of every row in ``mask`` holding at least one query term: the exhaustive kernel."""
    return K._njit(K._bm25)(rows, tfs, term_ptr[:-1], term_ptr[1:], idfs, doc_len, float(avgdl), mask,
                            mask.shape[0], BM25_K1, BM25_B)


def bm25_top_candidates(rows: np.ndarray, tfs: np.ndarray, term_ptr: np.ndarray, idfs: np.ndarray,
                        doc_len: np.ndarray, avgdl: float, mask: np.ndarray, slot: np.ndarray,
                        k: int) -> tuple[np.ndarray, np.ndarray]:
    """The term-at-a-time kernel: rows in ``mask`` holding a query term, including every row whose
    score reaches the k-th best (ties included). ``slot``: int64 scratch, ``-1`` for every row."""
    return K._njit(K._bm25_pruned, K._term_bound)(rows, tfs, term_ptr[:-1], term_ptr[1:], idfs, doc_len,
                                                  float(avgdl), mask, slot, int(k), BM25_K1, BM25_B, _NO_SEEN,
                                                  np.full(idfs.shape[0], -1, np.int64))


def bm25_maxscore(rows: np.ndarray, tfs: np.ndarray, term_ptr: np.ndarray, idfs: np.ndarray,
                  doc_len: np.ndarray, avgdl: float, mask: np.ndarray, k: int,
                  keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The MaxScore kernel (None when a term's rows do not ascend). With ``keys`` (row -> tie-break
    key): only the k best by (score, key) and the rows equal to the k-th in both."""
    ok, got_rows, got_scores = K._njit(K._bm25_maxscore, K._select, K._term_bound)(
        rows, tfs, term_ptr[:-1], term_ptr[1:], idfs, doc_len, float(avgdl), mask, max(int(k), 1), BM25_K1, BM25_B,
        _NO_SEEN, np.full(idfs.shape[0], -1, np.int64), K._NO_KEYS if keys is None else keys)
    return (got_rows, got_scores) if ok else None

WORDS = ["acme", "corp", "works", "berlin", "chess", "violin", "engineer", "paris", "rare", "unique"]


def exhaustive(store: SimStorageBackend, query: str, k: int, filters: SearchFilters | None) -> list[tuple[str, float]]:
    """Every row holding a query term scored (the kernel without early exit), sorted by score then id."""
    c = store._cache
    terms = query_terms(query)
    nf = F.normalise(filters)
    if not terms or nf.empty or c._n_alive == 0:
        return []
    rows, scores = c._postings.score(terms, c._n_alive, c._total_len / c._n_alive, c._doc_len[: c._n],
                                     c.row_mask(nf))
    ranked = sorted(((c._row_ids[int(r)], float(s)) for r, s in zip(rows, scores)), key=lambda t: (-t[1], t[0]))
    return ranked[:k]


docs = st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(docs=docs, query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
       k=st.integers(1, 12), prefix_len=st.integers(0, 12), rewrite=st.integers(0, 5),
       forget=st.integers(0, 5), only_notes=st.booleans(), data=st.data())
def test_store_top_k_equals_the_exhaustive_ranking(docs: list[list[str]], query: list[str], k: int,
                                                   prefix_len: int, rewrite: int, forget: int,
                                                   only_notes: bool, data: st.DataObject) -> None:
    store = SimStorageBackend(seed=0)
    # ids sharing their first `prefix_len` characters (past 8, their order keys are all equal), in an
    # order unrelated to the order they are stored in
    order = data.draw(st.permutations(range(len(docs))))
    ents = [Entity("note" if i % 2 else "person", f"n{i}", " ".join(words), id=f"{'x' * prefix_len}{order[i]:03d}")
            for i, words in enumerate(docs)]
    store.upsert(ents)
    q = " ".join(query)
    # a first search keeps each term's bound inputs (largest tf, shortest row): the changes below
    # must not leave them stale
    assert store.search_text(q, k) == exhaustive(store, q, k, None)
    for i in range(min(rewrite, len(ents))):  # changed terms: their postings leave the bulk arrays
        e = ents[data.draw(st.integers(0, len(ents) - 1))]
        store.upsert([Entity(e.entity_type, e.name, " ".join(data.draw(st.lists(st.sampled_from(WORDS), min_size=1,
                                                                                max_size=6))), id=e.id)])
    for _ in range(min(forget, len(ents) - 1)):
        store.delete(ents[data.draw(st.integers(0, len(ents) - 1))].id)
    filters = SearchFilters(entity_types=["note"]) if only_notes else None
    got = store.search_text(q, k, filters)
    assert got == exhaustive(store, q, k, filters)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_pruned_kernel_keeps_every_row_that_can_rank_and_its_exact_score(data: st.DataObject) -> None:
    n_rows = data.draw(st.integers(1, 80))
    n_terms = data.draw(st.integers(1, 5))
    rows_l, tfs_l, ptr = [], [], [0]
    for _ in range(n_terms):
        rows = sorted(data.draw(st.sets(st.integers(0, n_rows - 1), max_size=n_rows)))
        rows_l += rows
        tfs_l += [float(data.draw(st.integers(1, 4))) for _ in rows]
        ptr.append(len(rows_l))
    rows = np.array(rows_l, np.int64)
    tfs = np.array(tfs_l, np.float64)
    term_ptr = np.array(ptr, np.int64)
    idfs = np.array([data.draw(st.floats(0.0, 5.0)) for _ in range(n_terms)], np.float64)
    doc_len = np.array([float(data.draw(st.integers(1, 9))) for _ in range(n_rows)], np.float64)
    avgdl = float(doc_len.mean())
    mask = np.array([data.draw(st.booleans()) or i % 3 == 0 for i in range(n_rows)], np.bool_)
    k = data.draw(st.integers(1, 10))
    slot = np.full(n_rows, -1, np.int64)
    slot[: n_rows // 2] = data.draw(st.integers(-1, 3 * n_rows))  # stale scratch entries are harmless
    all_rows, all_scores = bm25_candidates(rows, tfs, term_ptr, idfs, doc_len, avgdl, mask)
    got_rows, got_scores = bm25_top_candidates(rows, tfs, term_ptr, idfs, doc_len, avgdl, mask, slot, k)
    full = dict(zip(all_rows.tolist(), all_scores.tolist()))
    got = dict(zip(got_rows.tolist(), got_scores.tolist()))
    assert len(got) == got_rows.shape[0]  # no row twice
    assert all(full[r] == s for r, s in got.items())  # the same bits, and only rows the full scorer has
    if all_scores.shape[0]:
        kth = np.sort(all_scores)[::-1][min(k, all_scores.shape[0]) - 1]
        assert {r for r, s in full.items() if s >= kth} <= set(got)  # everything that ranks or ties


def test_pruning_keeps_a_row_of_a_later_term_that_outscores_the_kth() -> None:
    # 'a' has the highest bound (row 0: tf 4, short), so it is taken first and admits rows 0 and 1;
    # row 1's partial score (1.39) is the 2nd best then, below what 'b' alone gives row 2 (1.92)
    rows = np.array([0, 1, 2], np.int64)
    tfs = np.array([4.0, 1.0, 1.0])
    term_ptr = np.array([0, 2, 3], np.int64)
    idfs = np.array([2.0, 1.5])
    doc_len = np.array([2.0, 9.0, 2.0])
    mask = np.ones(3, np.bool_)
    got_rows, got_scores = bm25_top_candidates(rows, tfs, term_ptr, idfs, doc_len, float(doc_len.mean()), mask,
                                               np.full(3, -1, np.int64), 2)
    all_rows, all_scores = bm25_candidates(rows, tfs, term_ptr, idfs, doc_len, float(doc_len.mean()), mask)
    assert dict(zip(got_rows.tolist(), got_scores.tolist())) == dict(zip(all_rows.tolist(), all_scores.tolist()))


def test_bulk_loaded_term_bounds_are_found_again_after_a_reload() -> None:
    # a top-k query keeps each bulk-loaded term's largest tf and shortest row; postings loaded again
    # must not be pruned with the old ones. 'a' (11 rows, idf just below 'b''s) first holds long rows
    # only; reloaded, it holds row 20, short with tf 5, the best row by far. With the old bound 'a'
    # would come after 'b' and look unable to lift a new row past the k-th: row 20 left out.
    from umi.storage._bm25 import PostingsIndex

    idx = PostingsIndex()
    doc_len = np.full(21, 50.0)
    mask = np.ones(21, np.bool_)
    b_rows = list(range(10))
    idx.load(["a", "b"], np.array([0, 11, 21]), np.array([*range(10, 20), 0, *b_rows]), np.ones(21))
    idx.score(["b", "a"], 1000, 50.0, doc_len, mask, 2)  # keeps the bounds' inputs
    doc_len[20] = 1.0
    idx.load(["a", "b"], np.array([0, 11, 21]), np.array([*range(10, 21), *b_rows]), np.array([1.0] * 10 + [5.0] + [1.0] * 10))
    rows, scores = idx.score(["b", "a"], 1000, 50.0, doc_len, mask, 2)
    all_rows, all_scores = idx.score(["b", "a"], 1000, 50.0, doc_len, mask)
    assert all_rows[np.argmax(all_scores)] == 20
    assert 20 in rows.tolist()


def test_changed_term_bounds_are_found_again() -> None:
    # the same story with postings changed one document at a time (a term's dict form)
    from umi.storage._bm25 import PostingsIndex

    idx = PostingsIndex()
    doc_len = np.full(21, 50.0)
    mask = np.ones(21, np.bool_)
    for r in range(10):
        idx.add_doc(r, {"b": 1})
    for r in range(10, 20):
        idx.add_doc(r, {"a": 1})
    idx.add_doc(20, {"c": 1})
    idx.score(["b", "a"], 1000, 50.0, doc_len, mask, 2)  # keeps the bounds' inputs
    idx.remove_doc(20, ["c"])
    idx.add_doc(20, {"a": 5})
    doc_len[20] = 1.0
    rows, _ = idx.score(["b", "a"], 1000, 50.0, doc_len, mask, 2)
    assert 20 in rows.tolist()


def test_pruning_skips_rows_that_cannot_rank() -> None:
    # 'rare' decides the top 2; 'common' is held by every row and cannot lift a row without 'rare'
    n = 50
    rare = [3, 7, 11]
    rows = np.array(rare + list(range(n)), np.int64)
    tfs = np.ones(rows.shape[0], np.float64)
    term_ptr = np.array([0, len(rare), rows.shape[0]], np.int64)
    idfs = np.array([3.0, 0.05])
    doc_len = np.full(n, 5.0)
    mask = np.ones(n, np.bool_)
    slot = np.full(n, -1, np.int64)
    got_rows, _ = bm25_top_candidates(rows, tfs, term_ptr, idfs, doc_len, 5.0, mask, slot, 2)
    assert sorted(got_rows.tolist()) == rare
    all_rows, _ = bm25_candidates(rows, tfs, term_ptr, idfs, doc_len, 5.0, mask)
    assert all_rows.shape[0] == n


@given(st.lists(st.text(min_size=0, max_size=12), min_size=2, max_size=30))
def test_id_order_keys_never_contradict_string_order(ids: list[str]) -> None:
    keys = id_order_keys(ids).tolist()
    for a, ka in zip(ids, keys):
        for b, kb in zip(ids, keys):
            if ka < kb:
                assert a < b


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6)), min_size=0, max_size=40), st.integers(1, 12))
def test_selection_by_score_then_key_holds_the_k_best_and_every_boundary_twin(pairs: list[tuple[int, int]],
                                                                             k: int) -> None:
    scores = np.array([float(s) for s, _ in pairs], np.float64)
    keys = np.array([key for _, key in pairs], np.uint64)
    got = sorted(top_by_score_then_key(scores, keys, k).tolist())
    order = sorted(range(len(pairs)), key=lambda i: (-pairs[i][0], pairs[i][1]))
    if len(pairs) <= k:
        assert got == list(range(len(pairs)))
        return
    kth = pairs[order[k - 1]]
    # the k best, and everything equal to the k-th in both score and key (ids decide among those)
    assert got == sorted(i for i in range(len(pairs)) if (-pairs[i][0], pairs[i][1]) <= (-kth[0], kth[1]))


def test_the_pruned_kernels_cell_limit_changes_no_answer(monkeypatch) -> None:
    from umi.storage import _bm25

    store = SimStorageBackend(seed=0)
    store.upsert([Entity("note", f"n{i}", " ".join(WORDS[j] for j in range(i % 7 + 1)), id=f"id{(i * 37) % 101:03d}")
                  for i in range(60)])
    query = "acme corp works berlin chess"
    pruned = store.search_text(query, 5)
    monkeypatch.setattr(_bm25, "PRUNED_CELLS_MAX", 1)
    assert store.search_text(query, 5) == pruned == exhaustive(store, query, 5, None)


def _random_postings(data: st.DataObject, ascending: bool = True):  # type: ignore[no-untyped-def]
    n_rows = data.draw(st.integers(1, 80))
    n_terms = data.draw(st.integers(1, 5))
    rows_l, tfs_l, ptr = [], [], [0]
    for _ in range(n_terms):
        rows = sorted(data.draw(st.sets(st.integers(0, n_rows - 1), max_size=n_rows)))
        if not ascending:
            rows = data.draw(st.permutations(rows))
        rows_l += rows
        tfs_l += [float(data.draw(st.integers(1, 4))) for _ in rows]
        ptr.append(len(rows_l))
    idfs = np.array([data.draw(st.floats(0.0, 5.0)) for _ in range(n_terms)], np.float64)
    # few lengths and tfs: many rows tie, at the k-th too
    doc_len = np.array([float(data.draw(st.integers(1, 9))) for _ in range(n_rows)], np.float64)
    mask = np.array([data.draw(st.booleans()) or i % 3 == 0 for i in range(n_rows)], np.bool_)
    return (np.array(rows_l, np.int64), np.array(tfs_l, np.float64), np.array(ptr, np.int64), idfs, doc_len,
            float(doc_len.mean()), mask)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_maxscore_kernel_keeps_every_row_that_can_rank_and_its_exact_score(data: st.DataObject) -> None:

    rows, tfs, term_ptr, idfs, doc_len, avgdl, mask = _random_postings(data)
    k = data.draw(st.integers(1, 10))
    all_rows, all_scores = bm25_candidates(rows, tfs, term_ptr, idfs, doc_len, avgdl, mask)
    got = bm25_maxscore(rows, tfs, term_ptr, idfs, doc_len, avgdl, mask, k)
    assert got is not None
    full = dict(zip(all_rows.tolist(), all_scores.tolist()))
    kept = dict(zip(got[0].tolist(), got[1].tolist()))
    assert len(kept) == got[0].shape[0]  # no row twice
    assert all(full[r] == s for r, s in kept.items())  # the same bits, and only rows the full scorer has
    if all_scores.shape[0]:
        kth = np.sort(all_scores)[::-1][min(k, all_scores.shape[0]) - 1]
        assert {r for r, s in full.items() if s >= kth} <= set(kept)  # everything that ranks or ties
    # with the tie-break keys: exactly what the selection by (score, key) keeps of the full answer
    keys = np.array([data.draw(st.integers(0, 5)) for _ in range(mask.shape[0])], np.uint64)
    got_rows, got_scores = bm25_maxscore(rows, tfs, term_ptr, idfs, doc_len, avgdl, mask, k, keys)
    sel = top_by_score_then_key(all_scores, keys[all_rows], k)
    want = sorted(zip(all_rows[sel].tolist(), all_scores[sel].tolist()))
    assert sorted(zip(got_rows.tolist(), got_scores.tolist())) == want


@pytest.mark.parametrize("k", [1, 30, 5000])
def test_maxscore_on_long_postings_of_tied_rows_keeps_the_k_best_by_score_then_key(k: int) -> None:
    # bench_bm25's shape at a small scale: long postings (far past the kernel's prefetch distance,
    # up to the last row), two lengths and tf 1 or 2, so thousands of rows tie at the k-th score and
    # the keys decide; keys in no order of the rows, some equal; a mask leaving rows out; k above
    # the rows that hold a term too

    rng = np.random.default_rng(7)
    n = 6000
    doc_len = rng.choice([5.0, 6.0], n)
    mask = rng.random(n) > 0.2
    keys = rng.integers(0, 60, n).astype(np.uint64)  # many equal: twins of the k-th kept too
    rows_l, tfs_l, ptr = [], [], [0]
    for share in (0.5, 0.1, 0.02):
        rows = np.flatnonzero(rng.random(n) < share)
        rows = np.append(rows[rows != n - 1], n - 1)
        rows_l.append(rows)
        tfs_l.append(rng.choice([1.0, 1.0, 1.0, 2.0], rows.shape[0]))
        ptr.append(ptr[-1] + rows.shape[0])
    rows, tfs, term_ptr = np.concatenate(rows_l), np.concatenate(tfs_l), np.array(ptr, np.int64)
    idfs = np.array([0.7, 2.3, 3.9])
    avgdl = float(doc_len.mean())
    for at in ([0, 1, 2], [2, 0], [0], [1, 2]):
        sub_rows = np.concatenate([rows[term_ptr[t]:term_ptr[t + 1]] for t in at])
        sub_tfs = np.concatenate([tfs[term_ptr[t]:term_ptr[t + 1]] for t in at])
        sub_ptr = np.zeros(len(at) + 1, np.int64)
        np.cumsum([term_ptr[t + 1] - term_ptr[t] for t in at], out=sub_ptr[1:])
        a_rows, a_scores = bm25_candidates(sub_rows, sub_tfs, sub_ptr, idfs[at], doc_len, avgdl, mask)
        sel = top_by_score_then_key(a_scores, keys[a_rows], k)
        want = sorted(zip(a_rows[sel].tolist(), a_scores[sel].tolist()))
        got_rows, got_scores = bm25_maxscore(sub_rows, sub_tfs, sub_ptr, idfs[at], doc_len, avgdl, mask, k,
                                             keys)
        assert sorted(zip(got_rows.tolist(), got_scores.tolist())) == want
        assert len(want) >= min(k, a_rows.shape[0])


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_maxscore_declines_a_term_whose_rows_do_not_ascend(data: st.DataObject) -> None:

    rows, tfs, term_ptr, idfs, doc_len, avgdl, mask = _random_postings(data, ascending=False)
    got = bm25_maxscore(rows, tfs, term_ptr, idfs, doc_len, avgdl, mask, 3)
    ascending = all(bool((np.diff(rows[a:b]) > 0).all()) for a, b in zip(term_ptr[:-1], term_ptr[1:]))
    assert (got is not None) == ascending


def _check_top_k_and_reference(idx: PostingsIndex, held: dict[int, dict[str, int]], n: int, terms: list[str],
                               keys: np.ndarray, k: int) -> None:
    """The top-k kernel's answer equals the exhaustive kernel's best k (score, then key), and the
    exhaustive kernel equals the reference formula over the documents themselves."""
    from umi.storage.text import bm25_idf, bm25_term_score
    doc_len = np.array([float(sum(held.get(r, {}).values())) for r in range(n)])
    mask = np.array([r in held and r % 5 != 1 for r in range(n)], np.bool_)
    live = max(len(held), 1)
    avgdl = float(doc_len.sum()) / live
    all_rows, all_scores = idx.score(terms, live, avgdl, doc_len, mask)
    want_sel = top_by_score_then_key(all_scores, keys[all_rows], k)
    want = sorted(zip(all_rows[want_sel].tolist(), all_scores[want_sel].tolist()))
    got_rows, got_scores = idx.score(terms, live, avgdl, doc_len, mask, k, keys)
    sel = top_by_score_then_key(got_scores, keys[got_rows], k)
    assert sorted(zip(got_rows[sel].tolist(), got_scores[sel].tolist())) == want
    df = {t: sum(1 for d in held.values() if t in d) for t in terms}
    expect = {}
    for r, d in held.items():
        if mask[r] and any(t in d for t in terms):
            acc = 0.0
            for t in terms:
                if t in d:
                    acc += bm25_term_score(d[t], int(doc_len[r]), avgdl, bm25_idf(live, df[t]))
            expect[r] = acc
    assert dict(zip(all_rows.tolist(), all_scores.tolist())) == expect



@settings(max_examples=60, deadline=None)
@given(docs=docs, edits=st.lists(st.tuples(st.integers(0, 59), st.lists(st.sampled_from(WORDS), max_size=6)),
                                 max_size=25),
       query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4), k=st.integers(1, 12),
       scrambled=st.booleans(), fold_often=st.booleans(), data=st.data())
def test_postings_written_in_session_folded_or_not_rank_as_the_exhaustive_scorer(
        docs: list[list[str]], edits: list[tuple[int, list[str]]], query: list[str], k: int, scrambled: bool,
        fold_often: bool, data: st.DataObject) -> None:
    # documents written one at a time (rows out of order when scrambled), rewritten (a row taken out
    # and put back: its dict entry moves to the end), forgotten; a query between edits folds the
    # changed postings back into the CSR block (fold_often) or reads them as dicts; and a bulk
    # load of rows that do not ascend (the term-at-a-time path). Every answer: the exhaustive one.
    from umi.storage import _bm25

    with pytest.MonkeyPatch.context() as mp:
        if fold_often:
            mp.setattr(_bm25, "FOLD_MIN", 0)
            mp.setattr(_bm25, "FOLD_SHARE", 0.0)
        _in_session(docs, edits, query, k, scrambled, data)


def _in_session(docs: list[list[str]], edits: list[tuple[int, list[str]]], query: list[str], k: int,
                scrambled: bool, data: st.DataObject) -> None:
    from umi.storage._bm25 import PostingsIndex
    from umi.storage.text import term_frequencies

    n = len(docs)
    held: dict[int, dict[str, int]] = {}
    idx = PostingsIndex()
    order = data.draw(st.permutations(range(n))) if scrambled else list(range(n))
    for r in order:
        held[r] = term_frequencies(" ".join(docs[r]))
        idx.add_doc(r, held[r])
    keys = np.array([data.draw(st.integers(0, 3)) for _ in range(n)], np.uint64)
    terms = list(dict.fromkeys(query))

    def check() -> None:
        _check_top_k_and_reference(idx, held, n, terms, keys, k)

    check()
    for row, words in edits:
        if row >= n:
            continue
        if row in held:
            idx.remove_doc(row, list(held.pop(row)))
        if words:
            held[row] = term_frequencies(" ".join(words))
            idx.add_doc(row, held[row])
        if data.draw(st.booleans()):
            check()
    check()
    # the same postings loaded in bulk with each term's rows scrambled: term at a time, same answer
    terms_all, offsets, rows, tfs = idx.export()
    perm = np.concatenate([a + np.array(data.draw(st.permutations(range(b - a))), np.int64)
                           for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())] or [np.zeros(0, np.int64)])
    idx.load(terms_all, offsets, rows[perm], tfs[perm])
    check()


def test_a_query_folds_postings_written_in_session_and_search_answers_the_same(monkeypatch) -> None:
    from umi.storage import _bm25

    monkeypatch.setattr(_bm25, "FOLD_MIN", 0)
    monkeypatch.setattr(_bm25, "FOLD_SHARE", 0.0)
    store = SimStorageBackend(seed=0)
    for i in range(40):  # one commit each
        store.upsert([Entity("note", f"n{i}", " ".join(WORDS[j] for j in range((i * 7) % 10 + 1)),
                             id=f"id{(i * 37) % 101:03d}")])
    store.upsert([Entity("note", "n3", "rare unique corp", id=f"id{(3 * 37) % 101:03d}")])  # a rewrite
    store.delete(f"id{(5 * 37) % 101:03d}")
    postings = store._cache._postings
    assert postings._post  # written in session: dict form
    for query in ("acme corp works", "rare unique", "violin engineer paris chess"):
        assert store.search_text(query, 5) == exhaustive(store, query, 5, None)
        assert not postings._post  # the first query folded every term back into the CSR block


def _reference(held: dict[int, dict[str, int]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in sorted(held):
        for t, f in held[r].items():
            out.setdefault(t, []).append((r, float(f)))
    return out


@settings(max_examples=80, deadline=None)
@given(docs=docs, edits=st.lists(st.tuples(st.integers(0, 59), st.lists(st.sampled_from(WORDS), max_size=6),
                                           st.integers(0, 3)), max_size=30),
       query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4), k=st.integers(1, 12),
       bulk=st.booleans(), data=st.data())
def test_postings_rank_as_the_exhaustive_scorer_while_a_fold_runs(
        docs: list[list[str]], edits: list[tuple[int, list[str], int]], query: list[str], k: int, bulk: bool,
        data: st.DataObject) -> None:
    # a fold's step is paused by a hook: writes, forgets and queries run with a fold started and not
    # done, done and not yet swapped in, swapped in; a save (export) meanwhile does not wait past its
    # bound and holds exactly the documents written. Every answer: the exhaustive one, and the
    # reference formula's.
    from umi.storage import _bm25
    from umi.storage._bm25 import PostingsIndex
    from umi.storage.text import term_frequencies

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_bm25, "FOLD_MIN", 0)
        mp.setattr(_bm25, "FOLD_SHARE", 0.0)
        mp.setattr(_bm25, "FOLD_WAIT_S", 0.0)
        n = len(docs)
        held = {r: term_frequencies(" ".join(d)) for r, d in enumerate(docs)}
        idx = PostingsIndex()
        paused: list[Any] = []
        idx.run_fold = paused.append
        if bulk:  # the block loaded, its rows scrambled when data says so
            ref = _reference(held)
            terms = list(ref)
            offsets = np.zeros(len(terms) + 1, np.int64)
            np.cumsum([len(ref[t]) for t in terms], out=offsets[1:])
            pairs = [p for t in terms for p in (ref[t][::-1] if data.draw(st.booleans()) else ref[t])]
            idx.load(terms, offsets, np.array([r for r, _ in pairs], np.int64), np.array([f for _, f in pairs]))
        else:
            for r in range(n):
                idx.add_doc(r, held[r])
        keys = np.array([data.draw(st.integers(0, 3)) for _ in range(n)], np.uint64)
        terms_q = list(dict.fromkeys(query))
        folds = 0

        def check() -> None:
            _check_top_k_and_reference(idx, held, n, terms_q, keys, k)
            for t in set(WORDS):
                assert idx.df(t) == sum(1 for d in held.values() if t in d)

        def check_export() -> None:
            terms_e, offsets, rows, tfs = idx.export()
            got = {t: sorted(zip(rows[a:b].tolist(), tfs[a:b].tolist()))
                   for t, a, b in zip(terms_e, offsets[:-1].tolist(), offsets[1:].tolist())}
            assert got == _reference(held)

        check()
        for row, words, step in edits:
            if row < n:
                if row in held:
                    idx.remove_doc(row, list(held.pop(row)))
                if words:
                    held[row] = term_frequencies(" ".join(words))
                    idx.add_doc(row, held[row])
            if step == 1 and paused:  # the fold's step runs: swapped in by the next call
                paused.pop().run()
                folds += 1
            elif step == 2:
                check_export()
            if data.draw(st.booleans()):
                check()  # (starts a fold when none is in progress and a query term changed)
        check()
        check_export()
        if paused:
            paused.pop().run()
        check()
        while paused:
            paused.pop().run()
        idx.fold()  # synchronous: every posting in the block
        assert not idx._post and idx._fold is None
        check()
        check_export()


def test_a_fold_in_progress_is_swapped_in_by_the_next_call_and_keeps_the_writes_made_meanwhile(monkeypatch) -> None:
    idx, paused = _paused_index(monkeypatch)
    idx.add_doc(0, {"a": 1, "b": 2})
    idx.add_doc(1, {"a": 3})
    doc_len, mask = np.array([3.0, 3.0, 1.0]), np.ones(3, np.bool_)
    before = idx.score(["a"], 2, 3.0, doc_len[:2], mask[:2])
    assert len(paused) == 1 and idx._fold is not None  # the query started a fold and did not wait
    idx.add_doc(2, {"a": 1})  # written while the fold runs
    idx.remove_doc(0, ["b"])
    paused.pop().run()
    assert idx._fold is not None  # done, not yet swapped in
    idx._settle()  # what every call does first
    assert idx._fold is None and idx._base_rows.tolist() == [0, 1, 0]  # a: rows 0 1, b: row 0
    assert set(idx._post) == {"a", "b"}  # the writes made meanwhile, over the new block
    for p in idx._post.values():  # (not over the old block nor the folded overlay: those are freed)
        assert not p.own and np.shares_memory(p.below[0], idx._base_rows)
    assert idx.df("a") == 3 and idx.df("b") == 0
    rows, scores = idx.score(["a"], 3, 5 / 3, doc_len, mask)
    assert sorted(rows.tolist()) == [0, 1, 2] and before[0].shape[0] == 2


def _paused_index(monkeypatch) -> tuple[Any, list[Any]]:
    """A keyword index that folds at every query, whose folds wait in the returned list until the
    test runs them (``paused.pop().run()``)."""
    from umi.storage import _bm25
    from umi.storage._bm25 import PostingsIndex

    monkeypatch.setattr(_bm25, "FOLD_MIN", 0)
    monkeypatch.setattr(_bm25, "FOLD_SHARE", 0.0)
    idx = PostingsIndex()
    paused: list[Any] = []
    idx.run_fold = paused.append
    return idx, paused


def test_terms_first_written_in_session_keep_their_postings_across_folds(monkeypatch) -> None:
    # more new terms than the interpreter's cached small ints: once a fold is swapped in, their ids
    # get new int objects (_bm25._drop_on_thread); each term still reads its own postings, including
    # the terms first written while the fold ran and those folded by a second fold
    idx, paused = _paused_index(monkeypatch)
    n = 900
    want: dict[str, list[int]] = {}
    for row in range(n):  # term w<i> in rows i, i + 1, i + 2 (a new term every row)
        idx.add_doc(row, {f"w{j}": 1 + j % 3 for j in range(max(0, row - 2), row + 1)})
        for j in range(max(0, row - 2), row + 1):
            want.setdefault(f"w{j}", []).append(row)
        if row == 599:
            idx.score(["w0"], row + 1, 3.0, np.full(row + 1, 3.0), np.ones(row + 1, np.bool_))
            assert len(paused) == 1  # a fold of rows 0..599 started; rows 600.. are written meanwhile
    paused.pop().run()
    doc_len, mask = np.full(n, 3.0), np.ones(n, np.bool_)

    def check() -> None:
        for t, rows in want.items():
            assert idx.df(t) == len(rows), t
            got, _ = idx.score([t], n, 3.0, doc_len, mask)
            assert sorted(got.tolist()) == rows, t

    idx._settle()  # what every call does first: the fold swapped in
    assert idx._fold is None and idx._nb == 600
    for th in threading.enumerate():  # the thread freeing the folded overlay renews the ids first
        if th.name == "umi-bm25-free":
            th.join(60.0)
    check()  # (a query starts the next fold: run it, then fold the rest synchronously)
    while paused:
        paused.pop().run()
    idx.fold()
    assert idx._nb == len(want) and not idx._post
    check()
    terms, offsets, rows, _ = idx.export()
    assert {t: rows[a:b].tolist() for t, a, b in zip(terms, offsets[:-1].tolist(), offsets[1:].tolist())} == want


def test_a_failed_fold_leaves_the_postings_as_they_were(monkeypatch) -> None:
    from umi.storage import _bm25

    idx, paused = _paused_index(monkeypatch)
    idx.add_doc(0, {"a": 1, "b": 2})
    idx.score(["a"], 1, 3.0, np.array([3.0]), np.ones(1, np.bool_))
    idx.add_doc(1, {"a": 3})
    job = paused.pop()

    def fail(*_: Any) -> None:
        raise MemoryError

    monkeypatch.setattr(_bm25, "_fold_arrays", fail)
    job.run()
    assert idx.df("a") == 2 and idx.df("b") == 1 and idx._fold is None
    monkeypatch.undo()
    terms, offsets, rows, tfs = idx.export()
    assert dict(zip(terms, np.diff(offsets).tolist())) == {"a": 2, "b": 1} and rows.tolist() == [0, 1, 0]


@pytest.mark.parametrize("finish", ["never", "before_close"])
def test_a_store_closed_while_a_fold_runs_saves_and_reopens_every_posting(tmp_path, monkeypatch, finish: str) -> None:
    # the fold's step paused by a hook; the close saves the keyword cache without waiting past
    # FOLD_WAIT_S (or with the fold done and not yet swapped in); the reopened store reads that
    # cache and answers as the exhaustive scorer and as before the close
    from umi.storage import _bm25
    from umi.storage.duckdb import DuckDBStorageBackend

    monkeypatch.setattr(_bm25, "FOLD_MIN", 0)
    monkeypatch.setattr(_bm25, "FOLD_SHARE", 0.0)
    monkeypatch.setattr(_bm25, "FOLD_WAIT_S", 0.0)
    paused: list[Any] = []
    monkeypatch.setattr(_bm25, "_fold_on_thread", paused.append)
    path = tmp_path / "umi.duckdb"
    queries = ("acme corp works", "rare unique", "violin engineer paris chess")
    with DuckDBStorageBackend.connect(path) as store:
        for i in range(30):
            text = " ".join(WORDS[j] for j in range((i * 7) % 10 + 1))
            store.upsert([Entity("note", f"n{i}", text, id=f"id{i:03d}")])
        store.search_text("acme", 5)  # starts a fold, paused
        assert paused
        store.upsert([Entity("note", "n3", "rare unique corp", id="id003")])  # written while it runs
        store.delete("id005")
        if finish == "before_close":
            paused.pop().run()
        before = [store.search_text(q, 5) for q in queries]
        assert before == [exhaustive(store, q, 5, None) for q in queries]
        assert store._cache._postings._fold is not None or finish == "before_close"
    with DuckDBStorageBackend.connect(path) as store:
        assert [store.search_text(q, 5) for q in queries] == before
        assert before == [exhaustive(store, q, 5, None) for q in queries]
