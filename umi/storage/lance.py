"""LanceDB storage: archival memory in a folder of Lance tables (``umi[lance]``).

``LanceStorageBackend.connect("./memory.lance")`` opens (or creates) a folder holding::

    state.json      schema version, generation, embedding dimension (written atomically)
    journal.json    only while a transaction writes: the table versions to go back to
    lance/          Lance tables: entities (with an ``embedding`` vector column once the
                    dimension is known), sources, relations, history

Reads and searches go to Lance: ``get``/``list``/``count``/``find_by_name`` are filtered scans,
and :meth:`search_vector` is Lance's own vector search (cosine, with the filters as a
*prefilter*): a brute-force scan, exact, until :meth:`optimize` builds an ANN index
(``IVF_HNSW_SQ``, once at least ``ann_index_rows`` vectors are stored). Its hits are
re-scored in float64, as in every backend. Keyword search is BM25 with the shared tokenizer
(:mod:`umi.storage.text`) over term frequencies kept in the entities table and mirrored in
memory (with the filter fields), so it scores exactly like every other backend. Lance's own
full-text index was not used: it tokenises differently, so the same query would match
different words here than in DuckDB or Postgres.

Transactions, and what Lance cannot do:

* Lance commits each table on its own; it has no transaction spanning tables. This backend
  makes ``transaction()`` atomic anyway: before the first write of a block it writes
  ``journal.json`` with every table's version, and on failure it restores each table to that
  version (Lance keeps old versions). The commit is the atomic rewrite of ``state.json``
  (generation + 1); after a crash, :meth:`connect` finds the journal and rolls back whatever
  the interrupted block had written. So ``supports_transactions`` is True.
* **One process at a time.** Restoring versions would undo another process's commits, so a
  store is opened by one process only: a second ``connect`` raises
  :class:`~umi.StorageLockedError` (``supports_concurrent_writers`` is False). For many
  processes or hosts, use the Postgres backend. Inside one process, threads are serialised
  (a transaction holds the lock until it ends).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    InvalidConfigError,
    SchemaVersionError,
    StorageError,
    StorageLockedError,
    UmiError,
    ValidationError,
)
from ..types import Entity, EntityType, EvolutionRelation, normalize_name, now_ms
from . import _rows as R
from ._common import (
    check_entities,
    check_id,
    check_ids,
    check_k,
    check_limit_offset,
    check_query_text,
    check_query_vector,
    check_relations,
    check_source,
    check_time,
    make_entity,
    snapshot_of,
)
from .base import HistoryRecord, SearchFilters, Source, StorageBackend
from .text import bm25_idf, bm25_term_score, document_terms, query_terms

__all__ = ["LanceStorageBackend"]

SCHEMA_VERSION = 1
TABLES = ("entities", "sources", "relations", "history")
OPTIMIZE_EVERY_COMMITS = 64
VECTOR_DIM_MAX = 65_536


def _lit(s: str) -> str:
    """A SQL string literal for Lance's filter parser (quotes doubled; checked with every character)."""
    return "'" + s.replace("'", "''") + "'"


def _hex(s: str) -> str:
    return s.encode("utf-8").hex()


def _name_key(name: str) -> str:
    return hashlib.sha256(normalize_name(name).encode("utf-8")).hexdigest()


def _meta_tags(tagged: Mapping[str, str]) -> list[str]:
    """``|hex(key)=hex(typed value)|`` per key: filters match them with strpos, so no quoting is needed."""
    return [f"|{_hex(k)}={_hex(v)}|" for k, v in sorted(tagged.items())]


@dataclass
class _Doc:
    """What keyword search needs of one entity: its terms and its filter fields."""

    tf: dict[str, int]
    doc_len: int
    entity_type: str
    created_at: int
    event_time: int | None
    valid_to: int | None
    tags: dict[str, str]


def _doc_matches(d: _Doc, p: R.FilterPlan) -> bool:
    if p.none:
        return False
    if p.entity_types is not None and d.entity_type not in p.entity_types:
        return False
    if p.time_required:
        t = d.created_at if p.time_field == "created_at" else d.event_time
        if t is None or (p.time_lo is not None and t < p.time_lo) or (p.time_hi is not None and t > p.time_hi):
            return False
    for k, v in p.metadata.items():
        if d.tags.get(k) != v:
            return False
    if p.as_of is not None:
        return d.created_at <= p.as_of and (d.valid_to is None or d.valid_to > p.as_of)
    return not p.current_only or d.valid_to is None


class LanceStorageBackend(StorageBackend):
    """Archival memory in LanceDB tables. Create it with :meth:`connect`."""

    #: a transaction() block commits all its writes or none (journal + version restore)
    supports_transactions = True
    #: one process per store (a second connect raises StorageLockedError)
    supports_concurrent_writers = False
    supports_multiple_processes = False
    durable = True

    def __init__(self, path: Path, db: Any, lock_fd: int, state: dict[str, Any], *, ann_index_rows: int) -> None:
        self.path = path
        self._db = db
        self._lock_fd = lock_fd
        self._state = state
        self._ann_rows = ann_index_rows
        self._mutex = threading.RLock()
        self._closed = False
        self._t: dict[str, Any] = {}
        self._docs: dict[str, _Doc] = {}
        self._post: dict[str, dict[str, int]] = {}
        self._total_len = 0
        self._seq: dict[str, int] = {}
        # the open transaction (guarded by _mutex)
        self._depth = 0
        self._journal: dict[str, Any] | None = None
        self._changed = False
        self._rollback_only = False
        self._pending_dim: int | None = None
        self._commits = 0

    # --- opening ------------------------------------------------------------------
    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, dim: int | None = None,
                ann_index_rows: int = 100_000) -> LanceStorageBackend:
        """Open or create the store in folder ``path``; ``dim`` fixes the embedding dimension now."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        if dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise TypeError(f"dim must be an int or None, not {type(dim).__name__}")
            if not 1 <= dim <= VECTOR_DIM_MAX:
                raise InvalidConfigError(f"dim must be between 1 and {VECTOR_DIM_MAX}, got {dim}")
        if isinstance(ann_index_rows, bool) or not isinstance(ann_index_rows, int):
            raise TypeError(f"ann_index_rows must be an int, not {type(ann_index_rows).__name__}")
        if ann_index_rows < 256:
            raise InvalidConfigError(f"ann_index_rows must be at least 256 (IVF training needs rows), got {ann_index_rows}")
        try:
            import fcntl

            import lancedb
            import pyarrow  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as exc:
            from ..errors import BackendNotInstalledError

            raise BackendNotInstalledError("the Lance backend needs lancedb: pip install 'umi[lance]'",
                                           extra="lance") from exc
        root = Path(os.fspath(path))
        if not str(root).strip():
            raise InvalidConfigError("path must name a folder, got an empty path")
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
        try:
            state = _read_state(root)
            if state["schema_version"] > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"the Lance store at {root} has schema version {state['schema_version']}, written by a newer "
                    f"umi; this one reads up to {SCHEMA_VERSION}", found=state["schema_version"],
                    supported=SCHEMA_VERSION)
            if dim is not None and state["dim"] is not None and state["dim"] != dim:
                raise InvalidConfigError(f"the store holds {state['dim']}-d vectors; it cannot be opened with dim={dim}")
            db = lancedb.connect(str(root / "lance"))
            self = cls(root, db, fd, state, ann_index_rows=ann_index_rows)
            self._open_tables()
            self._recover()
            if dim is not None and self._state["dim"] is None:
                with self.transaction():
                    self._fix_dim(dim)
                    self._changed = True
            self._load_memory()
        except BaseException as exc:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            if isinstance(exc, UmiError) or not isinstance(exc, Exception):
                raise
            raise StorageError(f"cannot open the Lance store at {root}: {type(exc).__name__}: {exc}") from exc
        return self

    def _schema(self, name: str) -> Any:
        import pyarrow as pa

        s, i, f = pa.string(), pa.int64(), pa.float64()
        fields = {
            "entities": [("id", s, False), ("entity_type", s, False), ("name", s, False), ("name_key", s, False),
                         ("content", s, False), ("metadata_json", s, False), ("meta_tags", s, False),
                         ("importance", f, False), ("confidence", f, False), ("created_at", i, False),
                         ("updated_at", i, False), ("event_time", i, True), ("valid_from", i, True),
                         ("valid_to", i, True), ("source_id", s, True), ("terms_json", s, False),
                         ("doc_len", i, False)],
            "sources": [("id", s, False), ("text_hash", s, False), ("text", s, False), ("created_at", i, False),
                        ("metadata_json", s, False)],
            "relations": [("id", s, False), ("source_id", s, False), ("target_id", s, False),
                          ("evolution_type", s, False), ("reason", s, False), ("confidence", f, False),
                          ("created_at", i, False)],
            "history": [("entity_id", s, False), ("seq", i, False), ("op", s, False), ("at", i, False),
                        ("snapshot", s, False)],
        }[name]
        out = [pa.field(n, t, nullable=nl) for n, t, nl in fields]
        dim = self._dim_now()
        if name == "entities" and dim is not None:
            out.append(pa.field("embedding", pa.list_(pa.float32(), dim), nullable=True))
        return pa.schema(out)

    def _open_tables(self) -> None:
        for name in TABLES:
            try:
                self._t[name] = self._db.open_table(name)
            except ValueError:  # "was not found"
                self._t[name] = self._db.create_table(name, schema=self._schema(name))

    def _recover(self) -> None:
        """Finish what a crash interrupted: a journal without its commit is rolled back."""
        jpath = self.path / "journal.json"
        if not jpath.exists():
            return
        journal = json.loads(jpath.read_text())
        if self._state["generation"] <= journal["generation"]:
            for name, version in journal["versions"].items():
                t = self._t[name]
                if t.version != version:
                    t.restore(version)
        jpath.unlink()
        _fsync_dir(self.path)

    def _load_memory(self) -> None:
        """Rebuild the keyword index and the history counters from the tables."""
        self._docs = {}
        self._post = {}
        self._total_len = 0
        rows = self._scan("entities", None, ["id", "entity_type", "created_at", "event_time", "valid_to",
                                             "meta_tags", "metadata_json", "terms_json", "doc_len"])
        for r in rows:
            md = json.loads(r["metadata_json"])
            self._index_doc(r["id"], _Doc(json.loads(r["terms_json"]), int(r["doc_len"]), r["entity_type"],
                                          int(r["created_at"]), r["event_time"], r["valid_to"],
                                          R.tagged_metadata(md)))
        self._seq = {}
        for r in self._scan("history", None, ["entity_id", "seq"]):
            if r["seq"] > self._seq.get(r["entity_id"], 0):
                self._seq[r["entity_id"]] = int(r["seq"])

    def _index_doc(self, eid: str, d: _Doc) -> None:
        self._unindex_doc(eid)
        self._docs[eid] = d
        self._total_len += d.doc_len
        for t, tf in d.tf.items():
            self._post.setdefault(t, {})[eid] = tf

    def _unindex_doc(self, eid: str) -> None:
        d = self._docs.pop(eid, None)
        if d is None:
            return
        self._total_len -= d.doc_len
        for t in d.tf:
            p = self._post.get(t)
            if p is not None:
                p.pop(eid, None)
                if not p:
                    del self._post[t]

    # --- small helpers ----------------------------------------------------------------
    def _dim_now(self) -> int | None:
        return self._pending_dim if self._pending_dim is not None else self._state["dim"]

    @property
    def dim(self) -> int | None:  # type: ignore[override]
        return self._state["dim"] if self._depth == 0 else self._dim_now()

    @property
    def generation(self) -> int:
        with self._mutex:
            return int(self._state["generation"])

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("this LanceStorageBackend is closed")

    def _scan(self, table: str, where: str | None, columns: builtins.list[str] | None = None) -> builtins.list[dict[str, Any]]:
        q = self._t[table].search()
        if where is not None:
            q = q.where(where)
        if columns is not None:
            q = q.select(columns)
        return q.limit(None).to_arrow().to_pylist()

    def _filter_sql(self, p: R.FilterPlan) -> str:
        if p.none:
            return "false"
        parts: builtins.list[str] = []
        if p.entity_types is not None:
            parts.append("entity_type IN (" + ", ".join(_lit(t) for t in p.entity_types) + ")")
        col = "created_at" if p.time_field == "created_at" else "event_time"
        if p.time_required:
            parts.append(f"{col} IS NOT NULL")
        if p.time_lo is not None:
            parts.append(f"{col} >= {int(p.time_lo)}")
        if p.time_hi is not None:
            parts.append(f"{col} <= {int(p.time_hi)}")
        for tag in _meta_tags(p.metadata):
            parts.append(f"strpos(meta_tags, {_lit(tag)}) > 0")  # hex digits, '|' and '=' only
        if p.as_of is not None:
            parts.append(f"created_at <= {int(p.as_of)} AND (valid_to IS NULL OR valid_to > {int(p.as_of)})")
        elif p.current_only:
            parts.append("valid_to IS NULL")
        return " AND ".join(f"({x})" for x in parts) if parts else "true"

    def _entities_where(self, where: str) -> builtins.list[Entity]:
        cols = [f.name for f in self._t["entities"].schema]
        return [_row_to_entity(r) for r in self._scan("entities", where, [c for c in cols if c != "terms_json"])]

    # --- transactions ---------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all. Nested blocks join the outer one."""
        with self._mutex:
            self._check_open()
            if self._depth:
                self._depth += 1
                try:
                    yield
                except BaseException:
                    self._rollback_only = True
                    raise
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            self._journal = None
            self._changed = False
            self._rollback_only = False
            self._pending_dim = None
            try:
                try:
                    yield
                except BaseException as exc:
                    self._rollback()
                    if isinstance(exc, UmiError) or not isinstance(exc, Exception):
                        raise
                    raise StorageError(f"transaction rolled back: {type(exc).__name__}: {exc}") from exc
                if self._rollback_only:
                    self._rollback()
                    raise StorageError("transaction rolled back: a write inside it failed (and the error was caught)")
                try:
                    self._commit()
                except BaseException as exc:
                    self._rollback()
                    if isinstance(exc, UmiError) or not isinstance(exc, Exception):
                        raise
                    raise StorageError(f"commit failed and was rolled back: {type(exc).__name__}: {exc}") from exc
            finally:
                self._depth = 0
                self._journal = None
                self._pending_dim = None

    def _begin_writes(self) -> None:
        """Before the block's first write: note every table's version in the journal (on disk)."""
        if self._journal is not None:
            return
        journal = {"generation": int(self._state["generation"]),
                   "versions": {n: int(t.version) for n, t in self._t.items()}}
        _write_json_atomic(self.path / "journal.json", journal)
        self._journal = journal

    def _commit(self) -> None:
        if self._journal is None:
            return  # nothing was written
        if self._changed:
            new_state = dict(self._state, generation=int(self._state["generation"]) + 1, dim=self._dim_now())
            _write_json_atomic(self.path / "state.json", new_state)  # the commit point
            self._state = new_state
        (self.path / "journal.json").unlink()
        _fsync_dir(self.path)
        self._journal = None
        self._commits += 1
        if self._commits % OPTIMIZE_EVERY_COMMITS == 0:
            with contextlib.suppress(Exception):  # compaction is housekeeping: a failure loses nothing
                self.optimize()

    def _rollback(self) -> None:
        journal = self._journal
        self._journal = None
        self._pending_dim = None
        if journal is None:
            return
        try:
            for name, version in journal["versions"].items():
                t = self._t[name]
                if t.version != version:
                    t.restore(version)
            (self.path / "journal.json").unlink()
            _fsync_dir(self.path)
        finally:
            self._load_memory()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        with self._mutex:
            self._check_open()
            if not self._depth:
                with self.transaction(), self._writing():
                    yield
                return
            if self._rollback_only:
                raise StorageError("an earlier write in this transaction failed; the transaction will be rolled back")
            try:
                self._begin_writes()
                yield
            except BaseException as exc:
                self._rollback_only = True
                if isinstance(exc, UmiError) or not isinstance(exc, Exception):
                    raise
                raise StorageError(f"a write to Lance failed: {type(exc).__name__}: {exc}") from exc

    @contextmanager
    def _reading(self) -> Iterator[None]:
        with self._mutex:
            self._check_open()
            try:
                yield
            except UmiError:
                raise
            except Exception as exc:
                raise StorageError(f"a read from Lance failed: {type(exc).__name__}: {exc}") from exc

    def _fix_dim(self, dim: int) -> None:
        import pyarrow as pa

        self._begin_writes()
        self._t["entities"].add_columns(pa.field("embedding", pa.list_(pa.float32(), dim), nullable=True))
        self._pending_dim = dim

    # --- entities -------------------------------------------------------------------
    def upsert(self, entities: Sequence[Entity]) -> None:
        with self._mutex:
            self._check_open()
            ents, dim = check_entities(entities, self._dim_now())
            R.check_metadata_text(ents)
            for e in ents:
                for what in ("name", "content"):
                    R.check_utf8(getattr(e, what), f"entity {e.id} {what}")
            if not ents:
                return
            with self._writing():
                if dim is not None and self._dim_now() is None:
                    self._fix_dim(dim)
                chunk: builtins.list[Entity] = []
                for e in ents:  # an id twice in one batch is written twice, in order
                    if any(c.id == e.id for c in chunk):
                        self._upsert_chunk(chunk)
                        chunk = []
                    chunk.append(e)
                self._upsert_chunk(chunk)
                self._changed = True

    def _upsert_chunk(self, chunk: builtins.list[Entity]) -> None:
        import pyarrow as pa

        schema = self._schema("entities")
        docs: builtins.list[tuple[str, _Doc]] = []
        rows: dict[str, list[Any]] = {f.name: [] for f in schema}
        for e in chunk:
            tf, length = document_terms(e.name, e.content)
            tagged = R.tagged_metadata(e.metadata)
            values = {"id": e.id, "entity_type": e.entity_type.value, "name": e.name, "name_key": _name_key(e.name),
                      "content": e.content, "metadata_json": R.dumps(e.metadata),
                      "meta_tags": "".join(_meta_tags(tagged)), "importance": e.importance,
                      "confidence": e.confidence, "created_at": e.created_at, "updated_at": e.updated_at,
                      "event_time": e.event_time, "valid_from": e.valid_from, "valid_to": e.valid_to,
                      "source_id": e.source_id, "terms_json": R.dumps(tf), "doc_len": length,
                      "embedding": None if e.embedding is None else e.embedding.tolist()}
            for name, column in rows.items():
                column.append(values[name])
            docs.append((e.id, _Doc(tf, length, e.entity_type.value, e.created_at, e.event_time, e.valid_to, tagged)))
        batch = pa.table(rows, schema=schema)
        self._t["entities"].merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(
            batch, on_bad_vectors="null")
        self._append_history([(e.id, "update" if e.id in self._docs else "create", e.updated_at, snapshot_of(e))
                              for e in chunk])
        for eid, d in docs:
            self._index_doc(eid, d)

    def _append_history(self, recs: builtins.list[tuple[str, str, int, dict[str, Any]]]) -> None:
        import pyarrow as pa

        rows: dict[str, list[Any]] = {"entity_id": [], "seq": [], "op": [], "at": [], "snapshot": []}
        seqs = dict(self._seq)
        for eid, op, at, snap in recs:
            seqs[eid] = seqs.get(eid, 0) + 1
            for k, v in zip(rows, (eid, seqs[eid], op, at, R.dumps(snap))):
                rows[k].append(v)
        self._t["history"].add(pa.table(rows, schema=self._schema("history")))
        self._seq = seqs

    def get(self, entity_id: str) -> Entity | None:
        eid = check_id(entity_id)
        with self._reading():
            got = self._entities_where(f"id = {_lit(eid)}")
        return got[0] if got else None

    def get_many(self, entity_ids: Sequence[str]) -> builtins.list[Entity]:
        ids = check_ids(entity_ids)
        if not ids:
            return []
        with self._reading():
            unique = list(dict.fromkeys(i for i in ids if i in self._docs))
            found: dict[str, Entity] = {}
            for start in range(0, len(unique), 1000):
                part = unique[start:start + 1000]
                found.update((e.id, e) for e in self._entities_where("id IN (" + ", ".join(map(_lit, part)) + ")"))
        out: builtins.list[Entity] = []
        used: set[str] = set()
        for i in ids:
            e = found.get(i)
            if e is not None:
                out.append(e if i not in used else _copy(e))
                used.add(i)
        return out

    def delete(self, entity_id: str, at: int | None = None) -> bool:
        eid = check_id(entity_id)
        when = check_time(at, "at", optional=True)
        with self._mutex:
            self._check_open()
            if eid not in self._docs:
                return False
            with self._writing():
                old = self._entities_where(f"id = {_lit(eid)}")[0]
                self._t["entities"].delete(f"id = {_lit(eid)}")
                self._append_history([(eid, "delete", now_ms() if when is None else when, snapshot_of(old))])
                self._unindex_doc(eid)
                self._changed = True
            return True

    def supersede(self, entity_id: str, valid_to: int) -> bool:
        eid = check_id(entity_id)
        vt = check_time(valid_to, "valid_to")
        assert vt is not None
        with self._mutex:
            self._check_open()
            d = self._docs.get(eid)
            if d is None or d.valid_to is not None:
                return False
            with self._writing():
                cur = self._entities_where(f"id = {_lit(eid)}")[0]
                cur.valid_to = vt
                cur.updated_at = max(cur.updated_at, vt)
                self._t["entities"].update(where=f"id = {_lit(eid)}",
                                           values={"valid_to": vt, "updated_at": cur.updated_at})
                self._append_history([(eid, "supersede", vt, snapshot_of(cur))])
                d.valid_to = vt
                self._changed = True
            return True

    # --- lists and counts ---------------------------------------------------------------
    def list(self, filters: SearchFilters | None = None, limit: int = 100, offset: int = 0) -> builtins.list[Entity]:
        limit, offset = check_limit_offset(limit, offset)
        where = self._filter_sql(R.plan_filters(filters))
        with self._reading():
            keys = sorted((int(r["created_at"]), r["id"]) for r in self._scan("entities", where, ["id", "created_at"]))
            page = [k[1] for k in keys[offset:offset + limit]]
            if not page:
                return []
            by_id = {e.id: e for e in self._entities_where("id IN (" + ", ".join(map(_lit, page)) + ")")}
        return [by_id[i] for i in page]

    def count(self, filters: SearchFilters | None = None) -> int:
        where = self._filter_sql(R.plan_filters(filters))
        with self._reading():
            return int(self._t["entities"].count_rows(where))

    def find_by_name(self, name: str, entity_type: EntityType | str | None = None,
                     filters: SearchFilters | None = None) -> builtins.list[Entity]:
        if not isinstance(name, str):
            raise TypeError(f"name must be str, not {type(name).__name__}")
        norm = normalize_name(name)
        if not norm:
            raise ValidationError("name must not be empty or only whitespace")
        R.check_utf8(norm, "name")
        etype = None if entity_type is None else EntityType.parse(entity_type)
        where = f"name_key = {_lit(_name_key(name))} AND ({self._filter_sql(R.plan_filters(filters))})"
        if etype is not None:
            where += f" AND entity_type = {_lit(etype.value)}"
        with self._reading():
            got = self._entities_where(where)
        return sorted(got, key=lambda e: (e.created_at, e.id))

    # --- search ---------------------------------------------------------------------------
    def search_vector(self, vector: np.ndarray, k: int, filters: SearchFilters | None = None) -> builtins.list[tuple[str, float]]:
        k = check_k(k)
        where = self._filter_sql(R.plan_filters(filters))
        with self._mutex:
            q = check_query_vector(vector, self._dim_now())
        with self._reading():
            if q is None or where == "false":
                return []
            margin = max(16, k)  # hits are re-scored in float64; the margin absorbs Lance's float32 ranking
            hits = (self._t["entities"].search(q, vector_column_name="embedding").distance_type("cosine")
                    .where(f"(embedding IS NOT NULL) AND ({where})", prefilter=True)
                    .select(["id", "embedding", "_distance"]).limit(k + margin).to_arrow())
        if hits.num_rows == 0:
            return []
        ids = hits.column("id").to_pylist()
        mat = np.asarray(hits.column("embedding").to_pylist(), dtype=np.float32)
        scores = R.cosine_scores(mat, np.asarray(vector, dtype=np.float32))
        return R.top_k([(i, float(s)) for i, s in zip(ids, scores)], k)

    def search_text(self, query: str, k: int, filters: SearchFilters | None = None) -> builtins.list[tuple[str, float]]:
        query = check_query_text(query)
        k = check_k(k)
        plan = R.plan_filters(filters)
        terms = query_terms(query)
        with self._reading():
            n_docs = len(self._docs)
            if not terms or n_docs == 0 or plan.none:
                return []
            avgdl = self._total_len / n_docs
            idf = {t: bm25_idf(n_docs, len(self._post.get(t, ()))) for t in terms}
            cands = sorted({eid for t in terms for eid in self._post.get(t, ())})
            scored: builtins.list[tuple[str, float]] = []
            for eid in cands:
                d = self._docs[eid]
                if not _doc_matches(d, plan):
                    continue
                s = 0.0
                for t in terms:  # the reference order of additions: the same doubles as bm25_scores
                    tf = d.tf.get(t, 0)
                    if tf:
                        s += bm25_term_score(tf, d.doc_len, avgdl, idf[t])
                scored.append((eid, s))
        return R.top_k(scored, k)

    # --- sources ------------------------------------------------------------------------
    def add_source(self, source: Source) -> None:
        import pyarrow as pa

        s = check_source(source)
        R.check_utf8(s.text, "source.text")
        with self._mutex:
            self._check_open()
            if self._t["sources"].count_rows(f"id = {_lit(s.id)}"):
                return  # the first record of a text is kept
            with self._writing():
                self._t["sources"].add(pa.table(
                    {"id": [s.id], "text_hash": [s.text_hash], "text": [s.text], "created_at": [s.created_at],
                     "metadata_json": [R.dumps(dict(s.metadata))]}, schema=self._schema("sources")))
                self._changed = True

    def get_source(self, source_id: str) -> Source | None:
        sid = check_id(source_id, "source_id")
        with self._reading():
            return self._first_source(f"id = {_lit(sid)}")

    def find_source_by_hash(self, text_hash: str) -> Source | None:
        if not isinstance(text_hash, str):
            raise TypeError(f"text_hash must be str, not {type(text_hash).__name__}")
        R.check_utf8(text_hash, "text_hash")
        with self._reading():
            return self._first_source(f"text_hash = {_lit(text_hash)}")

    def _first_source(self, where: str) -> Source | None:
        rows = self._scan("sources", where)
        if not rows:
            return None
        r = min(rows, key=lambda r: (r["created_at"], r["id"]))
        return Source(r["id"], r["text_hash"], r["text"], int(r["created_at"]), dict(json.loads(r["metadata_json"])))

    # --- evolution ----------------------------------------------------------------------
    def add_relations(self, relations: Sequence[EvolutionRelation]) -> None:
        import pyarrow as pa

        rels = check_relations(relations)
        if not rels:
            return
        for r in rels:
            R.check_utf8(r.reason, f"relation {r.id} reason")
        with self._mutex:
            self._check_open()
            for r in rels:
                for end in (r.source_id, r.target_id):
                    if end not in self._docs:
                        raise ValidationError(f"relation {r.id} refers to entity {end}, which is not stored")
            rels = list({r.id: r for r in rels}.values())  # a later duplicate of an id replaces an earlier one
            with self._writing():
                batch = pa.table({
                    "id": [r.id for r in rels], "source_id": [r.source_id for r in rels],
                    "target_id": [r.target_id for r in rels], "evolution_type": [r.evolution_type.value for r in rels],
                    "reason": [r.reason for r in rels], "confidence": [r.confidence for r in rels],
                    "created_at": [r.created_at for r in rels]}, schema=self._schema("relations"))
                self._t["relations"].merge_insert("id").when_matched_update_all() \
                    .when_not_matched_insert_all().execute(batch)
                self._changed = True

    def relations_for(self, entity_id: str) -> builtins.list[EvolutionRelation]:
        eid = check_id(entity_id)
        with self._reading():
            rows = self._scan("relations", f"source_id = {_lit(eid)} OR target_id = {_lit(eid)}")
        rows.sort(key=lambda r: (r["created_at"], r["id"]))
        return [EvolutionRelation(source_id=r["source_id"], target_id=r["target_id"],
                                  evolution_type=r["evolution_type"], reason=r["reason"], confidence=r["confidence"],
                                  id=r["id"], created_at=int(r["created_at"])) for r in rows]

    def history(self, entity_id: str) -> builtins.list[HistoryRecord]:
        eid = check_id(entity_id)
        with self._reading():
            rows = self._scan("history", f"entity_id = {_lit(eid)}")
        rows.sort(key=lambda r: r["seq"])
        return [HistoryRecord(r["entity_id"], int(r["seq"]), r["op"], int(r["at"]), json.loads(r["snapshot"]))
                for r in rows]

    # --- lifecycle ------------------------------------------------------------------------
    def optimize(self) -> None:
        """Compact small fragments and drop old versions; build the ANN index once it pays.

        Runs by itself every few dozen commits. Never inside a transaction (old versions are
        what a rollback restores).
        """
        import datetime

        with self._mutex:
            self._check_open()
            if self._depth:
                raise StorageError("optimize() cannot run inside a transaction")
            for t in self._t.values():
                t.optimize(cleanup_older_than=datetime.timedelta(minutes=10))
            ents = self._t["entities"]
            dim = self._state["dim"]
            if dim is not None and not ents.list_indices():
                n_vec = ents.count_rows("embedding IS NOT NULL")
                if n_vec >= self._ann_rows:
                    from lancedb.index import HnswSq

                    ents.create_index("embedding", config=HnswSq(distance_type="cosine"))

    def close(self) -> None:
        """Release the store (and its lock). Safe to call twice."""
        with self._mutex:
            if self._closed:
                return
            if self._depth:
                with contextlib.suppress(Exception):
                    self._rollback()
            self._closed = True
            self._t.clear()
            self._db = None
            import fcntl

            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)

    def __repr__(self) -> str:
        return f"<LanceStorageBackend {self.path} dim={self.dim} generation={self._state['generation']}>"


# --- files ----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


def _copy(e: Entity) -> Entity:
    from ._common import clone_entity

    return clone_entity(e, e.embedding)


def _row_to_entity(r: dict[str, Any]) -> Entity:
    emb = r.get("embedding")
    return make_entity({
        "entity_type": EntityType(r["entity_type"]), "name": r["name"], "content": r["content"],
        "metadata": dict(json.loads(r["metadata_json"])),
        "embedding": None if emb is None else np.asarray(emb, dtype=np.float32),
        "importance": float(r["importance"]), "confidence": float(r["confidence"]),
        "created_at": int(r["created_at"]), "updated_at": int(r["updated_at"]),
        "event_time": r["event_time"], "valid_from": r["valid_from"], "valid_to": r["valid_to"],
        "source_id": r["source_id"], "id": r["id"], "score": None})
