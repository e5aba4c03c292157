"""The storage protocol every archival backend implements.

The pipelines need exactly this and nothing SQL-specific. One contract test suite
(``tests/contract/``) runs against every backend.

Rules every backend keeps:

* Entities are never deleted by supersession: :meth:`supersede` sets ``valid_to``.
* Every change to an entity appends a :class:`HistoryRecord` (create, update,
  supersede, revive, delete). History is append-only, except that :meth:`delete` (forget)
  replaces every earlier record of the forgotten entity by a tombstone (:func:`tombstone`, filed
  under :data:`TOMBSTONE_SCOPE`: no scope).
* :meth:`transaction` makes everything inside it commit together or not at all;
  a failure inside raises :class:`umi.StorageError` and leaves nothing behind.
* ``generation`` goes up by at least one with every committed write.
* Searches apply filters *inside* the search (never filter after truncating to k).
* Results are ordered deterministically: score descending, then id ascending.
* ``filters=None`` always means ``SearchFilters()``: current facts of every scope.
* Every record carries a :class:`~umi.types.Scope` (a real, indexed column in every
  backend); a scope argument of ``None`` means every scope, a :class:`Scope` is a view
  (``scope.contains(record.scope)``).
"""

from __future__ import annotations

import abc
import builtins
import hashlib
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from ..errors import InvalidFilterError
from ..types import (
    UMI_NAMESPACE,
    UNSET_SCOPE,
    CoreBlockRecord,
    CoreHistoryRecord,
    Entity,
    EntityType,
    EvolutionRelation,
    MetadataValue,
    Scope,
    validate_metadata,
)
from . import filters as _filters

__all__ = ["StorageBackend", "SearchFilters", "Source", "HistoryRecord", "source_id_for", "text_hash",
           "tombstone", "TOMBSTONE_SCOPE", "TOMBSTONE_TEXT_PREFIX", "CoreBlockRecord", "CoreHistoryRecord", "META_EMBEDDER"]

#: store metadata key of the embedder identity, ``"name|model|dim"``
META_EMBEDDER = "embedder"
#: longest id (entity, source or relation), in characters
ID_CHARS_MAX = 256


def text_hash(text: str) -> str:
    """sha256 hex of the UTF-8 text: the exact-duplicate key of a source (with its scope)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_id_for(text: str, scope: Scope = UNSET_SCOPE) -> str:
    """The id of a remembered text in a scope: the same text told in two scopes is two sources.
    Texts without a scope keep the ids umi has always given them."""
    key = "src\x1f" + text_hash(text)
    if scope is not None and not scope.is_unset:
        key += "\x1escope\x1f" + scope.key()
    return str(uuid.uuid5(UMI_NAMESPACE, key))


@dataclass(frozen=True)
class Source:
    """One remembered text, kept for provenance and exact-duplicate detection (per scope)."""

    id: str
    text_hash: str
    text: str
    created_at: int
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)
    scope: Scope = UNSET_SCOPE

    @classmethod
    def for_text(cls, text: str, created_at: int, metadata: Mapping[str, MetadataValue] | None = None,
                 scope: Scope = UNSET_SCOPE) -> "Source":
        return cls(source_id_for(text, scope), text_hash(text), text, created_at, dict(metadata or {}), scope)


HistoryOp = Literal["create", "update", "supersede", "revive", "delete"]


def tombstone(entity_id: str) -> dict[str, Any]:
    """The snapshot that replaces every snapshot of a forgotten entity: no name, content or metadata."""
    return {"id": entity_id, "forgotten": True}


#: The scope every history record of a forgotten entity is filed under (its earlier records and
#: its ``delete`` record): none. A tombstone keeps that an id was forgotten, and when — the id's
#: history goes on from its last ``seq`` if the fact is told again, so a record ``(id, seq)``
#: never names two changes — but not whose it was: after ``forget_scope(user_id="alice")`` no
#: row names alice. Only an unscoped view sees tombstones.
TOMBSTONE_SCOPE: Scope = UNSET_SCOPE

#: How the stored text of every tombstone begins (the key-sorted compact JSON of :func:`tombstone`,
#: as every backend writes snapshots; an entity's snapshot has no ``forgotten`` key). Opening a
#: store written by an older umi re-files the tombstones it finds by it under
#: :data:`TOMBSTONE_SCOPE` (they were filed under their fact's scope then).
TOMBSTONE_TEXT_PREFIX = '{"forgotten":true,'


@dataclass(frozen=True)
class HistoryRecord:
    """One change to one entity. ``snapshot`` is the entity's dict (no embedding) after the change,
    or a :func:`tombstone` once the entity was forgotten. ``scope`` is the entity's."""

    entity_id: str
    seq: int
    op: HistoryOp
    at: int
    snapshot: Mapping[str, Any]
    scope: Scope = UNSET_SCOPE


TimeField = Literal["created_at", "event_time"]


@dataclass(frozen=True)
class SearchFilters:
    """Filters applied inside every search, list and count. Normalised once, at construction
    (``.norm``); :mod:`umi.storage.filters` compiles them for each backend.

    ``time_range`` is inclusive ``(start_ms, end_ms)`` over ``time_field``; ``None``
    on either side is open; a start after the end raises :class:`~umi.InvalidFilterError`.
    ``metadata`` is equality on scalar values only. ``scope`` is a view: ``None`` (or the
    unset scope) sees every scope, else each component it sets must equal the entity's.
    ``source_id`` keeps the facts of one source. By default only current facts (``valid_to``
    unset) are seen; ``include_superseded=True`` shows every fact; ``as_of=t`` shows the
    facts that were current at ``t`` (``created_at <= t`` and ``valid_to`` unset or ``> t``).
    The caller's objects are copied, never mutated. Hashable.
    """

    entity_types: tuple[EntityType, ...] | None = None
    time_range: tuple[int | None, int | None] | None = None
    time_field: TimeField = "created_at"
    metadata: Mapping[str, MetadataValue] | None = None
    include_superseded: bool = False
    as_of: int | None = None
    scope: Scope | None = None
    source_id: str | None = None

    def __post_init__(self) -> None:
        if self.entity_types is not None:
            types = (self.entity_types,) if isinstance(self.entity_types, (str, EntityType)) else self.entity_types
            object.__setattr__(self, "entity_types", tuple(sorted({EntityType.parse(t) for t in types}, key=lambda t: t.value)))
        if self.time_field not in ("created_at", "event_time"):
            raise InvalidFilterError(f"time_field must be 'created_at' or 'event_time', got {self.time_field!r}")
        if self.time_range is not None:
            tr = tuple(self.time_range)
            if len(tr) != 2 or any(v is not None and (isinstance(v, bool) or not isinstance(v, int)) for v in tr):
                raise InvalidFilterError("time_range must be (start_ms | None, end_ms | None) of ints")
            if tr[0] is not None and tr[1] is not None and tr[0] > tr[1]:
                raise InvalidFilterError(f"time_range start {tr[0]} is after its end {tr[1]}")
            object.__setattr__(self, "time_range", tr)
        if self.metadata is not None:
            object.__setattr__(self, "metadata", validate_metadata(self.metadata, what="metadata filter",
                                                                      error=InvalidFilterError))
        if not isinstance(self.include_superseded, bool):
            raise TypeError(f"include_superseded must be a bool, not {type(self.include_superseded).__name__}")
        if self.as_of is not None and (isinstance(self.as_of, bool) or not isinstance(self.as_of, int)):
            raise InvalidFilterError("as_of must be int milliseconds since the epoch")
        if self.scope is not None and not isinstance(self.scope, Scope):
            raise TypeError(f"scope must be a umi.Scope or None, not {type(self.scope).__name__}")
        if self.source_id is not None:
            if not isinstance(self.source_id, str):
                raise TypeError(f"source_id must be str or None, not {type(self.source_id).__name__}")
            if not self.source_id or len(self.source_id) > ID_CHARS_MAX or "\x00" in self.source_id:
                raise InvalidFilterError(f"source_id must be a non-empty str of at most {ID_CHARS_MAX} characters "
                                         "without NUL")
        object.__setattr__(self, "norm", _filters.build(self))

    #: the normal form (set by __post_init__)
    norm: "_filters.NormFilters" = field(init=False, repr=False, compare=False)

    @property
    def empty(self) -> bool:
        """True when no entity can match."""
        return self.norm.empty

    def __hash__(self) -> int:
        return hash(self.norm.cache_key)

    def matches(self, e: Entity) -> bool:
        """The reference semantics, in Python (:func:`umi.storage.filters.matches`)."""
        return _filters.matches(self.norm, e)


class StorageBackend(abc.ABC):
    """Durable home of archival memory. Implementations: DuckDB, Postgres, Lance, Sim."""

    #: embedding dimension this store holds (fixed by the first vector written), or None
    dim: int | None = None

    # --- capabilities (class attributes; a backend overrides what it offers) ---------------
    #: several writers (threads or processes) can commit without one waiting for the other's
    #: whole transaction (Postgres). False: writes are serialised by one lock in one process.
    supports_concurrent_writers: bool = False
    #: several processes can open the same store at once (Postgres).
    supports_multiple_processes: bool = False
    #: committed writes survive the process (False for ``:memory:`` and Sim).
    durable: bool = False

    def inline_read_lock(self, source_ids: Sequence[str] = ()) -> Any:
        """The lock every read holds, when reads are served from process memory (no I/O, no
        waiting) — reads of the sources ``source_ids`` too: a caller on an event loop that takes
        it without blocking may read inline instead of hopping to a thread. ``None`` (the
        default): reads may do I/O; always hop."""
        return None

    # --- entities ----------------------------------------------------------
    @abc.abstractmethod
    def upsert(self, entities: Sequence[Entity]) -> None:
        """Insert or replace entities by id (batched; one history record each)."""

    @abc.abstractmethod
    def get(self, entity_id: str) -> Entity | None: ...

    @abc.abstractmethod
    def get_many(self, entity_ids: Sequence[str]) -> builtins.list[Entity]:
        """Entities in the order of ``entity_ids``; ids with no entity are skipped. Each is the
        caller's own copy (changing it changes nothing stored)."""

    @abc.abstractmethod
    def delete(self, entity_id: str, at: int | None = None) -> bool:
        """Forget an entity; False if there was none. ``at`` defaults to now.

        Removes its row, vector and keyword postings; replaces every earlier history snapshot of
        it by a :func:`tombstone` and appends a ``"delete"`` record whose snapshot is the same
        tombstone, every record of it filed under :data:`TOMBSTONE_SCOPE`; removes every relation with the entity as source or target; removes the
        entity's source once no remaining entity has that ``source_id``. Revives nothing (that
        rule lives in the forget pipeline). One transaction (or the caller's)."""

    @abc.abstractmethod
    def list(self, filters: SearchFilters | None = None, limit: int = 100, offset: int = 0) -> builtins.list[Entity]:
        """Entities matching ``filters``, ordered by ``created_at`` then ``id``."""

    @abc.abstractmethod
    def count(self, filters: SearchFilters | None = None) -> int:
        """How many entities match (``None`` = ``SearchFilters()``: current facts only)."""

    @abc.abstractmethod
    def find_by_name(self, name: str, entity_type: EntityType | str | None = None,
                     filters: SearchFilters | None = None) -> builtins.list[Entity]:
        """Entities whose normalised name equals ``normalize_name(name)``; current only by default."""

    def find_by_names(self, names: Sequence[str], filters: SearchFilters | None = None) -> builtins.list[Entity]:
        """Entities of any type filed under any of ``names`` (each normalised as :meth:`find_by_name`
        does; a list or tuple), each once, oldest first (``created_at``, then id): the recall name
        signals' read. This default asks :meth:`find_by_name` once per distinct name; a backend that
        pays a round trip per read answers in one (Postgres: one statement)."""
        from ._common import check_name_queries

        found = {e.id: e for n in check_name_queries(names) for e in self.find_by_name(n, filters=filters)}
        return sorted(found.values(), key=lambda e: (e.created_at, e.id))

    # --- search ------------------------------------------------------------
    @abc.abstractmethod
    def search_vector(self, vector: np.ndarray, k: int, filters: SearchFilters | None = None) -> builtins.list[tuple[str, float]]:
        """Top-k (id, cosine similarity) among entities with an embedding that match ``filters``."""

    def search_vector_many(self, vectors: Sequence[np.ndarray], k: int, filters: SearchFilters | None = None
                           ) -> builtins.list[builtins.list[tuple[str, float]]]:
        """:meth:`search_vector` for each of ``vectors``, in order, each answer the same as its own
        call's. Backends with an in-process index answer them all in one pass (the deep recall path
        searches every query variant at once); this default asks one at a time."""
        return [self.search_vector(v, k, filters) for v in vectors]

    @abc.abstractmethod
    def search_text(self, query: str, k: int, filters: SearchFilters | None = None) -> builtins.list[tuple[str, float]]:
        """Top-k (id, BM25 score) over name + content among entities that match ``filters``."""

    def search_content(self, queries: Sequence[str], vectors: Sequence[np.ndarray | None], k: int,
                       filters: SearchFilters | None = None
                       ) -> builtins.list[tuple[builtins.list[tuple[str, float]] | None, builtins.list[tuple[str, float]]]]:
        """Recall's content searches in one read: for each query, ``(search_vector(its vector) —
        None when its vector is None —, search_text(query))``, each answer the same as its own
        call's. Backends with in-process indexes search keywords and vectors at once; this default
        asks one search at a time (the vectors together, by :meth:`search_vector_many`)."""
        from ._common import check_vectors_per_query  # (_common imports this module)

        check_vectors_per_query(queries, vectors)
        found = iter(self.search_vector_many([v for v in vectors if v is not None], k, filters))
        return [(None if v is None else next(found), self.search_text(q, k, filters)) for q, v in zip(queries, vectors)]

    # --- sources -----------------------------------------------------------
    @abc.abstractmethod
    def add_source(self, source: Source) -> None: ...

    @abc.abstractmethod
    def get_source(self, source_id: str) -> Source | None: ...

    @abc.abstractmethod
    def find_source_by_hash(self, text_hash: str) -> Source | None:
        """The earliest source (created_at, id) with this text hash, in any scope. For the
        exact-duplicate check of a scope use ``get_source(source_id_for(text, scope))``."""

    # --- evolution ---------------------------------------------------------
    @abc.abstractmethod
    def add_relations(self, relations: Sequence[EvolutionRelation]) -> None: ...

    @abc.abstractmethod
    def relations_for(self, entity_id: str) -> builtins.list[EvolutionRelation]:
        """Relations where the entity is source or target, ordered by created_at then id."""

    @abc.abstractmethod
    def supersede(self, entity_id: str, valid_to: int) -> bool:
        """Set ``valid_to`` on a current entity (never delete it). False if absent or already superseded."""

    @abc.abstractmethod
    def history(self, entity_id: str) -> builtins.list[HistoryRecord]:
        """Every change to the entity, oldest first (tombstones after it was forgotten)."""

    # --- forgetting, reviving, provenance ---------------------------------------------
    @abc.abstractmethod
    def revive(self, entity_id: str, at: int) -> bool:
        """Make a superseded entity current again: clear ``valid_to`` (``updated_at`` becomes
        ``max(updated_at, at)``), append a ``"revive"`` history record (snapshot after, at ``at``).
        False if absent or already current."""

    @abc.abstractmethod
    def entity_ids_for_source(self, source_id: str) -> builtins.list[str]:
        """Ids of every stored entity (superseded included) with this ``source_id``, sorted."""

    @abc.abstractmethod
    def delete_source(self, source_id: str) -> bool:
        """Remove a source row; False if there was none. That no entity references it afterwards
        is the caller's job (the storage does not check)."""

    # --- export / import --------------------------------------------------------------
    @abc.abstractmethod
    def iter_sources(self, scope: Scope | None = None) -> Iterator[Source]:
        """Every source in ``scope`` (``None``: all; a Scope: the view rule), ordered by
        ``(created_at, id)``."""

    def lone_source_ids(self, scope: Scope | None = None) -> builtins.list[str]:
        """Ids of the sources in ``scope`` (the view rule; ``None``: all) that no stored entity
        comes from (an import or ``add_source`` brings such a text), sorted. This scan of
        :meth:`iter_sources` is the rule; a store that reads sources on demand answers it without
        reading every source."""
        return sorted(s.id for s in self.iter_sources(scope) if not self.entity_ids_for_source(s.id))

    @abc.abstractmethod
    def iter_relations(self, scope: Scope | None = None) -> Iterator[EvolutionRelation]:
        """Every relation in ``scope``, ordered by ``(created_at, id)``."""

    @abc.abstractmethod
    def iter_history(self, scope: Scope | None = None) -> Iterator[HistoryRecord]:
        """Every history record in ``scope``, ordered by ``(entity_id, seq)``."""

    @abc.abstractmethod
    def restore(self, entities: Sequence[Entity], sources: Sequence[Source],
                relations: Sequence[EvolutionRelation], history: Sequence[HistoryRecord]) -> None:
        """Write exactly these records, for import: entities, sources and relations as given
        (insert or replace by id; relation endpoints must be stored or among ``entities``), and
        the history records with their own seqs (a record whose ``(entity_id, seq)`` exists is
        replaced); no history is generated. Joins the caller's transaction (else is its own)."""

    # --- core memory blocks (keyed by Scope(user_id, agent_id); session ignored) -----------
    @abc.abstractmethod
    def core_blocks(self, scope: Scope) -> builtins.list[CoreBlockRecord]:
        """The stored blocks of ``scope.core``, in stored order (``position`` 0, 1, ...)."""

    @abc.abstractmethod
    def set_core_block(self, scope: Scope, name: str, content: str, importance: float, at: int) -> None:
        """Insert or replace block ``name`` of ``scope.core``: a new name goes at the end, an
        existing one keeps its position. Appends a ``"set"`` core history record."""

    @abc.abstractmethod
    def remove_core_block(self, scope: Scope, name: str, at: int) -> bool:
        """Remove block ``name`` (later blocks move up one position); ``"remove"`` history record.
        False (and no history) if there was none."""

    @abc.abstractmethod
    def clear_core_blocks(self, scope: Scope, at: int) -> int:
        """Remove every block of ``scope.core``; returns how many. One ``"clear"`` history record
        (name ``""``) when there were any."""

    @abc.abstractmethod
    def forget_core(self, scope: Scope) -> int:
        """Delete every core block AND every core history record of each core scope that
        ``scope`` sees under the view rule (each of ``user_id`` / ``agent_id`` set in ``scope``
        must be equal; unset = any; ``session_id`` is ignored, as for every core call — so
        ``Scope()`` matches every core scope). Nothing of the deleted content stays in any table
        and no history record is appended. Returns how many blocks were removed."""

    @abc.abstractmethod
    def core_scopes(self, scope: Scope | None = None) -> builtins.list[Scope]:
        """Every core scope (``Scope(user_id, agent_id)``) holding at least one block that ``scope``
        sees under the view rule of :meth:`forget_core` (``None``: every one), sorted by
        ``(user_id or "", agent_id or "")``. For export."""

    @abc.abstractmethod
    def core_history(self, scope: Scope, name: str | None = None) -> builtins.list[CoreHistoryRecord]:
        """Core history of ``scope.core`` (only block ``name``'s records, plus clears, when given),
        oldest first (by seq)."""

    # --- store metadata ---------------------------------------------------------------
    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None:
        """A stored string value (e.g. :data:`META_EMBEDDER`), or None."""

    @abc.abstractmethod
    def set_meta(self, key: str, value: str) -> None:
        """Store a string value under ``key`` (transactional, like every write)."""

    # --- lifecycle ---------------------------------------------------------
    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """Everything written inside commits together, or nothing does."""

    @property
    @abc.abstractmethod
    def generation(self) -> int:
        """A counter bumped by every committed write."""

    def compact(self) -> bool:
        """Rewrite what the store keeps on disk so that the bytes of deleted and forgotten rows are
        gone from its files, not only from every read (a database keeps them until it rewrites
        the pages that held them). Time grows with the store's size. False when the store keeps
        nothing on disk to rewrite (in memory)."""
        return False

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "StorageBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iter_all(self, batch: int = 1000) -> Iterator[Entity]:
        """Every stored entity (superseded included), in list order."""
        everything = SearchFilters(include_superseded=True)
        offset = 0
        while True:
            page = self.list(everything, limit=batch, offset=offset)
            if not page:
                return
            yield from page
            offset += len(page)
