"""In-memory BM25: the postings of every term and the numba scoring kernel.

:class:`PostingsIndex` maps each term to its postings (row -> tf). Postings read in
bulk stay in one CSR block until a term is first changed; a changed term keeps a dict
and rebuilds its arrays (rows ascending) lazily for the next query, until a query folds the
changed terms back into the block (:meth:`PostingsIndex.fold_if_due`, once many were written). The kernel takes each query term's
postings as a range ``lo[t]:hi[t]`` of ``rows``/``tfs`` — of the bulk-loaded CSR block itself
(no copy) while every query term is untouched since the load, else of the terms' arrays
concatenated (a row appears at most once per term) —, accumulates scores per row and returns
only rows that the filter ``mask`` lets through. The kernels are compiled ``nogil``. Formula
and constants: :mod:`umi.storage.text`.

Top-k without scoring every posting's row (:meth:`PostingsIndex.score` with ``k``): MaxScore,
document at a time (:func:`_bm25_maxscore`), when every query term's rows ascend (always for
postings changed in session; checked once per bulk-loaded term). Each term's upper bound is its
score at its largest tf and shortest document. The rows are walked in ascending order over the
cursors of the *essential* terms; the terms whose bounds together stay below the k-th best
score found so far (``theta``) are non-essential: a row holding only those cannot rank, so they
are not walked, only looked up (galloping) for a row that may still reach ``theta``. A row's
score is summed in the query's term order, as the exhaustive kernel adds (the same bits). The
kernel writes only to its own small buffers — no per-row scratch or accumulator over the whole
store, whose scattered writes cost far more than the reads on a large store (1M rows: ~6 ms for
33k postings against ~0.2 ms). With the callers' tie-break keys it also selects the k best by
(score, key) itself (:func:`top_by_score_then_key`).

Otherwise (a bulk-loaded term whose rows do not ascend): a term-at-a-time MaxScore-style
early exit. Each term's upper bound is its score at its largest tf and shortest
document; terms are taken by upper bound, highest first, and a row is admitted as a candidate
only while the bounds of the terms still to come could lift a new row to the k-th best partial
score. After that the remaining (common) terms only add to the candidates they hold. A row
left out scores strictly below the k-th best, so the top k — and every row tied with the
k-th, for the caller's tie-break by id — are among the candidates, whose scores are summed in
the query's term order: the same bits as the exhaustive kernel's (held by a property test).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .text import BM25_B, BM25_K1, bm25_idf

__all__ = ["PostingsIndex", "bm25_candidates", "bm25_top_candidates", "csr_add_docs", "top_by_score_then_key"]


#: the compiled kernels, by the Python function's name (a kernel calls its compiled callees as the
#: module globals ``<callee>_jit``, so those are set before it compiles)
_select_jit: Any = None
_term_bound_jit: Any = None


def _njit(fn: Callable[..., Any], *callees: Callable[..., Any]) -> Any:
    """``fn`` compiled ``nogil`` (or loaded from numba's on-disk cache) on first use, its compiled
    callees first — numba is imported then, so ``import umi`` does not pay for it."""
    name = fn.__name__ + "_jit"
    got = globals().get(name)
    if got is None:
        from numba import njit

        for c in callees:
            _njit(c)
        got = globals()[name] = njit(cache=True, nogil=True)(fn)
    return got


def _term_bound(rows, tfs, lo, hi, doc_len, seen, at, idf, avgdl, k1, b):  # pragma: no cover - compiled
    """A term's upper bound — its score at its largest tf and its shortest document — and whether
    its rows ascend; read from ``seen[at]`` when found before (``at >= 0``), else found and kept there."""
    if at >= 0 and seen[at, 0] >= 0.0 and seen[at, 2] >= 0.0:
        tf_max = seen[at, 0]
        dl_min = seen[at, 1]
        asc = seen[at, 2] > 0.0
    else:
        tf_max = 0.0
        dl_min = np.inf
        asc = True
        prev = -1
        for p in range(lo, hi):
            v = float(tfs[p])
            if v > tf_max:
                tf_max = v
            r = rows[p]
            d = float(doc_len[r])
            if d < dl_min:
                dl_min = d
            if r <= prev:
                asc = False
            prev = r
        if at >= 0:
            seen[at, 0] = tf_max
            seen[at, 1] = dl_min
            seen[at, 2] = 1.0 if asc else 0.0
    norm = k1 * (1.0 - b + b * dl_min / avgdl) if avgdl > 0.0 else k1
    return idf * tf_max * (k1 + 1.0) / (tf_max + norm), asc


#: a query folds the postings changed since the load back into the CSR block (PostingsIndex.fold)
#: once the postings written since number at least FOLD_MIN and FOLD_SHARE of the block
FOLD_MIN = 1 << 16
FOLD_SHARE = 0.25

#: relative slack on the early-exit test, far above float64 rounding of a few-term sum
_BOUND_SLACK = 1e-9

#: the early exit keeps one contribution per (posting, term) slot: beyond this many cells (a long
#: query over long postings) the exhaustive kernel scores instead, with the same result
PRUNED_CELLS_MAX = 1 << 22


def _bm25_pruned(rows, tfs, lo, hi, idfs, doc_len, avgdl, mask, slot, k, k1, b, seen, seen_at):  # pragma: no cover - compiled
    n_terms = idfs.shape[0]
    # each term's upper bound: its score at its largest tf and its shortest document (those two
    # read from ``seen[seen_at[t]]`` when a bulk-loaded term's were found before, else found and kept)
    ubs = np.zeros(n_terms, np.float64)
    for t in range(n_terms):
        if hi[t] > lo[t]:
            ubs[t] = _term_bound_jit(rows, tfs, lo[t], hi[t], doc_len, seen, seen_at[t], idfs[t], avgdl, k1, b)[0]
    order = np.argsort(-ubs, kind="mergesort")
    rest = np.zeros(n_terms + 1, np.float64)  # rest[j]: bound of the terms order[j:] together
    for j in range(n_terms - 1, -1, -1):
        rest[j] = rest[j + 1] + ubs[order[j]]
    # room for every posting (never re-bound: arrays re-bound in a loop cost numba refcounting);
    # np.empty touches no memory, each row is cleared when admitted
    total = 0
    for t in range(n_terms):
        total += hi[t] - lo[t]
    cand = np.empty(total, np.int64)
    contrib = np.empty((total, n_terms), np.float64)
    partial = np.empty(total, np.float64)
    n = 0
    admit = True
    for j in range(n_terms):
        if admit and j > 0 and n >= k:
            theta = np.partition(partial[:n], n - k)[n - k]  # k-th best partial score: a lower bound
            if rest[j] * (1.0 + _BOUND_SLACK) < theta * (1.0 - _BOUND_SLACK):
                admit = False  # a row holding none of the terms so far cannot reach the k-th
        t = order[j]
        idf = idfs[t]
        for p in range(lo[t], hi[t]):
            r = rows[p]
            c = slot[r]
            # a sparse set: slot[r] counts only when it points back at r, so a stale entry is harmless
            if c < 0 or c >= n or cand[c] != r:
                if not admit or not mask[r]:
                    continue
                c = n
                slot[r] = c
                cand[c] = r
                partial[c] = 0.0
                for u in range(n_terms):
                    contrib[c, u] = 0.0
                n += 1
            tf = tfs[p]
            norm = k1 * (1.0 - b + b * doc_len[r] / avgdl) if avgdl > 0.0 else k1
            s = idf * tf * (k1 + 1.0) / (tf + norm)
            contrib[c, t] = s
            partial[c] += s
    out_scores = np.empty(n, np.float64)
    for c in range(n):
        slot[cand[c]] = -1  # the scratch map is all -1 again for the next query
        acc = 0.0
        for t in range(n_terms):  # the query's term order, as the exhaustive kernel adds (x + 0.0 == x)
            acc += contrib[c, t]
        out_scores[c] = acc
    return cand[:n].copy(), out_scores


def _bm25_maxscore(rows, tfs, lo, hi, idfs, doc_len, avgdl, mask, k, k1, b, seen, seen_at, keys):  # pragma: no cover - compiled
    n_terms = idfs.shape[0]
    # each term's upper bound (its score at its largest tf and shortest document) and whether its
    # rows ascend: read from ``seen[seen_at[t]]`` when found before, else found and kept there
    ubs = np.zeros(n_terms, np.float64)
    for t in range(n_terms):
        if hi[t] == lo[t]:
            continue
        ub, asc = _term_bound_jit(rows, tfs, lo[t], hi[t], doc_len, seen, seen_at[t], idfs[t], avgdl, k1, b)
        if not asc:  # the caller scores term at a time instead
            return False, np.zeros(0, np.int64), np.zeros(0, np.float64)
        ubs[t] = ub
    order = np.argsort(ubs, kind="mergesort")  # lowest bound first: the non-essential terms are order[:ne]
    below = np.zeros(n_terms + 1, np.float64)  # below[j]: bound of the terms order[:j] together
    for j in range(n_terms):
        below[j + 1] = below[j] + ubs[order[j]]
    total = 0
    for t in range(n_terms):
        total += hi[t] - lo[t]
    cap = min(total, mask.shape[0])  # a row is kept at most once
    out_rows = np.empty(cap, np.int64)
    out_scores = np.empty(cap, np.float64)
    n_out = 0
    best = np.empty(max(k, 1), np.float64)  # min-heap of the k best scores so far
    n_best = 0
    theta = -np.inf  # the k-th best score so far (a row scoring below it cannot rank)
    ne = 0
    pos = lo.copy()
    contrib = np.zeros(n_terms, np.float64)
    while True:
        r = -1  # the next row: the smallest under an essential term's cursor
        for j in range(ne, n_terms):
            t = order[j]
            p = pos[t]
            if p < hi[t] and (r < 0 or rows[p] < r):
                r = rows[p]
        if r < 0:
            break
        keep = mask[r]
        got = 0.0  # the row's score from the terms looked at so far (any order: a bound only)
        if keep:
            norm = k1 * (1.0 - b + b * doc_len[r] / avgdl) if avgdl > 0.0 else k1
        for j in range(ne, n_terms):
            t = order[j]
            p = pos[t]
            if p < hi[t] and rows[p] == r:
                pos[t] = p + 1
                if keep:
                    tf = tfs[p]
                    s = idfs[t] * tf * (k1 + 1.0) / (tf + norm)
                    contrib[t] = s
                    got += s
        if not keep:
            continue
        # the non-essential terms, highest bound first, while the row may still reach theta
        for j in range(ne - 1, -1, -1):
            if (got + below[j + 1]) * (1.0 + _BOUND_SLACK) < theta * (1.0 - _BOUND_SLACK):
                keep = False
                break
            t = order[j]
            p = pos[t]
            h = hi[t]
            if p < h and rows[p] < r:  # gallop to the first row >= r
                a = p  # rows[a] < r
                e = p + 1
                step = 1
                while e < h and rows[e] < r:
                    a = e
                    step *= 2
                    e = a + step
                if e > h:
                    e = h
                a += 1  # the first row >= r is in a..e (e: h, or a row >= r)
                while a < e:
                    m = (a + e) >> 1
                    if rows[m] < r:
                        a = m + 1
                    else:
                        e = m
                p = a
                pos[t] = p
            if p < h and rows[p] == r:
                tf = tfs[p]
                s = idfs[t] * tf * (k1 + 1.0) / (tf + norm)
                contrib[t] = s
                got += s
        if keep:
            acc = 0.0
            for t in range(n_terms):  # the query's term order, as the exhaustive kernel adds (x + 0.0 == x)
                acc += contrib[t]
            if acc >= theta:
                out_rows[n_out] = r
                out_scores[n_out] = acc
                n_out += 1
                if n_best < k:  # sift up
                    c = n_best
                    best[c] = acc
                    n_best += 1
                    while c > 0 and best[(c - 1) // 2] > best[c]:
                        best[c], best[(c - 1) // 2] = best[(c - 1) // 2], best[c]
                        c = (c - 1) // 2
                elif acc > best[0]:  # replace the worst kept, sift down
                    best[0] = acc
                    c = 0
                    while True:
                        m = c
                        if 2 * c + 1 < k and best[2 * c + 1] < best[m]:
                            m = 2 * c + 1
                        if 2 * c + 2 < k and best[2 * c + 2] < best[m]:
                            m = 2 * c + 2
                        if m == c:
                            break
                        best[c], best[m] = best[m], best[c]
                        c = m
                if n_best == k and best[0] > theta:
                    theta = best[0]
                    while ne < n_terms and below[ne + 1] * (1.0 + _BOUND_SLACK) < theta * (1.0 - _BOUND_SLACK):
                        ne += 1  # a row holding only the terms order[:ne] cannot reach theta
        for t in range(n_terms):
            contrib[t] = 0.0
    if keys.shape[0] == 0:
        return True, out_rows[:n_out].copy(), out_scores[:n_out].copy()
    # the k best by (score, key) and every twin of the k-th: what the caller selects anyway
    ck = np.empty(n_out, keys.dtype)
    for i in range(n_out):
        ck[i] = keys[out_rows[i]]
    sel = _select_jit(out_scores[:n_out], ck, k)
    return True, out_rows[sel], out_scores[sel]


def bm25_maxscore(rows: np.ndarray, tfs: np.ndarray, term_ptr: np.ndarray, idfs: np.ndarray,
                  doc_len: np.ndarray, avgdl: float, mask: np.ndarray, k: int,
                  keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`bm25_top_candidates` by :func:`_bm25_maxscore` (None when a term's rows do not ascend).
    With ``keys`` (row -> tie-break key, as :func:`top_by_score_then_key` takes): only the k best
    by (score, key) and the rows equal to the k-th in both."""
    ok, got_rows, got_scores = _njit(_bm25_maxscore, _select, _term_bound)(
        rows, tfs, term_ptr[:-1], term_ptr[1:], idfs, doc_len, float(avgdl), mask, max(int(k), 1), BM25_K1, BM25_B,
        _NO_SEEN, np.full(idfs.shape[0], -1, np.int64), _NO_KEYS if keys is None else keys)
    return (got_rows, got_scores) if ok else None


def bm25_top_candidates(rows: np.ndarray, tfs: np.ndarray, term_ptr: np.ndarray, idfs: np.ndarray,
                        doc_len: np.ndarray, avgdl: float, mask: np.ndarray, slot: np.ndarray,
                        k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of rows in ``mask`` holding a query term, including every row whose score
    reaches the k-th best (ties included); rows that provably score below it may be left out.
    Scores are those of :func:`bm25_candidates`. ``slot``: int64 scratch, ``-1`` for every row
    (left so)."""
    return _njit(_bm25_pruned, _term_bound)(rows, tfs, term_ptr[:-1], term_ptr[1:], idfs, doc_len, float(avgdl), mask, slot,
                              int(k), BM25_K1, BM25_B, _NO_SEEN, np.full(idfs.shape[0], -1, np.int64))


_NO_SEEN = np.zeros((0, 3), np.float64)
_NO_KEYS = np.zeros(0, np.uint64)


def _bm25(rows, tfs, lo, hi, idfs, doc_len, avgdl, mask, n_rows, k1, b):  # pragma: no cover - compiled
    acc = np.zeros(n_rows, np.float64)
    seen = np.zeros(n_rows, np.bool_)
    total = 0
    for t in range(idfs.shape[0]):
        total += hi[t] - lo[t]
    out_rows = np.empty(total, np.int64)
    n_out = 0
    for t in range(idfs.shape[0]):
        idf = idfs[t]
        for p in range(lo[t], hi[t]):
            r = rows[p]
            if not mask[r]:
                continue
            tf = tfs[p]
            norm = k1 * (1.0 - b + b * doc_len[r] / avgdl) if avgdl > 0.0 else k1
            acc[r] += idf * tf * (k1 + 1.0) / (tf + norm)
            if not seen[r]:
                seen[r] = True
                out_rows[n_out] = r
                n_out += 1
    out_rows = out_rows[:n_out]
    out_scores = np.empty(n_out, np.float64)
    for i in range(n_out):
        out_scores[i] = acc[out_rows[i]]
    return out_rows, out_scores


def bm25_candidates(rows: np.ndarray, tfs: np.ndarray, term_ptr: np.ndarray, idfs: np.ndarray,
                    doc_len: np.ndarray, avgdl: float, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of every row in ``mask`` holding at least one query term."""
    return _njit(_bm25)(rows, tfs, term_ptr[:-1], term_ptr[1:], idfs, doc_len, float(avgdl), mask, mask.shape[0],
                       BM25_K1, BM25_B)


def _select(scores, keys, k):  # pragma: no cover - compiled
    """Positions of the k best by (score desc, key asc), plus any sharing the k-th's score and key."""
    n = scores.shape[0]
    if n <= k:
        return np.arange(n)
    heap = np.empty(k, np.int64)  # the k best so far; heap[0] the worst of them
    for i in range(n):
        if i < k:
            heap[i] = i
            c = i
            while c > 0:  # sift up: a worse child goes to the root
                par = (c - 1) // 2
                a, b = heap[c], heap[par]
                if scores[a] < scores[b] or (scores[a] == scores[b] and keys[a] > keys[b]):
                    heap[c], heap[par] = b, a
                    c = par
                else:
                    break
            continue
        w = heap[0]
        if scores[i] < scores[w] or (scores[i] == scores[w] and keys[i] >= keys[w]):
            continue  # not better than the worst kept (an equal key is taken in the second pass)
        heap[0] = i
        c = 0
        while True:  # sift down
            lo, hi = 2 * c + 1, 2 * c + 2
            m = c
            if lo < k:
                a, b = heap[lo], heap[m]
                if scores[a] < scores[b] or (scores[a] == scores[b] and keys[a] > keys[b]):
                    m = lo
            if hi < k:
                a, b = heap[hi], heap[m]
                if scores[a] < scores[b] or (scores[a] == scores[b] and keys[a] > keys[b]):
                    m = hi
            if m == c:
                break
            heap[c], heap[m] = heap[m], heap[c]
            c = m
    ws, wk = scores[heap[0]], keys[heap[0]]
    out = np.empty(n, np.int64)
    n_out = 0
    for i in range(n):
        if scores[i] > ws or (scores[i] == ws and keys[i] <= wk):
            out[n_out] = i
            n_out += 1
    return out[:n_out].copy()


def top_by_score_then_key(scores: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Positions (unordered) of the k best by score descending, then key ascending, plus every
    position whose score and key equal the k-th's. With ``keys`` from
    :func:`umi.storage._hotcache.id_order_keys` the k best by (score, id) are among them: a
    smaller key means a smaller id, and equal keys are all kept for the caller to compare."""
    return _njit(_select)(scores, keys, int(k))


def csr_add_docs(terms: list[str], offsets: np.ndarray, rows: np.ndarray, tfs: np.ndarray,
                 docs: Iterable[tuple[int, dict[str, int]]]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """CSR postings with the documents ``docs`` ((row, term -> tf), rows not in the postings yet)
    added: each new posting goes at the end of its term's range, new terms at the end. One pass
    (``np.insert``), not one dict per touched term as :meth:`PostingsIndex.add_doc` would make."""
    index = dict(zip(terms, range(len(terms))))
    extra: list[str] = []
    t_ids: list[int] = []
    d_rows: list[int] = []
    d_tfs: list[int] = []
    for row, tf in docs:
        for t, f in tf.items():
            i = index.get(t)
            if i is None:
                i = index[t] = len(terms) + len(extra)
                extra.append(t)
            t_ids.append(i)
            d_rows.append(row)
            d_tfs.append(f)
    if not t_ids:
        return terms, offsets, rows, tfs
    n_terms = len(terms) + len(extra)
    tid = np.asarray(t_ids, np.int64)
    order = np.argsort(tid, kind="stable")
    tid = tid[order]
    ends = np.concatenate([offsets[1:], np.full(len(extra), offsets[-1], np.int64)])
    at = ends[tid]
    new_rows = np.insert(rows, at, np.asarray(d_rows, np.int64)[order])
    new_tfs = np.insert(tfs, at, np.asarray(d_tfs, np.float64)[order])
    counts = np.concatenate([np.diff(offsets), np.zeros(len(extra), np.int64)]) + np.bincount(tid, minlength=n_terms)
    new_offsets = np.zeros(n_terms + 1, np.int64)
    np.cumsum(counts, out=new_offsets[1:])
    return terms + extra, new_offsets, new_rows, new_tfs


class _Postings:
    """One term's postings: row -> tf, kept as arrays until first changed, then as a dict
    whose arrays are rebuilt lazily for the next query."""

    __slots__ = ("rows", "tfs", "d", "seen")

    def __init__(self, rows: np.ndarray | None = None, tfs: np.ndarray | None = None) -> None:
        self.rows = rows
        self.tfs = tfs
        self.d: dict[int, int] | None = None if rows is not None else {}
        # (largest tf, shortest row, rows ascending 1.0 / 0.0 / -1.0 not known) once a top-k query
        # found them; dropped with the arrays on a change (a row's length changes only with its
        # terms' postings)
        self.seen: tuple[float, ...] | None = None

    def writable(self) -> dict[int, int]:
        """The dict form (the arrays are dropped: they would go stale)."""
        if self.d is None:
            assert self.rows is not None and self.tfs is not None
            self.d = dict(zip(self.rows.tolist(), self.tfs.astype(np.int64).tolist()))
        self.rows = self.tfs = self.seen = None
        return self.d

    def df(self) -> int:
        return len(self.d) if self.d is not None else len(self.rows)  # type: ignore[arg-type]

    def row_iter(self) -> Iterable[int]:
        return self.d.keys() if self.d is not None else self.rows.tolist()  # type: ignore[union-attr]

    def tf_iter(self) -> Iterable[int]:
        return self.d.values() if self.d is not None else self.tfs.tolist()  # type: ignore[union-attr]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self.rows is None:
            d = self.d or {}
            rows = np.fromiter(d.keys(), dtype=np.int64, count=len(d))
            tfs = np.fromiter(d.values(), dtype=np.float64, count=len(d))
            if rows.shape[0] > 1 and not bool((rows[1:] > rows[:-1]).all()):  # ascending, for MaxScore
                order = np.argsort(rows, kind="stable")
                rows, tfs = rows[order], tfs[order]
            self.rows, self.tfs = rows, tfs
        return self.rows, self.tfs  # type: ignore[return-value]


class PostingsIndex:
    """term -> postings (row -> tf) for every stored document, and BM25 over them."""

    def __init__(self) -> None:
        self._post: dict[str, _Postings] = {}
        # postings loaded in bulk (CSR) and not touched since: term -> position in _base_off
        self._base_terms: dict[str, int] = {}
        self._base_off = np.zeros(1, np.int64)
        self._base_rows = np.zeros(0, np.int64)
        self._base_tfs = np.zeros(0, np.float64)
        # per bulk-loaded term, its largest tf and shortest document once a top-k query found them
        # (-1: not yet): a term in the bulk arrays has not changed since the load, nor has the length
        # of any row it holds (changing a row takes each of its terms out of the bulk arrays)
        self._base_seen = np.full((0, 3), -1.0)
        # row -> candidate position while a top-k query runs; -1 between queries
        self._slot = np.full(0, -1, np.int64)
        # postings written (added or removed) since the load, counted for :meth:`fold_if_due`
        self._written = 0

    def load(self, terms: list[str], offsets: np.ndarray, rows: np.ndarray, tfs: np.ndarray) -> None:
        """Replace everything with CSR postings: term i owns ``rows[offsets[i]:offsets[i + 1]]``."""
        self._post = {}
        self._written = 0
        self._base_terms = dict(zip(terms, range(len(terms))))
        self._base_off, self._base_rows, self._base_tfs = offsets, rows, tfs
        self._base_seen = np.full((len(terms), 3), -1.0)

    def export(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """Every term's postings as CSR (the form :meth:`load` takes): (terms, offsets, rows, tfs)."""
        off = self._base_off
        base_terms = list(self._base_terms)
        pos = np.fromiter(self._base_terms.values(), np.int64, len(base_terms))  # ascending
        starts = off[pos]
        counts = off[pos + 1] - starts
        if len(base_terms) == off.shape[0] - 1:  # every bulk-loaded term is untouched
            rows0, tfs0 = self._base_rows, self._base_tfs
        else:  # the untouched terms' ranges, concatenated
            new_starts = np.zeros(len(base_terms), np.int64)
            np.cumsum(counts[:-1], out=new_starts[1:])
            take = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - new_starts, counts)
            rows0, tfs0 = self._base_rows[take], self._base_tfs[take]
        # the changed terms' postings in one pass over their dicts (not one array pair per term: a
        # store written in session has a term per name), each term's rows ascending
        parts = list(self._post.values())
        counts_p = np.fromiter(map(_Postings.df, parts), np.int64, len(parts))
        n_p = int(counts_p.sum())
        rows_p = np.fromiter(itertools.chain.from_iterable(map(_Postings.row_iter, parts)), np.int64, n_p)
        tfs_p = np.fromiter(itertools.chain.from_iterable(map(_Postings.tf_iter, parts)), np.float64, n_p)
        if n_p > 1:
            term_of = np.repeat(np.arange(len(parts)), counts_p)
            if bool(((rows_p[1:] <= rows_p[:-1]) & (term_of[1:] == term_of[:-1])).any()):
                order = np.lexsort((rows_p, term_of))
                rows_p, tfs_p = rows_p[order], tfs_p[order]
        offsets = np.zeros(len(base_terms) + len(parts) + 1, np.int64)
        np.cumsum(np.concatenate([counts, counts_p]), out=offsets[1:])
        rows = np.concatenate([rows0.astype(np.int64, copy=False), rows_p])
        tfs = np.concatenate([tfs0.astype(np.float64, copy=False), tfs_p])
        return base_terms + list(self._post), offsets, rows, tfs

    def _base(self, term: str, pop: bool) -> tuple[np.ndarray, np.ndarray] | None:
        i = self._base_terms.pop(term, None) if pop else self._base_terms.get(term)
        if i is None:
            return None
        a, b = int(self._base_off[i]), int(self._base_off[i + 1])
        return self._base_rows[a:b], self._base_tfs[a:b]

    def _term(self, term: str, create: bool) -> _Postings | None:
        p = self._post.get(term)
        if p is None:
            base = self._base(term, pop=True)
            if base is not None:
                p = self._post[term] = _Postings(*base)
            elif create:
                p = self._post[term] = _Postings()
        return p

    def add_doc(self, row: int, tfs: dict[str, int]) -> None:
        post = self._post
        for t, tf in tfs.items():
            p = post.get(t)
            if p is None:
                p = self._term(t, True)
            p.writable()[row] = tf  # type: ignore[union-attr]
        self._written += len(tfs)

    def remove_doc(self, row: int, terms: Iterable[str]) -> None:
        for t in terms:
            p = self._term(t, False)
            if p is not None:
                d = p.writable()
                d.pop(row, None)
                self._written += 1
                if not d:
                    del self._post[t]

    def fold(self) -> None:
        """Every term's postings back into one CSR block (as :meth:`load` takes them): a query then
        reads the block in place, with no per-query copy, and the dicts (~100 B a posting) are
        freed (16 B a posting in the block). Everything is built before anything is replaced."""
        self.load(*self.export())

    def fold_if_due(self) -> bool:
        """:meth:`fold` once the postings written since the last load number at least ``FOLD_MIN``
        and ``FOLD_SHARE`` of the block (a fold reads every posting: at most once per that share of
        the block written, so a store written and read in turn rarely folds)."""
        if self._written < max(FOLD_MIN, FOLD_SHARE * self._base_rows.shape[0]):
            return False
        try:
            self.fold()
        except MemoryError:  # nothing was replaced: the postings stay as they were
            return False
        return True

    def df(self, term: str) -> int:
        p = self._post.get(term)
        if p is not None:
            return p.df()
        base = self._base(term, pop=False)
        return 0 if base is None else int(base[0].shape[0])

    def score(self, terms: Sequence[str], n_docs: int, avg_doc_len: float, doc_len: np.ndarray,
              mask: np.ndarray, k: int | None = None, keys: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, BM25 scores) of the rows in ``mask`` holding at least one of ``terms`` (distinct).
        With ``k``: only the rows that may rank in the top ``k`` or tie with the k-th are sure to
        be there (:func:`bm25_top_candidates`); ``keys`` (row -> tie-break key) may narrow them to
        the k best by (score, key) and the k-th's twins (:func:`bm25_maxscore`)."""
        return self.scorer(terms, n_docs, avg_doc_len, doc_len, mask, k, keys)()

    def scorer(self, terms: Sequence[str], n_docs: int, avg_doc_len: float, doc_len: np.ndarray,
               mask: np.ndarray, k: int | None = None, keys: np.ndarray | None = None) -> "_Scorer":
        """:meth:`score` in two steps: the postings are gathered now; the call returned runs the
        kernel (``nogil``: it may run on another thread while the caller keeps the index, ``mask``
        and ``doc_len`` unchanged, one call at a time per index — it uses the index's scratch)."""
        # the postings of each term: a range of the bulk-loaded CSR arrays (no copy) while every
        # query term is untouched since the load, else the terms' arrays concatenated — unless
        # many postings were written since: then every term is folded back into the block first
        if any(t in self._post for t in terms):
            self.fold_if_due()
        base = [self._base_terms.get(t) for t in terms if t not in self._post]
        if len(base) == len(terms):
            at = np.array([i for i in base if i is not None], np.int64)
            if at.shape[0] == 0:
                return _nothing
            off = self._base_off
            lo, hi = off[at].astype(np.int64, copy=False), off[at + 1].astype(np.int64, copy=False)
            rows, tfs = self._base_rows, self._base_tfs
            seen, seen_at = self._base_seen, at
            owners: list[Any] | None = None
        else:
            arrays = []
            owners = []  # each term's _Postings, or its position in the bulk arrays
            for t in terms:
                p = self._post.get(t)
                if p is not None:
                    arrays.append(p.arrays())
                    owners.append(p)
                else:
                    i = self._base_terms.get(t)
                    if i is not None:
                        a, b = int(self._base_off[i]), int(self._base_off[i + 1])
                        arrays.append((self._base_rows[a:b], self._base_tfs[a:b]))
                        owners.append(i)
            if not arrays:
                return _nothing
            ptr = np.zeros(len(arrays) + 1, np.int64)
            np.cumsum([a[0].shape[0] for a in arrays], out=ptr[1:])
            rows = np.concatenate([a[0] for a in arrays]) if len(arrays) > 1 else arrays[0][0]
            tfs = np.concatenate([a[1] for a in arrays]) if len(arrays) > 1 else arrays[0][1]
            lo, hi = ptr[:-1], ptr[1:]
            seen = np.array([self._seen_of(o) for o in owners], np.float64).reshape(len(owners), 3)
            seen_at = np.arange(len(owners), dtype=np.int64)
        dfs = (hi - lo).tolist()
        idfs = np.array([bm25_idf(n_docs, df) for df in dfs], np.float64)
        kernel = _njit(_bm25)
        if k is None:
            return _Scorer(lambda: kernel(rows, tfs, lo, hi, idfs, doc_len, float(avg_doc_len), mask, mask.shape[0],
                                          BM25_K1, BM25_B), sum(dfs))
        top, maxscore = max(int(k), 1), _njit(_bm25_maxscore, _select, _term_bound)
        tie_keys = _NO_KEYS if keys is None else keys

        base_seen = self._base_seen  # (a fold before the kernel runs replaces it)

        def keep_seen() -> None:
            if owners is not None:  # keep what the kernel found for the next query
                for o, found in zip(owners, seen.tolist()):
                    if isinstance(o, _Postings):
                        o.seen = tuple(found)
                    else:
                        base_seen[o] = found

        def run() -> tuple[np.ndarray, np.ndarray]:
            ok, got_rows, got_scores = maxscore(rows, tfs, lo, hi, idfs, doc_len, float(avg_doc_len), mask, top,
                                                BM25_K1, BM25_B, seen, seen_at, tie_keys)
            keep_seen()
            if ok:
                return got_rows, got_scores
            # a bulk-loaded term whose rows do not ascend: term at a time
            if sum(dfs) * len(dfs) > PRUNED_CELLS_MAX:
                return kernel(rows, tfs, lo, hi, idfs, doc_len, float(avg_doc_len), mask, mask.shape[0], BM25_K1,
                              BM25_B)
            if self._slot.shape[0] < mask.shape[0]:
                self._slot = np.full(max(mask.shape[0], int(self._slot.shape[0] * 1.5)), -1, np.int64)
            pruned = _njit(_bm25_pruned, _term_bound)
            got = pruned(rows, tfs, lo, hi, idfs, doc_len, float(avg_doc_len), mask, self._slot, top,
                         BM25_K1, BM25_B, seen, seen_at)
            keep_seen()
            return got

        return _Scorer(run, sum(dfs))

    def _seen_of(self, owner: Any) -> tuple[float, ...]:
        if isinstance(owner, _Postings):
            return owner.seen or (-1.0, -1.0, -1.0)
        return tuple(self._base_seen[owner].tolist())


class _Scorer:
    """A keyword search's kernel call, ready to run, and how many postings it reads (its work)."""

    __slots__ = ("run", "postings")

    def __init__(self, run: Callable[[], tuple[np.ndarray, np.ndarray]], postings: int) -> None:
        self.run, self.postings = run, postings

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.run()


def _none() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.float64)


_nothing = _Scorer(_none, 0)
