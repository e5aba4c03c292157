"""Value encodings and filter plans shared by the Postgres and Lance backends.

Input checks live in :mod:`umi.storage._common` (every backend rejects the same
inputs the same way); this module holds what the two out-of-process stores need
on top: encodings that keep round trips exact where a database would bend a value,
and a :class:`FilterPlan` that states :meth:`SearchFilters.matches` as bounds a
query language can use.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ValidationError
from ..types import Entity, EntityType, MetadataValue
from ._common import check_filters, meta_key
from .base import SearchFilters

__all__ = [
    "FilterPlan",
    "check_metadata_text",
    "check_utf8",
    "cosine_scores",
    "decode_text",
    "dumps",
    "encode_text",
    "plan_filters",
    "tagged_metadata",
    "top_k",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class FilterPlan:
    """:meth:`SearchFilters.matches` as plain conditions (all ANDed).

    ``none`` is True when nothing can match. Time bounds are inclusive and already
    inside the int64 range; ``time_required`` asks for a non-null ``time_field``
    (any ``time_range``, even ``(None, None)``, excludes entities without that time).
    ``as_of`` set: ``created_at <= as_of`` and (``valid_to`` null or ``> as_of``);
    else ``current_only``: ``valid_to`` null.
    """

    none: bool
    entity_types: tuple[str, ...] | None
    time_field: str
    time_required: bool
    time_lo: int | None
    time_hi: int | None
    metadata: dict[str, str]  # key -> tagged value (see tag_value)
    as_of: int | None
    current_only: bool


def plan_filters(filters: object) -> FilterPlan:
    """Check ``filters`` (``None`` = ``SearchFilters()``) as every backend does, and plan them."""
    check_filters(filters)  # the shared checks and errors
    f = SearchFilters() if filters is None else filters
    assert isinstance(f, SearchFilters)
    none = False
    types = None
    if f.entity_types is not None:
        types = tuple(sorted(EntityType.parse(t).value for t in f.entity_types))
        none = none or not types
    lo = hi = None
    required = f.time_range is not None
    if f.time_range is not None:
        lo, hi = f.time_range
        if (lo is not None and lo > INT64_MAX) or (hi is not None and hi < INT64_MIN):
            none = True
        lo = None if lo is None or lo <= INT64_MIN else min(lo, INT64_MAX)
        hi = None if hi is None or hi >= INT64_MAX else max(hi, INT64_MIN)
        if lo is not None and hi is not None and lo > hi:
            none = True
    as_of = None if f.as_of is None else min(max(f.as_of, INT64_MIN), INT64_MAX)
    meta = tagged_metadata(f.metadata or {})
    return FilterPlan(none, types, f.time_field, required, lo, hi, meta, as_of,
                      f.as_of is None and not f.include_superseded)


def tag_value(v: MetadataValue) -> str:
    """A metadata value as one string: equal strings <=> ``SearchFilters.matches`` calls them equal."""
    tag, text = meta_key(v)
    return f"{tag}:{text}"


def tagged_metadata(md: Mapping[str, MetadataValue]) -> dict[str, str]:
    return {k: tag_value(v) for k, v in sorted(md.items())}


def encode_text(s: str) -> str:
    """Reversible, and the identity for every string without NUL that does not start with \\x01.

    Postgres ``text`` (and JSONB strings) cannot hold NUL characters.
    """
    if "\x00" not in s and not s.startswith("\x01"):
        return s
    return "\x01" + s.replace("\x01", "\x01\x01").replace("\x00", "\x010")


def decode_text(s: str) -> str:
    if not s.startswith("\x01"):
        return s
    out: list[str] = []
    i, n = 1, len(s)
    while i < n:
        c = s[i]
        if c == "\x01" and i + 1 < n:
            out.append("\x00" if s[i + 1] == "0" else "\x01")
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def dumps(obj: Any) -> str:
    """JSON text that round-trips exactly: floats by repr; NUL and lone surrogates escaped (ASCII only)."""
    return json.dumps(obj, ensure_ascii=True, sort_keys=True, separators=(",", ":"), allow_nan=False)


def check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"{what} is not valid Unicode text (a lone surrogate at {exc.start})") from None


def check_metadata_text(entities: Sequence[Entity]) -> None:
    """Metadata strings must be encodable (a lone surrogate cannot be stored as UTF-8)."""
    for e in entities:
        for k, v in e.metadata.items():
            if isinstance(v, str):
                check_utf8(v, f"entity {e.id} metadata[{k!r}]")


def cosine_scores(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row with a non-zero ``query``, in float64."""
    m = np.asarray(matrix, dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    q = q / math.sqrt(float(q @ q))
    norms = np.sqrt(np.einsum("ij,ij->i", m, m))
    out = np.zeros(m.shape[0], dtype=np.float64)
    ok = norms > 0
    out[ok] = (m[ok] @ q) / norms[ok]
    return np.clip(out, -1.0, 1.0, out=out)  # rounding can step just past ±1


def top_k(scored: Sequence[tuple[str, float]], k: int) -> list[tuple[str, float]]:
    """Score descending, then id ascending; the first ``k``."""
    return sorted(scored, key=lambda p: (-p[1], p[0]))[:k]
