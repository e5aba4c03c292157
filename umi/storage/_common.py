"""Input checks and small helpers shared by the storage backends.

Every public backend method validates with these, so every backend rejects the
same inputs with the same errors.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import (
    EmptyQueryError,
    InvalidConfigError,
    InvalidConfidenceError,
    InvalidImportanceError,
    InvalidLimitError,
    ValidationError,
)
from ..types import (
    ENTITY_CONTENT_BYTES_MAX,
    ENTITY_NAME_BYTES_MAX,
    UNSET_SCOPE,
    Entity,
    EntityType,
    EvolutionRelation,
    MetadataValue,
    Scope,
    check_passage_embeddings,
    check_scope,
    normalize_name,
    validate_metadata,
)
from .._validate import QUERY_BYTES_MAX, check_input_text, check_text, check_vector_norm, utf8_len
from ..index import SEARCH_K_MAX  # the largest k a search accepts: the index's own limit, one number
from .base import ID_CHARS_MAX, HistoryRecord, Source, text_hash
from .filters import I64_MAX, meta_key

__all__ = [
    "SEARCH_K_MAX",
    "LIST_LIMIT_MAX",
    "GET_MANY_IDS_MAX",
    "ID_CHARS_MAX",
    "TIME_MS_MIN",
    "TIME_MS_MAX",
    "QUERY_BYTES_MAX",
    "check_int",
    "check_k",
    "check_limit_offset",
    "check_id",
    "check_ids",
    "check_time",
    "check_entities",
    "check_relations",
    "check_source",
    "check_seq",
    "check_history",
    "check_endpoints",
    "check_core_name",
    "check_core_block",
    "check_meta_key",
    "check_meta_entry",
    "stored_scope",
    "source_from_row",
    "relation_from_row",
    "check_query_vector",
    "check_query_text",
    "check_name_query",
    "check_name_queries",
    "meta_key",
    "clone_entity",
    "copy_relation",
    "make_entity",
    "snapshot_of",
    "dumps",
]

#: largest page list() returns
LIST_LIMIT_MAX = 100_000
#: most ids one get_many() call takes
GET_MANY_IDS_MAX = 100_000
#: stored times (ms since the epoch) must lie in [TIME_MS_MIN, TIME_MS_MAX] (about ±146 million years)
TIME_MS_MIN = -(2**62)
TIME_MS_MAX = 2**62

#: core block names: 1..64 bytes of [A-Za-z0-9_.-] (as CoreMemory); contents up to 16 MiB
CORE_NAME_BYTES_MAX = 64
CORE_CONTENT_BYTES_MAX = 16 * 1024 * 1024
#: store metadata keys and values
META_KEY_BYTES_MAX = 256
META_VALUE_BYTES_MAX = 1024 * 1024


def dumps(obj: Any) -> str:
    """Compact, key-sorted JSON (stable text for the same value)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _base_value(value: MetadataValue) -> MetadataValue:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str.__str__(value)


def check_int(value: object, what: str, lo: int, hi: int | None = None, *,
              optional: bool = False, exc: type[ValidationError] | None = None) -> int | None:
    """The one integer check of the storage layer: an ``int`` (not a ``bool``; else ``TypeError``)
    in ``[lo, hi]`` (else ``exc``, default :class:`~umi.InvalidConfigError`, naming the range).
    ``None`` passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int{' or None' if optional else ''}, not {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        if exc is None:
            raise InvalidConfigError(f"{what} must be {rng}, got {value}")
        if exc is InvalidLimitError:
            raise InvalidLimitError(f"{what} must be {rng}, got {value}", limit=(lo, hi) if hi is not None else lo,
                                    actual=value)
        raise exc(f"{what} must be {rng}, got {value}")
    return value


def check_k(k: object, what: str = "k") -> int:
    return check_int(k, what, 1, SEARCH_K_MAX, exc=InvalidLimitError)  # type: ignore[return-value]


def check_limit_offset(limit: object, offset: object) -> tuple[int, int]:
    lim = check_int(limit, "limit", 1, LIST_LIMIT_MAX, exc=InvalidLimitError)
    off = check_int(offset, "offset", 0, exc=InvalidLimitError)
    return lim, min(off, I64_MAX)  # type: ignore[return-value, type-var]


def check_id(value: object, what: str = "entity_id") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if not value or len(value) > ID_CHARS_MAX or "\x00" in value:
        raise ValidationError(
            f"{what} must be a non-empty str of at most {ID_CHARS_MAX} characters without NUL, "
            f"got {value[:40]!r}{'...' if len(value) > 40 else ''} ({len(value)} characters)"
        )
    if not value.isascii():
        utf8_len(value, what)  # a lone surrogate: ValidationError
    return value


def check_vectors_per_query(queries: Sequence[object], vectors: Sequence[object]) -> None:
    """``search_content``'s pairing: one vector (or None) per query."""
    if len(queries) != len(vectors):
        raise ValidationError(f"search_content needs one vector (or None) per query: {len(queries)} queries, "
                              f"{len(vectors)} vectors")


def _check_many(values: object, what: str, noun: str) -> list[Any]:
    """A sequence of str (as a list) of at most ``GET_MANY_IDS_MAX`` ``noun``."""
    out = check_seq(values, what, " of str")
    if len(out) > GET_MANY_IDS_MAX:
        raise InvalidLimitError(f"{what} holds {len(out)} {noun}; the limit is {GET_MANY_IDS_MAX}",
                                limit=GET_MANY_IDS_MAX, actual=len(out))
    return out


def check_ids(values: object, what: str = "entity_ids") -> list[str]:
    ids = _check_many(values, what, "ids")
    # the usual case checked in C-level passes (a recall checks ~30 ids); anything else, or a
    # failure, goes id by id so that the error names the first bad one
    plain = (ids and set(map(type, ids)) == {str} and min(map(len, ids)) > 0
             and max(map(len, ids)) <= ID_CHARS_MAX and "\x00" not in "".join(ids))
    if plain:
        return ids
    return [check_id(v, what[:-1] if what.endswith("s") else what) for v in ids]


def check_time(value: object, what: str, *, optional: bool = False) -> int | None:
    """Milliseconds since the epoch within [TIME_MS_MIN, TIME_MS_MAX]."""
    return check_int(value, f"{what} (ms)", TIME_MS_MIN, TIME_MS_MAX, optional=optional, exc=ValidationError)


def check_query_vector(vector: object, dim: int | None) -> np.ndarray | None:
    """A unit float32 copy of the query; None when the store holds no vectors yet."""
    if not isinstance(vector, (np.ndarray, list, tuple)):
        raise TypeError(f"vector must be a numpy array or a sequence of floats, not {type(vector).__name__}")
    try:
        q = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"vector must hold floats: {exc}") from exc
    if q.ndim != 1 or q.size == 0:
        raise ValidationError(f"vector must be a non-empty 1-d array, got shape {q.shape}")
    q64 = q.astype(np.float64)
    sq = float(q64.dot(q64))  # NaN or inf exactly when an entry is (float32 squares cannot overflow it)
    if not math.isfinite(sq):
        raise ValidationError("vector must hold finite values (no NaN or inf)")
    if dim is not None and q.shape[0] != dim:
        raise ValidationError(f"query vector has {q.shape[0]} dimensions but the store holds {dim}-d vectors")
    norm = math.sqrt(sq)  # np.linalg.norm's own steps (dot, then sqrt): the same bits
    if norm == 0.0:
        raise ValidationError("query vector has zero length; cosine similarity is undefined")
    if dim is None:
        return None
    return (q / np.float32(norm)).astype(np.float32)


def check_query_text(query: object) -> str:
    """A keyword query: the same limit and checks as ``recall``'s (one rule, in umi._validate)."""
    return check_input_text(query, "query", QUERY_BYTES_MAX, EmptyQueryError)


def check_name_query(name: object) -> str:
    """The name ``find_by_name`` looks up, normalised (``types.normalize_name``); not empty."""
    if not isinstance(name, str):
        raise TypeError(f"name must be str, not {type(name).__name__}")
    norm = normalize_name(name)
    if not norm:
        raise ValidationError("name must not be empty or only whitespace")
    return norm


def check_name_queries(names: object) -> list[str]:
    """The names ``find_by_names`` looks up: a sequence of at most ``GET_MANY_IDS_MAX`` names,
    each as :func:`check_name_query`; normalised, each once (sorted)."""
    return sorted({check_name_query(n) for n in _check_many(names, "names", "names")})


def _unit(value: object, what: str, exc: type[ValidationError]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a float in [0, 1], not {type(value).__name__}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise exc(f"{what} must be in [0, 1], got {value!r}", actual=value)  # type: ignore[call-arg]
    return v


def _text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if len(value) * 4 > limit:  # only long text can be over the byte limit
        n = len(value.encode("utf-8"))
        if n > limit:
            raise ValidationError(f"{what} is {n} bytes; the limit is {limit}")
    return value


def _check_entity(e: object, dim: int | None, pos: int) -> tuple[Entity, int | None]:
    """Every check of ``Entity.__post_init__`` again (the caller may have changed fields after
    construction), plus the store's own (ids, time range, vector dimension); returns a private copy."""
    if not isinstance(e, Entity):
        raise TypeError(f"entities[{pos}] must be an Entity, not {type(e).__name__}")
    d = dict(e.__dict__)
    et = d["entity_type"]
    d["entity_type"] = et if type(et) is EntityType else EntityType.parse(et)
    name = _text(d["name"], f"entities[{pos}].name", ENTITY_NAME_BYTES_MAX)
    if not name.strip():
        raise ValidationError(f"entities[{pos}].name must not be empty")
    _text(d["content"], f"entities[{pos}].content", ENTITY_CONTENT_BYTES_MAX)
    check_id(d["id"], f"entities[{pos}].id")
    for what in ("created_at", "updated_at"):
        check_time(d[what], f"entities[{pos}].{what}")
    for what in ("event_time", "valid_from", "valid_to"):
        check_time(d[what], f"entities[{pos}].{what}", optional=True)
    if d["source_id"] is not None:
        check_id(d["source_id"], f"entities[{pos}].source_id")
    d["importance"] = _unit(d["importance"], f"entities[{pos}].importance", InvalidImportanceError)
    d["confidence"] = _unit(d["confidence"], f"entities[{pos}].confidence", InvalidConfidenceError)
    d["metadata"] = {k: _base_value(v) for k, v in
                     validate_metadata(d["metadata"], what=f"entities[{pos}].metadata").items()}
    emb = d["embedding"]
    if emb is not None:
        if not isinstance(emb, np.ndarray):
            raise TypeError(f"entities[{pos}].embedding must be a numpy array, not {type(emb).__name__}")
        emb = np.array(emb, dtype=np.float32, copy=True)
        if emb.ndim != 1 or emb.size == 0 or not np.isfinite(emb).all():
            raise ValidationError(f"entities[{pos}].embedding must be a non-empty 1-d finite float vector")
        check_vector_norm(emb, f"entities[{pos}].embedding")
        if dim is not None and emb.shape[0] != dim:
            raise ValidationError(
                f"entities[{pos}].embedding has {emb.shape[0]} dimensions but the store holds {dim}-d vectors"
            )
        if not emb.any():
            raise ValidationError(f"entities[{pos}].embedding has zero length; cosine similarity is undefined")
        emb.flags.writeable = False
        dim = emb.shape[0]
    d["embedding"] = emb
    passages = d.get("passage_embeddings")
    if passages is not None:
        try:
            passages = check_passage_embeddings(passages, emb)
        except ValidationError as exc:
            raise ValidationError(f"entities[{pos}]: {exc}") from None
        passages.flags.writeable = False
    d["passage_embeddings"] = passages
    d["score"] = None
    d["mentions"] = ()
    sc = d.get("scope")
    if not isinstance(sc, Scope):
        raise TypeError(f"entities[{pos}].scope must be a umi.Scope, not {type(sc).__name__}")
    return make_entity(d), dim


def check_entities(entities: object, dim: int | None) -> tuple[list[Entity], int | None]:
    """Private, validated copies of ``entities`` (embeddings float32, read-only) and the
    dimension they fix (the store's, or the first vector's when the store has none)."""
    out = []
    for pos, e in enumerate(check_seq(entities, "entities", " of Entity")):
        c, dim = _check_entity(e, dim, pos)
        out.append(c)
    return out, dim


def check_relations(relations: object) -> list[EvolutionRelation]:
    out = []
    for pos, r in enumerate(check_seq(relations, "relations", " of EvolutionRelation")):
        if not isinstance(r, EvolutionRelation):
            raise TypeError(f"relations[{pos}] must be an EvolutionRelation, not {type(r).__name__}")
        check_id(r.id, f"relations[{pos}].id")
        check_id(r.source_id, f"relations[{pos}].source_id")
        check_id(r.target_id, f"relations[{pos}].target_id")
        check_time(r.created_at, f"relations[{pos}].created_at")
        if not isinstance(r.scope, Scope):
            raise TypeError(f"relations[{pos}].scope must be a umi.Scope, not {type(r.scope).__name__}")
        out.append(copy_relation(r))
    return out


def copy_relation(r: EvolutionRelation) -> EvolutionRelation:
    """A relation of the same fields (a stored one for a caller, or a caller's to store)."""
    return EvolutionRelation(source_id=r.source_id, target_id=r.target_id, evolution_type=r.evolution_type,
                             reason=r.reason, confidence=r.confidence, id=r.id, created_at=r.created_at,
                             scope=r.scope)


def check_source(source: object) -> Source:
    if not isinstance(source, Source):
        raise TypeError(f"source must be a Source, not {type(source).__name__}")
    check_id(source.id, "source.id")
    if not isinstance(source.text, str):
        raise TypeError(f"source.text must be str, not {type(source.text).__name__}")
    if not isinstance(source.text_hash, str):
        raise TypeError(f"source.text_hash must be str, not {type(source.text_hash).__name__}")
    want = text_hash(source.text)
    if source.text_hash != want:
        raise ValidationError(f"source.text_hash {source.text_hash[:16]!r}... is not the sha256 of source.text")
    check_time(source.created_at, "source.created_at")
    meta = {k: _base_value(v) for k, v in validate_metadata(source.metadata, what="source.metadata").items()}
    if not isinstance(source.scope, Scope):
        raise TypeError(f"source.scope must be a umi.Scope, not {type(source.scope).__name__}")
    return Source(source.id, source.text_hash, source.text, source.created_at, meta, source.scope)


def check_seq(values: object, what: str, of: str = "") -> list[Any]:
    """``what``: a sequence (not a str or bytes; ``of`` names its items in the error), as a list."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{what} must be a sequence{of}, not {type(values).__name__}")
    return list(values)


_OPS = ("create", "update", "supersede", "revive", "delete")


def check_history(h: object, pos: int) -> HistoryRecord:
    """Record ``pos`` of the history ``restore`` is given."""
    if not isinstance(h, HistoryRecord):
        raise TypeError(f"history[{pos}] must be a HistoryRecord, not {type(h).__name__}")
    check_id(h.entity_id, f"history[{pos}].entity_id")
    if isinstance(h.seq, bool) or not isinstance(h.seq, int) or not 1 <= h.seq <= 2**31 - 1:
        raise ValidationError(f"history[{pos}].seq must be an int in [1, {2**31 - 1}], got {h.seq!r}")
    if h.op not in _OPS:
        raise ValidationError(f"history[{pos}].op must be one of {', '.join(_OPS)}, got {h.op!r}")
    check_time(h.at, f"history[{pos}].at")
    check_scope(h.scope, f"history[{pos}].scope")
    if not isinstance(h.snapshot, dict):
        raise TypeError(f"history[{pos}].snapshot must be a dict, not {type(h.snapshot).__name__}")
    try:
        json.dumps(h.snapshot, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"history[{pos}].snapshot is not plain JSON: {exc}") from None
    return h


def check_endpoints(relations: Sequence[EvolutionRelation], stored: Callable[[str], bool]) -> None:
    """The one relation-endpoint rule: both ends of every relation are stored entities
    (``stored(id)``, which the backend answers)."""
    for r in relations:
        for end in (r.source_id, r.target_id):
            if not stored(end):
                raise ValidationError(f"relation {r.id} refers to entity {end}, which is not stored")


_CORE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,%d}" % CORE_NAME_BYTES_MAX)


def check_core_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"block name must be str, not {type(name).__name__}")
    if _CORE_NAME.fullmatch(name) is None:
        raise ValidationError(f"block name must be 1 to {CORE_NAME_BYTES_MAX} characters of [A-Za-z0-9_.-], "
                              f"got {name[:80]!r}")
    return name


def check_core_block(name: object, content: object, importance: object, at: object) -> tuple[str, str, float, int]:
    """``set_core_block``'s name, content, importance and time."""
    return (check_core_name(name), check_text(content, "block content", CORE_CONTENT_BYTES_MAX),
            _unit(importance, "importance", InvalidImportanceError), check_time(at, "at"))  # type: ignore[return-value]


def check_meta_key(key: object) -> str:
    return check_text(key, "meta key", META_KEY_BYTES_MAX)


def check_meta_entry(key: object, value: object) -> tuple[str, str]:
    """``set_meta``'s key (not empty) and value."""
    k = check_meta_key(key)
    if not k:
        raise ValidationError("meta key must not be empty")
    return k, check_text(value, "meta value", META_VALUE_BYTES_MAX)


def source_from_row(r: Sequence[Any], text: Callable[[str], str] = str) -> Source:
    """A stored source from its columns ``(id, text_hash, text, created_at, metadata JSON, user_id,
    agent_id, session_id)``, ``text`` decoding what the database holds (Postgres escapes NUL)."""
    return Source(r[0], r[1], text(r[2]), int(r[3]), dict(json.loads(r[4])), stored_scope(r[5], r[6], r[7]))


def relation_from_row(r: Sequence[Any], text: Callable[[str], str] = str) -> EvolutionRelation:
    """A stored relation from its columns ``(id, source_id, target_id, evolution_type, reason,
    confidence, created_at, user_id, agent_id, session_id)`` (``text``: as :func:`source_from_row`)."""
    return EvolutionRelation(source_id=r[1], target_id=r[2], evolution_type=r[3], reason=text(r[4]),
                             confidence=r[5], id=r[0], created_at=int(r[6]), scope=stored_scope(r[7], r[8], r[9]))


def core_key(sc: Scope) -> tuple[str, str]:
    """A core scope's ``(user_id, agent_id)``, ``''`` for an unset component: the order of core
    scopes (``core_scopes``, ``forget_core``, commits) and Postgres's key of its core tables."""
    return (sc.user_id or "", sc.agent_id or "")


@functools.lru_cache(maxsize=100_000)
def stored_scope(user_id: str | None, agent_id: str | None, session_id: str | None) -> Scope:
    """The Scope of a stored row's scope columns (None: the unset component), validated once per
    distinct value."""
    if user_id is None and agent_id is None and session_id is None:
        return UNSET_SCOPE
    return Scope(user_id, agent_id, session_id)


_ENTITY_NEW = object.__new__


def clone_entity(e: Entity, embedding: np.ndarray | None) -> Entity:
    """A copy for a caller (metadata dict and embedding are the caller's own); skips re-validation."""
    d = e.__dict__.copy()  # one dict copy, installed whole (recall hydrates ~20 per query)
    d["metadata"] = dict(e.metadata)
    if embedding is None:
        d["embedding"] = None
    elif type(embedding) is np.ndarray and embedding.dtype == np.float32:
        d["embedding"] = embedding.copy()
    else:
        d["embedding"] = np.array(embedding, dtype=np.float32, copy=True)
    d["score"] = None
    d["mentions"] = ()
    c = _ENTITY_NEW(Entity)
    c.__dict__ = d
    return c


def make_entity(fields: dict[str, Any]) -> Entity:
    """An Entity from trusted stored fields (already validated when written); skips re-validation."""
    c = _ENTITY_NEW(Entity)
    c.__dict__["passage_embeddings"] = None
    c.__dict__.update(fields)
    return c


def snapshot_of(e: Entity) -> dict[str, Any]:
    d = e.to_dict()
    d.pop("score", None)
    return d
