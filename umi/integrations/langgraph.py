"""umi as a LangGraph store: :class:`UmiStore` implements ``langgraph.store.base.BaseStore``.

``pip install 'umi[langgraph]'``::

    from umi.integrations.langgraph import UmiStore

    store = UmiStore(umi.Memory("agent.duckdb"), user_level=1)   # namespaces ("memories", <user>)
    graph = builder.compile(store=store)

How LangGraph's model maps onto umi's:

* **Items are archival facts.** ``put(namespace, key, value)`` stores one ``note`` entity whose
  content is the value as JSON, whose name is the key, and whose embedding is made by the
  Memory's own embedder from the indexed fields (``fields``, default the whole value, with
  LangGraph's own path syntax). The entity id is derived from (scope, namespace, key), so a
  put of an existing key updates that entity (history keeps every version; ``created_at``
  stays the first put's). ``delete`` forgets it (umi's forget: row, vector, postings, history
  snapshots). A batch's writes commit in one transaction, after its reads — as in
  ``InMemoryStore``, reads in a batch see the store as it was before the batch.
* **Namespaces map onto scopes.** ``user_level`` / ``agent_level`` / ``session_level`` name the
  namespace position that holds a user / agent / session id: with ``user_level=1``,
  ``("memories", "alice")`` is stored in ``Scope(user_id="alice")`` — an indexed column, so
  ``memory.scoped(user_id="alice").recall(...)`` finds Alice's LangGraph items too, and a
  search under ``("memories", "alice")`` never reads Bob's rows. A label at a scope level must
  be a valid scope id (``umi.InvalidScopeError`` otherwise). When ``memory`` is itself a scoped
  view, its scope is stamped on every item and bounds every read. The whole namespace path is
  also kept (metadata ``langgraph.ns``, ``langgraph.ns.<i>``) for exact addressing and
  ``list_namespaces``.
* **search(query=...) is umi's recall** (hybrid: vectors + BM25 + names, fused), restricted to
  the namespace prefix and the filter; without a query, items are listed oldest first.
  ``SearchItem.score`` is recall's fused score, not a cosine.
* **Filters** follow LangGraph's semantics exactly (equality, nested dicts, lists, ``$eq $ne $gt
  $gte $lt $lte``). Equality on a top-level string field is pushed into umi's search as a
  ``SearchFilters`` metadata filter (indexed, applied inside each search); every condition is
  then checked on the candidates with LangGraph's own rule.

Not supported: TTLs (``supports_ttl = False``, like ``InMemoryStore``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from langgraph.store.base import (
    BaseStore,
    GetOp,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    get_text_at_path,
    tokenize_path,
    validate_op_namespace,
)

from .._validate import utf8_len
from ..errors import InvalidConfigError, InvalidLimitError
from ..options import RECALL_LIMIT_MAX, RecallOptions
from ..storage._common import LIST_LIMIT_MAX
from ..storage.base import SearchFilters
from ..types import Entity, EntityType

if TYPE_CHECKING:
    from ..memory import Memory

__all__ = ["UmiStore"]

MARK = "langgraph"                 # metadata: True on every item this store writes
NS = "langgraph.ns"                # metadata: the namespace path, labels joined by "."
NS_AT = "langgraph.ns."            # metadata: + i -> the i-th label (prefix filters)
KEY = "langgraph.key"              # metadata: the item's key
FIELD = "langgraph.v."             # metadata: + name -> a top-level string field (filter push-down)
FIELD_BYTES_MAX = 256              # longer string fields are filtered after the search only
_SAFE_FIELD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_ID_NAMESPACE = uuid.UUID("7d0c5e3e-52a4-4b8e-9a63-1f4f8f6a8d21")
_SCOPE_PARTS = ("user_id", "agent_id", "session_id")
_LIST_PAGE = 500                   # rows read per storage page when listing with filters


class UmiStore(BaseStore):
    """A LangGraph ``BaseStore`` over a :class:`umi.Memory` (or a scoped view of one).

    ``fields`` are the value paths whose text is embedded (LangGraph path syntax; default
    ``["$"]``, the whole value); ``index=`` on ``put`` overrides them per item, ``index=False``
    stores the item without a vector (keyword search still finds it). ``deep_search`` lets
    recall add query variants (slower; off by default, as a store's search is on the hot path).
    The Memory stays the caller's to close.
    """

    supports_ttl = False

    def __init__(self, memory: Memory, *, user_level: int | None = None,
                 agent_level: int | None = None, session_level: int | None = None,
                 fields: Sequence[str] | None = None, deep_search: bool = False) -> None:
        from ..memory import Memory

        if not isinstance(memory, Memory):
            raise TypeError(f"memory must be a umi.Memory, not {type(memory).__name__}")
        levels = {"user_id": user_level, "agent_id": agent_level, "session_id": session_level}
        for what, level in levels.items():
            if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 0):
                raise InvalidConfigError(f"{what} level must be a namespace position >= 0, got {level!r}")
        used = [lv for lv in levels.values() if lv is not None]
        if len(used) != len(set(used)):
            raise InvalidConfigError(f"two scope parts read the same namespace position: {levels}")
        if memory.embedder is None:
            raise InvalidConfigError("UmiStore needs a Memory with an embedder")
        paths = list(fields) if fields is not None else ["$"]
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise InvalidConfigError(f"fields must be non-empty paths, got {fields!r}")
        self.memory = memory
        self._levels = {k: v for k, v in levels.items() if v is not None}
        self._fields = [(p, p if p == "$" else tokenize_path(p)) for p in paths]
        self._deep_search = bool(deep_search)

    # --- BaseStore --------------------------------------------------------------
    def batch(self, ops: Iterable[Op]) -> list[Result]:
        self.memory._check_open()  # reads go to the store directly: the Memory's error, not the store's
        ops = list(ops)
        for op in ops:
            validate_op_namespace(op)
        results: list[Result] = []
        puts: dict[tuple[tuple[str, ...], str], PutOp] = {}
        # reads first, against the store as it was before this batch (InMemoryStore's order)
        for op in ops:
            if isinstance(op, GetOp):
                results.append(self._get(op))
            elif isinstance(op, SearchOp):
                results.append(self._search(op))
            elif isinstance(op, ListNamespacesOp):
                results.append(self._list_namespaces(op))
            elif isinstance(op, PutOp):
                puts[(tuple(op.namespace), op.key)] = op  # the last put of a key wins
                results.append(None)
            else:
                raise TypeError(f"unknown store operation {type(op).__name__}")
        if puts:
            self._write(list(puts.values()))
        return results

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        # One logic: the blocking batch runs on a worker thread; umi's own loop does the I/O.
        return await asyncio.to_thread(self.batch, list(ops))

    # --- mapping ----------------------------------------------------------------
    def _scope(self, namespace: Sequence[str]) -> dict[str, str]:
        """Scope parts (of the view, then of the namespace) that own items under ``namespace``."""
        parts: dict[str, str] = {}
        view = getattr(self.memory, "scope", None)
        for name in _SCOPE_PARTS:
            value = getattr(view, name, None) if view is not None else None
            if value is not None:
                parts[name] = value
        for name, level in self._levels.items():
            if level < len(namespace):
                label = namespace[level]
                if name in parts and parts[name] != label:
                    raise InvalidConfigError(
                        f"namespace {tuple(namespace)} names {name} {label!r} at position {level}, "
                        f"but this store's Memory is scoped to {name} {parts[name]!r}")
                parts[name] = label
        return parts

    def _scope_object(self, parts: Mapping[str, str]) -> Any:
        from ..types import Scope  # the scopes contract (storage branch)

        return Scope(**parts)

    def _item_id(self, scope: Mapping[str, str], namespace: tuple[str, ...], key: str) -> str:
        for what, text in [("a store key", key), *(("a namespace label", label) for label in namespace)]:
            utf8_len(text, what)  # a lone surrogate: ValidationError (get, put and delete alike)
        ident = json.dumps([[scope.get(p) for p in _SCOPE_PARTS], list(namespace), key],
                           ensure_ascii=False, separators=(",", ":"))
        return str(uuid.uuid5(_ID_NAMESPACE, ident))

    def _filters(self, prefix: Sequence[str], scope: Mapping[str, str],
                 metadata: Mapping[str, Any]) -> SearchFilters:
        meta: dict[str, Any] = {MARK: True}
        for i, label in enumerate(prefix):
            meta[f"{NS_AT}{i}"] = label
        meta.update(metadata)
        kwargs: dict[str, Any] = {"metadata": meta}
        if scope:
            kwargs["scope"] = self._scope_object(scope)
        return SearchFilters(**kwargs)

    @staticmethod
    def _fields_of(e: Entity) -> dict[str, Any]:
        meta = e.metadata
        return {
            "namespace": tuple(str(meta[NS]).split(".")) if meta.get(NS) else (),
            "key": str(meta[KEY]),
            "value": json.loads(e.content),
            "created_at": datetime.fromtimestamp(e.created_at / 1000.0, tz=timezone.utc),
            "updated_at": datetime.fromtimestamp(e.updated_at / 1000.0, tz=timezone.utc),
        }

    def _to_item(self, e: Entity) -> Item:
        return Item(**self._fields_of(e))

    def _to_search_item(self, e: Entity, score: float | None = None) -> SearchItem:
        return SearchItem(**self._fields_of(e), score=score)

    def _index_text(self, value: Mapping[str, Any], index: Sequence[str] | None) -> str | None:
        paths = self._fields if index is None else [(p, p if p == "$" else tokenize_path(p)) for p in index]
        texts: list[str] = []
        for _path, tokens in paths:
            texts.extend(t for t in get_text_at_path(value, tokens) if t)
        return "\n".join(texts) if texts else None

    # --- reads --------------------------------------------------------------------
    def _get(self, op: GetOp) -> Item | None:
        namespace = tuple(op.namespace)
        scope = self._scope(namespace)
        e = self.memory.storage.get(self._item_id(scope, namespace, op.key))
        if e is None or e.metadata.get(MARK) is not True or e.valid_to is not None:
            return None
        return self._to_item(e)

    def _search(self, op: SearchOp) -> list[SearchItem]:
        if op.limit < 0 or op.offset < 0:
            raise InvalidLimitError(f"search limit and offset must be >= 0, got {op.limit} and {op.offset}",
                                    limit=(0, 2**31 - 1), actual=min(op.limit, op.offset))
        prefix = tuple(op.namespace_prefix)
        scope = self._scope(prefix)
        pushed, exact = _split_filter(op.filter)
        filters = self._filters(prefix, scope, pushed)
        if op.limit == 0:
            return []
        if op.query and op.query.strip():  # a blank query ranks nothing: a listing (recall refuses it)
            return self._recall(op.query, filters, exact, op.offset, op.limit)
        return self._list(filters, exact, op.offset, op.limit)

    def _list(self, filters: SearchFilters, exact: Mapping[str, Any] | None,
              offset: int, limit: int) -> list[SearchItem]:
        storage = self.memory.storage
        if not exact:  # page: BaseStore takes any limit, the storage listing at most LIST_LIMIT_MAX
            items: list[SearchItem] = []
            while len(items) < limit:
                want = min(limit - len(items), LIST_LIMIT_MAX)  # one call up to the limit, as before
                page = storage.list(filters, limit=want, offset=offset + len(items))
                items.extend(self._to_search_item(e) for e in page)
                if len(page) < want:
                    break
            return items
        out: list[SearchItem] = []
        skipped = 0
        page_at = 0
        while len(out) < limit:
            page = storage.list(filters, limit=_LIST_PAGE, offset=page_at)
            for e in page:
                item = self._to_search_item(e)
                if not _matches(item.value, exact):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                out.append(item)
                if len(out) == limit:
                    break
            if len(page) < _LIST_PAGE:
                break
            page_at += _LIST_PAGE
        return out

    def _recall(self, query: str, filters: SearchFilters, exact: Mapping[str, Any] | None,
                offset: int, limit: int) -> list[SearchItem]:
        want = offset + limit
        if want > RECALL_LIMIT_MAX:
            raise InvalidLimitError(
                f"a search with a query reaches the best {RECALL_LIMIT_MAX} items (recall's limit); "
                f"offset + limit is {want}", limit=(1, RECALL_LIMIT_MAX), actual=want)
        fetch = min(want if not exact else want * 4, RECALL_LIMIT_MAX)
        while True:
            opts = RecallOptions(limit=fetch, metadata=filters.metadata,
                                 deep_search=self._deep_search)
            view = self._view_for(filters)
            hits = view.recall_sync(query, opts)
            items = [self._to_search_item(e, e.score) for e in hits]
            if exact:
                items = [it for it in items if _matches(it.value, exact)]
            if len(items) >= want or len(hits) < fetch or fetch >= RECALL_LIMIT_MAX:
                return items[offset:want]
            fetch = min(fetch * 4, RECALL_LIMIT_MAX)

    def _view_for(self, filters: SearchFilters) -> Memory:
        scope = getattr(filters, "scope", None)
        if scope is None:
            return self.memory
        parts = {p: getattr(scope, p) for p in _SCOPE_PARTS if getattr(scope, p) is not None}
        view_scope = getattr(self.memory, "scope", None)
        current = {p: getattr(view_scope, p) for p in _SCOPE_PARTS
                   if view_scope is not None and getattr(view_scope, p) is not None}
        return self.memory if parts == current else self.memory.scoped(**parts)

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        if op.limit < 0 or op.offset < 0:
            raise InvalidLimitError(f"list_namespaces limit and offset must be >= 0, got {op.limit} "
                                    f"and {op.offset}", limit=(0, 2**31 - 1), actual=min(op.limit, op.offset))
        filters = self._filters((), self._scope(()), {})
        seen: set[tuple[str, ...]] = set()
        storage = self.memory.storage
        page_at = 0
        while True:
            page = storage.list(filters, limit=_LIST_PAGE, offset=page_at)
            for e in page:
                ns = tuple(str(e.metadata[NS]).split("."))
                if all(_ns_matches(c, ns) for c in op.match_conditions or ()):
                    seen.add(ns if op.max_depth is None else ns[:op.max_depth])
            if len(page) < _LIST_PAGE:
                break
            page_at += _LIST_PAGE
        return sorted(seen)[op.offset:op.offset + op.limit]

    # --- writes -------------------------------------------------------------------
    def _write(self, puts: list[PutOp]) -> None:
        """Embed outside any lock, then commit every put and delete in one transaction, under
        the Memory's write lock (as its own pipelines do), stamped by its clock."""
        upserts: list[tuple[PutOp, dict[str, str], str, str | None]] = []
        deletes: list[str] = []
        for op in puts:
            if op.ttl is not None:
                raise NotImplementedError("UmiStore does not support TTLs (supports_ttl is False)")
            namespace = tuple(op.namespace)
            scope = self._scope(namespace)
            entity_id = self._item_id(scope, namespace, op.key)
            if op.value is None:
                deletes.append(entity_id)
                continue
            if not isinstance(op.value, Mapping):
                raise TypeError(f"a store value must be a dict, not {type(op.value).__name__}")
            # not JSON: TypeError; a lone surrogate: ValidationError - now, before anything is written
            utf8_len(json.dumps(op.value, ensure_ascii=False), "a store value")
            text = None if op.index is False else self._index_text(op.value, op.index or None)
            upserts.append((op, scope, entity_id, text))
        texts = [t for (_, _, _, t) in upserts if t is not None]
        embedder = self.memory.embedder
        assert embedder is not None  # checked in __init__
        vectors = iter(embedder.embed(texts, kind="passage")) if texts else iter(())
        embedded = [(op, scope, eid, next(vectors) if text is not None else None)
                    for op, scope, eid, text in upserts]
        storage = self.memory.storage
        engine = self.memory._engine  # the parts the Memory and its views share

        def commit() -> None:
            now = engine.now_ms()
            existing = {e.id: e for e in storage.get_many([eid for _, _, eid, _ in embedded])}
            entities = [self._entity(op, scope, eid, vector, now,
                                     created_at=existing[eid].created_at if eid in existing else now)
                        for op, scope, eid, vector in embedded]
            with storage.transaction():
                engine.record_embedder_in_tx()  # a store's first write records the embedder, in its transaction
                if entities:
                    storage.upsert(entities)
                for entity_id in deletes:
                    storage.delete(entity_id, now)

        engine.runner.run(engine.locked_io(commit))

    def _entity(self, op: PutOp, scope: Mapping[str, str], entity_id: str, vector: Any,
                now: int, *, created_at: int) -> Entity:
        namespace = tuple(op.namespace)
        value = dict(op.value)  # type: ignore[arg-type]
        meta: dict[str, Any] = {MARK: True, NS: ".".join(namespace), KEY: op.key}
        for i, label in enumerate(namespace):
            meta[f"{NS_AT}{i}"] = label
        for name, v in value.items():
            if _pushable(name, v):
                meta[f"{FIELD}{name}"] = v
        kwargs: dict[str, Any] = {}
        if scope:
            kwargs["scope"] = self._scope_object(scope)
        return Entity(
            entity_type=EntityType.NOTE,
            name=op.key if op.key.strip() else "(empty key)",
            content=json.dumps(value, ensure_ascii=False),
            metadata=meta,
            embedding=vector,
            created_at=created_at,
            updated_at=now,
            valid_from=created_at,
            id=entity_id,
            **kwargs,
        )


# --- LangGraph filter semantics (the reference rule, as InMemoryStore applies it) -------
def _pushable(name: Any, value: Any) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 64 and set(name) <= _SAFE_FIELD
            and isinstance(value, str) and len(value.encode()) <= FIELD_BYTES_MAX)


def _split_filter(flt: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(metadata equalities umi can apply inside its search, the whole filter to check after)."""
    if not flt:
        return {}, None
    for condition in flt.values():
        _check_condition(condition)
    pushed = {f"{FIELD}{k}": v for k, v in flt.items() if _pushable(k, v)}
    return pushed, dict(flt)


_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")
_ORDER_OPERATORS = ("$gt", "$gte", "$lt", "$lte")


def _is_operator_dict(condition: Mapping[Any, Any]) -> bool:
    return any(isinstance(k, str) and k.startswith("$") for k in condition)


def _check_condition(condition: Any) -> None:
    """Refuse a bad operator or a comparison with no number, once, before any item is read (the
    rule below would meet it only on an item that has the field, and then as a bare ValueError)."""
    from ..errors import InvalidFilterError

    if isinstance(condition, dict):
        if not _is_operator_dict(condition):
            for sub in condition.values():
                _check_condition(sub)
            return
        for operator, operand in condition.items():
            if operator not in _OPERATORS:
                raise InvalidFilterError(f"unsupported filter operator {operator!r}; use {' '.join(_OPERATORS)}")
            if operator in _ORDER_OPERATORS:
                try:
                    float(operand)
                except (TypeError, ValueError, OverflowError):
                    raise InvalidFilterError(f"filter operator {operator} compares numbers, got {operand!r}") from None
    elif isinstance(condition, (list, tuple)):
        for sub in condition:
            _check_condition(sub)


def _matches(value: Mapping[str, Any], flt: Mapping[str, Any]) -> bool:
    return all(_compare(value.get(k), fv) for k, fv in flt.items())


def _compare(item_value: Any, filter_value: Any) -> bool:
    if isinstance(filter_value, dict):
        if _is_operator_dict(filter_value):
            return all(_apply(item_value, k, v) for k, v in filter_value.items())
        if not isinstance(item_value, dict):
            return False
        return all(_compare(item_value.get(k), v) for k, v in filter_value.items())
    if isinstance(filter_value, (list, tuple)):
        return (isinstance(item_value, (list, tuple)) and len(item_value) == len(filter_value)
                and all(_compare(a, b) for a, b in zip(item_value, filter_value)))
    return bool(item_value == filter_value)


def _apply(value: Any, operator: str, operand: Any) -> bool:
    if operator == "$eq":
        return bool(value == operand)
    if operator == "$ne":
        return bool(value != operand)
    b = float(operand)  # operators and operands were checked by _check_condition
    try:
        a = float(value)
    except (TypeError, ValueError, OverflowError):  # a missing or non-numeric field never matches
        return False
    return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[operator]


def _ns_matches(condition: MatchCondition, ns: tuple[str, ...]) -> bool:
    path = tuple(condition.path)
    if len(ns) < len(path):
        return False
    pairs = zip(ns, path) if condition.match_type == "prefix" else zip(reversed(ns), reversed(path))
    if condition.match_type not in ("prefix", "suffix"):
        from ..errors import InvalidFilterError

        raise InvalidFilterError(f"match_type must be 'prefix' or 'suffix', got {condition.match_type!r}")
    return all(p == "*" or k == p for k, p in pairs)
