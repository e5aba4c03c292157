"""``SimStorageBackend``: the whole storage contract in memory, with fault injection.

Deterministic: no wall clock (``delete(at=None)`` stamps the backend's
:class:`~umi.sim.SimClock`), no unordered iteration in results, seeded randomness
only. Entities live in the same :class:`~umi.storage._hotcache.EntityCache` that
serves the DuckDB backend's reads, with a :class:`umi.index.VectorIndex` for vectors.

Faults (a :class:`~umi.sim.FaultInjector`, consulted once per call):

* ``STORAGE_WRITE_FAIL`` — the write raises :class:`~umi.StorageError`. Batch writes
  fail part-way through (at a seeded position), so the rollback path is exercised:
  nothing of the call (or of the enclosing transaction) stays behind.
* ``STORAGE_READ_FAIL`` — the read raises :class:`~umi.StorageError`.
* ``STORAGE_LATENCY`` — the call advances the backend's clock by
  ``faults.latency_ms`` (simulated time; nothing sleeps).

Thread-safe: one re-entrant lock guards every call; a transaction holds it until it
ends, so other threads never see uncommitted state.
"""

from __future__ import annotations

import builtins
import copy
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from ..errors import StorageError, ValidationError
from ..sim.clock import SimClock
from ..sim.faults import FaultInjector, FaultType
from ..sim.rng import SimRng
from ..types import Entity, EvolutionRelation
from ._common import (
    check_entities,
    check_filters,
    check_id,
    check_limit_offset,
    check_relations,
    check_source,
    check_time,
    snapshot_of,
)
from ._hotcache import EntityCache
from ._reads import CachedReads
from ._txn import TransactionMixin
from .base import HistoryRecord, SearchFilters, Source, StorageBackend

__all__ = ["SimStorageBackend"]


class SimStorageBackend(CachedReads, TransactionMixin, StorageBackend):
    """In-memory storage for deterministic tests; passes the same contract as DuckDB."""

    supports_concurrent_writers = False
    supports_multiple_processes = False
    durable = False

    def __init__(self, seed: int = 0, faults: FaultInjector | None = None, *, clock: SimClock | None = None,
                 dim: int | None = None, hnsw_threshold: int = 20_000) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, not {type(seed).__name__}")
        if faults is not None and not isinstance(faults, FaultInjector):
            raise TypeError(f"faults must be a FaultInjector or None, not {type(faults).__name__}")
        if clock is not None and not callable(getattr(clock, "now_ms", None)):
            raise TypeError("clock must have a now_ms() method (a umi.sim.SimClock)")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise TypeError(f"dim must be an int or None, not {type(dim).__name__}")
        if dim is not None and not 1 <= dim <= 65_536:
            raise ValidationError(f"dim must be between 1 and 65536, got {dim}")
        if isinstance(hnsw_threshold, bool) or not isinstance(hnsw_threshold, int):
            raise TypeError(f"hnsw_threshold must be an int, not {type(hnsw_threshold).__name__}")
        self.seed = seed
        self.faults = faults
        self.clock = clock if clock is not None else SimClock()
        self._rng = SimRng(seed).fork("sim-storage")
        self._hnsw_threshold = hnsw_threshold

        def make_index(d: int) -> Any:
            from ..index import VectorIndex

            return VectorIndex(d, hnsw_threshold=hnsw_threshold, seed=seed)

        self._cache = EntityCache(dim=dim, index_factory=make_index)
        self._sources: dict[str, Source] = {}
        self._by_hash: dict[str, str] = {}
        self._relations: dict[str, EvolutionRelation] = {}
        self._rels_of: dict[str, set[str]] = {}
        self._history: dict[str, list[HistoryRecord]] = {}
        self._generation = 0
        self._lock = threading.RLock()
        self._undo: list[Callable[[], None]] = []
        self._closed = False

    # --- plumbing --------------------------------------------------------------------
    @property
    def dim(self) -> int | None:  # type: ignore[override]
        return self._cache.dim

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("this SimStorageBackend is closed")

    def _latency(self) -> None:
        f = self.faults
        if f is not None and f.should_fail(FaultType.STORAGE_LATENCY):
            self.clock.advance(f.latency_ms)

    @contextmanager
    def _reading(self, op: str) -> Iterator[None]:
        with self._lock:
            self._check_open()
            self._latency()
            if self.faults is not None and self.faults.should_fail(FaultType.STORAGE_READ_FAIL):
                raise StorageError(f"injected storage read failure in {op}()")
            yield

    def _write_fault_at(self, n_items: int) -> int | None:
        """Where (item position) this write fails, or None. Consults the injector once."""
        self._latency()
        if self.faults is None or not self.faults.should_fail(FaultType.STORAGE_WRITE_FAIL):
            return None
        return self._rng.randint(0, max(n_items - 1, 0))

    @staticmethod
    def _fail(op: str) -> None:
        raise StorageError(f"injected storage write failure in {op}()")

    def _check_writable(self) -> None:
        self._check_open()

    def _begin_tx(self) -> None:
        self._undo = []
        self._cache.begin()

    def _commit_tx(self, wrote: bool) -> None:
        self._cache.commit()
        self._undo = []
        if wrote:
            self._generation += 1

    def _rollback_tx(self) -> None:
        try:
            self._cache.rollback()
            for fn in reversed(self._undo):
                fn()
        finally:
            self._undo = []

    def _add_history(self, eid: str, op: str, at: int, snapshot: dict[str, Any]) -> None:
        recs = self._history.setdefault(eid, [])
        recs.append(HistoryRecord(eid, len(recs) + 1, op, at, snapshot))  # type: ignore[arg-type]

        def undo() -> None:
            recs.pop()
            if not recs:
                self._history.pop(eid, None)

        self._undo.append(undo)

    # --- entities --------------------------------------------------------------------
    def upsert(self, entities: Sequence[Entity]) -> None:
        with self._lock:
            self._check_open()
            ents, _ = check_entities(entities, self._cache.dim)
            if not ents:
                return
            with self._writing("upsert"):
                fail_at = self._write_fault_at(len(ents))
                done = ents if fail_at is None else ents[:fail_at]
                fresh = self._cache.put_many(done)
                for e, new in zip(done, fresh):
                    self._add_history(e.id, "create" if new else "update", e.updated_at, snapshot_of(e))
                if fail_at is not None:
                    self._fail("upsert")

    def delete(self, entity_id: str, at: int | None = None) -> bool:
        eid = check_id(entity_id)
        at = check_time(at, "at", optional=True)
        with self._lock:
            self._check_open()
            if eid not in self._cache:
                return False
            with self._writing("delete"):
                if self._write_fault_at(1) is not None:
                    self._fail("delete")
                when = at if at is not None else self.clock.now_ms()
                old = self._cache.remove(eid)
                assert old is not None
                self._add_history(eid, "delete", when, snapshot_of(old))
            return True

    def supersede(self, entity_id: str, valid_to: int) -> bool:
        eid = check_id(entity_id)
        valid_to = check_time(valid_to, "valid_to")  # type: ignore[assignment]
        with self._lock:
            self._check_open()
            cur = self._cache.peek(eid)
            if cur is None or cur.valid_to is not None:
                return False
            with self._writing("supersede"):
                if self._write_fault_at(1) is not None:
                    self._fail("supersede")
                new = self._cache.set_valid_to(eid, valid_to)
                assert new is not None
                self._add_history(eid, "supersede", valid_to, snapshot_of(new))
            return True

    def list(self, filters: SearchFilters | None = None, limit: int = 100, offset: int = 0) -> list[Entity]:
        limit, offset = check_limit_offset(limit, offset)
        nf = check_filters(filters)
        with self._reading("list"):
            return self._cache.list(nf, limit, offset)

    def count(self, filters: SearchFilters | None = None) -> int:
        nf = check_filters(filters)
        with self._reading("count"):
            return self._cache.count(nf)

    # --- sources ---------------------------------------------------------------------
    def add_source(self, source: Source) -> None:
        src = check_source(source)
        with self._writing("add_source"):
            if self._write_fault_at(1) is not None:
                self._fail("add_source")
            if src.id in self._sources:
                return  # the first record of a text is kept
            self._sources[src.id] = src
            prev = self._by_hash.get(src.text_hash)
            if prev is None or (src.created_at, src.id) < (self._sources[prev].created_at, prev):
                self._by_hash[src.text_hash] = src.id

            def undo() -> None:
                del self._sources[src.id]
                if prev is None:
                    self._by_hash.pop(src.text_hash, None)
                else:
                    self._by_hash[src.text_hash] = prev

            self._undo.append(undo)

    def get_source(self, source_id: str) -> Source | None:
        sid = check_id(source_id, "source_id")
        with self._reading("get_source"):
            src = self._sources.get(sid)
            return None if src is None else _copy_source(src)

    def find_source_by_hash(self, text_hash: str) -> Source | None:
        if not isinstance(text_hash, str):
            raise TypeError(f"text_hash must be str, not {type(text_hash).__name__}")
        with self._reading("find_source_by_hash"):
            sid = self._by_hash.get(text_hash)
            return None if sid is None else _copy_source(self._sources[sid])

    # --- evolution -------------------------------------------------------------------
    def add_relations(self, relations: Sequence[EvolutionRelation]) -> None:
        rels = check_relations(relations)
        if not rels:
            return
        with self._lock:
            self._check_open()
            for r in rels:
                for end in (r.source_id, r.target_id):
                    if end not in self._cache:
                        raise ValidationError(f"relation {r.id} refers to entity {end}, which is not stored")
        with self._writing("add_relations"):
            fail_at = self._write_fault_at(len(rels))
            for i, r in enumerate(rels):
                if i == fail_at:
                    self._fail("add_relations")
                self._put_relation(r)

    def _put_relation(self, r: EvolutionRelation) -> None:
        old = self._relations.get(r.id)
        self._relations[r.id] = r
        added = []
        for end in (r.source_id, r.target_id):
            s = self._rels_of.setdefault(end, set())
            if r.id not in s:
                s.add(r.id)
                added.append(end)

        def undo() -> None:
            for end in added:
                self._rels_of[end].discard(r.id)
            if old is None:
                del self._relations[r.id]
            else:
                self._relations[r.id] = old

        self._undo.append(undo)

    def relations_for(self, entity_id: str) -> builtins.list[EvolutionRelation]:
        eid = check_id(entity_id)
        with self._reading("relations_for"):
            rels = [self._relations[i] for i in self._rels_of.get(eid, ())]
            rels = [r for r in rels if eid in (r.source_id, r.target_id)]
            rels.sort(key=lambda r: (r.created_at, r.id))
            return [EvolutionRelation.from_dict(r.to_dict()) for r in rels]

    def history(self, entity_id: str) -> builtins.list[HistoryRecord]:
        eid = check_id(entity_id)
        with self._reading("history"):
            return [HistoryRecord(r.entity_id, r.seq, r.op, r.at, copy.deepcopy(dict(r.snapshot)))
                    for r in self._history.get(eid, ())]

    # --- lifecycle -------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._depth:
                self._finish(commit=False)
            self._closed = True

    def __repr__(self) -> str:
        return (f"SimStorageBackend(seed={self.seed}, entities={len(self._cache)}, dim={self.dim}, "
                f"generation={self._generation})")


def _copy_source(s: Source) -> Source:
    return Source(s.id, s.text_hash, s.text, s.created_at, dict(s.metadata))
