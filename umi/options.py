"""Configuration and per-call options.

All three are immutable. Build them with keywords (``RecallOptions(limit=5)``) or
with chainable methods that return a new object (``RecallOptions().with_limit(5)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Mapping

from . import _validate as V
from .errors import InvalidConfigError, InvalidImportanceError, InvalidLimitError, ValidationError
from .index import HNSW_THRESHOLD
from .storage.base import SearchFilters
from .types import EntityType, MetadataValue, validate_metadata

__all__ = [
    "MemoryConfig",
    "RememberOptions",
    "RecallOptions",
    "TEXT_BYTES_MAX",
    "RECALL_LIMIT_MIN",
    "RECALL_LIMIT_MAX",
]

TimeField = Literal["created_at", "event_time"]
SortBy = Literal["relevance", "event_time", "created_at"]

TEXT_BYTES_MAX = V.TEXT_BYTES_MAX
RECALL_LIMIT_MIN = V.RECALL_LIMIT_MIN
RECALL_LIMIT_MAX = V.RECALL_LIMIT_MAX


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, not {type(limit).__name__}")
    if not (RECALL_LIMIT_MIN <= limit <= RECALL_LIMIT_MAX):
        raise InvalidLimitError(
            f"limit must be between {RECALL_LIMIT_MIN} and {RECALL_LIMIT_MAX}, got {limit}",
            limit=(RECALL_LIMIT_MIN, RECALL_LIMIT_MAX),
            actual=limit,
        )
    return limit


@dataclass(frozen=True)
class MemoryConfig:
    """Sizes and knobs of a :class:`umi.Memory`. Every field is honoured."""

    core_memory_bytes: int = 32 * 1024
    working_memory_bytes: int = 1 << 20
    working_memory_entries: int = 10_000
    working_memory_ttl: timedelta = timedelta(hours=1)
    recall_limit: int = 10
    text_bytes_max: int = TEXT_BYTES_MAX
    #: candidates per new entity considered for evolution (same name + nearest vectors)
    evolution_candidates: int = 5
    #: vectors nearer than this (cosine) are evolution candidates even with another name
    evolution_similarity: float = 0.80
    #: below this many vectors the exact kernel is used instead of HNSW
    hnsw_threshold: int = HNSW_THRESHOLD
    #: reciprocal rank fusion constant
    rrf_k: int = 60
    #: auto deep search: a question whose best fused score is under this runs the deep path
    deep_search_threshold: float = 0.025
    embedding_batch_size: int = 32
    #: an ``update`` / ``contradict`` retires the older fact only at this confidence or above;
    #: below it the relation is recorded and both facts stay current. 0.75 lets the rule
    #: classifier's updates (0.8) and contradictions (0.85) through and holds back a model's
    #: hesitant guesses; 0 supersedes on every proposal, 1 only on certain ones.
    supersede_confidence: float = 0.75
    #: a second-stage scorer for recall (a ``umi.providers.rerank.Reranker``, e.g.
    #: ``LocalReranker()``): it rescores the fused top ``rerank_top_n`` statements and its order is
    #: fused with theirs. None: no reranking (``RecallOptions.rerank`` turns it off per call).
    reranker: Any = None
    #: how many fused statements the reranker rescores (at least the recall's ``limit``). On
    #: bench_quality's dev split (LocalReranker, limit 10) R@10 went .681 -> .763 with 20 and .771
    #: with 50, which costs twice the time (bench_rerank.py)
    rerank_top_n: int = 20

    def __post_init__(self) -> None:
        # Integer fields take ints only (5.5, True, NaN are refused here, not later);
        # real fields take finite numbers. One rule: umi._validate.
        def whole(name: str, lo: int, hi: int) -> None:
            V.check_int(getattr(self, name), f"MemoryConfig.{name}", lo, hi)

        def real(name: str, lo: float, hi: float) -> None:
            object.__setattr__(self, name, V.check_real(getattr(self, name), f"MemoryConfig.{name}", lo, hi))

        whole("core_memory_bytes", V.CORE_MEMORY_MAX_BYTES_MIN, V.CORE_MEMORY_MAX_BYTES_MAX)
        whole("working_memory_bytes", V.WORKING_MEMORY_MAX_BYTES_MIN, V.WORKING_MEMORY_MAX_BYTES_MAX)
        whole("working_memory_entries", 1, 10_000_000)
        whole("recall_limit", RECALL_LIMIT_MIN, RECALL_LIMIT_MAX)
        whole("text_bytes_max", 1, TEXT_BYTES_MAX)
        whole("evolution_candidates", 0, 100)
        real("evolution_similarity", 0.0, 1.0)
        whole("hnsw_threshold", 0, 1 << 31)
        whole("rrf_k", 1, 10_000)
        real("deep_search_threshold", 0.0, 1.0)
        whole("embedding_batch_size", 1, 4096)
        real("supersede_confidence", 0.0, 1.0)
        whole("rerank_top_n", 1, RECALL_LIMIT_MAX)
        if self.reranker is not None:
            from .providers.rerank import Reranker

            if not isinstance(self.reranker, Reranker):
                raise TypeError(f"reranker must be a umi.providers.rerank.Reranker, not {type(self.reranker).__name__}")
        ttl = self.working_memory_ttl
        if isinstance(ttl, timedelta):
            secs = ttl.total_seconds()
        elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
            secs = ttl  # checked below before timedelta() sees it (NaN, inf and 10**400 break it)
        else:
            raise TypeError(f"working_memory_ttl must be a timedelta or seconds, not {type(ttl).__name__}")
        secs = V.check_ttl_secs(secs, "MemoryConfig.working_memory_ttl (seconds)")
        if not isinstance(ttl, timedelta):
            object.__setattr__(self, "working_memory_ttl", timedelta(seconds=secs))

    def _with(self, **kw: Any) -> "MemoryConfig":
        return dataclasses.replace(self, **kw)

    def with_core_memory_bytes(self, n: int) -> "MemoryConfig":
        return self._with(core_memory_bytes=n)

    def with_working_memory_bytes(self, n: int) -> "MemoryConfig":
        return self._with(working_memory_bytes=n)

    def with_working_memory_entries(self, n: int) -> "MemoryConfig":
        return self._with(working_memory_entries=n)

    def with_working_memory_ttl(self, ttl: timedelta | float) -> "MemoryConfig":
        return self._with(working_memory_ttl=ttl)

    def with_recall_limit(self, n: int) -> "MemoryConfig":
        return self._with(recall_limit=n)

    def with_hnsw_threshold(self, n: int) -> "MemoryConfig":
        return self._with(hnsw_threshold=n)

    def with_supersede_confidence(self, confidence: float) -> "MemoryConfig":
        return self._with(supersede_confidence=confidence)


def _check_importance(x: object) -> float:
    return V.check_real(x, "importance", 0.0, 1.0, InvalidImportanceError)


def _check_time(value: object, what: str) -> int | None:
    if value is None:
        return None
    return V.check_int(value, what, V.TIME_MS_MIN, V.TIME_MS_MAX, ValidationError)


@dataclass(frozen=True)
class RememberOptions:
    extract_entities: bool = True
    generate_embeddings: bool = True
    detect_evolutions: bool = True
    importance: float = 0.5
    metadata: Mapping[str, MetadataValue] | None = None
    event_time: int | None = None

    def __post_init__(self) -> None:
        for switch in ("extract_entities", "generate_embeddings", "detect_evolutions"):
            V.check_bool(getattr(self, switch), switch)
        object.__setattr__(self, "importance", _check_importance(self.importance))
        if self.metadata is not None:
            object.__setattr__(self, "metadata", validate_metadata(self.metadata, what="RememberOptions.metadata"))
        _check_time(self.event_time, "event_time (int milliseconds since the epoch)")

    def without_extraction(self) -> "RememberOptions":
        return dataclasses.replace(self, extract_entities=False)

    def without_evolution(self) -> "RememberOptions":
        return dataclasses.replace(self, detect_evolutions=False)

    def without_embeddings(self) -> "RememberOptions":
        return dataclasses.replace(self, generate_embeddings=False)

    def with_embeddings(self) -> "RememberOptions":
        return dataclasses.replace(self, generate_embeddings=True)

    def with_importance(self, importance: float) -> "RememberOptions":
        return dataclasses.replace(self, importance=importance)

    def with_metadata(self, metadata: Mapping[str, MetadataValue]) -> "RememberOptions":
        return dataclasses.replace(self, metadata=metadata)

    def with_event_time(self, event_time_ms: int) -> "RememberOptions":
        return dataclasses.replace(self, event_time=event_time_ms)


_UNSET: Any = object()
#: the filter keywords RecallOptions takes as shortcuts for fields of its SearchFilters
_FILTER_KEYWORDS = ("entity_types", "time_range", "time_field", "metadata", "include_superseded", "as_of")


@dataclass(frozen=True, init=False)
class RecallOptions:
    """How ``recall`` searches and what it returns.

    What may match is one :class:`~umi.SearchFilters` (``filters``), validated and normalised
    there — the same rules as ``Memory.count(where=...)`` and every backend. The filter
    keywords (``entity_types``, ``time_range``, ``time_field``, ``metadata``,
    ``include_superseded``, ``as_of``) are shortcuts: given, they replace that field of
    ``filters``; read, they return it. A recall still only sees its memory's scope (a
    ``filters.scope`` may narrow it, never leave it).
    """

    limit: int | None
    use_vector_search: bool
    deep_search: bool | None
    filters: SearchFilters
    #: order of the ``limit`` most relevant results: by relevance (default), or newest first by
    #: ``event_time`` / ``created_at`` (facts without an event time last); ``sort_ascending`` flips it
    sort_by: SortBy
    sort_ascending: bool
    #: second-stage reranking: None uses ``MemoryConfig.reranker`` when one is set, False skips it,
    #: True requires it (InvalidConfigError at recall when the Memory has none)
    rerank: bool | None

    def __init__(
        self,
        limit: int | None = None,
        use_vector_search: bool = True,
        deep_search: bool | None = None,
        entity_types: Any = _UNSET,
        time_range: Any = _UNSET,
        metadata: Any = _UNSET,
        include_superseded: Any = _UNSET,
        as_of: Any = _UNSET,
        time_field: Any = _UNSET,
        sort_by: SortBy = "relevance",
        sort_ascending: bool = False,
        rerank: bool | None = None,
        *,
        filters: SearchFilters | None = None,
    ) -> None:
        if filters is None:
            filters = SearchFilters()
        elif not isinstance(filters, SearchFilters):
            raise TypeError(f"filters must be a umi.SearchFilters or None, not {type(filters).__name__}")
        given = dict(entity_types=entity_types, time_range=time_range, metadata=metadata,
                     include_superseded=include_superseded, as_of=as_of, time_field=time_field)
        changes = {k: v for k, v in given.items() if v is not _UNSET}
        if changes:
            filters = dataclasses.replace(filters, **changes)  # SearchFilters validates: one rule
        if sort_by not in ("relevance", "event_time", "created_at"):
            raise InvalidConfigError(f"sort_by must be 'relevance', 'event_time' or 'created_at', got {sort_by!r}")
        V.check_bool(sort_ascending, "sort_ascending")
        V.check_bool(use_vector_search, "use_vector_search")
        V.check_bool(deep_search, "deep_search", optional=True)
        V.check_bool(rerank, "rerank", optional=True)
        if limit is not None:
            check_limit(limit)
        for name, value in (("limit", limit), ("use_vector_search", use_vector_search),
                            ("deep_search", deep_search), ("filters", filters), ("sort_by", sort_by),
                            ("sort_ascending", sort_ascending), ("rerank", rerank)):
            object.__setattr__(self, name, value)

    # the filter shortcuts, read from the one SearchFilters
    @property
    def entity_types(self) -> tuple[EntityType, ...] | None:
        return self.filters.entity_types

    @property
    def time_range(self) -> tuple[int | None, int | None] | None:
        return self.filters.time_range

    @property
    def time_field(self) -> TimeField:
        return self.filters.time_field

    @property
    def metadata(self) -> Mapping[str, MetadataValue] | None:
        return self.filters.metadata

    @property
    def include_superseded(self) -> bool:
        return self.filters.include_superseded

    @property
    def as_of(self) -> int | None:
        return self.filters.as_of

    def with_filters(self, filters: SearchFilters) -> "RecallOptions":
        return dataclasses.replace(self, filters=filters)

    def _refilter(self, **changes: Any) -> "RecallOptions":
        """These options with some fields of the filters replaced (SearchFilters checks them)."""
        return dataclasses.replace(self, filters=dataclasses.replace(self.filters, **changes))

    def with_limit(self, limit: int) -> "RecallOptions":
        return dataclasses.replace(self, limit=limit)

    def with_deep_search(self) -> "RecallOptions":
        return dataclasses.replace(self, deep_search=True)

    def fast_only(self) -> "RecallOptions":
        return dataclasses.replace(self, deep_search=False)

    def with_rerank(self, rerank: bool = True) -> "RecallOptions":
        """Rerank with ``MemoryConfig.reranker`` (required), or with ``False`` never."""
        return dataclasses.replace(self, rerank=rerank)

    def without_vector_search(self) -> "RecallOptions":
        return dataclasses.replace(self, use_vector_search=False)

    def with_time_range(self, start_ms: int | None, end_ms: int | None) -> "RecallOptions":
        return self._refilter(time_range=(start_ms, end_ms))

    def with_entity_types(self, *types: EntityType | str) -> "RecallOptions":
        parsed: tuple[EntityType, ...] = tuple(EntityType.parse(t) for t in types)
        return self._refilter(entity_types=parsed)

    def with_metadata(self, metadata: Mapping[str, MetadataValue]) -> "RecallOptions":
        return self._refilter(metadata=metadata)

    def with_superseded(self) -> "RecallOptions":
        return self._refilter(include_superseded=True)

    def with_as_of(self, as_of_ms: int) -> "RecallOptions":
        return self._refilter(as_of=as_of_ms)

    def with_event_time_range(self, start_ms: int | None, end_ms: int | None) -> "RecallOptions":
        """Only facts whose ``event_time`` (when it happened) is in ``[start_ms, end_ms]``."""
        return self._refilter(time_range=(start_ms, end_ms), time_field="event_time")

    def sorted_by(self, field: "SortBy", *, ascending: bool = False) -> "RecallOptions":
        """Order the results by ``"event_time"`` or ``"created_at"`` (newest first unless ``ascending``)."""
        return dataclasses.replace(self, sort_by=field, sort_ascending=ascending)
