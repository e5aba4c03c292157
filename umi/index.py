"""VectorIndex: an in-process cosine index, exact (numba) when small, HNSW (hnswlib) when large.

The index is a *cache* of the durable store: ids and L2-normalised float32 vectors
live in one ``(capacity, dim)`` array addressed by integer *slots*, and every search
result is scored exactly from that array.

Path selection (``search`` / ``search_many``), with ``eligible`` the number of live
slots the mask lets through (all live slots when there is no mask):

* **exact** — the fused numba scan (:mod:`umi.kernels`) when ``len(index) <
  hnsw_threshold``, or when the mask is selective: ``eligible < hnsw_threshold`` or
  ``eligible < EXACT_SELECTIVITY * len(index)`` (10 %). A masked scan only reads the
  rows it lets through, so it costs about ``eligible`` rows, while a filtered HNSW
  walk visits about ``1 / selectivity`` times more nodes and loses recall. Also
  when ``k > 256`` and ``k > len(index) / 16``: such a walk visits most of the graph.
* **hnsw** — otherwise. Without a mask, hnswlib returns ``k`` candidates. With a
  mask, it over-fetches ``k * len / eligible * 2`` candidates (bounded by
  ``len``) and keeps those the mask allows; if that leaves fewer than ``k``, it asks
  again with hnswlib's filter callback, and falls back to the exact scan if hnswlib
  still cannot fill ``k``. Candidates are re-scored exactly from the stored vectors.

Results are ``(id, cosine)`` ordered by score descending, then id ascending; on the
exact path the selection itself honours that order at a tie on the k-th score.

Slots: a new id takes the lowest free slot (slots freed by :meth:`remove` are reused,
so ``capacity`` stays bounded by the peak number of live ids); re-adding an existing
id keeps its slot. In the HNSW graph a slot's label is the slot number; a removed
slot is ``mark_deleted`` and, when reused, hnswlib updates that node in place.

The graph is built lazily, the first time a search needs it (or by
:meth:`build_graph`), from the live slots in slot order with one thread, and is kept
up to date incrementally afterwards (``add_items``/``mark_deleted``, one thread). One
thread makes construction deterministic: the same adds in the same order with the
same ``seed`` give the same graph and the same results.

Persistence: :meth:`save` writes ``path`` (header, ids, vectors, CRC-32) and, when
the graph is built, a sibling ``<path>.<token>.hnsw`` — the format and the crash rules
live in :mod:`umi._index_file`. :meth:`load` verifies everything and raises
:class:`umi.errors.IndexCacheError` on any mismatch; the caller then rebuilds from
the store. A graph that was not saved is built by :meth:`load` when the index has
reached ``hnsw_threshold`` (or left to the first search, ``build_graph=False``).

A :class:`VectorIndex` guards itself with a lock: calls from several threads are
serialised.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import threading
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import numpy as np

from . import _index_file
from .errors import IndexCacheError, InvalidConfigError, InvalidLimitError, ValidationError

__all__ = ["EXACT_SELECTIVITY", "INDEX_DIM_MAX", "SEARCH_K_MAX", "VectorIndex"]

#: masks letting through less than this fraction of the live vectors use the exact scan
EXACT_SELECTIVITY = 0.10

#: largest ``k`` a search accepts
SEARCH_K_MAX = 10_000

#: largest vector dimension accepted
INDEX_DIM_MAX = 65_536

_MIN_GROW = 64
#: map saved vectors instead of reading them (POSIX: a mapped file can still be replaced)
_HNSW_K_MIN_EXACT = 256  # k above this and above len/16 goes exact
_BATCH_PAD = 8  # extra candidates per query fetched by the batch scan
_UNIT_TOLERANCE = 4e-7  # |norm - 1| within which a row counts as normalised (~3 float32 ulps)


def _check_int(
    name: str,
    value: Any,
    lo: int,
    hi: int | None = None,
    error: type[ValidationError] = InvalidConfigError,
) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise error(f"{name} must be {bound}, got {value}")
    return value


#: rows normalised per step: the float64 temporaries stay ~25 MB at 384-d, not 2 x 3 GB for a
#: million rows at once (a rebuild of a 1M-row index went through them)
_NORMALISE_CHUNK_ROWS = 8_192


def _normalise_rows(vectors: np.ndarray, what: str) -> np.ndarray:
    """float32 copy with unit rows; rejects non-finite values and zero rows.

    Row by row arithmetic, done in chunks of rows: the result is the same bits whatever the chunk.
    """
    out = np.empty(vectors.shape, np.float32)
    for a in range(0, vectors.shape[0], _NORMALISE_CHUNK_ROWS):
        chunk = vectors[a : a + _NORMALISE_CHUNK_ROWS]
        if not np.all(np.isfinite(chunk)):
            bad = a + int(np.argwhere(~np.isfinite(chunk))[0][0]) if vectors.ndim == 2 else 0
            raise ValidationError(f"{what} must be finite; row {bad} has NaN or inf")
        v64 = chunk.astype(np.float64, copy=False)
        norms = np.sqrt(np.einsum("ij,ij->i", v64, v64))
        huge = np.flatnonzero(~np.isfinite(norms))
        if huge.size:
            raise ValidationError(
                f"{what} must have a finite norm; row {a + int(huge[0])} overflows float64"
            )
        zero = np.flatnonzero(norms == 0.0)
        if zero.size:
            raise ValidationError(
                f"{what} must be non-zero to be normalised; row {a + int(zero[0])} is all zeros"
            )
        # Rows already unit length to float32 precision are kept bit for bit, so that adding
        # back a vector read from the index (or from the store) reproduces it exactly.
        scale = np.where(np.abs(norms - 1.0) <= _UNIT_TOLERANCE, 1.0, norms)
        out[a : a + chunk.shape[0]] = v64 / scale[:, None]
    return out


def by_score_then_id(pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """``pairs`` (id, score) sorted in place by score descending, then id: the order of every
    search answer. By id, then (stable) by score: two C-level sorts, no key tuple per pair."""
    pairs.sort(key=itemgetter(0))
    pairs.sort(key=itemgetter(1), reverse=True)
    return pairs


#: compact erases the vectors of removed nodes in the graph in place (~5 ms a node at 100k, under
#: the store's lock) while there is at most one per this many live nodes; above, the graph is
#: dropped and built anew on a thread (~1 ms a live node at 100k, searches exact meanwhile)
ERASE_IN_PLACE_SHARE = 10

#: From this many vectors on, a missing graph is built on a background thread while searches
#: stay exact; below it, the first search that needs the graph builds it (a few seconds at most).
BACKGROUND_BUILD_MIN = 5_000


#: below this many vectors every search is an exact scan (no graph to build or keep up): the
#: numba kernel reads the vectors at memory bandwidth, exact and cheaper than a graph walk plus a
#: graph insert per write at small sizes (measured here, 384-d Sim vectors, k=30: exact 0.3 ms at
#: 5k, 1.35 ms at 10k against a walk's 0.6 ms, which costs each write ~0.7 ms more at 10k)
HNSW_THRESHOLD = 20_000
#: the graph's parameters (hnswlib's M, ef_construction, ef_search)
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128


class VectorIndex:
    """Cosine top-k over string ids; see the module docstring for paths, slots and files."""

    def __init__(
        self,
        dim: int,
        *,
        hnsw_threshold: int = HNSW_THRESHOLD,
        M: int = HNSW_M,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        ef_search: int = HNSW_EF_SEARCH,
        seed: int = 0,
    ) -> None:
        self.dim = _check_int("dim", dim, 1, INDEX_DIM_MAX)
        self.hnsw_threshold = _check_int("hnsw_threshold", hnsw_threshold, 0)
        self.M = _check_int("M", M, 2, 1024)
        self.ef_construction = _check_int("ef_construction", ef_construction, 1)
        self.ef_search = _check_int("ef_search", ef_search, 1)
        self.seed = _check_int("seed", seed, 0, 2**31 - 1)
        self._lock = threading.RLock()
        self._vectors = np.zeros((0, self.dim), np.float32)
        self._live = np.zeros(0, np.bool_)
        self._ids: list[str | None] = []  # slot -> id; len == high-water mark
        self._slot: dict[str, int] = {}
        self._free: list[int] = []  # freed slots, a min-heap: the lowest is reused first
        self._graph: Any = None  # hnswlib.Index once built
        self._in_graph = np.zeros(0, np.bool_)  # slot has a node (live or deleted) in the graph
        # A graph being built in the background: the thread, and the slots written meanwhile.
        self._building: threading.Thread | None = None
        self._build_log: list[np.ndarray] | None = None
        # A saved graph left on disk by load(defer_graph=True) — (graph file, index file, what
        # the index file says of it) — until a search or a save needs it; _build_log then holds
        # the slots written meanwhile.
        self._graph_file: tuple[str, str, dict[str, Any]] | None = None

    # --- size ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot)

    @property
    def capacity(self) -> int:
        """Slots allocated; valid slot ids are ``0 .. capacity - 1`` and masks are at least this long."""
        return int(self._vectors.shape[0])

    @property
    def graph_built(self) -> bool:
        """A graph is built, or saved and read when first needed (``defer_graph``)."""
        return self._graph is not None or self._graph_file is not None

    def __repr__(self) -> str:
        return (
            f"VectorIndex(dim={self.dim}, len={len(self)}, capacity={self.capacity}, "
            f"hnsw_threshold={self.hnsw_threshold}, graph_built={self.graph_built})"
        )

    # --- validation -----------------------------------------------------------
    @staticmethod
    def _check_ids(ids: Sequence[str]) -> list[str]:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"ids must be a sequence of str, got {type(ids).__name__}")
        out = list(ids)
        for i in out:
            if not isinstance(i, str):
                raise TypeError(f"every id must be a str, got {type(i).__name__}")
            if not i:
                raise ValidationError("ids must be non-empty strings")
        return out

    def _check_matrix(self, vectors: Any, what: str) -> np.ndarray:
        if not isinstance(vectors, np.ndarray):
            raise TypeError(f"{what} must be a numpy array, got {type(vectors).__name__}")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise TypeError(f"{what} must have a float dtype, got {vectors.dtype}")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValidationError(f"{what} must have shape (n, {self.dim}), got {vectors.shape}")
        return vectors

    def _check_query(self, query: Any) -> np.ndarray:
        if not isinstance(query, np.ndarray):
            raise TypeError(f"query must be a numpy array, got {type(query).__name__}")
        if not np.issubdtype(query.dtype, np.floating):
            raise TypeError(f"query must have a float dtype, got {query.dtype}")
        if query.shape != (self.dim,):
            raise ValidationError(f"query must have shape ({self.dim},), got {query.shape}")
        q64 = query.astype(np.float64)
        norm2 = float(q64 @ q64)  # NaN or inf when any entry is
        if not math.isfinite(norm2):
            raise ValidationError(
                "query must be finite with a finite norm; it has NaN, inf or huge values"
            )
        if norm2 == 0.0:
            raise ValidationError("query must be non-zero to be normalised; it is all zeros")
        norm = math.sqrt(norm2)
        if abs(norm - 1.0) <= _UNIT_TOLERANCE:
            return query.astype(np.float32)  # a fresh writable array: one compiled kernel type
        return (q64 / norm).astype(np.float32)

    @staticmethod
    def _check_k(k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if not 1 <= k <= SEARCH_K_MAX:
            raise InvalidLimitError(
                f"k must be in [1, {SEARCH_K_MAX}], got {k}", limit=(1, SEARCH_K_MAX), actual=int(k)
            )
        return int(k)

    def _check_mask(self, mask: Any) -> np.ndarray | None:
        if mask is None:
            return None
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise TypeError(
                f"mask must be a numpy bool array, got {getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if mask.ndim != 1 or mask.shape[0] < self.capacity:
            raise ValidationError(
                f"mask must be 1-D with length >= capacity ({self.capacity}), got shape {mask.shape}"
            )
        if not (mask.flags.c_contiguous and mask.flags.writeable):
            mask = mask.copy()  # strided or read-only arrays would each compile another kernel
        return mask

    # --- writes ---------------------------------------------------------------
    def add(self, ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """Insert or replace vectors; returns the slot of each id (int64, same order as ``ids``).

        Rows are L2-normalised here (zero rows and non-finite values are rejected). An
        id already present keeps its slot and gets the new vector; when an id repeats
        within the call, its last row wins. Nothing changes if validation fails.
        """
        id_list = self._check_ids(ids)
        vectors = self._check_matrix(vectors, "vectors")
        if vectors.shape[0] != len(id_list):
            raise ValidationError(
                f"got {len(id_list)} ids but {vectors.shape[0]} vectors; they must match"
            )
        if not id_list:
            return np.empty(0, np.int64)
        unit = _normalise_rows(vectors, "vectors")
        with self._lock:
            last_row: dict[str, int] = {}
            for row, i in enumerate(id_list):
                last_row[i] = row  # dict keeps first-appearance order, value = last row
            new_ids = [i for i in last_row if i not in self._slot]
            self._reserve(len(self._slot) + len(new_ids))
            assigned: dict[str, int] = {}
            free = self._free
            for i in new_ids:
                if free:
                    assigned[i] = heapq.heappop(free)
                else:
                    assigned[i] = len(self._ids)
                    self._ids.append(None)
            for i, s in assigned.items():
                self._ids[s] = i
                self._slot[i] = s
            slots_unique = np.fromiter((self._slot[i] for i in last_row), np.int64, len(last_row))
            rows_unique = np.fromiter(last_row.values(), np.int64, len(last_row))
            if rows_unique.shape[0] == unit.shape[0]:  # no repeated id: every row, in order
                self._vectors[slots_unique] = unit
            else:
                self._vectors[slots_unique] = unit[rows_unique]
            self._live[slots_unique] = True
            if self._graph is not None:
                self._graph_add(slots_unique)
            elif self._build_log is not None:
                self._build_log.append(slots_unique)
            return np.fromiter((self._slot[i] for i in id_list), np.int64, len(id_list))

    def remove(self, ids: Sequence[str]) -> int:
        """Remove ids (absent ones are ignored); returns how many were removed.

        The slot is freed and reused by a later new id (lowest slot first).
        """
        id_list = self._check_ids(ids)
        removed = 0
        with self._lock:
            for i in dict.fromkeys(id_list):
                s = self._slot.pop(i, None)
                if s is None:
                    continue
                self._ids[s] = None
                self._live[s] = False
                self._vectors[s] = 0.0
                if self._graph is not None and self._in_graph[s]:
                    self._graph.mark_deleted(s)
                elif self._build_log is not None:
                    self._build_log.append(np.array([s], np.int64))
                heapq.heappush(self._free, s)
                removed += 1
        return removed

    def clear(self) -> None:
        """Remove everything (capacity and graph are dropped too)."""
        with self._lock:
            self._vectors = np.zeros((0, self.dim), np.float32)
            self._live = np.zeros(0, np.bool_)
            self._ids = []
            self._slot = {}
            self._free = []
            self._graph = None
            self._in_graph = np.zeros(0, np.bool_)
            self._building, self._build_log = None, None  # a running build is discarded
            self._graph_file = None

    def _reserve(self, needed: int) -> None:
        """Make room for ``needed`` live slots, growing geometrically."""
        high_water_needed = len(self._ids) + max(0, needed - len(self._slot) - len(self._free))
        cap = self.capacity
        if high_water_needed <= cap:
            return
        new_cap = max(high_water_needed, 2 * cap, _MIN_GROW)
        vec = np.zeros((new_cap, self.dim), np.float32)
        vec[:cap] = self._vectors
        live = np.zeros(new_cap, np.bool_)
        live[:cap] = self._live
        in_graph = np.zeros(new_cap, np.bool_)
        in_graph[:cap] = self._in_graph
        if self._graph is not None:
            self._graph.resize_index(new_cap)
        self._vectors, self._live, self._in_graph = vec, live, in_graph

    # --- reads --------------------------------------------------------------------
    def slot_of(self, id: str) -> int:
        if not isinstance(id, str):
            raise TypeError(f"id must be a str, got {type(id).__name__}")
        return self._slot.get(id, -1)

    def slots_of(self, ids: Sequence[str]) -> np.ndarray:
        """The slot of each of ``ids`` (str, unchecked), -1 where absent: int64, in order."""
        # every slot, in slot order (a cache adopting a loaded index): one list compare, no lookups
        if isinstance(ids, list) and len(ids) == len(self._ids) == len(self._slot) and ids == self._ids:
            return np.arange(len(ids), dtype=np.int64)
        return np.fromiter(map(self._slot.get, ids, itertools.repeat(-1)), np.int64, len(ids))

    def id_at(self, slot: int) -> str | None:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)):
            raise TypeError(f"slot must be an int, got {type(slot).__name__}")
        if 0 <= slot < len(self._ids):
            return self._ids[slot]
        return None

    def __contains__(self, id: object) -> bool:
        return isinstance(id, str) and id in self._slot

    def ids(self) -> list[str]:
        """Live ids in slot order."""
        with self._lock:
            return [i for i in self._ids if i is not None]

    def get_vector(self, id: str) -> np.ndarray | None:
        """A copy of the stored (normalised) vector, or None when absent."""
        if not isinstance(id, str):
            raise TypeError(f"id must be a str, got {type(id).__name__}")
        with self._lock:
            s = self._slot.get(id, -1)
            return None if s < 0 else self._vectors[s].copy()

    # --- search -----------------------------------------------------------------------
    def search(
        self, query: np.ndarray, k: int, mask: np.ndarray | None = None
    ) -> list[tuple[str, float]]:
        """Top-``k`` ``(id, cosine)`` for one query; see the module docstring for the path rule."""
        return self.search_unit(self._check_query(query), self._check_k(k), mask)

    def search_unit(
        self, q: np.ndarray, k: int, mask: np.ndarray | None = None
    ) -> list[tuple[str, float]]:
        """:meth:`search` for a caller that checked its query at its own boundary (a store's read
        path): ``q`` a float32 ``(dim,)`` array of unit length to float32 precision (what
        :meth:`search` would make of it: the same bits), ``1 <= k <= SEARCH_K_MAX``. Only the mask
        is checked here (a store's cached mask may predate the index's growth)."""
        mask = self._check_mask(mask)
        with self._lock:
            eligible = self._eligible(mask)
            if eligible == 0:
                return []
            if self._use_exact(eligible, k):
                return self._exact(q, k, mask)
            return self._hnsw(q, k, mask, eligible)

    def search_many(
        self, queries: np.ndarray, k: int, mask: np.ndarray | None = None
    ) -> list[list[tuple[str, float]]]:
        """:meth:`search` for each row of ``queries`` ``(m, dim)``, sharing one pass over the vectors."""
        qs = self._check_matrix(queries, "queries")
        k = self._check_k(k)
        if qs.shape[0] == 0:
            return []
        return self.search_many_unit(_normalise_rows(qs, "queries"), k, mask)

    def search_many_unit(
        self, qs: np.ndarray, k: int, mask: np.ndarray | None = None
    ) -> list[list[tuple[str, float]]]:
        """:meth:`search_many` for a caller that checked its queries (as :meth:`search_unit`):
        ``qs`` a C-contiguous float32 ``(m, dim)`` array of unit rows, ``m >= 1``."""
        mask = self._check_mask(mask)
        with self._lock:
            eligible = self._eligible(mask)
            if eligible == 0:
                return [[] for _ in range(qs.shape[0])]
            if self._use_exact(eligible, k):
                return self._exact_many(qs, k, mask)
            return self._hnsw_many(qs, k, mask, eligible)

    def path_for(self, mask: np.ndarray | None = None, k: int = 10) -> str:
        """``"exact"`` or ``"hnsw"``: the path a search with this mask and k would take now."""
        mask = self._check_mask(mask)
        k = self._check_k(k)
        with self._lock:
            return "exact" if self._use_exact(self._eligible(mask), k) else "hnsw"

    def _eligible(self, mask: np.ndarray | None) -> int:
        if mask is None:
            return len(self._slot)
        hw = len(self._ids)
        return int(np.count_nonzero(mask[:hw] & self._live[:hw]))

    def _use_exact(self, eligible: int, k: int) -> bool:
        n = len(self._slot)
        if k > _HNSW_K_MIN_EXACT and k * 16 > n:
            return True  # the walk would visit most of the graph: a scan is cheaper
        return (
            n < self.hnsw_threshold
            or eligible < self.hnsw_threshold
            or eligible < EXACT_SELECTIVITY * n
        )

    def _scan_args(self, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hw = len(self._ids)
        live = self._live[:hw]
        return self._vectors[:hw], live, (mask[:hw] if mask is not None else live)

    def _rank(self, slots: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[str, float]]:
        ids = self._ids
        pairs: list[tuple[str, float]] = [
            (ids[s], v) for s, v in zip(slots.tolist(), scores.tolist())
        ]
        return by_score_then_id(pairs)[:k]

    def _exact(self, q: np.ndarray, k: int, mask: np.ndarray | None) -> list[tuple[str, float]]:
        vecs, live, m = self._scan_args(mask)
        fetch = k + 1
        while True:
            slots, scores = _kernels().topk_unchecked(vecs, q, fetch, live, m)
            # The kernel breaks ties by slot, the index by id. When the k-th score ties
            # with the (k+1)-th, widen the fetch until the whole tied group is in hand.
            if (
                slots.shape[0] <= k
                or scores[k] != scores[k - 1]
                or scores[-1] != scores[k - 1]
                or slots.shape[0] < fetch
                or fetch == _kernels().TOPK_K_MAX
            ):
                return self._rank(slots, scores, k)
            fetch = min(fetch * 4, _kernels().TOPK_K_MAX)

    def _exact_many(
        self, qs: np.ndarray, k: int, mask: np.ndarray | None
    ) -> list[list[tuple[str, float]]]:
        vecs, live, m = self._scan_args(mask)
        fetch = min(k + _BATCH_PAD, _kernels().TOPK_K_MAX)
        slots, batch_scores = _kernels().topk_many_unchecked(vecs, qs, fetch, live, m)
        # The batch kernel's arithmetic may differ from the single-query kernel's in the
        # last bit. Re-score its candidates the single-query way; the answer is settled
        # when every row left out scores below the k-th candidate even allowing for that
        # difference, else that query is re-run on the single-query kernel.
        slack = 4.0 * self.dim * 2.0**-24
        out = []
        for r in range(qs.shape[0]):
            cand = slots[r]
            exact = _kernels().dot_rows_unchecked(vecs, qs[r], cand)
            ranked = self._rank(cand, exact, cand.shape[0])
            if (
                cand.shape[0] < fetch
                or float(batch_scores[r, -1]) + slack < ranked[min(k, len(ranked)) - 1][1]
            ):
                out.append(ranked[:k])
            else:
                out.append(self._exact(qs[r], k, mask))
        return out

    # --- hnsw -------------------------------------------------------------------------
    def build_graph(self) -> None:
        """Build the HNSW graph now (normally built on the first search that needs it)."""
        self.wait_for_graph()
        with self._lock:
            self._load_deferred_graph()
            if self._graph is None:
                self._build_graph()

    def erase_removed(self) -> bool:
        """Overwrite with zeros, in the HNSW graph, the vector of every removed id, so that no save
        writes it to disk again: hnswlib keeps a node marked deleted, with its vector, until its
        slot is reused. The node stays, marked deleted (a walk passes through it, never returns
        it); hnswlib re-links it to its zero vector as it would for an update (about one graph
        insert per node: 5 ms at 100k). With more than one removed node per
        ``ERASE_IN_PLACE_SHARE`` live ones, the graph is dropped instead, and the next search that
        needs one builds it on a thread (exact results meanwhile), as a graph is built at a store's
        first open. A background build whose snapshot may hold a removed vector is discarded
        (the next search that needs a graph starts another). True when anything was erased or
        discarded. A store's compact calls this before it saves its index cache: after a forget and
        a compact, nothing of a forgotten fact stays on disk. An erased node counts as out of the
        graph (``_in_graph``): a later call passes it by, and a new id reusing its slot is added
        as any other (hnswlib un-deletes the node and takes the new vector). A graph read back from
        disk counts its erased nodes in again, so the first compact after a reopen erases them
        once more."""
        with self._lock:
            done = False
            if not self._free:  # no slot is removed and not reused: no node holds a removed vector
                return done
            if self._building is not None:  # its snapshot may predate a removal
                self._building, self._build_log = None, None  # the thread discards what it built
                done = True
            self._load_deferred_graph()
            dead = np.flatnonzero(self._in_graph & ~self._live)
            if self._graph is None or dead.size == 0:
                return done
            if dead.size * ERASE_IN_PLACE_SHARE > len(self._slot):  # cheaper built anew, on a thread
                self._drop_graph()
                return True
            try:  # add_items of a deleted label un-deletes it and replaces its vector
                self._graph.add_items(np.zeros((dead.size, self.dim), np.float32), dead, num_threads=1)
                for slot in dead.tolist():
                    self._graph.mark_deleted(slot)
                self._in_graph[dead] = False  # (erased: a later call passes them by)
            except (RuntimeError, MemoryError):  # half done: a zero vector may be live; build anew
                self._drop_graph()
            return True

    def _defer_graph(self, gpath: str, spath: str, meta: dict[str, Any]) -> None:
        """Leave the graph file ``gpath`` of the index file ``spath`` (``meta``: what that says of
        it) to be checked and read when first needed (see :meth:`load`)."""
        self._graph_file = (gpath, spath, meta)
        self._build_log = []

    def _load_deferred_graph(self) -> None:
        """Check and read the graph :meth:`_defer_graph` left on disk, with the slots written since
        replayed into it (caller holds the lock). A file that is missing, fails its checksum or
        that hnswlib refuses is logged and dropped: the graph is then built like a missing one."""
        if self._graph_file is None:
            return
        (gpath, spath, meta), self._graph_file = self._graph_file, None
        log, self._build_log = self._build_log, None
        try:
            graph, in_graph = _index_file.open_graph(self, gpath, spath, meta)
        except IndexCacheError as exc:
            logging.getLogger("umi.index").warning("saved HNSW graph unusable, building it again: %s", exc)
            return
        self._adopt_graph(graph, in_graph, log or [])

    def wait_for_graph(self, timeout: float | None = None) -> bool:
        """Wait for a background graph build, if one is running. True when none is running now."""
        t = self._building
        if t is not None:
            t.join(timeout)
        return self._building is None

    def _start_background_build(self) -> None:
        """Build the graph on a thread from a snapshot; writes made meanwhile are replayed into it.

        Until it is ready, searches take the exact path: a large store never stalls a search for
        the seconds to minutes a single-threaded build takes (~0.5 ms per vector here).
        """
        if self._building is not None:
            return
        slots, vectors = self._live_rows()
        log: list[np.ndarray] = []
        self._build_log = log
        t = threading.Thread(target=self._background_build, args=(slots, vectors, self.capacity, log),
                             name="umi-hnsw-build", daemon=True)
        self._building = t
        t.start()

    def _background_build(self, slots: np.ndarray, vectors: np.ndarray, cap: int,
                          log: list[np.ndarray]) -> None:
        try:
            graph = _hnswlib().Index(space="ip", dim=self.dim)
            graph.init_index(max_elements=max(cap, 1), M=self.M, ef_construction=self.ef_construction,
                             random_seed=self.seed)
            graph.set_ef(self.ef_search)
            if slots.size:
                graph.add_items(vectors, slots, num_threads=1)
        except (RuntimeError, MemoryError):
            graph = None  # searches stay exact; the next one that needs a graph tries again
        with self._lock:
            if self._build_log is not log:  # cleared while building: discard
                return
            self._building, self._build_log = None, None
            if graph is None:
                return
            if self.capacity > cap:
                graph.resize_index(self.capacity)
            in_graph = np.zeros(self.capacity, np.bool_)
            in_graph[slots] = True
            self._adopt_graph(graph, in_graph, log)

    def _adopt_graph(self, graph: Any, in_graph: np.ndarray, log: list[np.ndarray]) -> None:
        """Use ``graph`` (sized to the capacity; ``in_graph``: its nodes) once the slots written
        while it was out of reach (``log``) are replayed into it: re-added when live (updates,
        un-deletes), marked deleted when not. A failed replay leaves no graph (the next search
        that needs one builds it). Caller holds the lock."""
        touched = np.unique(np.concatenate(log)) if log else np.empty(0, np.int64)
        live = touched[self._live[touched]]
        dead = touched[~self._live[touched] & in_graph[touched]]
        try:
            if live.size:
                graph.add_items(self._vectors[live], live, num_threads=1)
                in_graph[live] = True
            for d in dead:
                graph.mark_deleted(int(d))
        except (RuntimeError, MemoryError):
            return
        self._graph, self._in_graph = graph, in_graph

    def _live_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(live slots, their vectors) for a graph build. With no free slot below the high-water
        mark (nothing removed, the usual case) the vectors are a view of ``_vectors``, not a copy:
        at 1M x 384 a copy is 1.5 GB more at the peak of a build. A background build may then
        read a row that a write changes meanwhile; every such slot is in the build log and is
        re-added (or marked deleted) from ``_vectors`` when the build is adopted."""
        hw = len(self._ids)
        if len(self._slot) == hw:
            return np.arange(hw, dtype=np.int64), self._vectors[:hw]
        slots = np.flatnonzero(self._live[:hw]).astype(np.int64)
        return slots, self._vectors[slots]

    def _build_graph(self) -> None:
        graph = _hnswlib().Index(space="ip", dim=self.dim)
        graph.init_index(
            max_elements=max(self.capacity, 1),
            M=self.M,
            ef_construction=self.ef_construction,
            random_seed=self.seed,
        )
        graph.set_ef(self.ef_search)
        slots, vectors = self._live_rows()
        if slots.size:
            graph.add_items(vectors, slots, num_threads=1)
        in_graph = np.zeros(self.capacity, np.bool_)
        in_graph[slots] = True
        self._graph, self._in_graph = graph, in_graph

    def _graph_add(self, slots: np.ndarray) -> None:
        try:
            self._graph.add_items(self._vectors[slots], slots, num_threads=1)
        except (RuntimeError, MemoryError):
            # The vectors are stored and are what searches score from; a graph that
            # missed an update is dropped and rebuilt by the next search needing it.
            self._drop_graph()
            return
        self._in_graph[slots] = True

    def _drop_graph(self) -> None:
        """Forget the graph (caller holds the lock): the next search that needs one builds it from
        the live vectors (on a thread from ``BACKGROUND_BUILD_MIN`` on, exact results meanwhile)."""
        self._graph = None
        self._in_graph[:] = False

    def _hnsw(
        self, q: np.ndarray, k: int, mask: np.ndarray | None, eligible: int
    ) -> list[tuple[str, float]]:
        if self._graph is None:
            self._load_deferred_graph()
        if self._graph is None:
            if len(self._slot) < BACKGROUND_BUILD_MIN:
                self._build_graph()
            else:
                self._start_background_build()
                return self._exact(q, k, mask)
        graph = self._graph
        n = len(self._slot)
        want = min(k, eligible)
        if mask is None:
            fetch = want
        else:
            fetch = min(n, max(want, math.ceil(want * n / eligible * 2)))
        labels = self._knn(graph, q, fetch)
        if labels is not None and mask is not None:
            labels = labels[mask[labels]]
            if labels.shape[0] < want:
                elig = mask[: self.capacity] & self._live
                labels = self._knn(graph, q, want, filter=lambda label: bool(elig[label]))
        if labels is None or labels.shape[0] < want:
            return self._exact(q, k, mask)
        scores = _kernels().dot_rows_unchecked(self._vectors, q, labels)
        return self._rank(labels, scores, k)

    def _hnsw_many(
        self, qs: np.ndarray, k: int, mask: np.ndarray | None, eligible: int
    ) -> list[list[tuple[str, float]]]:
        """:meth:`_hnsw` for each row of ``qs``. Unmasked, on a built graph: one ``knn_query`` for
        them all (hnswlib walks the rows one after another on one thread, each as it walks a single
        query: the same labels), then each row scored and ranked as :meth:`_hnsw` does. One thread:
        hnswlib itself walks a batch of at most 4 rows per thread asked for on one thread, so deep
        recall's 1-4 rewrites gain nothing from more (measured: 3 walks at ``num_threads=2``, 4.7-5.4
        ms, against 4.9-5.0 ms at 1)."""
        graph = self._graph
        if mask is not None or graph is None or qs.shape[0] < 2:
            return [self._hnsw(q, k, mask, eligible) for q in qs]
        want = min(k, eligible)
        graph.set_ef(max(self.ef_search, want))
        try:
            labels, _ = graph.knn_query(qs, k=want, num_threads=1)
        except RuntimeError:  # a row could not find `want` neighbours: each its own way
            return [self._hnsw(q, k, mask, eligible) for q in qs]
        dot_rows, vectors = _kernels().dot_rows_unchecked, self._vectors
        return [self._rank(row, dot_rows(vectors, q, row), k) for q, row in zip(qs, labels.astype(np.int64))]

    def _knn(self, graph: Any, q: np.ndarray, fetch: int, filter: Any = None) -> np.ndarray | None:
        graph.set_ef(max(self.ef_search, fetch))
        try:
            labels, _ = graph.knn_query(q, k=fetch, num_threads=1, filter=filter)
        except RuntimeError:
            return None  # hnswlib could not find `fetch` neighbours (deletions, strict filter)
        return labels[0].astype(np.int64)

    # --- persistence (the file format: umi._index_file) ------------------------------------
    def save(self, path: str | os.PathLike[str], generation: int) -> None:
        """Write the index to ``path`` atomically, tagged with the store ``generation``."""
        _index_file.write(self, path, generation)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, dim: int | None = None, build_graph: bool = True,
        defer_graph: bool = False,
    ) -> tuple[VectorIndex, int]:
        """Read an index written by :meth:`save`; returns ``(index, generation)``.

        When the file holds no graph but the index has reached its ``hnsw_threshold``,
        the graph is built here (``build_graph=False`` leaves that to the first search
        that needs it, or to :meth:`build_graph`). A saved graph is checked (size, CRC-32)
        and read here, or with ``defer_graph`` by the first search that walks it,
        :meth:`build_graph` or :meth:`save` (checking and reading one costs ~0.4-0.7 s at
        100k x 384, and hnswlib holds the GIL while it reads); a graph file found missing,
        corrupt or unreadable then is logged and the graph built as if none had been saved.

        Raises :class:`umi.errors.IndexCacheError` when the file is missing, truncated,
        fails its checksum, or holds vectors of a dimension other than ``dim``.
        """
        return _index_file.read(cls, path, dim=dim, build_graph=build_graph, defer_graph=defer_graph)


def _kernels() -> Any:
    """:mod:`umi.kernels`, imported on first use: importing numba costs ~1 s, and opening a
    store with a saved index (or anything short of a search) needs none of it."""
    from . import kernels

    return kernels


def _hnswlib() -> Any:
    import hnswlib  # type: ignore[import-untyped]  # imported on first use: it is only needed above the threshold

    return hnswlib
