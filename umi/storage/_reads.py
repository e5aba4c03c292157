"""The read methods that every cache-backed backend (DuckDB, Sim) serves from its
:class:`~umi.storage._hotcache.EntityCache`: validation first, then the cache."""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Sequence

import numpy as np

from ..types import Entity, EntityType, normalize_name
from ._common import check_filters, check_id, check_ids, check_k, check_query_text, check_query_vector
from ._hotcache import EntityCache
from .base import SearchFilters
from .text import query_terms

__all__ = ["CachedReads"]


class CachedReads:
    """Mixin: ``_cache`` is the EntityCache; ``_reading(op)`` guards a read (lock, open
    check, injected faults)."""

    _cache: EntityCache
    _lock: threading.RLock
    _generation: int

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def _reading(self, op: str) -> AbstractContextManager[None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def get(self, entity_id: str) -> Entity | None:
        eid = check_id(entity_id)
        with self._reading("get"):
            return self._cache.get(eid)

    def get_many(self, entity_ids: Sequence[str]) -> list[Entity]:
        ids = check_ids(entity_ids)
        with self._reading("get_many"):
            return self._cache.get_many(ids)

    def find_by_name(self, name: str, entity_type: EntityType | str | None = None,
                     filters: SearchFilters | None = None) -> list[Entity]:
        if not isinstance(name, str):
            raise TypeError(f"name must be str, not {type(name).__name__}")
        norm = normalize_name(name)
        if not norm:
            from ..errors import ValidationError

            raise ValidationError("name must not be empty or only whitespace")
        etype = None if entity_type is None else EntityType.parse(entity_type)
        nf = check_filters(filters)
        with self._reading("find_by_name"):
            return self._cache.find_by_name(norm, etype, nf)

    def search_vector(self, vector: np.ndarray, k: int, filters: SearchFilters | None = None
                      ) -> list[tuple[str, float]]:
        k = check_k(k)
        nf = check_filters(filters)
        with self._reading("search_vector"):
            q = check_query_vector(vector, self._cache.dim)
            if q is None:
                return []
            return self._cache.search_vector(q, k, nf)

    def search_text(self, query: str, k: int, filters: SearchFilters | None = None
                    ) -> list[tuple[str, float]]:
        query = check_query_text(query)
        k = check_k(k)
        nf = check_filters(filters)
        terms = query_terms(query)
        with self._reading("search_text"):
            return self._cache.search_text(terms, k, nf)
