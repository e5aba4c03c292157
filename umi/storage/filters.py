"""One filter semantics, compiled per target.

:class:`~umi.storage.base.SearchFilters` normalises itself once, at construction, into a
:class:`NormFilters` (``filters.norm``): checked, clamped into the int64 range, hashable,
with an ``empty`` flag when nothing can match. This module turns that one form into what
each backend runs:

* :func:`predicate` / :func:`matches` — a Python predicate over an :class:`~umi.types.Entity`:
  **the reference semantics**, used by tests and the plain-Python models;
* :func:`mask` — a numpy bool mask over the rows of an in-process column cache;
* :func:`to_sql` — a WHERE clause and its parameters, per SQL dialect (``"duckdb"``,
  ``"postgres"``).

The rules (all ANDed):

* ``entity_types``: the type is one of them (an empty tuple matches nothing);
* ``time_range`` ``(lo, hi)``, inclusive, over ``time_field``; either side may be open;
  any time range (even ``(None, None)``) excludes entities without a value in that field;
  a start after the end is refused at construction (:class:`~umi.InvalidFilterError`);
* ``metadata``: equality per key, on value *and* JSON type (``1``, ``1.0``, ``True`` and
  ``"1"`` are four different values);
* ``scope``: a *view* — each component the filter's scope sets equals the entity's
  (``Scope.contains``); ``None`` or the unset scope match every scope;
* ``source_id``: the entity came from that source;
* validity: ``as_of=t`` keeps facts current at ``t`` (``created_at <= t`` and ``valid_to``
  unset or ``> t``); else ``include_superseded=False`` (the default) keeps current facts
  only (``valid_to`` unset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

import numpy as np

from ..errors import InvalidFilterError
from ..types import SCOPE_FIELDS, EntityType, MetadataValue

if TYPE_CHECKING:
    from ..types import Entity
    from .base import SearchFilters

__all__ = [
    "NormFilters",
    "normalise",
    "meta_key",
    "predicate",
    "matches",
    "MaskColumns",
    "mask",
    "to_sql",
    "Dialect",
    "I64_MIN",
    "I64_MAX",
]

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

Dialect = Literal["duckdb", "postgres"]


def meta_key(value: MetadataValue) -> tuple[str, str]:
    """(type tag, canonical text) of a metadata value: two values are equal for a filter
    exactly when their keys are (same JSON type and ``==``). Subclasses compare as their base."""
    if value is None:
        return ("null", "")
    if isinstance(value, bool):
        return ("bool", "true" if value else "false")
    if isinstance(value, int):
        return ("int", str(int(value)))
    if isinstance(value, float):
        v = float(value)
        return ("float", "0.0" if v == 0.0 else repr(v))
    if isinstance(value, str):
        return ("str", str.__str__(value))
    raise InvalidFilterError(f"metadata values must be scalars, not {type(value).__name__}")


@dataclass(frozen=True)
class NormFilters:
    """A :class:`SearchFilters` in the one form every compiler reads.

    ``entity_types`` are sorted; time bounds are inclusive and inside int64 (``None`` = open);
    ``has_time``: a time range was given (entities without ``time_field`` never match);
    ``metadata`` holds ``(key, type tag, canonical text)`` sorted by key; ``scope`` holds the
    set components of the view as ``(field, value)`` pairs (empty = every scope);
    ``current_only``: ``valid_to`` must be unset (only when ``as_of`` is None);
    ``empty``: nothing can match.
    """

    entity_types: tuple[EntityType, ...] | None
    time_field: str
    has_time: bool
    time_lo: int | None
    time_hi: int | None
    metadata: tuple[tuple[str, str, str], ...]
    as_of: int | None
    current_only: bool
    scope: tuple[tuple[str, str], ...]
    source_id: str | None
    empty: bool

    @property
    def cache_key(self) -> tuple[Any, ...]:
        """Hashable, equal for filters that select the same entities by the same rule."""
        return (self.entity_types, self.time_field, self.has_time, self.time_lo, self.time_hi, self.metadata,
                self.as_of, self.current_only, self.scope, self.source_id, self.empty)


def _clamp(v: int) -> int:
    return min(max(v, I64_MIN), I64_MAX)


def build(f: "SearchFilters") -> NormFilters:
    """The normal form of a constructed (already checked) :class:`SearchFilters`. Called once,
    by ``SearchFilters.__post_init__``."""
    empty = False
    types = f.entity_types
    if types is not None and len(types) == 0:
        empty = True
    lo = hi = None
    if f.time_range is not None:
        lo, hi = f.time_range
        if (lo is not None and lo > I64_MAX) or (hi is not None and hi < I64_MIN):
            empty = True  # the whole range lies outside every storable time
        lo = None if lo is None or lo <= I64_MIN else _clamp(lo)
        hi = None if hi is None or hi >= I64_MAX else _clamp(hi)
    meta: tuple[tuple[str, str, str], ...] = ()
    if f.metadata:
        meta = tuple(sorted((k, *meta_key(v)) for k, v in f.metadata.items()))
    scope: tuple[tuple[str, str], ...] = ()
    if f.scope is not None:
        scope = tuple((name, v) for name, v in zip(SCOPE_FIELDS, f.scope.as_tuple()) if v is not None)
    # below int64 max: the cache keeps an unset valid_to as int64 max, which must stay later than t
    as_of = None if f.as_of is None else min(_clamp(f.as_of), I64_MAX - 1)
    return NormFilters(types, f.time_field, f.time_range is not None, lo, hi, meta, as_of,
                       f.as_of is None and not f.include_superseded, scope, f.source_id, empty)


def normalise(filters: object) -> NormFilters:
    """``None`` means ``SearchFilters()`` (current facts of every scope)."""
    from .base import SearchFilters

    if filters is None:
        return _DEFAULT
    if not isinstance(filters, SearchFilters):
        raise TypeError(f"filters must be a SearchFilters or None, not {type(filters).__name__}")
    return filters.norm


_DEFAULT = NormFilters(None, "created_at", False, None, None, (), None, True, (), None, False)


# --- the reference: a Python predicate ------------------------------------------------------


def matches(nf: NormFilters, e: "Entity") -> bool:
    """Does entity ``e`` pass ``nf``? The reference every other target must agree with."""
    if nf.empty:
        return False
    if nf.entity_types is not None and e.entity_type not in nf.entity_types:
        return False
    if nf.has_time:
        t = e.created_at if nf.time_field == "created_at" else e.event_time
        if t is None or (nf.time_lo is not None and t < nf.time_lo) or (nf.time_hi is not None and t > nf.time_hi):
            return False
    for k, vt, vx in nf.metadata:
        if k not in e.metadata or meta_key(e.metadata[k]) != (vt, vx):
            return False
    if nf.scope:
        s = e.scope
        for name, v in nf.scope:
            if getattr(s, name) != v:
                return False
    if nf.source_id is not None and e.source_id != nf.source_id:
        return False
    if nf.as_of is not None:
        return e.created_at <= nf.as_of and (e.valid_to is None or e.valid_to > nf.as_of)
    return not nf.current_only or e.valid_to is None


def predicate(filters: object) -> Callable[["Entity"], bool]:
    """``filters`` (a SearchFilters or None) as a one-argument predicate over entities."""
    nf = normalise(filters)
    return lambda e: matches(nf, e)


# --- numpy: a mask over a column cache -------------------------------------------------------


class MaskColumns(Protocol):
    """What :func:`mask` reads of a column cache (row i = one entity; ``n`` rows)."""

    @property
    def n(self) -> int: ...

    def column(self, name: str) -> np.ndarray:
        """``alive`` (bool), ``type`` (int8 codes of :data:`TYPE_CODES`), ``created``, ``event``,
        ``valid_to`` (int64; ``valid_to`` unset = I64_MAX), ``has_event`` (bool)."""

    def code_column(self, name: str) -> np.ndarray | None:
        """int32 value codes (0 = unset) of a coded column: ``user_id``, ``agent_id``,
        ``session_id``, ``source_id`` or ``meta:<key>``; None when no row has a value."""

    def code_of(self, name: str, value: Any) -> int | None:
        """The code of ``value`` in coded column ``name`` (None: no row holds it)."""


#: entity type -> int8 code used by column caches
TYPE_CODES: dict[EntityType, int] = {t: i for i, t in enumerate(EntityType)}


def mask(nf: NormFilters, cols: MaskColumns) -> np.ndarray:
    """Rows 0..n-1 of ``cols`` that are alive and pass ``nf``."""
    n = cols.n
    m = cols.column("alive")[:n].copy()
    if nf.empty:
        m[:] = False
        return m

    def coded(name: str, value: Any) -> bool:
        code = cols.code_of(name, value)
        col = cols.code_column(name)
        if code is None or col is None:
            m[:] = False
            return False
        m[:] &= col[:n] == code
        return True

    if nf.entity_types is not None and len(nf.entity_types) < len(TYPE_CODES):
        types = cols.column("type")[:n]
        tm = np.zeros(n, bool)
        for t in nf.entity_types:
            tm |= types == TYPE_CODES[t]
        m &= tm
    if nf.has_time:
        if nf.time_field == "event_time":
            col = cols.column("event")[:n]
            m &= cols.column("has_event")[:n]
        else:
            col = cols.column("created")[:n]
        if nf.time_lo is not None:
            m &= col >= nf.time_lo
        if nf.time_hi is not None:
            m &= col <= nf.time_hi
    for k, vt, vx in nf.metadata:
        if not coded("meta:" + k, (vt, vx)):
            return m
    for name, v in nf.scope:
        if not coded(name, v):
            return m
    if nf.source_id is not None and not coded("source_id", nf.source_id):
        return m
    valid_to = cols.column("valid_to")[:n]
    if nf.as_of is not None:
        m &= cols.column("created")[:n] <= nf.as_of
        m &= valid_to > nf.as_of
    elif nf.current_only:
        m &= valid_to == I64_MAX
    return m


# --- SQL ------------------------------------------------------------------------------------


def to_sql(filters: object, dialect: Dialect = "postgres", alias: str | None = None) -> tuple[str, list[Any]]:
    """A WHERE condition (without the keyword) and its parameters.

    Column names are the entity table's: ``entity_type``, ``created_at``, ``event_time``,
    ``valid_to``, ``source_id``, ``user_id``, ``agent_id``, ``session_id``, prefixed with
    ``alias.`` when given. Metadata: ``"duckdb"`` tests a row of ``entity_metadata``
    (``entity_id, key, vtype, vtext``); ``"postgres"`` tests ``metadata @> %s::jsonb`` over
    the tagged JSONB column (keys and ``"<vtype>:<vtext>"`` values, NUL-escaped). Placeholders
    are ``?`` (duckdb) or ``%s`` (postgres). Every value is a parameter, never SQL text.
    """
    if dialect not in ("duckdb", "postgres"):
        raise ValueError(f"unknown SQL dialect {dialect!r}; expected 'duckdb' or 'postgres'")
    nf = normalise(filters)
    if nf.empty:
        return "FALSE", []
    ph = "?" if dialect == "duckdb" else "%s"
    a = f"{alias}." if alias else ""
    clauses: list[str] = []
    params: list[Any] = []
    if nf.entity_types is not None:
        if dialect == "postgres":
            clauses.append(f"{a}entity_type = ANY({ph})")
            params.append([t.value for t in nf.entity_types])
        else:
            clauses.append(f"{a}entity_type IN ({', '.join(ph for _ in nf.entity_types)})")
            params.extend(t.value for t in nf.entity_types)
    if nf.has_time:
        col = f"{a}event_time" if nf.time_field == "event_time" else f"{a}created_at"
        clauses.append(f"{col} IS NOT NULL")
        if nf.time_lo is not None:
            clauses.append(f"{col} >= {ph}")
            params.append(nf.time_lo)
        if nf.time_hi is not None:
            clauses.append(f"{col} <= {ph}")
            params.append(nf.time_hi)
    if nf.metadata:
        if dialect == "postgres":
            from ._rows import tagged_json

            clauses.append(f"{a}metadata @> {ph}::jsonb")
            params.append(tagged_json((k, (vt, vx)) for k, vt, vx in nf.metadata))
        else:
            for key, vtype, vtext in nf.metadata:
                clauses.append(
                    f"EXISTS (SELECT 1 FROM entity_metadata m WHERE m.entity_id = {a}id "
                    f"AND m.key = {ph} AND m.vtype = {ph} AND m.vtext = {ph})")
                params.extend((key, vtype, vtext))
    for name, v in nf.scope:
        clauses.append(f"{a}{name} = {ph}")
        params.append(v)
    if nf.source_id is not None:
        clauses.append(f"{a}source_id = {ph}")
        params.append(nf.source_id)
    if nf.as_of is not None:
        clauses.append(f"{a}created_at <= {ph} AND ({a}valid_to IS NULL OR {a}valid_to > {ph})")
        params.extend((nf.as_of, nf.as_of))
    elif nf.current_only:
        clauses.append(f"{a}valid_to IS NULL")
    return (" AND ".join(clauses) if clauses else "TRUE"), params
