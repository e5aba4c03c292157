"""Archival memory's value types: scopes, entities, evolution relations, results.

An :class:`Entity` is one fact about one named thing. Its id is a UUIDv5 of its
type, normalised name and normalised content (and its scope, when one is set), so the
same fact told twice in one scope is one entity and a new fact about the same name is
a new one.

A :class:`Scope` says whose a record is: ``(user_id, agent_id, session_id)``, each
optional. A stored record's unset component means "not owned at that level". A *view*
with a scope sees the records whose components equal every component the view sets
(an unset component in the view matches anything): ``view.contains(record.scope)``.
"""

from __future__ import annotations

import enum
import math
import re
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union

import numpy as np

from . import _validate as V
from .errors import (
    InvalidConfidenceError,
    InvalidEntityTypeError,
    InvalidEvolutionTypeError,
    InvalidImportanceError,
    InvalidMetadataError,
    InvalidScopeError,
    ValidationError,
)

__all__ = [
    "Scope",
    "UNSET_SCOPE",
    "SCOPE_COMPONENT_CHARS_MAX",
    "CoreBlockRecord",
    "CoreHistoryRecord",
    "EntityType",
    "EvolutionType",
    "Entity",
    "EvolutionRelation",
    "RememberResult",
    "Usage",
    "MetadataValue",
    "UMI_NAMESPACE",
    "normalize_name",
    "normalize_content",
    "entity_id_for",
    "now_ms",
    "validate_metadata",
]

#: Namespace of every id umi derives (UUIDv5). Fixed forever: changing it changes every id.
UMI_NAMESPACE = uuid.UUID("6d1f3c2e-5b0a-5c8e-9f4e-0a7b1c2d3e4f")

ENTITY_NAME_BYTES_MAX = V.ENTITY_NAME_BYTES_MAX
ENTITY_CONTENT_BYTES_MAX = V.ENTITY_CONTENT_BYTES_MAX

MetadataValue = Union[str, int, float, bool, None]

#: longest scope component (user_id, agent_id, session_id), in characters
SCOPE_COMPONENT_CHARS_MAX = 128
_SCOPE_COMPONENT = re.compile(r"[A-Za-z0-9_.:@+\-]{1,%d}" % SCOPE_COMPONENT_CHARS_MAX)
SCOPE_FIELDS = ("user_id", "agent_id", "session_id")


@dataclass(frozen=True)
class Scope:
    """Whose a record is: ``user_id``, ``agent_id``, ``session_id``, each optional.

    Each set value is 1..128 characters of ``[A-Za-z0-9_.:@+-]``; anything else raises
    :class:`~umi.InvalidScopeError` (a non-str raises ``TypeError``). Hashable and ordered
    by ``(user_id, agent_id, session_id)`` with unset first.
    """

    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None

    def __post_init__(self) -> None:
        for f in SCOPE_FIELDS:
            v = getattr(self, f)
            if v is None:
                continue
            if not isinstance(v, str):
                raise TypeError(f"Scope.{f} must be str or None, not {type(v).__name__}")
            if _SCOPE_COMPONENT.fullmatch(v) is None:
                shown = v[:40] + ("..." if len(v) > 40 else "")
                raise InvalidScopeError(
                    f"Scope.{f} must be 1 to {SCOPE_COMPONENT_CHARS_MAX} characters of [A-Za-z0-9_.:@+-], "
                    f"got {shown!r} ({len(v)} characters)", component=f, value=v)

    @property
    def is_unset(self) -> bool:
        """No component is set (the scope of everything written without one)."""
        return self.user_id is None and self.agent_id is None and self.session_id is None

    def contains(self, other: "Scope") -> bool:
        """Every component set in ``self`` equals ``other``'s: a view with this scope sees
        a record with scope ``other``. The unset scope contains every scope."""
        return ((self.user_id is None or self.user_id == other.user_id)
                and (self.agent_id is None or self.agent_id == other.agent_id)
                and (self.session_id is None or self.session_id == other.session_id))

    @property
    def core(self) -> "Scope":
        """The scope core blocks are kept under: ``Scope(user_id, agent_id)`` (session ignored)."""
        return self if self.session_id is None else Scope(self.user_id, self.agent_id)

    def as_tuple(self) -> tuple[str | None, str | None, str | None]:
        return (self.user_id, self.agent_id, self.session_id)

    def key(self) -> str:
        """A canonical text of the scope (``""`` when unset): equal exactly when the scopes are."""
        if self.is_unset:
            return ""
        return "\x1f".join("" if v is None else v for v in self.as_tuple())

    def to_dict(self) -> dict[str, str | None]:
        return {"user_id": self.user_id, "agent_id": self.agent_id, "session_id": self.session_id}

    @classmethod
    def from_dict(cls, d: "Mapping[str, Any] | Scope | None") -> "Scope":
        if d is None:
            return UNSET_SCOPE
        if isinstance(d, Scope):
            return d
        if not isinstance(d, Mapping):
            raise TypeError(f"a scope must be a Scope or a dict, not {type(d).__name__}")
        extra = set(d) - set(SCOPE_FIELDS)
        if extra:
            raise InvalidScopeError(f"unknown scope component(s) {sorted(extra)}; expected {list(SCOPE_FIELDS)}",
                                    component=sorted(extra)[0], value=None)
        return cls(d.get("user_id"), d.get("agent_id"), d.get("session_id"))

    def __lt__(self, other: "Scope") -> bool:
        if not isinstance(other, Scope):
            return NotImplemented
        return _scope_sort_key(self) < _scope_sort_key(other)


def _scope_sort_key(s: Scope) -> tuple[tuple[bool, str], ...]:
    return tuple((v is not None, v or "") for v in s.as_tuple())


#: the scope of a record written without one (and the view that sees every scope)
UNSET_SCOPE = Scope()


def _coerce_scope(value: object, what: str) -> Scope:
    """None -> the unset scope; a dict as written by ``to_dict`` -> its Scope."""
    if value is None:
        return UNSET_SCOPE
    if isinstance(value, Mapping):
        return Scope.from_dict(value)
    raise TypeError(f"{what} must be a umi.Scope (or a dict of its components), not {type(value).__name__}")


def check_scope(scope: object, what: str = "scope", *, optional: bool = False) -> Scope | None:
    """``scope`` as a Scope (``None`` is allowed only when ``optional``)."""
    if scope is None and optional:
        return None
    if not isinstance(scope, Scope):
        raise TypeError(f"{what} must be a umi.Scope{' or None' if optional else ''}, not {type(scope).__name__}")
    return scope


class EntityType(str, enum.Enum):
    SELF = "self"
    PERSON = "person"
    ORGANIZATION = "organization"
    PROJECT = "project"
    TOPIC = "topic"
    LOCATION = "location"
    EVENT = "event"
    NOTE = "note"
    TASK = "task"

    @classmethod
    def parse(cls, value: "EntityType | str") -> "EntityType":
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise TypeError(f"entity type must be an EntityType or str, not {type(value).__name__}")
        try:
            return cls(value.strip().lower())
        except ValueError:
            allowed = ", ".join(t.value for t in cls)
            raise InvalidEntityTypeError(
                f"unknown entity type {value!r}; expected one of: {allowed}", actual=value
            ) from None

    def __str__(self) -> str:
        return self.value


class EvolutionType(str, enum.Enum):
    UPDATE = "update"
    EXTEND = "extend"
    DERIVE = "derive"
    CONTRADICT = "contradict"

    @classmethod
    def parse(cls, value: "EvolutionType | str") -> "EvolutionType":
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise TypeError(
                f"evolution type must be an EvolutionType or str, not {type(value).__name__}"
            )
        try:
            return cls(value.strip().lower())
        except ValueError:
            allowed = ", ".join(t.value for t in cls)
            raise InvalidEvolutionTypeError(
                f"unknown evolution type {value!r}; expected one of: {allowed}", actual=value
            ) from None

    @property
    def supersedes(self) -> bool:
        """``update`` and ``contradict`` retire the older fact; ``extend``/``derive`` keep both."""
        return self in (EvolutionType.UPDATE, EvolutionType.CONTRADICT)

    def __str__(self) -> str:
        return self.value


_WS = re.compile(r"\s+")


def normalize_name(name: str) -> str:
    """NFKC, case-folded, whitespace collapsed: 'Alice  Smith' == 'alice smith'."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", name)).strip().casefold()


def normalize_content(content: str) -> str:
    """As :func:`normalize_name`, and trailing sentence punctuation ignored."""
    return normalize_name(content).rstrip(" .!;")


def entity_id_for(entity_type: EntityType | str, name: str, content: str, scope: Scope = None) -> str:  # type: ignore[assignment]
    """The id of a fact: the same type, name and content in the same scope is the same fact.
    Facts without a scope keep the ids umi has always given them."""
    et = EntityType.parse(entity_type)
    key = f"{et.value}\x1f{normalize_name(name)}\x1f{normalize_content(content)}"
    if scope is not None and not scope.is_unset:
        key += "\x1escope\x1f" + scope.key()
    return str(uuid.uuid5(UMI_NAMESPACE, key))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_EMBEDDING_RULE = "Entity.embedding must be a non-empty 1-d vector of finite numbers within float32 range"


def _check_embedding(value: object) -> np.ndarray:
    """A contiguous float32 1-d vector, or TypeError (not numbers: str, bytes, a mapping, bools,
    complex, objects) / ValidationError (empty, not 1-d, ragged, NaN, inf, beyond float32 —
    ``[10**400]`` included). Never a bare ValueError, OverflowError or a numpy cast warning."""
    if isinstance(value, np.ndarray) and value.dtype == np.float32:
        emb = np.ascontiguousarray(value)
    else:
        if isinstance(value, (str, bytes, bytearray, memoryview, Mapping, set, frozenset)):
            raise TypeError(f"Entity.embedding must be a sequence of numbers or a numpy array, "
                            f"not {type(value).__name__}")
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:  # ragged nesting and the like
            raise ValidationError(f"{_EMBEDDING_RULE}: {exc}") from None
        if arr.dtype.kind == "O":  # Python ints too big for int64, mixed objects
            items = arr.ravel().tolist() if arr.ndim else [arr.item()]
            for x in items:
                if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
                    raise TypeError(f"Entity.embedding must hold numbers, not {type(x).__name__}")
            try:
                arr = np.array([float(x) for x in items], dtype=np.float64).reshape(arr.shape)
            except OverflowError:
                raise ValidationError(f"{_EMBEDDING_RULE}: a value is too large for a float") from None
        elif arr.dtype.kind not in "fiu":
            raise TypeError(f"Entity.embedding must hold real numbers, not {arr.dtype} values")
        if arr.ndim != 1 or arr.size == 0:
            raise ValidationError(f"{_EMBEDDING_RULE}; got shape {arr.shape}")
        wide = arr.astype(np.float64)
        if not np.all(np.isfinite(wide)) or float(np.max(np.abs(wide))) > _FLOAT32_MAX:
            raise ValidationError(f"{_EMBEDDING_RULE} (|x| <= {_FLOAT32_MAX:.7g}); got NaN, inf or a larger value")
        emb = np.ascontiguousarray(wide, dtype=np.float32)
    if emb.ndim != 1 or emb.size == 0 or not np.all(np.isfinite(emb)):
        raise ValidationError(f"{_EMBEDDING_RULE}; got shape {emb.shape}" if emb.ndim != 1 or emb.size == 0
                              else f"{_EMBEDDING_RULE}; got NaN or inf")
    V.check_vector_norm(emb, "Entity.embedding")
    return emb


def check_passage_embeddings(value: object, embedding: np.ndarray | None) -> np.ndarray:
    """Passage vectors as a contiguous float32 matrix: one non-empty row per passage, each a
    valid embedding of ``embedding``'s dimension (a fact without an embedding has none)."""
    if embedding is None:
        raise ValidationError("Entity.passage_embeddings need an Entity.embedding (the vector of the whole content)")
    if isinstance(value, np.ndarray) and value.ndim != 2:
        raise ValidationError(f"Entity.passage_embeddings must be a 2-d matrix (a row per passage); "
                              f"got shape {value.shape}")
    if isinstance(value, (str, bytes, bytearray, Mapping)):
        raise TypeError(f"Entity.passage_embeddings must be a sequence of vectors, not {type(value).__name__}")
    seq: Any = value  # a sequence of vectors (anything else fails in _check_embedding or here)
    rows = [_check_embedding(r) for r in seq]
    if not rows or any(r.shape != embedding.shape for r in rows) or not all(r.any() for r in rows):
        raise ValidationError(f"Entity.passage_embeddings must hold at least one non-zero row of "
                              f"{embedding.shape[0]} numbers (the embedding's dimension)")
    return np.ascontiguousarray(np.stack(rows))


def _check_unit(value: float, what: str, exc: type[ValidationError]) -> float:
    return V.check_real(value, what, 0.0, 1.0, exc)


def validate_metadata(metadata: Mapping[str, Any] | None, *, what: str = "metadata",
                      error: type[ValidationError] = InvalidMetadataError) -> dict[str, MetadataValue]:
    """Return a copy of ``metadata`` after checking it is a flat str -> scalar mapping.

    Dicts, lists and operator-looking keys (``$gt``) are rejected: metadata is for
    equality filters, and a value that looks like a query operator is an injection attempt.
    Sizes are bounded (:data:`umi._validate.METADATA_KEYS_MAX` keys,
    ``METADATA_VALUE_BYTES_MAX`` per string value, ``METADATA_BYTES_MAX`` in all), and a
    key or value holding a lone surrogate (not storable as UTF-8) is refused.

    One rule for metadata to store and metadata to filter on; the caller names the thing:
    ``what`` (in the message, with the key) and ``error`` — :class:`~umi.InvalidMetadataError`
    for metadata to store, :class:`~umi.InvalidFilterError` for a filter's.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{what} must be a dict of str -> scalar, not {type(metadata).__name__}")
    out: dict[str, MetadataValue] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not k or V.utf8_len(k, f"{what} key", error) > 128:
            raise error(f"{what} keys must be non-empty str of at most 128 bytes, got {k!r}")
        if k.startswith("$") or any(c in k for c in "\"'`;\\\x00"):
            raise error(f"{what} key {k!r} contains characters that are not allowed")
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise error(
                f"{what}[{k!r}] must be a scalar (str, int, float, bool or None), "
                f"not {type(v).__name__}"
            )
        if isinstance(v, float) and not math.isfinite(v):
            raise error(f"{what}[{k!r}] must be finite, got {v!r}")
        out[k] = v
    V.check_metadata_limits(out, what, error)
    return out


@dataclass(eq=False)
class Entity:
    """One fact about one named thing.

    ``id`` is derived (UUIDv5 of type, normalised name, normalised content) unless given.
    Times are integer milliseconds since the Unix epoch. ``valid_to`` is set when a
    newer fact updates or contradicts this one; the entity is kept, never deleted.
    ``score`` is filled in by ``recall`` (the fused retrieval score). ``scope`` says whose
    the fact is (stored, and part of a derived id when set). ``mentions`` is filled in by
    ``recall`` for a statement: the names of the facts that share its source and content
    (never stored).
    """

    entity_type: EntityType
    name: str
    content: str
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    importance: float = 0.5
    confidence: float = 1.0
    created_at: int = -1
    updated_at: int = -1
    event_time: int | None = None
    valid_from: int | None = None
    valid_to: int | None = None
    source_id: str | None = None
    id: str = ""
    score: float | None = None
    scope: Scope = UNSET_SCOPE
    mentions: tuple[str, ...] = ()
    passage_embeddings: np.ndarray | None = field(default=None, repr=False)  # a row per passage (long texts)

    def __post_init__(self) -> None:
        self.entity_type = EntityType.parse(self.entity_type)
        if not isinstance(self.scope, Scope):
            self.scope = _coerce_scope(self.scope, "Entity.scope")
        if type(self.mentions) is not tuple:
            if isinstance(self.mentions, (str, bytes)):
                raise TypeError("Entity.mentions must be a tuple of str, not a single string")
            self.mentions = tuple(self.mentions)
        if not all(isinstance(m, str) for m in self.mentions):
            raise TypeError("Entity.mentions must be a tuple of str")
        for what in ("name", "content"):
            v = getattr(self, what)
            if not isinstance(v, str):
                raise TypeError(f"Entity.{what} must be str, not {type(v).__name__}")
        if not self.name.strip():
            raise ValidationError("Entity.name must not be empty")
        V.check_text(self.name, "Entity.name", ENTITY_NAME_BYTES_MAX)
        V.check_text(self.content, "Entity.content", ENTITY_CONTENT_BYTES_MAX)
        self.metadata = validate_metadata(self.metadata)
        self.importance = _check_unit(self.importance, "importance", InvalidImportanceError)
        self.confidence = _check_unit(self.confidence, "confidence", InvalidConfidenceError)
        if self.embedding is not None:
            self.embedding = _check_embedding(self.embedding)
        if self.passage_embeddings is not None:
            self.passage_embeddings = check_passage_embeddings(self.passage_embeddings, self.embedding)
        if self.created_at < 0:
            self.created_at = now_ms()
        if self.updated_at < 0:
            self.updated_at = self.created_at
        if self.valid_from is None:
            self.valid_from = self.event_time if self.event_time is not None else self.created_at
        if not self.id:
            self.id = entity_id_for(self.entity_type, self.name, self.content, self.scope)

    @property
    def is_current(self) -> bool:
        return self.valid_to is None

    def is_valid_at(self, t_ms: int) -> bool:
        vf = self.valid_from if self.valid_from is not None else self.created_at
        return self.created_at <= t_ms and vf <= t_ms and (self.valid_to is None or t_ms < self.valid_to)

    def text_for_embedding(self) -> str:
        return f"{self.name}: {self.content}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entity):
            return NotImplemented
        return _same_array(self.embedding, other.embedding) and _same_array(
            self.passage_embeddings, other.passage_embeddings) and all(
            getattr(self, f) == getattr(other, f)
            for f in (
                "id", "entity_type", "name", "content", "metadata", "importance", "confidence",
                "created_at", "updated_at", "event_time", "valid_from", "valid_to", "source_id", "scope",
            )
        )

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self, *, with_embedding: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "entity_type": self.entity_type.value,
            "name": self.name,
            "content": self.content,
            "metadata": dict(self.metadata),
            "importance": self.importance,
            "confidence": self.confidence,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "event_time": self.event_time,
            "valid_from": self.valid_from,
            "valid_to": self.valid_to,
            "source_id": self.source_id,
            "scope": self.scope.to_dict(),
        }
        if self.score is not None:
            d["score"] = self.score
        if self.mentions:
            d["mentions"] = list(self.mentions)
        if with_embedding and self.embedding is not None:
            d["embedding"] = [float(x) for x in self.embedding]
            if self.passage_embeddings is not None:
                d["passage_embeddings"] = self.passage_embeddings.tolist()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Entity":
        emb = d.get("embedding")
        passages = d.get("passage_embeddings")
        return cls(
            entity_type=d["entity_type"],
            name=d["name"],
            content=d["content"],
            metadata=dict(d.get("metadata") or {}),
            embedding=None if emb is None else np.asarray(emb, dtype=np.float32),
            importance=d.get("importance", 0.5),
            confidence=d.get("confidence", 1.0),
            created_at=d.get("created_at", -1),
            updated_at=d.get("updated_at", -1),
            event_time=d.get("event_time"),
            valid_from=d.get("valid_from"),
            valid_to=d.get("valid_to"),
            source_id=d.get("source_id"),
            id=d.get("id", ""),
            scope=Scope.from_dict(d.get("scope")),
            passage_embeddings=None if passages is None else np.asarray(passages, dtype=np.float32),
        )


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.array_equal(a, b))


@dataclass(eq=True)
class EvolutionRelation:
    """``source`` is the older entity, ``target`` the newer; never the same. ``scope`` is
    the scope of the write that made it (default unset)."""

    source_id: str
    target_id: str
    evolution_type: EvolutionType
    reason: str = ""
    confidence: float = 1.0
    id: str = ""
    created_at: int = -1
    scope: Scope = UNSET_SCOPE

    def __post_init__(self) -> None:
        if not isinstance(self.scope, Scope):
            self.scope = _coerce_scope(self.scope, "EvolutionRelation.scope")
        if not isinstance(self.source_id, str) or not isinstance(self.target_id, str):
            raise TypeError("source_id and target_id must be str")
        if not self.source_id or not self.target_id:
            raise ValidationError("source_id and target_id must not be empty")
        if self.source_id == self.target_id:
            raise ValidationError(
                f"an evolution relation links two different entities; source and target are both {self.source_id}"
            )
        self.evolution_type = EvolutionType.parse(self.evolution_type)
        if not isinstance(self.reason, str):
            raise TypeError(f"reason must be str, not {type(self.reason).__name__}")
        V.check_text(self.reason, "EvolutionRelation.reason", V.TEXT_BYTES_MAX)
        self.confidence = _check_unit(self.confidence, "confidence", InvalidConfidenceError)
        if self.created_at < 0:
            self.created_at = now_ms()
        if not self.id:
            key = f"rel\x1f{self.source_id}\x1f{self.target_id}\x1f{self.evolution_type.value}"
            self.id = str(uuid.uuid5(UMI_NAMESPACE, key))

    @property
    def type(self) -> EvolutionType:
        return self.evolution_type

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source_id": self.source_id,
            "target_id": self.target_id,
            "evolution_type": self.evolution_type.value,
            "reason": self.reason,
            "confidence": self.confidence,
            "created_at": self.created_at,
            "scope": self.scope.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvolutionRelation":
        return cls(source_id=d["source_id"], target_id=d["target_id"], evolution_type=d["evolution_type"],
                   reason=d.get("reason", ""), confidence=d.get("confidence", 1.0), id=d.get("id", ""),
                   created_at=d.get("created_at", -1), scope=Scope.from_dict(d.get("scope")))


CoreOp = Literal["set", "remove", "clear"]


@dataclass(frozen=True)
class CoreBlockRecord:
    """One stored core-memory block of one agent scope; ``position`` is its place in stored order
    (0-based: a new name goes at the end, an existing name keeps its place)."""

    name: str
    content: str
    importance: float
    position: int


@dataclass(frozen=True)
class CoreHistoryRecord:
    """One change to the core blocks of ``scope`` (a ``Scope(user_id, agent_id)``).

    ``seq`` counts the changes of that scope from 1. ``op`` is ``"set"`` (``content`` and
    ``importance`` are the block after it), ``"remove"`` (one block, by ``name``) or
    ``"clear"`` (every block; ``name`` is ``""``); both leave ``content`` ``None``.
    """

    scope: Scope
    name: str
    seq: int
    op: CoreOp
    at: int
    content: str | None = None
    importance: float | None = None


@dataclass
class Usage:
    """Tokens spent by provider calls (added up over one ``remember``/``recall``)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    calls: int = 0

    def add(self, other: "Usage") -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.calls += other.calls


@dataclass
class RememberResult:
    entities: list[Entity] = field(default_factory=list)
    evolutions: list[EvolutionRelation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source_id: str | None = None
    duplicate: bool = False
    usage: Usage = field(default_factory=Usage)

    @property
    def entity_count(self) -> int:
        return len(self.entities)

    @property
    def has_evolutions(self) -> bool:
        return bool(self.evolutions)
