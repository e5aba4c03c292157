"""The storage protocol every archival backend implements.

The pipelines need exactly this and nothing SQL-specific. One contract test suite
(``tests/contract/``) runs against every backend.

Rules every backend keeps:

* Entities are never deleted by supersession: :meth:`supersede` sets ``valid_to``.
* Every change to an entity appends a :class:`HistoryRecord` (create, update,
  supersede, delete). History is append-only.
* :meth:`transaction` makes everything inside it commit together or not at all;
  a failure inside raises :class:`umi.StorageError` and leaves nothing behind.
* ``generation`` goes up by at least one with every committed write.
* Searches apply filters *inside* the search (never filter after truncating to k).
* Results are ordered deterministically: score descending, then id ascending.
* ``filters=None`` always means ``SearchFilters()``: current facts only.
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
    Entity,
    EntityType,
    EvolutionRelation,
    MetadataValue,
    validate_metadata,
)

__all__ = ["StorageBackend", "SearchFilters", "Source", "HistoryRecord", "source_id_for", "text_hash"]


def text_hash(text: str) -> str:
    """sha256 hex of the UTF-8 text: the exact-duplicate key of a source."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_id_for(text: str) -> str:
    return str(uuid.uuid5(UMI_NAMESPACE, "src\x1f" + text_hash(text)))


@dataclass(frozen=True)
class Source:
    """One remembered text, kept for provenance and exact-duplicate detection."""

    id: str
    text_hash: str
    text: str
    created_at: int
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)

    @classmethod
    def for_text(cls, text: str, created_at: int, metadata: Mapping[str, MetadataValue] | None = None) -> "Source":
        return cls(source_id_for(text), text_hash(text), text, created_at, dict(metadata or {}))


HistoryOp = Literal["create", "update", "supersede", "delete"]


@dataclass(frozen=True)
class HistoryRecord:
    """One change to one entity. ``snapshot`` is the entity's dict (no embedding) after the change."""

    entity_id: str
    seq: int
    op: HistoryOp
    at: int
    snapshot: Mapping[str, Any]


TimeField = Literal["created_at", "event_time"]


@dataclass(frozen=True)
class SearchFilters:
    """Filters applied inside every search, list and count.

    ``time_range`` is inclusive ``(start_ms, end_ms)`` over ``time_field``; ``None``
    on either side is open. ``metadata`` is equality on scalar values only.
    By default only current facts (``valid_to`` unset) are seen;
    ``include_superseded=True`` shows every fact; ``as_of=t`` shows the facts that were
    current at ``t`` (``created_at <= t`` and ``valid_to`` unset or ``> t``).
    The caller's objects are copied, never mutated.
    """

    entity_types: tuple[EntityType, ...] | None = None
    time_range: tuple[int | None, int | None] | None = None
    time_field: TimeField = "created_at"
    metadata: Mapping[str, MetadataValue] | None = None
    include_superseded: bool = False
    as_of: int | None = None

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
            object.__setattr__(self, "time_range", tr)
        if self.metadata is not None:
            object.__setattr__(self, "metadata", validate_metadata(self.metadata, what="metadata filter"))
        if self.as_of is not None and (isinstance(self.as_of, bool) or not isinstance(self.as_of, int)):
            raise InvalidFilterError("as_of must be int milliseconds since the epoch")

    def matches(self, e: Entity) -> bool:
        """The reference semantics, in Python. Backends must agree with it."""
        if self.entity_types is not None and e.entity_type not in self.entity_types:
            return False
        if self.time_range is not None:
            t = e.created_at if self.time_field == "created_at" else e.event_time
            lo, hi = self.time_range
            if t is None or (lo is not None and t < lo) or (hi is not None and t > hi):
                return False
        if self.metadata:
            for k, v in self.metadata.items():
                if k not in e.metadata or e.metadata[k] != v or type(e.metadata[k]) is not type(v):
                    return False
        if self.as_of is not None:
            if e.created_at > self.as_of:
                return False
            if e.valid_to is not None and e.valid_to <= self.as_of:
                return False
        elif not self.include_superseded and e.valid_to is not None:
            return False
        return True


class StorageBackend(abc.ABC):
    """Durable home of archival memory. Implementations: DuckDB, Postgres, Lance, Sim."""

    #: embedding dimension this store holds (fixed by the first vector written), or None
    dim: int | None = None

    # --- entities ----------------------------------------------------------
    @abc.abstractmethod
    def upsert(self, entities: Sequence[Entity]) -> None:
        """Insert or replace entities by id (batched; one history record each)."""

    @abc.abstractmethod
    def get(self, entity_id: str) -> Entity | None: ...

    @abc.abstractmethod
    def get_many(self, entity_ids: Sequence[str]) -> builtins.list[Entity]:
        """Entities in the order of ``entity_ids``; ids with no entity are skipped."""

    @abc.abstractmethod
    def delete(self, entity_id: str, at: int | None = None) -> bool:
        """Remove an entity (and its vector); False if there was none. History keeps a record."""

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

    # --- search ------------------------------------------------------------
    @abc.abstractmethod
    def search_vector(self, vector: np.ndarray, k: int, filters: SearchFilters | None = None) -> builtins.list[tuple[str, float]]:
        """Top-k (id, cosine similarity) among entities with an embedding that match ``filters``."""

    @abc.abstractmethod
    def search_text(self, query: str, k: int, filters: SearchFilters | None = None) -> builtins.list[tuple[str, float]]:
        """Top-k (id, BM25 score) over name + content among entities that match ``filters``."""

    # --- sources -----------------------------------------------------------
    @abc.abstractmethod
    def add_source(self, source: Source) -> None: ...

    @abc.abstractmethod
    def get_source(self, source_id: str) -> Source | None: ...

    @abc.abstractmethod
    def find_source_by_hash(self, text_hash: str) -> Source | None: ...

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
        """Every change to the entity, oldest first."""

    # --- lifecycle ---------------------------------------------------------
    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """Everything written inside commits together, or nothing does."""

    @property
    @abc.abstractmethod
    def generation(self) -> int:
        """A counter bumped by every committed write."""

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
