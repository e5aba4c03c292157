"""BM25 scoring kernel (numba) over in-memory postings.

The postings of the query's terms arrive concatenated (``rows``, ``tfs``) with
``term_ptr`` marking where each term's list starts; each row appears at most once
per term. Scores accumulate in a dense per-row array; only rows that the filter
``mask`` lets through are returned. Formula and constants: :mod:`umi.storage.text`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .text import BM25_B, BM25_K1

__all__ = ["bm25_candidates", "top_rows"]

_kernel: Any = None


def _compiled() -> Any:
    """numba is imported (and the kernel compiled, or loaded from its on-disk cache) on first use,
    so ``import umi`` does not pay for it."""
    global _kernel
    if _kernel is None:
        from numba import njit

        _kernel = njit(cache=True)(_bm25)
    return _kernel


def _bm25(rows, tfs, term_ptr, idfs, doc_len, avgdl, mask, n_rows, k1, b):  # pragma: no cover - compiled
    acc = np.zeros(n_rows, np.float64)
    seen = np.zeros(n_rows, np.bool_)
    out_rows = np.empty(rows.shape[0], np.int64)
    n_out = 0
    for t in range(idfs.shape[0]):
        idf = idfs[t]
        for p in range(term_ptr[t], term_ptr[t + 1]):
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
    return _compiled()(rows, tfs, term_ptr, idfs, doc_len, float(avgdl), mask, mask.shape[0], BM25_K1, BM25_B)


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best scores, plus every position tied with the k-th (so the caller
    can break ties by id); unordered."""
    n = scores.shape[0]
    if n <= k:
        return np.arange(n)
    kth = np.partition(scores, n - k)[n - k]
    return np.flatnonzero(scores >= kth)
