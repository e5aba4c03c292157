"""Numba kernels: exact top-k cosine similarity over L2-normalised float32 rows.

The scan is memory-bound: every eligible row is read once, its dot product with the
query is computed in registers and fed straight into a size-``k`` selection heap, so
no ``(n,)`` score array is ever written. Rows are split into one block per numba
thread (``prange``); each block keeps its own heap and the heaps are merged at the end.
Masked-out rows are skipped before their bytes are touched, so a selective mask makes
the scan proportionally cheaper.

Ordering contract, shared by every function here: score descending, then slot
ascending. Selection uses the same comparator, so the chosen set at a tie on the
k-th score is the one with the lowest slots, whatever the number of threads.

The dot products use ``fastmath`` reassociation (so the loop vectorises); a score is a
deterministic function of the two vectors on a given machine, bit-identical between
:func:`topk` and :func:`dot_rows`, and within float32 rounding (``dim * 2**-24``) of
numpy's BLAS dot and of :func:`topk_many`. :func:`topk_reference` is the plain numpy
reference.

Threads: scans under ``PARALLEL_MIN_FLOATS`` floats run on one thread. Larger ones run
on one thread or on all numba threads (one row block each), whichever has been faster
lately: each choice keeps a moving average of its cost per float, and the other one is
re-tried every ``_Threads.PROBE_EVERY`` calls. On an idle machine the parallel scan
wins; on cores shared with busy processes a parallel region can wait a whole
scheduler time slice for its second thread, and the one-thread scan wins. Results do
not depend on the choice (selection uses a total order and each score is computed by
the same loop). ``THREADS = "one"`` / ``"all"`` pins it; ``numba.set_num_threads``
bounds it.

Nothing is compiled at import: numba compiles each kernel on first call (and caches
the machine code on disk, ``cache=True``). :func:`warmup` compiles them eagerly.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from numba import njit, prange

from .errors import InvalidLimitError, ValidationError

__all__ = [
    "PARALLEL_MIN_FLOATS",
    "THREADS",
    "TOPK_K_MAX",
    "dot_rows",
    "dot_rows_unchecked",
    "topk",
    "topk_many",
    "topk_many_unchecked",
    "topk_reference",
    "topk_unchecked",
    "warmup",
]

#: largest ``k`` a top-k call accepts (the per-thread heaps are ``k`` long)
TOPK_K_MAX = 100_000

#: scans smaller than this many floats (rows x dim; 16 MiB) run on one thread. Below it
#: the work is a few hundred microseconds, mostly from cache, and waking the thread
#: pool costs more than it saves (on a busy machine, a whole scheduler time slice).
PARALLEL_MIN_FLOATS = 1 << 22

#: ``"auto"`` (measure and pick), ``"one"`` or ``"all"`` threads for scans above
#: ``PARALLEL_MIN_FLOATS``
THREADS = "auto"

# Only reassociation (plus its harmless companions): the heap code compares floats
# and must not be told that infinities and NaNs cannot occur.
_FASTMATH = {"reassoc", "nsz", "contract", "arcp"}


# --- building blocks, compiled once and called by the kernels (LLVM inlines _dot) --


@njit(fastmath=_FASTMATH, cache=True)
def _dot(vectors, i, query):  # pragma: no cover - compiled
    s = np.float32(0.0)
    for j in range(query.shape[0]):
        s += vectors[i, j] * query[j]
    return s


@njit(cache=True)
def _worse(sa, ia, sb, ib):  # pragma: no cover - compiled
    """True when candidate a ranks after candidate b (lower score, or same score, higher slot)."""
    return sa < sb or (sa == sb and ia > ib)


@njit(cache=True)
def _sift_down(hs, hi, pos, cnt):  # pragma: no cover - compiled
    # min-heap on rank: the root is the worst candidate kept so far
    while True:
        child = 2 * pos + 1
        if child >= cnt:
            break
        right = child + 1
        if right < cnt and _worse(hs[right], hi[right], hs[child], hi[child]):
            child = right
        if _worse(hs[child], hi[child], hs[pos], hi[pos]):
            ts = hs[pos]
            ti = hi[pos]
            hs[pos] = hs[child]
            hi[pos] = hi[child]
            hs[child] = ts
            hi[child] = ti
            pos = child
        else:
            break


@njit(cache=True)
def _push(hs, hi, cnt, k, s, i):  # pragma: no cover - compiled
    """Offer (s, i) to a heap holding ``cnt`` of at most ``k``; returns the new count."""
    if cnt < k:
        pos = cnt
        hs[pos] = s
        hi[pos] = i
        while pos > 0:
            parent = (pos - 1) // 2
            if _worse(hs[pos], hi[pos], hs[parent], hi[parent]):
                ts = hs[pos]
                ti = hi[pos]
                hs[pos] = hs[parent]
                hi[pos] = hi[parent]
                hs[parent] = ts
                hi[parent] = ti
                pos = parent
            else:
                break
        return cnt + 1
    if _worse(hs[0], hi[0], s, i):
        hs[0] = s
        hi[0] = i
        _sift_down(hs, hi, 0, cnt)
    return cnt


@njit(cache=True)
def _drain_sorted(hs, hi, cnt, out_s, out_i):  # pragma: no cover - compiled
    """Empty the heap into out_* best-first (pops the worst into the last free place)."""
    n = cnt
    while n > 0:
        out_s[n - 1] = hs[0]
        out_i[n - 1] = hi[0]
        n -= 1
        hs[0] = hs[n]
        hi[0] = hi[n]
        _sift_down(hs, hi, 0, n)


@njit(fastmath=_FASTMATH, cache=True)
def _scan_block(vectors, query, k, valid, mask, start, end, hs, hi):  # pragma: no cover
    cnt = 0
    for i in range(start, end):
        if not (valid[i] and mask[i]):
            continue
        s = _dot(vectors, i, query)
        # fast reject: rows are scanned in slot order, so a tie never displaces the root
        if cnt == k and s <= hs[0]:
            continue
        cnt = _push(hs, hi, cnt, k, s, i)
    return cnt


# --- single query -------------------------------------------------------------------


@njit(fastmath=_FASTMATH, cache=True)
def _topk_serial(vectors, query, k, valid, mask):  # pragma: no cover - compiled
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    cnt = _scan_block(vectors, query, k, valid, mask, 0, vectors.shape[0], hs, hi)
    out_s = np.empty(cnt, np.float32)
    out_i = np.empty(cnt, np.int64)
    _drain_sorted(hs, hi, cnt, out_s, out_i)
    return out_i, out_s


@njit(fastmath=_FASTMATH, parallel=True, cache=True)
def _topk_parallel(vectors, query, k, valid, mask, nblocks):  # pragma: no cover - compiled
    n = vectors.shape[0]
    per = (n + nblocks - 1) // nblocks
    bs = np.empty((nblocks, k), np.float32)
    bi = np.empty((nblocks, k), np.int64)
    bc = np.zeros(nblocks, np.int64)
    for b in prange(nblocks):
        start = b * per
        end = min(n, start + per)
        bc[b] = _scan_block(vectors, query, k, valid, mask, start, end, bs[b], bi[b])
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    cnt = 0
    for b in range(nblocks):
        for t in range(bc[b]):
            cnt = _push(hs, hi, cnt, k, bs[b, t], bi[b, t])
    out_s = np.empty(cnt, np.float32)
    out_i = np.empty(cnt, np.int64)
    _drain_sorted(hs, hi, cnt, out_s, out_i)
    return out_i, out_s


# --- several queries: each row is read once and scored against every query ---------


@njit(cache=True)
def _offer(hs, hi, cnts, q, k, s, i):  # pragma: no cover - compiled
    c = cnts[q]
    if c == k and s <= hs[q, 0]:
        return
    cnts[q] = _push(hs[q], hi[q], c, k, s, i)


@njit(fastmath=_FASTMATH, cache=True)
def _scan_block_many(
    vectors, queries, k, valid, mask, start, end, hs, hi, cnts
):  # pragma: no cover
    m, d = queries.shape
    for i in range(start, end):
        if not (valid[i] and mask[i]):
            continue
        # Four queries per pass over the row: the row element is loaded once for four
        # products, which roughly halves the loads per multiply-add.
        q = 0
        while q + 4 <= m:
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for j in range(d):
                r = vectors[i, j]
                s0 += r * queries[q, j]
                s1 += r * queries[q + 1, j]
                s2 += r * queries[q + 2, j]
                s3 += r * queries[q + 3, j]
            # the cheap reject is written out here: a call per score costs more than the score
            if cnts[q] < k or s0 > hs[q, 0]:
                _offer(hs, hi, cnts, q, k, s0, i)
            if cnts[q + 1] < k or s1 > hs[q + 1, 0]:
                _offer(hs, hi, cnts, q + 1, k, s1, i)
            if cnts[q + 2] < k or s2 > hs[q + 2, 0]:
                _offer(hs, hi, cnts, q + 2, k, s2, i)
            if cnts[q + 3] < k or s3 > hs[q + 3, 0]:
                _offer(hs, hi, cnts, q + 3, k, s3, i)
            q += 4
        if q + 2 <= m:  # a pair: the deep recall path's 3 variants are a pair and one
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            for j in range(d):
                r = vectors[i, j]
                s0 += r * queries[q, j]
                s1 += r * queries[q + 1, j]
            if cnts[q] < k or s0 > hs[q, 0]:
                _offer(hs, hi, cnts, q, k, s0, i)
            if cnts[q + 1] < k or s1 > hs[q + 1, 0]:
                _offer(hs, hi, cnts, q + 1, k, s1, i)
            q += 2
        while q < m:
            s = _dot(vectors, i, queries[q])
            if cnts[q] < k or s > hs[q, 0]:
                _offer(hs, hi, cnts, q, k, s, i)
            q += 1


@njit(cache=True)
def _merge_many(bs, bi, bc, k, m):  # pragma: no cover - compiled
    nblocks = bs.shape[0]
    # every query sees the same eligible rows, so all end with the same count
    total = 0
    for b in range(nblocks):
        total += bc[b, 0]
    kk = min(k, total)
    out_s = np.empty((m, kk), np.float32)
    out_i = np.empty((m, kk), np.int64)
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    for q in range(m):
        cnt = 0
        for b in range(nblocks):
            for t in range(bc[b, q]):
                cnt = _push(hs, hi, cnt, k, bs[b, q, t], bi[b, q, t])
        _drain_sorted(hs, hi, cnt, out_s[q], out_i[q])
    return out_i, out_s


@njit(fastmath=_FASTMATH, cache=True)
def _topk_many_serial(vectors, queries, k, valid, mask):  # pragma: no cover - compiled
    m = queries.shape[0]
    bs = np.empty((1, m, k), np.float32)
    bi = np.empty((1, m, k), np.int64)
    bc = np.zeros((1, m), np.int64)
    _scan_block_many(vectors, queries, k, valid, mask, 0, vectors.shape[0], bs[0], bi[0], bc[0])
    return _merge_many(bs, bi, bc, k, m)


@njit(fastmath=_FASTMATH, parallel=True, cache=True)
def _topk_many_parallel(vectors, queries, k, valid, mask, nblocks):  # pragma: no cover - compiled
    n = vectors.shape[0]
    m = queries.shape[0]
    per = (n + nblocks - 1) // nblocks
    bs = np.empty((nblocks, m, k), np.float32)
    bi = np.empty((nblocks, m, k), np.int64)
    bc = np.zeros((nblocks, m), np.int64)
    for b in prange(nblocks):
        start = b * per
        end = min(n, start + per)
        _scan_block_many(vectors, queries, k, valid, mask, start, end, bs[b], bi[b], bc[b])
    return _merge_many(bs, bi, bc, k, m)


@njit(fastmath=_FASTMATH, cache=True)
def _dot_rows(vectors, query, slots):  # pragma: no cover - compiled
    out = np.empty(slots.shape[0], np.float32)
    for t in range(slots.shape[0]):
        out[t] = _dot(vectors, slots[t], query)
    return out


# --- Python entry points --------------------------------------------------------------


def _check_vectors(vectors: np.ndarray) -> np.ndarray:
    if not isinstance(vectors, np.ndarray):
        raise TypeError(f"vectors must be a numpy array, got {type(vectors).__name__}")
    if vectors.dtype != np.float32:
        raise TypeError(f"vectors must be float32, got {vectors.dtype}")
    if vectors.ndim != 2:
        raise ValidationError(f"vectors must be 2-D (n, dim), got shape {vectors.shape}")
    return np.ascontiguousarray(vectors)


def _check_query(query: np.ndarray, dim: int, ndim: int) -> np.ndarray:
    if not isinstance(query, np.ndarray):
        raise TypeError(f"query must be a numpy array, got {type(query).__name__}")
    if query.dtype != np.float32:
        raise TypeError(f"query must be float32, got {query.dtype}")
    if query.ndim != ndim or query.shape[-1] != dim:
        want = f"({dim},)" if ndim == 1 else f"(m, {dim})"
        raise ValidationError(f"query must have shape {want}, got {query.shape}")
    return np.ascontiguousarray(query)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= TOPK_K_MAX:
        raise InvalidLimitError(
            f"k must be in [1, {TOPK_K_MAX}], got {k}", limit=(1, TOPK_K_MAX), actual=int(k)
        )
    return int(k)


def _check_mask(mask: np.ndarray | None, n: int, name: str) -> np.ndarray | None:
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise TypeError(
            f"{name} must be a numpy bool array, got {getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if mask.ndim != 1 or mask.shape[0] < n:
        raise ValidationError(
            f"{name} must be 1-D with length >= {n} (rows), got shape {mask.shape}"
        )
    return np.ascontiguousarray(mask[:n])


def _masks(
    valid: np.ndarray | None, mask: np.ndarray | None, n: int
) -> tuple[np.ndarray, np.ndarray]:
    valid = _check_mask(valid, n, "valid")
    mask = _check_mask(mask, n, "mask")
    if valid is None and mask is None:
        valid = np.ones(n, np.bool_)
    # the kernels test valid[i] and mask[i]; passing one array twice costs nothing
    return (valid if valid is not None else mask), (mask if mask is not None else valid)  # type: ignore[return-value]


class _Threads:
    """Chooses one thread or all of them for a large scan, by measured cost per float."""

    PROBE_EVERY = 32
    _DECAY = 0.25

    def __init__(self) -> None:
        self.cost: dict[int, float] = {}  # blocks -> moving average of seconds per float
        self.calls = 0

    def blocks(self, work: int, rows: int) -> int:
        if work < PARALLEL_MIN_FLOATS or THREADS == "one":
            return 1
        nt = max(1, min(numba.get_num_threads(), rows))
        if nt == 1 or THREADS == "all":
            return nt
        self.calls += 1
        one, many = self.cost.get(1), self.cost.get(nt)
        if one is None:
            return 1
        if many is None:
            return nt
        best, other = (1, nt) if one <= many else (nt, 1)
        return other if self.calls % self.PROBE_EVERY == 0 else best

    def record(self, blocks: int, work: int, seconds: float) -> None:
        per = seconds / work
        old = self.cost.get(blocks)
        self.cost[blocks] = per if old is None else old + self._DECAY * (per - old)


_single_threads = _Threads()
_batch_threads = _Threads()


def topk(
    vectors: np.ndarray,
    query: np.ndarray,
    k: int,
    mask: np.ndarray | None = None,
    *,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``vectors`` by dot product with ``query``.

    ``vectors`` is ``(n, dim)`` float32 and ``query`` ``(dim,)`` float32; both are
    expected L2-normalised, so the dot product is the cosine similarity. Only rows with
    ``valid[i] and mask[i]`` are eligible (either may be None = all; each, if given, is a
    bool array of length >= n). Returns ``(rows int64, scores float32)`` of length
    ``min(k, eligible)``, score descending then row ascending.
    """
    vectors = _check_vectors(vectors)
    n, dim = vectors.shape
    query = _check_query(query, dim, 1)
    k = _check_k(k)
    v, m = _masks(valid, mask, n)
    return topk_unchecked(vectors, query, k, v, m)


def topk_unchecked(
    vectors: np.ndarray, query: np.ndarray, k: int, valid: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`topk` without argument checks, for callers that keep the invariants.

    ``vectors`` C-contiguous float32 ``(n, dim)``, ``query`` contiguous float32 ``(dim,)``,
    ``valid`` and ``mask`` contiguous bool of length ``n`` (the same array may be passed
    twice), ``1 <= k <= TOPK_K_MAX``.
    """
    n, dim = vectors.shape
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    work = n * dim
    nb = _single_threads.blocks(work, n)
    if work < PARALLEL_MIN_FLOATS:
        return _topk_serial(vectors, query, k, valid, mask)
    t = time.perf_counter()
    if nb == 1:
        out = _topk_serial(vectors, query, k, valid, mask)
    else:
        out = _topk_parallel(vectors, query, k, valid, mask, nb)
    _single_threads.record(nb, work, time.perf_counter() - t)
    return out


def topk_many(
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    mask: np.ndarray | None = None,
    *,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`topk` for a batch of ``(m, dim)`` queries in one pass over ``vectors``.

    Returns ``(rows, scores)`` of shape ``(m, min(k, eligible))``, each row of the result
    ordered as :func:`topk` orders it. Queries are scored four at a time, so a score may
    differ from :func:`topk`'s in the last bit (both are within float32 rounding of the
    true dot product); callers that need :func:`topk`'s exact choice at near-ties
    re-score candidates with :func:`dot_rows` (``VectorIndex.search_many`` does).
    """
    vectors = _check_vectors(vectors)
    n, dim = vectors.shape
    queries = _check_query(queries, dim, 2)
    k = _check_k(k)
    v, m = _masks(valid, mask, n)
    return topk_many_unchecked(vectors, queries, k, v, m)


def topk_many_unchecked(
    vectors: np.ndarray, queries: np.ndarray, k: int, valid: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`topk_many` without argument checks (see :func:`topk_unchecked`)."""
    n, dim = vectors.shape
    nq = queries.shape[0]
    v, m = valid, mask
    if n == 0 or nq == 0:
        kk = 0 if n == 0 else min(k, int(np.count_nonzero(v & m)))
        return np.empty((nq, kk), np.int64), np.empty((nq, kk), np.float32)
    if nq == 1:  # the single-query kernel is the faster loop for one query
        rows, scores = topk_unchecked(vectors, queries[0], k, v, m)
        return rows[None, :], scores[None, :]
    # the scan is compute-bound from about four queries on: size the thread choice by work
    work = n * dim * max(1, nq // 4)
    nb = _batch_threads.blocks(work, n)
    if work < PARALLEL_MIN_FLOATS:
        return _topk_many_serial(vectors, queries, k, v, m)
    t = time.perf_counter()
    if nb == 1:
        out = _topk_many_serial(vectors, queries, k, v, m)
    else:
        out = _topk_many_parallel(vectors, queries, k, v, m, nb)
    _batch_threads.record(nb, work, time.perf_counter() - t)
    return out


def dot_rows(vectors: np.ndarray, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Scores of the given rows against ``query``, bit-identical to :func:`topk`'s."""
    vectors = _check_vectors(vectors)
    n, dim = vectors.shape
    query = _check_query(query, dim, 1)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if rows.ndim != 1:
        raise ValidationError(f"rows must be 1-D, got shape {rows.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValidationError(
            f"rows must be in [0, {n}), got values in [{rows.min()}, {rows.max()}]"
        )
    return _dot_rows(vectors, query, rows)


def dot_rows_unchecked(vectors: np.ndarray, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """:func:`dot_rows` without argument checks (``rows`` int64, all in range)."""
    return _dot_rows(vectors, query, rows)


def topk_reference(
    vectors: np.ndarray,
    query: np.ndarray,
    k: int,
    mask: np.ndarray | None = None,
    *,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy reference for :func:`topk` (same contract; scores from numpy's dot)."""
    vectors = _check_vectors(vectors)
    n, dim = vectors.shape
    query = _check_query(query, dim, 1)
    k = _check_k(k)
    v, m = _masks(valid, mask, n)
    rows = np.flatnonzero(v & m)
    scores = (vectors[rows] @ query).astype(np.float32)
    order = np.lexsort((rows, -scores))[:k]
    return rows[order].astype(np.int64), scores[order]


def warmup(dim: int = 8) -> None:
    """Compile (or load from the on-disk cache) every kernel now instead of on first use."""
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((4, dim)).astype(np.float32)
    q = vecs[0].copy()
    ones = np.ones(4, np.bool_)
    _topk_serial(vecs, q, 2, ones, ones)
    _topk_parallel(vecs, q, 2, ones, ones, 2)
    _topk_many_serial(vecs, vecs[:2].copy(), 2, ones, ones)
    _topk_many_parallel(vecs, vecs[:2].copy(), 2, ones, ones, 2)
    _dot_rows(vecs, q, np.arange(2, dtype=np.int64))
