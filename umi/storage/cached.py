"""``CachedStore``: the storage contract written once, over a small durable store.

A :class:`CachedStore` holds the store in process — entities in the columnar
:class:`~umi.storage._hotcache.EntityCache` (filters as numpy masks, BM25 postings, the
vector index), and sources, relations, history, core blocks and store metadata in plain
dicts — and serves every read from there. Over a *lazy* durable store (DuckDB) history,
sources and relations are not read at open: the cache asks the durable store for an entity's
history, a source (by id or text hash) or an entity's relations the first time a call needs
them (and for all of them in ``iter_*``), under the store's lock, and always before changing
them, so what the cache holds for a known key is the committed rows plus this transaction's
changes. It owns the lock, the transaction rules
(:class:`~umi.storage._txn.TransactionMixin`), input checks, relation-endpoint checks, forgetting
and the scope rules; the write rules it shares with Postgres (history records and their numbers,
supersede/revive, core-block edits) are :mod:`umi.storage._rules`.

Under it, a :class:`DurableStore` does only durable I/O: :meth:`DurableStore.load` at open
(everything, or what a lazy store reads up front), the on-demand reads of a lazy store, and :meth:`DurableStore.commit` one :class:`ChangeSet` (the net effect of one transaction)
atomically. Implementations: DuckDB (:mod:`umi.storage.duckdb`), Lance
(:mod:`umi.storage.lance`) and :class:`MemoryDurable` (nothing to persist; the Sim backend).
A write changes the cache at once (and journals how to undo it) and records itself in the
transaction's change set; the commit hands the change set to the durable store, and a failed
durable commit rolls the cache back, so the cache never holds what the store does not.

Forget (:meth:`CachedStore.delete`): the row, its postings, vector and passage vectors go; every history
snapshot of it becomes a tombstone (and a ``delete`` record with the tombstone is appended);
relations touching it go; its source goes once no remaining entity has that ``source_id``.
"""

from __future__ import annotations

import builtins
import copy
import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ..errors import StorageError
from ..types import (
    CoreBlockRecord,
    CoreHistoryRecord,
    CoreOp,
    Entity,
    EntityType,
    EvolutionRelation,
    Scope,
    check_scope,
    now_ms,
)
from . import filters as F
from ._common import (  # (the core-block and meta limits are re-exported from here)
    CORE_CONTENT_BYTES_MAX,
    CORE_NAME_BYTES_MAX,
    META_KEY_BYTES_MAX,
    META_VALUE_BYTES_MAX,
    check_core_name,
    check_endpoints,
    check_entities,
    check_history,
    check_id,
    check_ids,
    check_k,
    check_limit_offset,
    check_meta_entry,
    check_meta_key,
    check_name_query,
    check_query_text,
    check_query_vector,
    check_relations,
    check_seq,
    check_source,
    check_time,
    check_vectors_per_query,
    copy_relation,
    core_key,
    snapshot_of,
)
from ._hotcache import EntityCache
from ._rules import CORE_METHODS, SharedWrites, core_change, history_record, upsert_entry, validity_change
from ._txn import TransactionMixin
from .base import TOMBSTONE_SCOPE, HistoryOp, HistoryRecord, SearchFilters, Source, StorageBackend, tombstone
from .text import document_terms, query_terms

__all__ = ["CachedStore", "ChangeSet", "DurableStore", "FaultyDurable", "Loaded", "MemoryDurable", "CORE_NAME_BYTES_MAX",
           "CORE_CONTENT_BYTES_MAX", "META_KEY_BYTES_MAX", "META_VALUE_BYTES_MAX"]

#: a lazy durable store is asked for one entity's history, one source or one entity's relations
#: at most this many times per session; then the rest of that kind is read in one go (a bulk
#: forget of 10k entities must not cost 10k database round trips each)
LAZY_KEY_READS_MAX = 256
#: a commit that writes at least this many history records (a bulk upsert, a remember_many
#: chunk) to a lazy durable store leaves none of them in the cache: they are read back when
#: asked for. A snapshot dict per fact held for the session cost ~0.85 GB per million facts;
#: a small commit's records stay, so updating a fact just written needs no database read
HISTORY_KEEP_COMMIT_MAX = 1_000
#: a lazy durable store's orphan keys (:meth:`DurableStore.load_orphans`) are read once the point
#: reads they spare would have cost as much: the scan costs about one point read per this many
#: stored entities (DuckDB: a point read 0.5-1 ms, the scan ~0.8 s at 1M facts). A small store
#: reads them at its first write; a large one after that many new facts' history/source reads
ORPHAN_SCAN_ROWS_PER_READ = 1000


# --- what moves between the cache and a durable store -------------------------------------------


@dataclass
class ChangeSet:
    """The net effect of one transaction, for :meth:`DurableStore.commit`.

    ``entities``: id -> the entity's new full state (``None``: deleted); ``entity_existed``: id ->
    whether the durable store held the id before the transaction. ``history``: records appended or
    (``restore``) put by ``(entity_id, seq)``; ``tombstoned``: entities whose every stored snapshot
    becomes :func:`tombstone` (applied before ``history``). ``sources`` / ``relations``: id -> new
    record or ``None`` (deleted). ``core_forgotten``: core scopes whose every block and core
    history record is deleted (applied before ``core`` and ``core_history``). ``core``: core
    scopes whose blocks are rewritten from ``core_blocks``; ``core_history``: appended.
    ``meta``: key -> value. ``dim``: the vector dimension fixed in this transaction. ``terms``:
    id -> (term frequencies, length) of written entities, when known. An entity written whole
    (not only its validity) carries its passage vectors, which replace the stored ones.
    """

    entities: dict[str, Entity | None] = field(default_factory=dict)
    entity_existed: dict[str, bool] = field(default_factory=dict)
    terms: dict[str, tuple[dict[str, int], int]] = field(default_factory=dict)
    history: list[HistoryRecord] = field(default_factory=list)
    #: some of ``history`` may replace stored records (restore)
    history_replace: bool = False
    tombstoned: set[str] = field(default_factory=set)
    sources: dict[str, Source | None] = field(default_factory=dict)
    relations: dict[str, EvolutionRelation | None] = field(default_factory=dict)
    #: id -> whether the durable store held the source / relation before the transaction (an id
    #: missing here counts as held: a durable store must then replace, not just insert)
    source_existed: dict[str, bool] = field(default_factory=dict)
    relation_existed: dict[str, bool] = field(default_factory=dict)
    core_forgotten: set[Scope] = field(default_factory=set)
    core: dict[Scope, list[CoreBlockRecord]] = field(default_factory=dict)
    core_history: list[CoreHistoryRecord] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    dim: int | None = None

    def unique_history(self) -> list[HistoryRecord]:
        """``history`` as written: one record per ``(entity_id, seq)``, the last put (a restore may
        put one twice)."""
        return list({(r.entity_id, r.seq): r for r in self.history}.values())

    def __bool__(self) -> bool:
        return bool(self.entities or self.history or self.tombstoned or self.sources or self.relations
                    or self.core_forgotten or self.core or self.core_history or self.meta or self.dim is not None)


class Orphans(NamedTuple):
    """Keys a durable store holds for no stored entity (:meth:`DurableStore.load_orphans`)."""

    #: ids with history records and no entity row (forgotten entities, imported history)
    history: frozenset[str]
    #: ids of sources no entity row refers to
    sources: frozenset[str]


@dataclass
class Loaded:
    """Everything a durable store holds, as :meth:`DurableStore.load` returns it. ``rows`` fills
    the entity cache (:meth:`EntityCache.bulk_load`), or ``entities`` (a list) does."""

    generation: int = 0
    dim: int | None = None
    rows: Any = None
    entities: list[Entity] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    relations: list[EvolutionRelation] = field(default_factory=list)
    #: (entity_id, seq, op, at, snapshot as a dict or JSON text, scope)
    history: list[tuple[str, int, str, int, Any, Scope]] = field(default_factory=list)
    core_blocks: list[tuple[Scope, CoreBlockRecord]] = field(default_factory=list)
    core_history: list[CoreHistoryRecord] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    #: entity id -> its passage vectors (a row per passage), for ``rows`` (``entities`` carry theirs)
    passages: dict[str, np.ndarray] = field(default_factory=dict)


class DurableStore:
    """The narrow durable layer under :class:`CachedStore`.

    A store whose :attr:`lazy` is True leaves ``Loaded.history``, ``sources`` and ``relations``
    empty at open and answers :meth:`load_history`, :meth:`load_sources` and
    :meth:`load_relations` instead, when the cache first needs those records. They return
    committed records only (the cache holds what the open transaction changed), in any order.
    """

    #: history, sources and relations are read on demand, not at open
    lazy = False

    def load(self, dim: int | None) -> Loaded:  # pragma: no cover - interface
        raise NotImplementedError

    def load_history(self, entity_ids: Sequence[str] | None) -> list[tuple[str, int, str, int, Any, Scope]]:
        """The history records of ``entity_ids`` (every record when ``None``), as ``Loaded.history``."""
        raise NotImplementedError  # pragma: no cover - only lazy stores are asked

    def load_sources(self, ids: Sequence[str] | None = None, hashes: Sequence[str] | None = None) -> list[Source]:
        """The sources with one of ``ids`` or one of ``hashes`` (every source when both are ``None``)."""
        raise NotImplementedError  # pragma: no cover - only lazy stores are asked

    def load_relations(self, entity_ids: Sequence[str] | None) -> list[EvolutionRelation]:
        """The relations with an end in ``entity_ids`` (every relation when ``None``)."""
        raise NotImplementedError  # pragma: no cover - only lazy stores are asked

    def load_lone_sources(self, scope: Scope | None) -> list[Source]:
        """The committed sources in view ``scope`` (None: all) that no entity row refers to."""
        raise NotImplementedError  # pragma: no cover - only lazy stores are asked

    def load_orphans(self) -> Orphans:
        """The committed keys that no entity row accounts for: history of ids without an entity
        row, sources no entity row refers to. With them (and the ids and source ids the cache
        has held) the cache knows that a new fact has no history and a new text no source,
        without a read per key."""
        raise NotImplementedError  # pragma: no cover - only lazy stores are asked

    def commit(self, changes: ChangeSet, generation: int) -> None:  # pragma: no cover - interface
        """Write ``changes`` and the new ``generation`` atomically, or raise and write nothing."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class FaultyDurable(DurableStore):
    """Any durable store, with injected commit failures: when ``faults`` fires
    ``STORAGE_WRITE_FAIL`` at a commit, the commit raises :class:`~umi.StorageError` before
    writing anything (as a full disk would), so the transaction rolls back. Wraps DuckDB and
    Lance stores (``connect(..., faults=...)``) as well as the Sim one."""

    def __init__(self, inner: DurableStore, faults: Any) -> None:
        self.inner = inner
        self.faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def lazy(self) -> bool:  # type: ignore[override]
        return bool(self.inner.lazy)

    def load(self, dim: int | None) -> Loaded:
        return self.inner.load(dim)

    def load_history(self, entity_ids: Sequence[str] | None) -> list[tuple[str, int, str, int, Any, Scope]]:
        return self.inner.load_history(entity_ids)

    def load_sources(self, ids: Sequence[str] | None = None, hashes: Sequence[str] | None = None) -> list[Source]:
        return self.inner.load_sources(ids, hashes)

    def load_relations(self, entity_ids: Sequence[str] | None) -> list[EvolutionRelation]:
        return self.inner.load_relations(entity_ids)

    def load_lone_sources(self, scope: Scope | None) -> list[Source]:
        return self.inner.load_lone_sources(scope)

    def load_orphans(self) -> Orphans:
        return self.inner.load_orphans()

    def commit(self, changes: ChangeSet, generation: int) -> None:
        from ..sim.faults import FaultType

        if self.faults.should_fail(FaultType.STORAGE_WRITE_FAIL):
            raise StorageError("injected storage failure at commit")
        self.inner.commit(changes, generation)

    def close(self) -> None:
        self.inner.close()


class MemoryDurable(DurableStore):
    """Nothing to persist: the cache is the store (Sim)."""

    def load(self, dim: int | None) -> Loaded:
        return Loaded(dim=dim)

    def commit(self, changes: ChangeSet, generation: int) -> None:
        pass


# --- history records kept in memory ------------------------------------------------------------


class _Hist:
    """One history record; ``snap`` is a dict or (loaded, not read yet) its JSON text."""

    __slots__ = ("seq", "op", "at", "snap", "scope")

    def __init__(self, seq: int, op: str, at: int, snap: Any, scope: Scope) -> None:
        self.seq, self.op, self.at, self.snap, self.scope = seq, op, at, snap, scope

    def record(self, eid: str) -> HistoryRecord:
        snap = json.loads(self.snap) if isinstance(self.snap, str) else copy.deepcopy(self.snap)
        return HistoryRecord(eid, self.seq, self.op, self.at, snap, self.scope)  # type: ignore[arg-type]


class _Keyed:
    """Sources or relations: id -> record (``None``: known to be absent), and the ids each index
    key has (a source's text hash; a relation's two ends), kept exact. A change returns its undo."""

    __slots__ = ("recs", "by", "keys")

    def __init__(self, keys: Callable[[Any], tuple[str, ...]]) -> None:
        self.recs: dict[str, Any] = {}
        self.by: dict[str, set[str]] = {}
        self.keys = keys

    def add_loaded(self, records: Iterable[Any]) -> None:
        """Committed records (an id held already keeps its record)."""
        for rec in records:
            if rec.id not in self.recs:
                self._set(rec.id, rec)

    def _set(self, rid: str, rec: Any) -> None:
        old = self.recs.get(rid)
        if old is not None:
            for k in self.keys(old):
                self.by[k].discard(rid)
        self.recs[rid] = rec
        if rec is not None:
            for k in self.keys(rec):
                self.by.setdefault(k, set()).add(rid)

    def put(self, rid: str, rec: Any) -> Callable[[], None]:
        """Hold ``rec`` (``None``: drop the record) under ``rid``; returns the undo."""
        had, old = rid in self.recs, self.recs.get(rid)
        self._set(rid, rec)

        def undo() -> None:
            self._set(rid, old)
            if not had:
                del self.recs[rid]

        return undo

    def in_scope(self, sc: Scope | None) -> list[Any]:
        """The records held in scope view ``sc`` (None: all), by (created_at, id)."""
        got = [r for r in self.recs.values() if r is not None and (sc is None or sc.contains(r.scope))]
        return sorted(got, key=lambda r: (r.created_at, r.id))


# --- the store ----------------------------------------------------------------------------------


class CachedStore(SharedWrites, TransactionMixin, StorageBackend):
    """Every rule of the storage contract, over a :class:`DurableStore`. Subclasses set up the
    durable store and call :meth:`_open_cache`; they may override the hooks ``_fault_read(op)``,
    ``_write_fault_at(n)`` (Sim), ``_after_commit()`` (index saves) and ``_check_writable()``."""

    _cache: EntityCache
    _durable: DurableStore

    def _init_state(self, durable: DurableStore, dim: int | None, index_factory: Callable[[int], Any]) -> None:
        if "_lock" not in self.__dict__:  # a reload keeps the lock its caller holds
            self._lock = threading.RLock()
        self._durable = durable
        self._index_factory = index_factory
        self._closed = True
        self._cache = EntityCache(dim=dim, index_factory=index_factory)
        # Sources and relations (_Keyed): id -> record, or None when known to be absent (deleted in
        # this session, or asked of a lazy durable store and not there). With a lazy durable store an
        # id missing here is asked of it; their index (by text hash / by end) covers the records
        # held here, complete for the hashes in _hashes_known / the entities in _rels_known (or
        # all, once *_all).
        self._sources = _Keyed(lambda s: (s.text_hash,))
        self._hashes_known: set[str] = set()
        self._src_all = True
        self._relations = _Keyed(lambda r: (r.source_id, r.target_id))
        self._rels_known: set[str] = set()
        self._rel_all = True
        self._history: dict[str, list[_Hist]] = {}
        # lazy history (a lazy durable store): ids whose committed records were read;
        # _hist_all once every record was. An id absent from both is asked of the durable store
        # before its records are read or changed, so the cache never acts on half a history.
        self._hist_known: set[str] = set()
        self._hist_all = True
        self._key_reads = {"history": 0, "sources": 0, "relations": 0}
        # a lazy durable store's orphan keys, once read (see _orphan_keys); point reads until then
        self._orphans: Orphans | None = None
        self._point_reads = 0
        self._source_codes_at_orphans = 0  # source ids the cache had coded when they were read
        self._core: dict[Scope, list[CoreBlockRecord]] = {}
        self._core_hist: dict[Scope, list[CoreHistoryRecord]] = {}
        self._meta: dict[str, str] = {}
        self._generation = 0
        self._undo: list[Callable[[], None]] = []
        self._changes = ChangeSet()
        self._dim_stored: int | None = dim
        self._dim_before: int | None = dim

    def _open_cache(self, loaded: Loaded) -> None:
        """Fill everything from what the durable store loaded."""
        self._generation = loaded.generation
        self._dim_stored = loaded.dim
        if loaded.rows is not None:
            self._cache.bulk_load(loaded.rows)
        elif loaded.entities:
            self._cache.put_many(loaded.entities)
        if loaded.passages:
            self._cache.load_passages(loaded.passages)
        lazy = bool(self._durable.lazy)
        self._sources.add_loaded(loaded.sources)
        self._relations.add_loaded(loaded.relations)
        self._hist_all = self._src_all = self._rel_all = not lazy
        self._add_loaded_history(loaded.history)
        for scope, block in loaded.core_blocks:
            self._core.setdefault(scope, []).append(block)
        for blocks in self._core.values():
            blocks.sort(key=lambda b: b.position)
        for rec in loaded.core_history:
            self._core_hist.setdefault(rec.scope, []).append(rec)
        for recs2 in self._core_hist.values():
            recs2.sort(key=lambda r: r.seq)
        self._meta = dict(loaded.meta)

    def _add_loaded_history(self, records: Sequence[tuple[str, int, str, int, Any, Scope]],
                            skip: set[str] | None = None) -> None:
        """Committed records from the durable store into ``_history`` (ids in ``skip`` are known
        already: the cache's copy, which may hold this transaction's changes, wins)."""
        hist = self._history
        touched = set()
        for eid, seq, op, at, snap, scope in records:
            if skip is not None and eid in skip:
                continue
            recs = hist.get(eid)
            if recs is None:
                hist[eid] = [_Hist(seq, op, at, snap, scope)]
            else:
                recs.append(_Hist(seq, op, at, snap, scope))
                touched.add(eid)
        for eid in touched:
            hist[eid].sort(key=lambda h: h.seq)

    def _fetch_history(self, entity_ids: Sequence[str]) -> None:
        """Read the committed history of those of ``entity_ids`` not known yet (one durable read;
        none for ids known to have no history: see :meth:`_orphan_keys`)."""
        if self._hist_all:
            return
        known = self._hist_known
        want = sorted({i for i in entity_ids if i not in known})
        if not want:
            return
        orphans = self._orphan_keys()
        if orphans is not None:
            # committed history is an orphan's or belongs to a stored entity row: one the cache
            # holds, or one this transaction removed (an earlier one read the history it changed)
            existed = self._changes.entity_existed
            maybe = [i for i in want if i in self._cache or existed.get(i) or i in orphans.history]
            known.update(i for i in want if i not in maybe)
            want = maybe
            if not want:
                return
        self._point_reads += 1
        self._add_loaded_history(self._durable.load_history(want))
        known.update(want)

    def _orphan_keys(self) -> Orphans | None:
        """The lazy durable store's orphan keys, read once the point reads of new keys so far add
        up to the cost of reading them (``ORPHAN_SCAN_ROWS_PER_READ``); None until then. Every
        change after the read is in the cache: a forgotten entity's history was read before it
        was changed, and a source written or dropped is held (or held as absent)."""
        if self._orphans is None and (self._point_reads + 1) * ORPHAN_SCAN_ROWS_PER_READ >= len(self._cache):
            self._orphans = self._durable.load_orphans()
            self._source_codes_at_orphans = self._cache.codes_given("source_id")
        return self._orphans

    def _source_is_new(self, sid: str) -> bool:
        """``sid`` is known to have no committed source row, without a durable read: when the
        orphan keys were read, it was not an orphan and no entity the cache held or had held
        referred to it (since then the cache holds every source written or dropped)."""
        orphans = self._orphan_keys()
        if orphans is None or sid in orphans.sources:
            return False
        code = self._cache.code_of("source_id", sid)
        return code is None or code > self._source_codes_at_orphans

    def _read_key(self, kind: str, one: Callable[[], None], every: Callable[[], None]) -> None:
        """The one lazy-read rule: read the committed records of one key of ``kind`` (``one()``),
        or, once that kind had ``LAZY_KEY_READS_MAX`` single-key reads, all of them (``every()``)."""
        self._key_reads[kind] += 1
        if self._key_reads[kind] > LAZY_KEY_READS_MAX:
            every()
        else:
            one()

    def _hist(self, eid: str) -> builtins.list[_Hist] | None:
        """``eid``'s history records (read from the durable store on first use)."""
        if not self._hist_all and eid not in self._hist_known:
            self._read_key("history", lambda: self._fetch_history([eid]), self._fetch_all_history)
        return self._history.get(eid)

    def _forget_history(self, entity_ids: Iterable[str]) -> None:
        """Drop committed history of ``entity_ids`` from the cache (lazy stores only: it is
        asked of the durable store again when needed)."""
        hist, known = self._history, self._hist_known
        for eid in set(entity_ids):
            hist.pop(eid, None)
            known.discard(eid)

    def _fetch_all_history(self) -> None:
        if not self._hist_all:
            self._add_loaded_history(self._durable.load_history(None), skip=self._hist_known)
            self._hist_all = True
            self._hist_known.clear()

    def _source(self, sid: str) -> Source | None:
        """The stored source ``sid`` (read from the durable store on first use), or None."""
        recs = self._sources.recs
        if sid not in recs:
            if self._src_all:
                return None
            if self._source_is_new(sid):
                recs[sid] = None
                return None
            self._point_reads += 1
            self._read_key("sources", lambda: self._sources.add_loaded(self._durable.load_sources(ids=[sid])),
                           self._fetch_sources_all)
            recs.setdefault(sid, None)
        return recs[sid]

    def _fetch_sources_all(self) -> None:
        if not self._src_all:
            self._sources.add_loaded(self._durable.load_sources())
            self._src_all = True
            self._hashes_known.clear()

    def _rels_for(self, eid: str) -> builtins.list[EvolutionRelation]:
        """The stored relations with an end at ``eid`` (read from the durable store on first use)."""
        if not self._rel_all and eid not in self._rels_known:
            self._read_key("relations", lambda: self._relations.add_loaded(self._durable.load_relations([eid])),
                           self._fetch_relations_all)
            self._rels_known.add(eid)  # (harmless once every relation was read)
        recs = self._relations.recs
        return [recs[rid] for rid in self._relations.by.get(eid, ())]

    def _fetch_relations_all(self) -> None:
        if not self._rel_all:
            self._relations.add_loaded(self._durable.load_relations(None))
            self._rel_all = True
            self._rels_known.clear()

    # --- plumbing ---------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:  # type: ignore[override]
        return self._cache.dim

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def _describe(self) -> str:
        return type(self).__name__

    def inline_read_lock(self, source_ids: Sequence[str] = ()) -> Any:
        # inline only while searches and get_many cannot reach the durable store: a lazily opened
        # store with vectors still to fetch on demand keeps the thread hop (history, which a lazy
        # store also fetches on demand, is not read inline: see umi.pipeline.recall), and so does
        # a source a lazy store would be asked for
        if self._cache.reads_from_memory() and all(self._source_in_memory(sid) for sid in source_ids):
            return self._lock
        return None

    def _source_in_memory(self, sid: str) -> bool:
        """:meth:`_source` answers for ``sid`` without a durable read (and without reading the
        orphan keys: until they are read, a new source id is asked of the durable store)."""
        return self._src_all or sid in self._sources.recs or (self._orphans is not None and self._source_is_new(sid))

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"this {self._describe()} is closed")

    def _check_writable(self) -> None:
        self._check_open()

    def _fault_read(self, op: str) -> None:
        """Hook: raise to inject a read failure (Sim)."""

    def _write_fault_at(self, n_items: int) -> int | None:
        """Hook: the item position at which this write fails, or None (Sim)."""
        return None

    def _after_commit(self) -> None:
        """Hook: after a durable commit that wrote something (index saves)."""

    @staticmethod
    def _fail(op: str) -> None:
        raise StorageError(f"injected storage write failure in {op}()")

    @contextmanager
    def _writing_one(self, op: str) -> Iterator[None]:
        """:meth:`_writing` for a write of one item, which an injected fault (Sim) fails before it
        changes anything."""
        with self._writing(op):
            if self._write_fault_at(1) is not None:
                self._fail(op)
            yield

    @contextmanager
    def _reading(self, op: str) -> Iterator[None]:
        with self._lock:
            self._check_open()
            self._fault_read(op)
            yield

    def _begin_tx(self) -> None:
        self._cache.begin()
        self._undo = []
        self._changes = ChangeSet()
        self._dim_before = self._dim_stored

    def _rollback_tx(self) -> None:
        try:
            self._cache.rollback()
        finally:
            for fn in reversed(self._undo):
                fn()
            self._undo = []
            self._changes = ChangeSet()
            self._dim_stored = self._dim_before

    def _commit_tx(self, wrote: bool) -> None:
        changes = self._changes
        if wrote and changes:
            self._durable.commit(changes, self._generation + 1)  # raises: the mixin rolls back
            if len(changes.history) >= HISTORY_KEEP_COMMIT_MAX and not self._hist_all:
                self._forget_history(r.entity_id for r in changes.history)
        self._cache.commit()
        self._undo = []
        self._changes = ChangeSet()
        if wrote and changes:  # a write that changed nothing committed nothing: no generation of its own
            self._generation += 1  # (the durable store holds every generation: its commit log relies on it)
            self._after_commit()

    def _on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    # --- change recording ---------------------------------------------------------------------
    def _record_entity(self, eid: str, new: Entity | None, existed: bool,
                       terms: tuple[dict[str, int], int] | None = None) -> None:
        ch = self._changes
        if eid not in ch.entity_existed:
            ch.entity_existed[eid] = existed
        ch.entities[eid] = new
        if terms is not None:
            ch.terms[eid] = terms
        elif new is None:
            ch.terms.pop(eid, None)
        # else a validity change: an earlier whole write in this transaction (terms kept) stays whole

    def _append_history(self, eid: str, op: HistoryOp, at: int, snap: dict[str, Any], scope: Scope) -> None:
        held = self._hist(eid)
        rec = history_record(held[-1].seq if held else 0, eid, op, at, snap, scope)
        recs = self._history.setdefault(eid, [])
        recs.append(_Hist(rec.seq, op, at, snap, scope))

        def undo() -> None:
            recs.pop()
            if not recs:
                self._history.pop(eid, None)

        self._on_undo(undo)
        self._changes.history.append(rec)

    # --- entities ---------------------------------------------------------------------------
    def upsert(self, entities: Sequence[Entity]) -> None:
        with self._lock:
            self._check_writable()
            ents, dim = check_entities(entities, self._cache.dim)
            if not ents:
                return
            terms = [document_terms(e.name, e.content) for e in ents]
            with self._writing("upsert"):
                fail_at = self._write_fault_at(len(ents))
                done = ents if fail_at is None else ents[:fail_at]
                self._put_entities(done, terms[:len(done)], dim, history=True)
                if fail_at is not None:
                    self._fail("upsert")

    def _put_entities(self, ents: list[Entity], terms: list[tuple[dict[str, int], int]], dim: int | None,
                      *, history: bool) -> None:
        if not ents:
            return
        if history:  # before the cache holds the new ids: see _fetch_history
            self._fetch_history([e.id for e in ents])
        existed = {e.id: e.id in self._cache for e in ents}
        if not self._rel_all:  # a new id has no stored relation (a deleted entity's went with it)
            self._rels_known.update(i for i, was in existed.items() if not was)
        fresh = self._cache.put_many(ents, terms)
        if dim is not None and self._dim_stored is None:
            self._dim_stored = dim
            self._changes.dim = dim
        for e, t in zip(ents, terms):
            self._record_entity(e.id, e, existed[e.id], t)
        if history:
            for e, new in zip(ents, fresh):
                self._append_history(*upsert_entry(e, not new))

    def delete(self, entity_id: str, at: int | None = None) -> bool:
        eid = check_id(entity_id)
        at = check_time(at, "at", optional=True)
        with self._lock:
            self._check_writable()
            if eid not in self._cache:
                return False
            with self._writing_one("delete"):
                self._forget(eid, self._now() if at is None else at)
            return True

    def _now(self) -> int:
        return now_ms()

    def _forget(self, eid: str, at: int) -> None:
        old = self._cache.remove(eid)
        assert old is not None
        self._record_entity(eid, None, True)
        # every record of it becomes a tombstone, then the delete record (a tombstone too)
        recs = self._hist(eid) or []
        before = [(h.snap, h.scope) for h in recs]
        stone = tombstone(eid)
        for h in recs:
            h.snap, h.scope = dict(stone), TOMBSTONE_SCOPE

        def undo_stones() -> None:
            for h, (snap, scope) in zip(recs, before):
                h.snap, h.scope = snap, scope

        self._on_undo(undo_stones)
        self._changes.tombstoned.add(eid)
        self._changes.history = [r if r.entity_id != eid else
                                 HistoryRecord(eid, r.seq, r.op, r.at, dict(stone), TOMBSTONE_SCOPE)
                                 for r in self._changes.history]
        self._append_history(eid, "delete", at, dict(stone), TOMBSTONE_SCOPE)
        for rid in sorted(r.id for r in self._rels_for(eid)):
            self._put_relation(rid, None)
        sid = old.source_id
        if sid is not None and self._source(sid) is not None and not self._cache.ids_with("source_id", sid):
            self._put_source(sid, None)

    def _set_validity(self, eid: str, valid_to: int | None, at: int, op: HistoryOp) -> bool:
        with self._lock:
            self._check_writable()
            cur = self._cache.peek(eid)
            changed = None if cur is None else validity_change(cur, valid_to, at)
            if changed is None:
                return False
            with self._writing_one(op):
                new = self._cache.set_validity(eid, changed)
                self._record_entity(eid, new, True)
                self._append_history(eid, op, at, snapshot_of(new), new.scope)
            return True

    # --- reads ------------------------------------------------------------------------------
    def get(self, entity_id: str) -> Entity | None:
        eid = check_id(entity_id)
        with self._reading("get"):
            return self._cache.get(eid)

    def get_many(self, entity_ids: Sequence[str]) -> builtins.list[Entity]:
        ids = check_ids(entity_ids)
        with self._reading("get_many"):
            return self._cache.get_many(ids)

    def peek_many(self, entity_ids: Sequence[str], read: str | None = None) -> builtins.list[Entity]:
        """:meth:`get_many` for a caller that only reads the entities, at once, and keeps none: the
        stored objects themselves (no copy, no ``embedding``), which it must not change. Recall
        reads a ranking's candidates this way and hydrates only the statements it returns. Not a
        read of its own for the Sim faults (it stands for part of the get_many its caller makes
        next) unless ``read`` names the read it replaces (recall's signals: ``"get_many"``)."""
        ids = check_ids(entity_ids)
        with self._lock:
            self._check_open()
            if read is not None:
                self._fault_read(read)
            return self._cache.peek_many(ids)

    def peek_by_name(self, name: str, filters: SearchFilters | None = None) -> builtins.list[Entity]:
        """:meth:`find_by_name` (any entity type) for a caller that only reads the entities at once
        and keeps none: the stored objects themselves, as :meth:`peek_many` hands them out (recall's
        name signal reads their id, content and time; copying every fact filed under a common name
        cost more than the rest of the signal). The same read for the Sim faults."""
        norm = check_name_query(name)
        nf = F.normalise(filters)
        with self._reading("find_by_name"):
            return self._cache.find_by_name(norm, None, nf, peek=True)

    def list(self, filters: SearchFilters | None = None, limit: int = 100, offset: int = 0) -> builtins.list[Entity]:
        limit, offset = check_limit_offset(limit, offset)
        nf = F.normalise(filters)
        with self._reading("list"):
            return self._cache.list(nf, limit, offset)

    def count(self, filters: SearchFilters | None = None) -> int:
        nf = F.normalise(filters)
        with self._reading("count"):
            return self._cache.count(nf)

    def find_by_name(self, name: str, entity_type: EntityType | str | None = None,
                     filters: SearchFilters | None = None) -> builtins.list[Entity]:
        norm = check_name_query(name)
        etype = None if entity_type is None else EntityType.parse(entity_type)
        nf = F.normalise(filters)
        with self._reading("find_by_name"):
            return self._cache.find_by_name(norm, etype, nf)

    def search_vector(self, vector: np.ndarray, k: int, filters: SearchFilters | None = None
                      ) -> builtins.list[tuple[str, float]]:
        k = check_k(k)
        nf = F.normalise(filters)
        with self._reading("search_vector"):
            q = check_query_vector(vector, self._cache.dim)
            if q is None:
                return []
            return self._cache.search_vector(q, k, nf)

    def search_vector_many(self, vectors: Sequence[np.ndarray], k: int, filters: SearchFilters | None = None
                           ) -> builtins.list[builtins.list[tuple[str, float]]]:
        k = check_k(k)
        nf = F.normalise(filters)
        with self._reading("search_vector_many"):
            qs = [check_query_vector(v, self._cache.dim) for v in vectors]
            if not qs or qs[0] is None:  # no vectors stored yet
                return [[] for _ in qs]
            return self._cache.search_vector_many(np.stack([q for q in qs if q is not None]), k, nf)

    def search_text(self, query: str, k: int, filters: SearchFilters | None = None
                    ) -> builtins.list[tuple[str, float]]:
        query = check_query_text(query)
        k = check_k(k)
        nf = F.normalise(filters)
        terms = query_terms(query)
        with self._reading("search_text"):
            return self._cache.search_text(terms, k, nf)

    def search_content(self, queries: Sequence[str], vectors: Sequence[np.ndarray | None], k: int,
                       filters: SearchFilters | None = None
                       ) -> builtins.list[tuple[builtins.list[tuple[str, float]] | None, builtins.list[tuple[str, float]]]]:
        check_vectors_per_query(queries, vectors)
        terms = [query_terms(check_query_text(q)) for q in queries]
        k = check_k(k)
        nf = F.normalise(filters)
        n_vec = sum(v is not None for v in vectors)
        with self._lock:
            self._check_open()
            # the reads it stands for, in the order recall made them one by one (Sim faults)
            if n_vec:
                self._fault_read("search_vector" if n_vec == 1 else "search_vector_many")
            for _ in queries:
                self._fault_read("search_text")
            dim = self._cache.dim
            qs = [None if v is None else check_query_vector(v, dim) for v in vectors]
            if dim is None:  # no vectors stored yet: every vector search finds nothing
                return [(None if v is None else [], hits)
                        for v, (_, hits) in zip(vectors, self._cache.search_content([None] * len(qs), terms, k, nf))]
            return self._cache.search_content(qs, terms, k, nf)

    def entity_ids_for_source(self, source_id: str) -> builtins.list[str]:
        sid = check_id(source_id, "source_id")
        with self._reading("entity_ids_for_source"):
            return self._cache.ids_with("source_id", sid)

    # --- sources ------------------------------------------------------------------------------
    def add_source(self, source: Source) -> None:
        src = check_source(source)
        with self._lock:
            self._check_writable()
            if self._source(src.id) is not None:
                return  # the first record of a text is kept
            with self._writing_one("add_source"):
                self._put_source(src.id, src)

    def _put_source(self, sid: str, src: Source | None) -> None:
        """Hold ``src`` (None: drop the stored one) and record the change."""
        existed = self._source(sid) is not None
        self._on_undo(self._sources.put(sid, src))
        self._changes.source_existed.setdefault(sid, existed)
        self._changes.sources[sid] = src

    def delete_source(self, source_id: str) -> bool:
        sid = check_id(source_id, "source_id")
        with self._lock:
            self._check_writable()
            if self._source(sid) is None:
                return False
            with self._writing_one("delete_source"):
                self._put_source(sid, None)
            return True

    def get_source(self, source_id: str) -> Source | None:
        sid = check_id(source_id, "source_id")
        with self._reading("get_source"):
            return _copy_source(self._source(sid))

    def find_source_by_hash(self, text_hash: str) -> Source | None:
        if not isinstance(text_hash, str):
            raise TypeError(f"text_hash must be str, not {type(text_hash).__name__}")
        with self._reading("find_source_by_hash"):
            if not self._src_all and text_hash not in self._hashes_known:
                self._read_key("sources", lambda: self._sources.add_loaded(self._durable.load_sources(hashes=[text_hash])),
                               self._fetch_sources_all)
                self._hashes_known.add(text_hash)  # (harmless once every source was read)
            ids = self._sources.by.get(text_hash)
            if not ids:
                return None
            return _copy_source(min((self._sources.recs[i] for i in ids), key=lambda s: (s.created_at, s.id)))

    def iter_sources(self, scope: Scope | None = None) -> Iterator[Source]:
        sc = check_scope(scope, optional=True)
        with self._reading("iter_sources"):
            self._fetch_sources_all()
            got = self._sources.in_scope(sc)
        return iter([_copy_source(s) for s in got])  # type: ignore[misc]

    def lone_source_ids(self, scope: Scope | None = None) -> builtins.list[str]:
        sc = check_scope(scope, optional=True)
        with self._reading("lone_source_ids"):
            if self._src_all or not self._durable.lazy or self._changes:
                # held in memory, or this transaction changed what the durable store holds: the scan
                self._fetch_sources_all()
                got = self._sources.in_scope(sc)
            else:  # one durable query (committed = current), not a read of every source
                got = self._durable.load_lone_sources(sc)
                self._sources.add_loaded(got)  # (the forget_scope that asks drops them next)
            return sorted(s.id for s in got if not self._cache.ids_with("source_id", s.id))

    # --- relations ----------------------------------------------------------------------------
    def add_relations(self, relations: Sequence[EvolutionRelation]) -> None:
        rels = check_relations(relations)
        if not rels:
            return
        with self._lock:
            self._check_writable()
            check_endpoints(rels, self._cache.__contains__)
            with self._writing("add_relations"):
                fail_at = self._write_fault_at(len(rels))
                for i, r in enumerate(rels):
                    if i == fail_at:
                        self._fail("add_relations")
                    self._put_relation(r.id, r)

    def _put_relation(self, rid: str, r: EvolutionRelation | None) -> None:
        """Hold ``r`` (None: drop the stored one) and record the change."""
        if r is not None:
            self._rels_for(r.source_id)  # a stored relation of this id is read first (lazy relations)
        existed = self._relations.recs.get(rid) is not None
        self._on_undo(self._relations.put(rid, r))
        self._changes.relation_existed.setdefault(rid, existed)
        self._changes.relations[rid] = r

    def relations_for(self, entity_id: str) -> builtins.list[EvolutionRelation]:
        eid = check_id(entity_id)
        with self._reading("relations_for"):
            rels = self._rels_for(eid)
        rels.sort(key=lambda r: (r.created_at, r.id))
        return [copy_relation(r) for r in rels]

    def iter_relations(self, scope: Scope | None = None) -> Iterator[EvolutionRelation]:
        sc = check_scope(scope, optional=True)
        with self._reading("iter_relations"):
            self._fetch_relations_all()
            got = self._relations.in_scope(sc)
        return iter([copy_relation(r) for r in got])

    # --- history ------------------------------------------------------------------------------
    def history(self, entity_id: str) -> builtins.list[HistoryRecord]:
        eid = check_id(entity_id)
        with self._reading("history"):
            return [h.record(eid) for h in self._hist(eid) or ()]

    def iter_history(self, scope: Scope | None = None) -> Iterator[HistoryRecord]:
        sc = check_scope(scope, optional=True)
        with self._reading("iter_history"):
            self._fetch_all_history()
            out = [h.record(eid) for eid in sorted(self._history) for h in self._history[eid]
                   if sc is None or sc.contains(h.scope)]
        return iter(out)

    # --- restore (import) ---------------------------------------------------------------------
    def restore(self, entities: Sequence[Entity], sources: Sequence[Source],
                relations: Sequence[EvolutionRelation], history: Sequence[HistoryRecord]) -> None:
        with self._lock:
            self._check_writable()
            ents, dim = check_entities(entities, self._cache.dim)
            srcs = [check_source(s) for s in check_seq(sources, "sources")]
            rels = check_relations(relations)
            hist = [check_history(h, i) for i, h in enumerate(check_seq(history, "history"))]
            new_ids = {e.id for e in ents}
            check_endpoints(rels, lambda end: end in self._cache or end in new_ids)
            with self._writing_one("restore"):
                self._put_entities(ents, [document_terms(e.name, e.content) for e in ents], dim, history=False)
                for s in srcs:
                    self._put_source(s.id, s)
                for r in rels:
                    self._put_relation(r.id, r)
                for h in hist:
                    self._put_history(h)

    def _put_history(self, h: HistoryRecord) -> None:
        self._hist(h.entity_id)
        recs = self._history.setdefault(h.entity_id, [])
        before = list(recs)
        new = _Hist(h.seq, h.op, h.at, copy.deepcopy(dict(h.snapshot)), h.scope)
        pos = next((i for i, x in enumerate(recs) if x.seq >= h.seq), len(recs))
        if pos < len(recs) and recs[pos].seq == h.seq:
            recs[pos] = new
        else:
            recs.insert(pos, new)

        def undo() -> None:
            if before:
                recs[:] = before
            else:
                self._history.pop(h.entity_id, None)

        self._on_undo(undo)
        self._changes.history.append(HistoryRecord(h.entity_id, h.seq, h.op, h.at, new.snap, h.scope))
        self._changes.history_replace = True

    # --- core blocks --------------------------------------------------------------------------
    def core_blocks(self, scope: Scope) -> builtins.list[CoreBlockRecord]:
        sc = check_scope(scope).core  # type: ignore[union-attr]
        with self._reading("core_blocks"):
            return list(self._core.get(sc, ()))

    def _set_blocks(self, sc: Scope, blocks: builtins.list[CoreBlockRecord], rec: CoreHistoryRecord) -> None:
        old = self._core.get(sc)
        hist = self._core_hist.setdefault(sc, [])
        if blocks:
            self._core[sc] = blocks
        else:
            self._core.pop(sc, None)
        hist.append(rec)

        def undo() -> None:
            hist.pop()
            if old is None:
                self._core.pop(sc, None)
            else:
                self._core[sc] = old

        self._on_undo(undo)
        self._changes.core[sc] = list(blocks)
        self._changes.core_history.append(rec)

    def _edit_core(self, sc: Scope, op: CoreOp, at: int, name: str = "", content: str | None = None,
                   importance: float | None = None) -> int:
        with self._lock:
            self._check_writable()
            blocks = self._core.get(sc, [])
            hist = self._core_hist.get(sc)
            change = core_change(sc, blocks, hist[-1].seq if hist else 0, op, at, name, content, importance)
            if change is None:
                return 0
            with self._writing_one(CORE_METHODS[op]):
                self._set_blocks(sc, *change)
            return len(blocks)

    def forget_core(self, scope: Scope) -> int:
        view = check_scope(scope).core  # type: ignore[union-attr]
        with self._lock:
            self._check_writable()
            gone = sorted({sc for sc in (*self._core, *self._core_hist) if view.contains(sc)}, key=core_key)
            if not gone:
                return 0
            n = sum(len(self._core.get(sc, ())) for sc in gone)
            with self._writing_one("forget_core"):
                for sc in gone:
                    self._drop_core(sc)
            return n

    def core_scopes(self, scope: Scope | None = None) -> builtins.list[Scope]:
        sc = check_scope(scope, optional=True)
        view = None if sc is None else sc.core
        with self._reading("core_scopes"):
            got = [s for s, blocks in self._core.items() if blocks and (view is None or view.contains(s))]
        return sorted(got, key=core_key)

    def _drop_core(self, sc: Scope) -> None:
        """Forget core scope ``sc``: its blocks and its whole core history, in the cache and (at
        commit) in the durable store; what this transaction had queued for it is dropped too."""
        blocks = self._core.pop(sc, None)
        hist = self._core_hist.pop(sc, None)

        def undo() -> None:
            if blocks is not None:
                self._core[sc] = blocks
            if hist is not None:
                self._core_hist[sc] = hist

        self._on_undo(undo)
        ch = self._changes
        ch.core_forgotten.add(sc)
        ch.core.pop(sc, None)
        ch.core_history = [r for r in ch.core_history if r.scope != sc]

    def core_history(self, scope: Scope, name: str | None = None) -> builtins.list[CoreHistoryRecord]:
        sc = check_scope(scope).core  # type: ignore[union-attr]
        if name is not None:
            name = check_core_name(name)
        with self._reading("core_history"):
            return [r for r in self._core_hist.get(sc, ()) if name is None or r.name == name or r.op == "clear"]

    # --- store metadata -------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        check_meta_key(key)
        with self._reading("get_meta"):
            return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        check_meta_entry(key, value)
        with self._writing_one("set_meta"):
            had = key in self._meta
            old = self._meta.get(key)
            self._meta[key] = value

            def undo() -> None:
                if had:
                    self._meta[key] = old  # type: ignore[assignment]
                else:
                    self._meta.pop(key, None)

            self._on_undo(undo)
            self._changes.meta[key] = value

    # --- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Roll back an open transaction, then release the durable store. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._depth:
                    self._finish(commit=False)
                self._before_close()
            finally:
                self._closed = True
                self._durable.close()

    def _before_close(self) -> None:
        """Hook: last work on an open store (index saves)."""


# --- helpers ------------------------------------------------------------------------------------


def _copy_source(s: Source | None) -> Source | None:
    if s is None:
        return None
    return Source(s.id, s.text_hash, s.text, s.created_at, dict(s.metadata), s.scope)
