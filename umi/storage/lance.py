"""LanceDB storage: archival memory in a folder of Lance tables (``umi[lance]``).

``LanceStorageBackend.connect("./memory.lance")`` opens (or creates) a folder holding::

    state.json      schema version, generation, embedding dimension (written atomically)
    journal.json    only while a commit writes: the table versions to go back to
    lance/          Lance tables: entities (with an ``embedding`` vector column once the
                    dimension is known, and a long fact's passage vectors), sources, relations, history, core_blocks,
                    core_history, meta

A :class:`~umi.storage.cached.CachedStore` over Lance, like the DuckDB backend: every read
(filters, vector search, BM25 with the shared numba kernel) is served from the in-process
cache, loaded from the tables at open; Lance is the durable store.

Commits, and what Lance cannot do:

* Lance commits each table on its own; it has no transaction spanning tables. A commit here
  writes ``journal.json`` with every table's version first, then the tables, then the atomic
  rewrite of ``state.json`` (generation + 1) — the commit point — and removes the journal. On
  failure it restores each table to its journaled version (Lance keeps old versions); after a
  crash, :meth:`connect` finds the journal and rolls back whatever the interrupted commit had
  written. Writes inside a transaction reach Lance only at its commit.
* **One process at a time.** Restoring versions would undo another process's commits, so a
  store is opened once: a second ``connect`` (in this process or another) raises
  :class:`~umi.StorageLockedError`. For many processes or hosts, use the Postgres backend.
"""

from __future__ import annotations

import contextlib
import json
import os
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from .._index_file import atomic_write, fsync_dir
from ..errors import (
    InvalidConfigError,
    SchemaVersionError,
    StorageError,
    StorageLockedError,
)
from ..index import HNSW_THRESHOLD
from ..types import SCOPE_FIELDS, CoreBlockRecord, CoreHistoryRecord, Entity, EntityType, Scope
from ._common import check_int, core_key, dumps, make_entity, relation_from_row, source_from_row, stored_scope
from .base import TOMBSTONE_SCOPE, TOMBSTONE_TEXT_PREFIX, tombstone
from ._txn import raise_wrapped
from .cached import CachedStore, ChangeSet, DurableStore, Loaded

__all__ = ["LanceStorageBackend"]

#: 1: entities, sources, relations, history. 2: scope columns; core_blocks, core_history, meta.
#: 3: ``entities.passages`` (passage vectors of long facts; null for the others). 4: no table change:
#: the tombstones an older umi wrote are re-filed under ``TOMBSTONE_SCOPE`` (:meth:`LanceDurable.refile_tombstones`)
SCHEMA_VERSION = 4
TABLES = ("entities", "sources", "relations", "history", "core_blocks", "core_history", "meta")
OPTIMIZE_EVERY_COMMITS = 64
VECTOR_DIM_MAX = 65_536


_SOURCE_ROW = itemgetter("id", "text_hash", "text", "created_at", "metadata_json", *SCOPE_FIELDS)
_RELATION_ROW = itemgetter("id", "source_id", "target_id", "evolution_type", "reason", "confidence", "created_at",
                           *SCOPE_FIELDS)


def _lit(s: str) -> str:
    """A SQL string literal for Lance's filter parser (quotes doubled)."""
    return "'" + s.replace("'", "''") + "'"


def _in(col: str, values: list[str]) -> str:
    return f"{col} IN (" + ", ".join(map(_lit, values)) + ")"


def _is(col: str, v: str | None) -> str:
    return f"{col} IS NULL" if v is None else f"{col} = {_lit(v)}"


class LanceDurable(DurableStore):
    """The Lance half of :class:`LanceStorageBackend`."""

    def __init__(self, root: Path, db: Any, state: dict[str, Any]) -> None:
        self.root = root
        self.db = db
        self.state = state
        self.t: dict[str, Any] = {}
        self.commits = 0

    @property
    def dim(self) -> int | None:
        return self.state["dim"]

    # --- tables ---------------------------------------------------------------------------------
    def schema(self, name: str, dim: int | None = None) -> Any:
        import pyarrow as pa  # type: ignore[import-untyped]

        s, i, f = pa.string(), pa.int64(), pa.float64()
        scope = [(c, s, True) for c in SCOPE_FIELDS]
        fields = {
            "entities": [("id", s, False), ("entity_type", s, False), ("name", s, False), ("content", s, False),
                         ("metadata_json", s, False), ("importance", f, False), ("confidence", f, False),
                         ("created_at", i, False), ("updated_at", i, False), ("event_time", i, True),
                         ("valid_from", i, True), ("valid_to", i, True), ("source_id", s, True), *scope,
                         ("passages", pa.list_(pa.float32()), True)],  # passage vectors, row after row
            "sources": [("id", s, False), ("text_hash", s, False), ("text", s, False), ("created_at", i, False),
                        ("metadata_json", s, False), *scope],
            "relations": [("id", s, False), ("source_id", s, False), ("target_id", s, False),
                          ("evolution_type", s, False), ("reason", s, False), ("confidence", f, False),
                          ("created_at", i, False), *scope],
            "history": [("entity_id", s, False), ("seq", i, False), ("op", s, False), ("at", i, False),
                        ("snapshot", s, False), *scope],
            "core_blocks": [("user_id", s, True), ("agent_id", s, True), ("name", s, False), ("content", s, False),
                            ("importance", f, False), ("position", i, False)],
            "core_history": [("user_id", s, True), ("agent_id", s, True), ("seq", i, False), ("name", s, False),
                             ("op", s, False), ("at", i, False), ("content", s, True), ("importance", f, True)],
            "meta": [("key", s, False), ("value", s, False)],
        }[name]
        out = [pa.field(n, t, nullable=nl) for n, t, nl in fields]
        d = dim if dim is not None else self.dim
        if name == "entities" and d is not None:
            out.append(pa.field("embedding", pa.list_(pa.float32(), d), nullable=True))
        return pa.schema(out)

    def open_tables(self) -> None:
        import pyarrow as pa

        for name in TABLES:
            try:
                t = self.db.open_table(name)
            except ValueError:  # "was not found"
                t = self.db.create_table(name, schema=self.schema(name))
            have = set(t.schema.names)
            want = self.schema(name)
            missing = [f for f in want if f.name not in have and f.name != "embedding"]
            if missing:  # an older table: its rows land in the unset scope, without passages
                t.add_columns([pa.field(f.name, f.type, nullable=True) for f in missing])
            stale = sorted(have - set(want.names) - {"embedding"})
            if stale:  # schema 1 kept keyword and filter mirrors in the table; the cache has them now
                t.drop_columns(stale)
            self.t[name] = t

    def recover(self) -> None:
        """Finish what a crash interrupted: a journal without its commit is rolled back."""
        jpath = self.root / "journal.json"
        if not jpath.exists():
            return
        journal = json.loads(jpath.read_text())
        if self.state["generation"] <= journal["generation"]:
            for name, version in journal["versions"].items():
                t = self.t.get(name)
                if t is not None and t.version != version:
                    t.restore(version)
        jpath.unlink()
        fsync_dir(self.root)

    def refile_tombstones(self) -> None:
        """File every tombstone under ``TOMBSTONE_SCOPE``, as ``delete`` does since schema 4: an older
        umi left a forgotten fact's records filed under its scope. Run at open, before the state
        records schema 4; a crash in between runs it again (it only sets what it sets)."""
        self.t["history"].update(where=f"starts_with(snapshot, {_lit(TOMBSTONE_TEXT_PREFIX)})",
                                 values=_scope_row(TOMBSTONE_SCOPE))

    def _rows(self, table: str) -> list[dict[str, Any]]:
        return self.t[table].search().limit(None).to_arrow().to_pylist()

    # --- load -----------------------------------------------------------------------------------
    def load(self, dim: int | None) -> Loaded:
        ents = [_row_to_entity(r) for r in self._rows("entities")]
        # the tables' columns in the order of the shared row readers
        sources = [source_from_row(_SOURCE_ROW(r)) for r in self._rows("sources")]
        relations = [relation_from_row(_RELATION_ROW(r)) for r in self._rows("relations")]
        history = [(r["entity_id"], int(r["seq"]), r["op"], int(r["at"]), r["snapshot"], _scope_of(r))
                   for r in self._rows("history")]
        core_blocks = [(_scope_of(r), CoreBlockRecord(r["name"], r["content"], float(r["importance"]),
                                                       int(r["position"]))) for r in self._rows("core_blocks")]
        core_history = [CoreHistoryRecord(_scope_of(r), r["name"], int(r["seq"]), r["op"], int(r["at"]), r["content"],
                                          r["importance"]) for r in self._rows("core_history")]
        meta = {r["key"]: r["value"] for r in self._rows("meta")}
        return Loaded(generation=int(self.state["generation"]), dim=self.dim, entities=ents, sources=sources,
                      relations=relations, history=history, core_blocks=core_blocks, core_history=core_history,
                      meta=meta)

    # --- commit ---------------------------------------------------------------------------------
    def commit(self, ch: ChangeSet, generation: int) -> None:
        versions: dict[str, int] = {n: int(t.version) for n, t in self.t.items()}
        journal = {"generation": int(self.state["generation"]), "versions": versions}
        _write_json_atomic(self.root / "journal.json", journal)
        dim = self.dim if self.dim is not None else ch.dim
        try:
            self._write(ch, dim)
            new_state = dict(self.state, generation=generation, dim=dim)
            _write_json_atomic(self.root / "state.json", new_state)  # the commit point
        except BaseException:
            for name, version in versions.items():
                t = self.t[name]
                with contextlib.suppress(Exception):
                    if t.version != version:
                        t.restore(version)
            with contextlib.suppress(OSError):
                (self.root / "journal.json").unlink()
            raise
        self.state = new_state
        (self.root / "journal.json").unlink()
        fsync_dir(self.root)
        self.commits += 1
        if self.commits % OPTIMIZE_EVERY_COMMITS == 0:
            with contextlib.suppress(Exception):  # compaction is housekeeping: a failure loses nothing
                self.optimize()

    def _write(self, ch: ChangeSet, dim: int | None) -> None:
        import pyarrow as pa

        t = self.t
        if ch.dim is not None and self.dim is None:
            t["entities"].add_columns(pa.field("embedding", pa.list_(pa.float32(), ch.dim), nullable=True))
        gone = sorted(i for i, e in ch.entities.items() if e is None and ch.entity_existed.get(i))
        put = [e for e in ch.entities.values() if e is not None]
        for part in _chunks(gone):
            t["entities"].delete(_in("id", part))
        if put:
            schema = self.schema("entities", dim)
            rows = [_entity_row(e) for e in put]
            t["entities"].merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(
                pa.Table.from_pylist(rows, schema=schema), on_bad_vectors="null")  # a null vector is "bad" to Lance
        for eid in sorted(ch.tombstoned):
            t["history"].update(where=f"entity_id = {_lit(eid)}",
                                values={"snapshot": dumps(tombstone(eid)), **_scope_row(TOMBSTONE_SCOPE)})
        if ch.history:
            recs = ch.unique_history()
            data = pa.Table.from_pylist([{"entity_id": r.entity_id, "seq": r.seq, "op": r.op, "at": r.at,
                                          "snapshot": dumps(dict(r.snapshot)), **_scope_row(r.scope)} for r in recs],
                                        schema=self.schema("history"))
            if ch.history_replace:
                t["history"].merge_insert(["entity_id", "seq"]).when_matched_update_all() \
                    .when_not_matched_insert_all().execute(data)
            else:
                t["history"].add(data)
        self._keyed("sources", ch.sources, lambda s: {
            "id": s.id, "text_hash": s.text_hash, "text": s.text, "created_at": s.created_at,
            "metadata_json": dumps(dict(s.metadata)), **_scope_row(s.scope)})
        self._keyed("relations", ch.relations, lambda r: {
            "id": r.id, "source_id": r.source_id, "target_id": r.target_id,
            "evolution_type": r.evolution_type.value, "reason": r.reason, "confidence": r.confidence,
            "created_at": r.created_at, **_scope_row(r.scope)})
        for sc in sorted(ch.core_forgotten, key=core_key):
            for table in ("core_blocks", "core_history"):
                t[table].delete(f"{_is('user_id', sc.user_id)} AND {_is('agent_id', sc.agent_id)}")
        for sc, blocks in ch.core.items():
            t["core_blocks"].delete(f"{_is('user_id', sc.user_id)} AND {_is('agent_id', sc.agent_id)}")
            if blocks:
                t["core_blocks"].add(pa.Table.from_pylist(
                    [{"user_id": sc.user_id, "agent_id": sc.agent_id, "name": b.name, "content": b.content,
                      "importance": b.importance, "position": b.position} for b in blocks],
                    schema=self.schema("core_blocks")))
        if ch.core_history:
            t["core_history"].add(pa.Table.from_pylist(
                [{"user_id": r.scope.user_id, "agent_id": r.scope.agent_id, "seq": r.seq, "name": r.name, "op": r.op,
                  "at": r.at, "content": r.content, "importance": r.importance} for r in ch.core_history],
                schema=self.schema("core_history")))
        if ch.meta:
            t["meta"].merge_insert("key").when_matched_update_all().when_not_matched_insert_all().execute(
                pa.Table.from_pylist([{"key": k, "value": v} for k, v in sorted(ch.meta.items())],
                                     schema=self.schema("meta")))

    def _keyed(self, table: str, changes: dict[str, Any], row: Any) -> None:
        import pyarrow as pa

        if not changes:
            return
        gone = sorted(i for i, v in changes.items() if v is None)
        for part in _chunks(gone):
            self.t[table].delete(_in("id", part))
        put = [row(v) for v in changes.values() if v is not None]
        if put:
            self.t[table].merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(
                pa.Table.from_pylist(put, schema=self.schema(table)))

    def optimize(self, *, keep_old_versions: bool = True) -> None:
        """Compact small fragments; drop versions older than ten minutes, or (``keep_old_versions``
        False) every version but the current one and files no version uses."""
        import datetime
        import warnings

        older = datetime.timedelta(minutes=10) if keep_old_versions else datetime.timedelta(0)
        for t in self.t.values():
            with warnings.catch_warnings():  # "cleanup_older_than=0 ...": this process holds the store's lock
                warnings.simplefilter("ignore", UserWarning)
                t.optimize(cleanup_older_than=older, delete_unverified=not keep_old_versions)


class LanceStorageBackend(CachedStore):
    """Archival memory in LanceDB tables. Create it with :meth:`connect`."""

    path: Path
    _lock_fd: int

    durable = True  # (one process, one writer: the base class's defaults)

    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, dim: int | None = None,
                hnsw_threshold: int = HNSW_THRESHOLD, seed: int = 0) -> "LanceStorageBackend":
        """Open or create the store in folder ``path``; ``dim`` fixes the embedding dimension now.
        ``hnsw_threshold`` and ``seed`` configure the in-process vector index."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        check_int(dim, "dim", 1, VECTOR_DIM_MAX, optional=True)
        check_int(hnsw_threshold, "hnsw_threshold", 0)
        check_int(seed, "seed", 0, 2**31 - 1)
        try:
            import fcntl

            import lancedb
            import pyarrow  # noqa: F401
        except ImportError as exc:
            from ..errors import BackendNotInstalledError

            raise BackendNotInstalledError("the Lance backend needs lancedb: pip install 'umi[lance]'",
                                           extra="lance") from exc
        root = Path(os.fspath(path))
        if not str(root).strip():
            raise InvalidConfigError("path must name a folder, got an empty path")
        if "\x00" in str(root):
            from ..errors import ValidationError

            raise ValidationError(f"path {str(root)!r} contains a NUL byte")
        if root.exists() and not root.is_dir():
            raise InvalidConfigError(f"{root} exists and is not a folder")
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / ".umi.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot open the Lance store at {root}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageLockedError(
                f"the Lance store at {root} is open in another process (or another backend in this one); "
                "Lance stores take one process at a time: use the Postgres backend to share one memory",
                path=str(root)) from None
        self = cls.__new__(cls)
        self.path = root
        self._lock_fd = fd
        try:
            state = _read_state(root)
            if state["schema_version"] > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"the Lance store at {root} has schema version {state['schema_version']}, written by a newer "
                    f"umi; this one reads up to {SCHEMA_VERSION}", found=state["schema_version"],
                    supported=SCHEMA_VERSION)
            if dim is not None and state["dim"] is not None and state["dim"] != dim:
                raise InvalidConfigError(f"the store holds {state['dim']}-d vectors; it cannot be opened with dim={dim}")
            durable = LanceDurable(root, lancedb.connect(str(root / "lance")), state)
            durable.open_tables()
            durable.recover()
            if state["schema_version"] < SCHEMA_VERSION:
                if state["schema_version"] < 4:
                    durable.refile_tombstones()
                durable.state = dict(durable.state, schema_version=SCHEMA_VERSION)
                _write_json_atomic(root / "state.json", durable.state)

            def make_index(d: int) -> Any:
                from ..index import VectorIndex

                return VectorIndex(d, hnsw_threshold=hnsw_threshold, seed=seed)

            self._init_state(durable, durable.dim, make_index)
            self._open_cache(durable.load(durable.dim))
            self._closed = False
            if dim is not None and durable.dim is None:
                with self._writing("connect"):
                    self._cache._ensure_dim(dim)
                    self._dim_stored = dim
                    self._changes.dim = dim
        except BaseException as exc:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._closed = True
            raise_wrapped(exc, f"cannot open the Lance store at {root}")
        return self

    def optimize(self) -> None:
        """Compact small fragments and drop old versions. Runs by itself every few dozen commits.
        Never inside a transaction."""
        with self._lock:
            self._check_open()
            if self._depth:
                raise StorageError("optimize() cannot run inside a transaction")
            self._durable.optimize()  # type: ignore[attr-defined]

    def compact(self) -> bool:
        """Rewrite the tables and drop every older version of them (:meth:`optimize` keeps ten
        minutes of versions, which still hold forgotten rows). Never inside a transaction."""
        with self._lock:
            self._check_writable()
            if self._depth:
                raise StorageError("compact() cannot run inside a transaction")
            try:
                self._durable.optimize(keep_old_versions=False)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - lance raises its own (OSError, RuntimeError...)
                raise StorageError(f"compact of {self.path} failed: {type(exc).__name__}: {exc}") from exc
            return True

    def close(self) -> None:
        """Release the store (and its lock). Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            try:
                super().close()
            finally:
                import fcntl

                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)

    def __repr__(self) -> str:
        return f"<LanceStorageBackend {self.path} dim={self.dim} generation={self._generation}>"


def _chunks(ids: list[str], n: int = 500) -> list[list[str]]:
    return [ids[i:i + n] for i in range(0, len(ids), n)]


def _scope_row(s: Scope) -> dict[str, str | None]:
    return dict(zip(SCOPE_FIELDS, s.as_tuple()))


def _scope_of(r: dict[str, Any]) -> Scope:
    return stored_scope(r.get("user_id"), r.get("agent_id"), r.get("session_id"))


def _entity_row(e: Entity) -> dict[str, Any]:
    return {"id": e.id, "entity_type": e.entity_type.value, "name": e.name, "content": e.content,
            "metadata_json": dumps(e.metadata), "importance": e.importance, "confidence": e.confidence,
            "created_at": e.created_at, "updated_at": e.updated_at, "event_time": e.event_time,
            "valid_from": e.valid_from, "valid_to": e.valid_to, "source_id": e.source_id, **_scope_row(e.scope),
            "embedding": None if e.embedding is None else e.embedding.tolist(),
            "passages": None if e.passage_embeddings is None else e.passage_embeddings.ravel().tolist()}


def _row_to_entity(r: dict[str, Any]) -> Entity:
    emb = r.get("embedding")
    passages = r.get("passages")
    return make_entity({
        "entity_type": EntityType(r["entity_type"]), "name": r["name"], "content": r["content"],
        "metadata": dict(json.loads(r["metadata_json"])),
        "embedding": None if emb is None else np.asarray(emb, dtype=np.float32),
        "importance": float(r["importance"]), "confidence": float(r["confidence"]),
        "created_at": int(r["created_at"]), "updated_at": int(r["updated_at"]),
        "event_time": r["event_time"], "valid_from": r["valid_from"], "valid_to": r["valid_to"],
        "source_id": r["source_id"], "id": r["id"], "score": None, "scope": _scope_of(r), "mentions": (),
        "passage_embeddings": None if passages is None or emb is None
        else np.asarray(passages, dtype=np.float32).reshape(-1, len(emb))})


# --- files ----------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, sort_keys=True), text=True, tmp=path.with_name(path.name + ".tmp"))


def _read_state(root: Path) -> dict[str, Any]:
    p = root / "state.json"
    if not p.exists():
        state = {"schema_version": SCHEMA_VERSION, "generation": 0, "dim": None}
        _write_json_atomic(p, state)
        return state
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
        ok = (isinstance(state, dict) and isinstance(state.get("schema_version"), int)
              and isinstance(state.get("generation"), int) and (state.get("dim") is None or isinstance(state["dim"], int)))
    except (OSError, ValueError) as exc:
        raise StorageError(f"{p} is unreadable or not JSON: {exc}") from exc
    if not ok:
        raise StorageError(f"{p} does not hold a umi Lance store state (schema_version, generation, dim)")
    return state
