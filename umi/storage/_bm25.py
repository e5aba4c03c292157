"""In-memory BM25: the postings of every term and the numba scoring kernel.

:class:`PostingsIndex` maps each term to its postings (row -> tf): a CSR block, and an overlay of
the terms written since it was built (each the block's range below and a dict of the changes, so a
write is O(1); merged into arrays, rows ascending, lazily for the next query). Once many were
written, a query starts a fold (:meth:`PostingsIndex.fold_if_due`): a thread builds the next block
from the current one and the log of those writes while queries go on reading the old block and the
overlay; the next call swaps it in. No query waits for a fold. The kernel takes each query term's
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
33k postings against ~0.2 ms). Its reads of a row's length, mask and key, each a cache line of
its own when a term's rows lie far apart, are started ``_AHEAD`` postings before the cursor gets
there (a prefetch hint): walked one by one they wait on memory in turn (1M rows, bench_bm25: about
half the kernel's time). With the callers' tie-break keys it also selects the k best by
(score, key) itself (:func:`top_by_score_then_key`): its heap of the k best so far orders by
(score, key) too, so a row tying the k-th score with a larger key is dropped as it is walked
(bench_bm25's corpus: ~33k rows tie at every query's 30th score), not kept for the selection.

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
import threading
import time
from array import array
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .text import BM25_B, BM25_K1, bm25_idf

__all__ = ["PostingsIndex", "csr_add_docs", "top_by_score_then_key"]


#: the compiled kernels, by the Python function's name (a kernel calls its compiled callees as the
#: module globals ``<callee>_jit``, so those are set before it compiles)
_select_jit: Any = None
_term_bound_jit: Any = None
_prefetch_jit: Any = None


def _njit(fn: Callable[..., Any], *callees: Callable[..., Any]) -> Any:
    """``fn`` compiled ``nogil`` (or loaded from numba's on-disk cache) on first use, its compiled
    callees first — numba is imported then, so ``import umi`` does not pay for it."""
    name = fn.__name__ + "_jit"
    got = globals().get(name)
    if got is None:
        from numba import njit

        global _prefetch_jit
        if _prefetch_jit is None:
            _prefetch_jit = _prefetch_intrinsic()
        for c in callees:
            _njit(c)
        got = globals()[name] = njit(cache=True, nogil=True)(fn)
    return got


def _prefetch_intrinsic() -> Any:
    """``prefetch(a, i)``, for compiled code: asks the CPU to load ``a[i]``'s cache line, to be read
    soon (LLVM's ``llvm.prefetch``: a hint, no effect on results)."""
    from llvmlite import ir  # type: ignore[import-untyped]
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def prefetch(typingctx, arr, i):
        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
            i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
            # named for the pointer type as llvmlite writes it (LLVM renames it for opaque pointers,
            # as it does numba's llvm.memset)
            fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p],
                                                  ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
            # a read, kept in every cache level, of data
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(arr, i), codegen

    return prefetch


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
#: the longest a save (PostingsIndex.export) or a synchronous fold waits for a fold in progress,
#: in seconds; past it, the save merges the postings itself
FOLD_WAIT_S = 60.0

#: relative slack on the early-exit test, far above float64 rounding of a few-term sum
_BOUND_SLACK = 1e-9

#: how many postings ahead of an essential term's cursor :func:`_bm25_maxscore` starts the reads of
#: a row's length, mask and key (rows ~30 apart: each its own cache line, read at the latency of
#: memory unless started early)
_AHEAD = 16

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
    total = (hi - lo).sum()
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
    total = (hi - lo).sum()
    cap = min(total, mask.shape[0])  # a row is kept at most once
    out_rows = np.empty(cap, np.int64)
    out_scores = np.empty(cap, np.float64)
    n_out = 0
    best = np.empty(max(k, 1), np.float64)  # heap of the k best (score, key) so far; [0] the worst
    best_key = np.zeros(max(k, 1), np.uint64)
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
                if p + _AHEAD < hi[t]:  # the row this cursor reaches _AHEAD on: its reads start now
                    q = rows[p + _AHEAD]
                    _prefetch_jit(doc_len, q)
                    _prefetch_jit(mask, q)
                    if keys.shape[0]:
                        _prefetch_jit(keys, q)
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
            # kept unless k rows seen so far are better by (score, key): a row strictly below the
            # k-th so far is neither among the k best nor a twin of the k-th (no keys: all 0)
            kr = keys[r] if keys.shape[0] else np.uint64(0)
            if acc > theta or (acc == theta and (n_best < k or kr <= best_key[0])):
                out_rows[n_out] = r
                out_scores[n_out] = acc
                n_out += 1
                if n_best < k:  # sift up: a better child above a worse parent goes down
                    c = n_best
                    best[c] = acc
                    best_key[c] = kr
                    n_best += 1
                    while c > 0:
                        u = (c - 1) // 2
                        if best[c] < best[u] or (best[c] == best[u] and best_key[c] > best_key[u]):
                            best[c], best[u] = best[u], best[c]
                            best_key[c], best_key[u] = best_key[u], best_key[c]
                            c = u
                        else:
                            break
                elif acc > best[0] or (acc == best[0] and kr < best_key[0]):  # replace the worst kept
                    best[0] = acc
                    best_key[0] = kr
                    c = 0
                    while True:  # sift down: the worse child up
                        m = c
                        for u in range(2 * c + 1, min(2 * c + 3, k)):
                            if best[u] < best[m] or (best[u] == best[m] and best_key[u] > best_key[m]):
                                m = u
                        if m == c:
                            break
                        best[c], best[m] = best[m], best[c]
                        best_key[c], best_key[m] = best_key[m], best_key[c]
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


_NO_KEYS = np.zeros(0, np.uint64)


def _bm25(rows, tfs, lo, hi, idfs, doc_len, avgdl, mask, n_rows, k1, b):  # pragma: no cover - compiled
    acc = np.zeros(n_rows, np.float64)
    seen = np.zeros(n_rows, np.bool_)
    total = (hi - lo).sum()
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
        while True:  # sift down: the worse child up
            m = c
            for u in range(2 * c + 1, min(2 * c + 3, k)):
                a, b = heap[u], heap[m]
                if scores[a] < scores[b] or (scores[a] == scores[b] and keys[a] > keys[b]):
                    m = u
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


def _fold_csr(off, rows, tfs, nb, log_t, log_r, log_f, n_terms):  # pragma: no cover - compiled
    """CSR postings of terms ``0..n_terms`` (the first ``nb`` with postings ``off``/``rows``/``tfs``)
    with the log of writes applied in order ((term, row, tf); tf 0: removed; the last per (term,
    row) wins): each term's rows ascending."""
    m = log_t.shape[0]
    span = 1
    for i in range(m):
        if log_r[i] + 1 > span:
            span = log_r[i] + 1
    key = np.empty(m, np.int64)
    for i in range(m):
        key[i] = np.int64(log_t[i]) * span + log_r[i]
    order = np.argsort(key, kind="mergesort")  # stable: a later write after an earlier one
    out_rows = np.empty(off[nb] + m, np.int64)
    out_tfs = np.empty(off[nb] + m, np.float64)
    new_off = np.zeros(n_terms + 1, np.int64)
    q = 0  # the log, by (term, row); of a (term, row) written more than once only the last counts
    while q + 1 < m and key[order[q + 1]] == key[order[q]]:
        q += 1
    o = 0
    for t in range(n_terms):
        new_off[t] = o
        a = off[t] if t < nb else 0
        b = off[t + 1] if t < nb else 0
        asc = True
        for p in range(a + 1, b):
            if rows[p] <= rows[p - 1]:
                asc = False
                break
        if asc:
            src_r = rows
            src_t = tfs
            at = a
        else:  # a bulk-loaded term whose rows do not ascend: sorted first
            srt = np.argsort(rows[a:b], kind="mergesort") + a
            src_r = rows[srt]
            src_t = tfs[srt]
            at = 0
        nbr = b - a
        i = 0
        while True:
            lq = order[q] if q < m and log_t[order[q]] == t else -1
            if lq < 0 and i >= nbr:
                break
            if lq >= 0 and (i >= nbr or log_r[lq] <= src_r[at + i]):
                if i < nbr and log_r[lq] == src_r[at + i]:
                    i += 1  # rewritten or removed
                if log_f[lq] > 0:
                    out_rows[o] = log_r[lq]
                    out_tfs[o] = float(log_f[lq])
                    o += 1
                q += 1
                while q + 1 < m and key[order[q + 1]] == key[order[q]]:
                    q += 1
            else:
                out_rows[o] = src_r[at + i]
                out_tfs[o] = src_t[at + i]
                o += 1
                i += 1
    new_off[n_terms] = o
    return new_off, out_rows[:o].copy(), out_tfs[:o].copy()


_EMPTY_ROWS = np.zeros(0, np.int64)
_EMPTY_TFS = np.zeros(0, np.float64)
_EMPTY_LOG = np.zeros(0, np.int32)


def _ascends(rows: np.ndarray) -> bool:
    return rows.shape[0] < 2 or bool((rows[1:] > rows[:-1]).all())


def _merged(rows: np.ndarray, tfs: np.ndarray, d: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Postings ``rows``/``tfs`` with the changes ``d`` (row -> tf; 0: removed), rows ascending —
    what :func:`_fold_csr` makes of them (vectorised: O(df) in numpy, no per-posting Python)."""
    rows = rows.astype(np.int64, copy=False)
    tfs = tfs.astype(np.float64, copy=False)
    if not _ascends(rows):
        order = np.argsort(rows, kind="stable")
        rows, tfs = rows[order], tfs[order]
    if not d:
        return rows, tfs
    dr = np.fromiter(d.keys(), np.int64, len(d))
    dt = np.fromiter(d.values(), np.float64, len(d))
    if not _ascends(dr):
        order = np.argsort(dr, kind="stable")
        dr, dt = dr[order], dt[order]
    if rows.shape[0]:
        pos = np.searchsorted(rows, dr)
        hit = pos < rows.shape[0]
        hit[hit] = rows[pos[hit]] == dr[hit]
        if hit.any():  # rewritten or removed: out of the postings below
            keep = np.ones(rows.shape[0], np.bool_)
            keep[pos[hit]] = False
            rows, tfs = rows[keep], tfs[keep]
    add = dt > 0.0
    if not add.all():
        dr, dt = dr[add], dt[add]
    if rows.shape[0] == 0:
        return dr, dt
    at = np.searchsorted(rows, dr)
    return np.insert(rows, at, dr), np.insert(tfs, at, dt)


class _Postings:
    """One term's postings changed since the CSR block was built: the postings below (the term's
    range of the block, or its :class:`_Postings` in the overlay being folded, or none; once a query
    merged changes, its own arrays) and the changes since (row -> tf; 0: removed) — a write is
    O(1) —, merged into arrays (rows ascending) lazily for the next query: O(changes) in Python,
    O(df) in numpy."""

    __slots__ = ("tid", "below", "own", "d", "rows", "tfs", "seen")

    def __init__(self, tid: int, below: "_Postings | tuple[np.ndarray, np.ndarray] | None") -> None:
        self.tid = tid  # the term's id (its position in the block)
        self.below = below
        self.own = False  # below: arrays merged here (else the block's range or the overlay below)
        self.d: dict[int, int] = {}
        self.rows: np.ndarray | None = None  # set to None by a write (see PostingsIndex.add_doc)
        self.tfs: np.ndarray | None = None
        # (largest tf, shortest row, rows ascending 1.0 / 0.0 / -1.0 not known) once a top-k query
        # found them; dropped with the arrays on a change (a row's length changes only with its
        # terms' postings)
        self.seen: tuple[float, ...] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self.rows is None:
            b = self.below
            below = (_EMPTY_ROWS, _EMPTY_TFS) if b is None else b.arrays() if isinstance(b, _Postings) else b
            self.rows, self.tfs = _merged(below[0], below[1], self.d)
            self.seen = None
            if self.d:  # the next merge starts from here
                self.below, self.own, self.d = (self.rows, self.tfs), True, {}
        return self.rows, self.tfs  # type: ignore[return-value]


class _Fold:
    """A fold's inputs (the block and the log of the writes since, frozen), run by :meth:`run` —
    on a thread of its own, or by a test's hook — and its outcome, read once ``done`` is set."""

    __slots__ = ("args", "out", "seen", "error", "done")

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.seen: np.ndarray | None = None  # the new block's PostingsIndex._base_seen
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.out = _fold_arrays(*self.args)
            self.seen = np.full((self.out[0].shape[0] - 1, 3), -1.0)
        except BaseException as exc:  # noqa: BLE001 - read by the adopting thread: the fold is dropped
            self.error = exc
        finally:
            self.args = ()
            self.done.set()


def _fold_arrays(off: np.ndarray, rows: np.ndarray, tfs: np.ndarray, nb: int, log: "_Log",
                 n_terms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, r, f = log.arrays()
    return _njit(_fold_csr)(off.astype(np.int64, copy=False), rows.astype(np.int64, copy=False),
                            tfs.astype(np.float64, copy=False), nb, t, r, f, n_terms)


class _Log:
    """The postings written since the block was built, in order: (term id, row, tf; 0: removed),
    appended in C (``array``) and read by a fold without a copy once no longer appended to."""

    __slots__ = ("t", "r", "f")

    def __init__(self) -> None:
        self.t, self.r, self.f = array("i"), array("i"), array("i")  # 12 B a posting

    def __len__(self) -> int:
        return len(self.t)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not len(self.t):
            return _EMPTY_LOG, _EMPTY_LOG, _EMPTY_LOG
        return (np.frombuffer(self.t, np.int32), np.frombuffer(self.r, np.int32),
                np.frombuffer(self.f, np.int32))

    def joined(self, later: "_Log") -> "_Log":
        out = _Log()
        out.t, out.r, out.f = self.t + later.t, self.r + later.r, self.f + later.f
        return out


def _fold_on_thread(job: _Fold) -> None:
    threading.Thread(target=job.run, name="umi-bm25-fold", daemon=True).start()


def _libc_trim() -> Callable[[], Any]:
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere): hands the pages of freed blocks back to the
    system. glibc keeps what a folded overlay's larger dicts and a fold's scratch freed in its
    heap (~70 B a posting folded) — memory the process holds, yet reuses only for its own mallocs."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


_trim = _libc_trim()


def _drop_on_thread(overlay: dict[str, _Postings], tid: dict[str, int], names: list[str], lo: int, hi: int) -> None:
    """Free a folded overlay (a dict per term, ~100 B a posting) a term at a time on a thread: freed
    at once, its millions of objects would hold the interpreter for up to a second. First the ids
    ``lo:hi`` in ``tid`` (term -> id; ``names``: id -> term), those of the terms the overlay first
    wrote, get new int objects, all made before any old one is freed: an id made while its term was
    first written sits among the overlay's objects (row ints, dicts) and, once they are freed,
    would alone keep its allocator arena (1 MiB) from going back to the system (bench_bm25's
    corpus, a new term every ~5 postings: ~80 B a posting folded). The values stay equal, so a
    call reading ``tid`` meanwhile (on its own thread, under the GIL) sees no change; after a
    ``load`` these are the old dict and list, no longer read. Last, glibc's heap is trimmed."""

    def drain() -> None:
        fresh: list[int] = []
        for a in range(lo, hi, 4096):
            fresh.extend(range(a, min(a + 4096, hi)))
            time.sleep(0.0002)  # let a query take the interpreter (else it may wait a switch interval)
        for a in range(0, len(fresh), 4096):
            for i in fresh[a:a + 4096]:
                tid[names[i]] = i
            time.sleep(0.0002)
        del fresh
        while overlay:
            for _ in range(min(len(overlay), 512)):
                overlay.popitem()
            time.sleep(0.0002)
        _trim()

    threading.Thread(target=drain, name="umi-bm25-free", daemon=True).start()


class PostingsIndex:
    """term -> postings (row -> tf) for every stored document, and BM25 over them.

    The postings are a CSR block (term id -> range of ``rows``/``tfs``) and an overlay of the terms
    changed since (:class:`_Postings`), with the log of those writes. Once many were written, a
    query starts a fold (:meth:`fold_if_due`): the overlay and log so far are frozen and a fresh
    overlay takes the writes; a thread merges the block and the frozen log into a new block
    (:func:`_fold_csr`, ``nogil``) while queries read the old block under both overlays; the next
    call after it is done swaps the new block in and drops the frozen overlay (the fresh one —
    the writes since the fold started — stays, rebased on the new block). Every call runs on the
    caller's thread under its lock (the store's); the fold thread reads only arrays no call
    changes, and hands its result over through :class:`_Fold` (an event)."""

    def __init__(self) -> None:
        self._fold: _Fold | None = None
        #: runs a fold's step (:meth:`_Fold.run`): on a thread of its own; a test's hook may run it
        #: when it likes
        self.run_fold: Callable[[_Fold], None] = _fold_on_thread
        self.load([], np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
        # row -> candidate position while a top-k query runs; -1 between queries
        self._slot = np.full(0, -1, np.int64)

    def load(self, terms: list[str], offsets: np.ndarray, rows: np.ndarray, tfs: np.ndarray) -> None:
        """Replace everything with CSR postings: term i owns ``rows[offsets[i]:offsets[i + 1]]``
        (a fold in progress is dropped)."""
        self._fold = None
        self._names = list(terms)  # term id -> term
        self._tid = dict(zip(self._names, range(len(self._names))))
        self._nb = len(self._names)  # the terms in the block: ids below
        self._base_off, self._base_rows, self._base_tfs = offsets, rows, tfs
        # per block term, its largest tf and shortest document once a top-k query found them
        # (-1: not yet): a term not in an overlay has not changed since the block was built, nor has
        # the length of any row it holds (changing a row writes each of its terms)
        self._base_seen = np.full((self._nb, 3), -1.0)
        self._post: dict[str, _Postings] = {}  # the terms written since the block (or the fold) began
        self._frozen: dict[str, _Postings] | None = None  # those written before, while a fold runs
        self._log = _Log()  # the writes in _post, for the next fold
        self._frozen_log: _Log | None = None

    # --- the fold ---------------------------------------------------------------------
    def _adopt(self) -> None:
        """Swap in the block of a fold that is done (or drop a failed one: the overlays and logs
        join again). The writes since the fold started stay in the overlay and the log."""
        job = self._fold
        assert job is not None and job.done.is_set() and self._frozen is not None and self._frozen_log is not None
        frozen, self._frozen, self._fold = self._frozen, None, None
        if job.out is None:  # (MemoryError): the postings stay as they were
            self._log = self._frozen_log.joined(self._log)
            self._frozen_log = None
            for t, p in frozen.items():
                self._post.setdefault(t, p)
            return
        self._frozen_log = None
        off, rows, tfs = job.out
        assert job.seen is not None
        old_nb, self._nb = self._nb, off.shape[0] - 1
        self._base_off, self._base_rows, self._base_tfs = off, rows, tfs
        self._base_seen = job.seen
        nb = self._nb
        for p in self._post.values():
            if not p.own:  # the old block's range or the folded overlay's: the new block holds it
                i = p.tid
                p.below = (rows[off[i]:off[i + 1]], tfs[off[i]:off[i + 1]]) if i < nb else None
        _drop_on_thread(frozen, self._tid, self._names, old_nb, nb)

    def _settle(self) -> None:
        job = self._fold
        if job is not None and job.done.is_set():
            self._adopt()

    def _start_fold(self, run: Callable[[_Fold], None]) -> None:
        self._frozen, self._post = self._post, {}
        self._frozen_log, self._log = self._log, _Log()
        job = self._fold = _Fold(self._base_off, self._base_rows, self._base_tfs, self._nb, self._frozen_log,
                                 len(self._names))
        run(job)

    def wait_fold(self, timeout: float) -> bool:
        """Wait at most ``timeout`` s for a fold in progress and swap it in. True when none runs now."""
        job = self._fold
        if job is not None and job.done.wait(timeout):
            self._adopt()
        return self._fold is None

    def fold(self) -> None:
        """Every term's postings into one CSR block now, on this thread (a fold in progress first)."""
        if self.wait_fold(FOLD_WAIT_S) and len(self._log):
            self._start_fold(_Fold.run)
            self._adopt()

    def fold_if_due(self) -> bool:
        """Start a fold once the postings written since the block was built number at least
        ``FOLD_MIN`` and ``FOLD_SHARE`` of the block (a fold reads every posting: at most once per
        that share of the block written, so a store written and read in turn rarely folds); swap in
        one that is done. True when a fold started."""
        self._settle()
        if self._fold is not None or len(self._log) < max(FOLD_MIN, FOLD_SHARE * self._base_rows.shape[0]):
            return False
        self._start_fold(self.run_fold)
        return True

    # --- writes -------------------------------------------------------------------------
    def _changed(self, term: str) -> _Postings | None:
        p = self._post.get(term)
        if p is None and self._frozen is not None:
            p = self._frozen.get(term)
        return p

    def _writable(self, term: str, create: bool) -> _Postings | None:
        """The term's postings in the overlay, put there (over the block's range, or the overlay
        being folded) when not yet; a term never seen: made when ``create``, else None."""
        i = self._tid.get(term)
        if i is None:
            if not create:
                return None
            i = self._tid[term] = len(self._names)
            self._names.append(term)
        below: Any = self._frozen.get(term) if self._frozen is not None else None
        if below is None and i < self._nb:
            a, b = int(self._base_off[i]), int(self._base_off[i + 1])
            below = (self._base_rows[a:b], self._base_tfs[a:b])
        p = self._post[term] = _Postings(i, below)
        return p

    def add_doc(self, row: int, tfs: dict[str, int]) -> None:
        if self._fold is not None:
            self._settle()
        post, ids = self._post, []
        for t, tf in tfs.items():
            p = post.get(t) or self._writable(t, True)
            p.d[row] = tf  # type: ignore[union-attr]
            p.rows = None  # type: ignore[union-attr]
            ids.append(p.tid)  # type: ignore[union-attr]
        log = self._log
        log.t.extend(ids)
        log.r.extend(itertools.repeat(row, len(ids)))
        log.f.extend(tfs.values())

    def remove_doc(self, row: int, terms: Iterable[str]) -> None:
        if self._fold is not None:
            self._settle()
        post, ids = self._post, []
        for t in terms:
            p = post.get(t) or self._writable(t, False)
            if p is not None:
                p.d[row] = 0
                p.rows = None
                ids.append(p.tid)
        log = self._log
        log.t.extend(ids)
        log.r.extend(itertools.repeat(row, len(ids)))
        log.f.extend(itertools.repeat(0, len(ids)))

    # --- reads --------------------------------------------------------------------------
    def export(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """Every term holding a posting, as CSR (the form :meth:`load` takes): (terms, offsets, rows,
        tfs), each term's rows ascending unless none was written since the load. A fold in progress
        is waited for (at most ``FOLD_WAIT_S``; past that its work is done again here)."""
        self.wait_fold(FOLD_WAIT_S)
        # a copy of the log: the one appended to must not be viewed (an array exporting its buffer
        # cannot grow)
        log = (self._frozen_log or _Log()).joined(self._log)
        if len(log):
            off, rows, tfs = _fold_arrays(self._base_off, self._base_rows, self._base_tfs, self._nb, log,
                                          len(self._names))
        else:
            off, rows, tfs = self._base_off, self._base_rows, self._base_tfs
        counts = np.diff(off)
        kept = np.flatnonzero(counts)
        if kept.shape[0] == counts.shape[0]:
            return list(self._names[: counts.shape[0]]), off, rows, tfs
        offsets = np.zeros(kept.shape[0] + 1, np.int64)
        np.cumsum(counts[kept], out=offsets[1:])
        names = self._names
        return [names[i] for i in kept.tolist()], offsets, rows, tfs

    def df(self, term: str) -> int:
        self._settle()
        p = self._changed(term)
        if p is not None:
            return int(p.arrays()[0].shape[0])
        i = self._tid.get(term)
        return 0 if i is None or i >= self._nb else int(self._base_off[i + 1] - self._base_off[i])

    def score(self, terms: Sequence[str], n_docs: int, avg_doc_len: float, doc_len: np.ndarray,
              mask: np.ndarray, k: int | None = None, keys: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, BM25 scores) of the rows in ``mask`` holding at least one of ``terms`` (distinct).
        With ``k``: only the rows that may rank in the top ``k`` or tie with the k-th are sure to
        be there (:func:`_bm25_pruned`); ``keys`` (row -> tie-break key) may narrow them to
        the k best by (score, key) and the k-th's twins (:func:`_bm25_maxscore`)."""
        return self.scorer(terms, n_docs, avg_doc_len, doc_len, mask, k, keys).run()

    def scorer(self, terms: Sequence[str], n_docs: int, avg_doc_len: float, doc_len: np.ndarray,
               mask: np.ndarray, k: int | None = None, keys: np.ndarray | None = None) -> "_Scorer":
        """:meth:`score` in two steps: the postings are gathered now; the call returned runs the
        kernel (``nogil``: it may run on another thread while the caller keeps the index, ``mask``
        and ``doc_len`` unchanged, one call at a time per index — it uses the index's scratch)."""
        # the postings of each term: a range of the CSR block (no copy) while no query term changed
        # since it was built, else the terms' arrays concatenated; a fold may start (or be swapped in)
        self._settle()
        changed = [self._changed(t) for t in terms]
        if any(p is not None for p in changed):
            self.fold_if_due()  # (the overlay being frozen: the same postings, under _frozen)
        tid, nb = self._tid, self._nb
        if all(p is None for p in changed):
            at = np.array([i for i in map(tid.get, terms) if i is not None and i < nb], np.int64)
            if at.shape[0] == 0:
                return _nothing
            off = self._base_off
            lo, hi = off[at].astype(np.int64, copy=False), off[at + 1].astype(np.int64, copy=False)
            rows, tfs = self._base_rows, self._base_tfs
            seen, seen_at = self._base_seen, at
            owners: list[Any] | None = None
        else:
            arrays = []
            owners = []  # each term's _Postings, or its position in the block
            for t, p in zip(terms, changed):
                if p is not None:
                    got = p.arrays()
                    if got[0].shape[0]:
                        arrays.append(got)
                        owners.append(p)
                else:
                    i = tid.get(t)
                    if i is not None and i < nb:
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

        base_seen = self._base_seen  # (a fold swapped in before the kernel runs replaces it)

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
    """A keyword search's kernel call, ready to :attr:`run`, and how many postings it reads (its work)."""

    __slots__ = ("run", "postings")

    def __init__(self, run: Callable[[], tuple[np.ndarray, np.ndarray]], postings: int) -> None:
        self.run, self.postings = run, postings


def _none() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.float64)


_nothing = _Scorer(_none, 0)
