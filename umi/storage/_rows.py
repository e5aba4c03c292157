"""Value encodings shared by the Postgres and Lance backends.

Input checks live in :mod:`umi.storage._common` (every backend rejects the same
inputs the same way); this module holds what the two out-of-process stores need
on top: encodings that keep round trips exact where a database would bend a value.
Filters are compiled once, by :mod:`umi.storage.filters`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .._validate import utf8_len
from ..types import Entity, MetadataValue
from ._common import meta_key

__all__ = [
    "check_metadata_text",
    "cosine_scores",
    "decode_text",
    "dumps",
    "encode_text",
    "tagged_json",
    "tagged_metadata",
]



def tagged_json(pairs: Iterable[tuple[str, tuple[str, str]]]) -> str:
    """Metadata as the JSONB text Postgres's ``@>`` compares, stored and in a filter alike: each
    key -> ``"<type tag>:<canonical text>"`` (:func:`~umi.storage.filters.meta_key`: equal strings
    <=> ``SearchFilters.matches`` calls the values equal), NUL escaped (JSONB strings cannot hold it)."""
    return dumps({encode_text(k): encode_text(f"{tag}:{text}") for k, (tag, text) in pairs})


def tagged_metadata(md: Mapping[str, MetadataValue]) -> str:
    """:func:`tagged_json` of an entity's metadata."""
    return tagged_json((k, meta_key(v)) for k, v in md.items())


def encode_text(s: str) -> str:
    """Reversible, and the identity for every string without NUL that does not start with \\x01.

    Postgres ``text`` (and JSONB strings) cannot hold NUL characters.
    """
    if "\x00" not in s and not s.startswith("\x01"):
        return s
    return "\x01" + s.replace("\x01", "\x01\x01").replace("\x00", "\x010")


_ESCAPE = re.compile("\x01(.)", re.DOTALL)


def decode_text(s: str) -> str:
    if not s.startswith("\x01"):
        return s
    return _ESCAPE.sub(lambda m: "\x00" if m.group(1) == "0" else "\x01", s[1:])


def dumps(obj: Any) -> str:
    """JSON text that round-trips exactly: floats by repr; NUL and lone surrogates escaped (ASCII only)."""
    return json.dumps(obj, ensure_ascii=True, sort_keys=True, separators=(",", ":"), allow_nan=False)


def check_metadata_text(entities: Sequence[Entity]) -> None:
    """Metadata strings must be encodable (a lone surrogate cannot be stored as UTF-8)."""
    for e in entities:
        for k, v in e.metadata.items():
            if isinstance(v, str):
                utf8_len(v, f"entity {e.id} metadata[{k!r}]")  # a lone surrogate: ValidationError


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
