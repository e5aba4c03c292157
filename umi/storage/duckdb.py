"""``DuckDBStorageBackend``: the default archival store, one DuckDB file (or ``":memory:"``).

DuckDB is the source of truth. Reads on the hot path (get, get_many, find_by_name,
vector and keyword search) are served by an in-process
:class:`~umi.storage._hotcache.EntityCache` that every commit keeps in step and that
is rebuilt from DuckDB on open; ``list``, ``count``, history, relations and sources
are SQL. Writes go through DuckDB's Arrow bulk path (a registered Arrow table and one
``INSERT ... SELECT`` per table), never row-by-row.

Vector index: a :class:`umi.index.VectorIndex` saved beside the file as
``<path>.umiidx`` with the generation it reflects. On open it is loaded when its
generation matches, caught up from ``history`` (every write appends there, tagged with
its generation, deletions included) when it is behind, and rebuilt from the cached
vectors when missing, unreadable or inconsistent; ``index_load_status`` says which.
It is saved on :meth:`close` (and every ``save_index_every`` commits when set). A crash
can cost the cache file, never a committed write.

Transactions: BEGIN/COMMIT/ROLLBACK; a write outside :meth:`transaction` is its own
transaction; nested use joins the outer one. ``generation`` is bumped inside the
committing transaction. A rollback restores the cache as it was.

Threads: one re-entrant lock guards the connection and the cache; every call holds it
and a transaction holds it until it ends, so readers in other threads wait for a
commit or rollback and never see uncommitted state.
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from ..errors import (
    IndexCacheError,
    InvalidConfigError,
    StorageError,
    ValidationError,
)
from ..types import Entity, EvolutionRelation, now_ms
from ._common import (
    check_entities,
    check_filters,
    check_id,
    check_k,
    check_limit_offset,
    check_query_text,
    check_relations,
    check_source,
    check_time,
    dumps,
    snapshot_of,
)
from ._duckdb_schema import add_embedding_column, open_connection, prepare, where_sql
from ._hotcache import EntityCache
from ._duckdb_io import (
    bm25_sql,
    delete_rows_of,
    entities_table,
    history_table,
    insert_arrow,
    load_rows,
    metadata_table,
    postings_table,
    relations_table,
)
from ._reads import CachedReads
from ._txn import TransactionMixin
from .base import HistoryRecord, SearchFilters, Source, StorageBackend
from .text import BM25_B, BM25_K1, document_terms, query_terms

__all__ = ["DuckDBStorageBackend", "INDEX_SUFFIX"]

log = logging.getLogger("umi.storage.duckdb")

#: the vector index cache lives at ``<database path> + INDEX_SUFFIX``
INDEX_SUFFIX = ".umiidx"

def _make_index(params: dict[str, int], dim: int) -> Any:
    from ..index import VectorIndex

    return VectorIndex(dim, **params)


def _check_pos_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


class DuckDBStorageBackend(CachedReads, TransactionMixin, StorageBackend):
    """Archival memory in one DuckDB file. Open with :meth:`connect`."""

    supports_concurrent_writers = False
    supports_multiple_processes = False
    #: True for a file; an instance opened on ``":memory:"`` says False
    durable = True

    @classmethod
    def connect(cls, path: str | os.PathLike[str] = ":memory:", *, read_only: bool = False,
                dim: int | None = None, hnsw_threshold: int = 20_000, M: int = 16,
                ef_construction: int = 200, ef_search: int = 128, seed: int = 0,
                save_index_every: int | None = None, bm25: str = "numba") -> "DuckDBStorageBackend":
        """Open (creating if needed) the store at ``path``.

        ``dim`` fixes the vector dimension up front (else the first vector fixes it; a
        store that has one refuses another). ``read_only`` opens an existing file for
        reading (DuckDB allows that only while no other process holds it for writing).
        ``hnsw_threshold``, ``M``, ``ef_construction``, ``ef_search``, ``seed`` configure the
        vector index; ``save_index_every`` saves the index cache every that many commits;
        ``bm25="sql"`` scores keyword search in DuckDB instead of the numba kernel.
        """
        return cls(path, read_only=read_only, dim=dim, hnsw_threshold=hnsw_threshold, M=M,
                   ef_construction=ef_construction, ef_search=ef_search, seed=seed,
                   save_index_every=save_index_every, bm25=bm25)

    def __init__(self, path: str | os.PathLike[str] = ":memory:", *, read_only: bool = False,
                 dim: int | None = None, hnsw_threshold: int = 20_000, M: int = 16,
                 ef_construction: int = 200, ef_search: int = 128, seed: int = 0,
                 save_index_every: int | None = None, bm25: str = "numba") -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be str or PathLike, not {type(path).__name__}")
        spath = os.fspath(path)
        if not isinstance(spath, str):
            raise TypeError("path must be a text path")
        if not isinstance(read_only, bool):
            raise TypeError(f"read_only must be a bool, not {type(read_only).__name__}")
        if dim is not None:
            dim = _check_pos_int("dim", dim, 1, 65_536)
        self._index_params = {
            "hnsw_threshold": _check_pos_int("hnsw_threshold", hnsw_threshold, 0, 2**62),
            "M": _check_pos_int("M", M, 2, 1024),
            "ef_construction": _check_pos_int("ef_construction", ef_construction, 1, 1_000_000),
            "ef_search": _check_pos_int("ef_search", ef_search, 1, 1_000_000),
            "seed": _check_pos_int("seed", seed, 0, 2**31 - 1),
        }
        if save_index_every is not None:
            save_index_every = _check_pos_int("save_index_every", save_index_every, 1, 2**62)
        if bm25 not in ("numba", "sql"):
            raise InvalidConfigError(f"bm25 must be 'numba' or 'sql', got {bm25!r}")
        self.path = spath
        self.read_only = read_only
        self.in_memory = spath == ":memory:" or spath == ""
        self.durable = not self.in_memory
        self.index_path: str | None = None if self.in_memory else spath + INDEX_SUFFIX
        self.save_index_every = save_index_every
        self.bm25 = bm25
        self.index_load_status = "rebuilt"
        self._lock = threading.RLock()
        self._closed = True
        self._pending_gen = 0
        self._seq_undo: dict[str, int | None] = {}
        self._commits_since_save = 0
        self._index_dirty = False
        self._dim_before: int | None = None
        self._con = open_connection(None if self.in_memory else spath, read_only)
        try:
            self._generation, self._dim_stored, self.db_uuid = prepare(self._con, spath, read_only, dim)
            self._cache = EntityCache(dim=self._dim_stored, index_factory=self._new_index)
            self._load_cache()
            self._open_index()
        except BaseException:
            self._con.close()
            raise
        self._closed = False

    # --- opening -----------------------------------------------------------------------
    @property
    def _new_index(self) -> Callable[[int], Any]:
        # a partial, not a bound method: the cache must not hold the backend (and its connection) in a cycle
        return functools.partial(_make_index, dict(self._index_params))

    def _load_cache(self) -> None:
        """Fill the cache from DuckDB (see :func:`~umi.storage._duckdb_io.load_rows`)."""
        rows, self._seq = load_rows(self._con, self._cache.dim)
        self._cache.bulk_load(rows)

    def _remove_stale_temp_files(self) -> None:
        """Temp files of index saves cut short by a crash (we hold the write lock: no save is running)."""
        if self.index_path is None or self.read_only:
            return
        directory, name = os.path.split(os.path.abspath(self.index_path))
        try:
            for entry in os.scandir(directory):
                if entry.name.startswith(f".{name}.") and entry.name.endswith(".tmp"):
                    os.unlink(entry.path)
        except OSError as exc:
            log.warning("could not remove stale index temp files in %s: %s", directory, exc)

    def _open_index(self) -> None:
        cache = self._cache
        self._remove_stale_temp_files()
        if cache.dim is None or self.index_path is None or not os.path.exists(self.index_path):
            self._rebuild_index()
            return
        from ..index import VectorIndex

        try:
            # a file without a graph gets one from the first search that needs it, not here
            index, gen = VectorIndex.load(self.index_path, dim=cache.dim, build_graph=False)
        except IndexCacheError as exc:
            log.warning("vector index cache unusable, rebuilding from the database: %s", exc)
            self._rebuild_index()
            return
        p = self._index_params
        if gen > self._generation or index.M != p["M"] or index.ef_construction != p["ef_construction"]:
            self._rebuild_index()
            return
        index.hnsw_threshold = p["hnsw_threshold"]
        index.ef_search = p["ef_search"]
        changed: list[str] = []
        if gen < self._generation:
            changed = [r[0] for r in self._con.execute(
                "SELECT DISTINCT entity_id FROM history WHERE generation > ? ORDER BY entity_id", [gen]).fetchall()]
        if not cache.adopt_index(index, changed):
            log.warning("vector index cache disagrees with the database, rebuilding it")
            self._rebuild_index()
            return
        self.index_load_status = "loaded" if gen == self._generation else "caught_up"
        self._index_dirty = gen != self._generation

    def _rebuild_index(self) -> None:
        self._cache.rebuild_index()
        self.index_load_status = "rebuilt"
        if not self.read_only and self.index_path is not None and self._cache.dim is not None:
            self._save_index_quietly()

    # --- plumbing ------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:  # type: ignore[override]
        return self._cache.dim

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"the DuckDB store {self.path!r} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise StorageError(f"the DuckDB store {self.path!r} was opened read_only; writes are refused")

    @contextmanager
    def _reading(self, op: str) -> Iterator[None]:
        with self._lock:
            self._check_open()
            try:
                yield
            except duckdb.Error as exc:
                raise StorageError(f"{op}() failed: {exc}") from exc

    def _begin_tx(self) -> None:
        self._con.execute("BEGIN TRANSACTION")
        self._cache.begin()
        self._pending_gen = self._generation + 1
        self._seq_undo = {}
        self._dim_before = self._dim_stored

    def _rollback_tx(self) -> None:
        try:
            self._con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # a failed COMMIT has already ended the transaction
        try:
            self._cache.rollback()
        except Exception:  # noqa: BLE001 - the cache is rebuilt from the source of truth
            log.exception("cache rollback failed; reloading it from the database")
            self._cache = EntityCache(dim=self._dim_before, index_factory=self._new_index)
            self._load_cache()
            self._cache.rebuild_index()
        for eid, old in self._seq_undo.items():
            if old is None:
                self._seq.pop(eid, None)
            else:
                self._seq[eid] = old
        self._seq_undo = {}
        self._dim_stored = self._dim_before

    def _commit_tx(self, wrote: bool) -> None:
        try:
            if wrote:
                self._con.execute("UPDATE umi_state SET generation = ? WHERE id = 1", [self._pending_gen])
            self._con.execute("COMMIT")
        except BaseException as exc:
            self._rollback_tx()
            if isinstance(exc, duckdb.Error):
                raise StorageError(f"commit failed and was rolled back: {exc}") from exc
            raise
        self._cache.commit()
        self._seq_undo = {}
        if wrote:
            self._generation = self._pending_gen
            self._commits_since_save += 1
            self._index_dirty = True
        if self.save_index_every is not None and self._commits_since_save >= self.save_index_every:
            self._save_index_quietly()

    def _next_seq(self, eid: str) -> int:
        old = self._seq.get(eid)
        if eid not in self._seq_undo:
            self._seq_undo[eid] = old
        seq = (old or 0) + 1
        self._seq[eid] = seq
        return seq

    def _history_rows(self, recs: list[tuple[str, str, int, dict[str, Any]]]) -> None:
        if recs:
            seqs = [self._next_seq(r[0]) for r in recs]
            insert_arrow(self._con, "history", history_table(recs, seqs, self._pending_gen))

    # --- entities --------------------------------------------------------------------
    def upsert(self, entities: Sequence[Entity]) -> None:
        with self._lock:
            self._check_writable()
            ents, dim = check_entities(entities, self._cache.dim)
            if not ents:
                return
            terms = [document_terms(e.name, e.content) for e in ents]
            with self._writing("upsert"):
                if dim is not None and self._dim_stored is None:
                    add_embedding_column(self._con, dim)
                self._write_entities(ents, terms, dim)
                fresh = self._cache.put_many(ents, terms)
                self._history_rows([(e.id, "create" if new else "update", e.updated_at, snapshot_of(e))
                                    for e, new in zip(ents, fresh)])
                if dim is not None and self._dim_stored is None:
                    self._dim_stored = dim

    def _write_entities(self, ents: list[Entity], ents_terms: list[tuple[dict[str, int], int]],
                        dim: int | None) -> None:
        last = {e.id: (e, t) for e, t in zip(ents, ents_terms)}  # a repeated id: the last one is stored
        batch = [v[0] for v in last.values()]
        terms = [v[1] for v in last.values()]
        con = self._con
        data = entities_table(batch, terms, self._pending_gen, dim)
        # INSERT OR REPLACE costs ~2.5x a plain INSERT in DuckDB: use it only for ids already stored
        known = np.array([e.id in self._cache for e in batch], bool)
        if not known.any():
            insert_arrow(con, "entities", data)
        elif known.all():
            insert_arrow(con, "entities", data, replace=True)
        else:
            insert_arrow(con, "entities", data.filter(pa.array(~known)))
            insert_arrow(con, "entities", data.filter(pa.array(known)), replace=True)
        if known.any():
            delete_rows_of(con, ("postings", "entity_metadata"), [e.id for e, k in zip(batch, known) if k])
        insert_arrow(con, "postings", postings_table(batch, [t[0] for t in terms]))
        insert_arrow(con, "entity_metadata", metadata_table(batch))

    def delete(self, entity_id: str, at: int | None = None) -> bool:
        eid = check_id(entity_id)
        at = check_time(at, "at", optional=True)
        with self._lock:
            self._check_writable()
            if eid not in self._cache:
                return False
            with self._writing("delete"):
                when = at if at is not None else now_ms()
                con = self._con
                con.execute("DELETE FROM entities WHERE id = ?", [eid])
                con.execute("DELETE FROM postings WHERE entity_id = ?", [eid])
                con.execute("DELETE FROM entity_metadata WHERE entity_id = ?", [eid])
                old = self._cache.remove(eid)
                assert old is not None
                self._history_rows([(eid, "delete", when, snapshot_of(old))])
            return True

    def supersede(self, entity_id: str, valid_to: int) -> bool:
        eid = check_id(entity_id)
        valid_to = check_time(valid_to, "valid_to")  # type: ignore[assignment]
        with self._lock:
            self._check_writable()
            cur = self._cache.peek(eid)
            if cur is None or cur.valid_to is not None:
                return False
            with self._writing("supersede"):
                new = self._cache.set_valid_to(eid, valid_to)
                assert new is not None
                self._con.execute(
                    "UPDATE entities SET valid_to = ?, updated_at = ?, updated_generation = ? WHERE id = ?",
                    [valid_to, new.updated_at, self._pending_gen, eid])
                self._history_rows([(eid, "supersede", valid_to, snapshot_of(new))])
            return True

    def list(self, filters: SearchFilters | None = None, limit: int = 100, offset: int = 0) -> list[Entity]:
        limit, offset = check_limit_offset(limit, offset)
        nf = check_filters(filters)
        where, params = where_sql(nf)
        with self._reading("list"):
            ids = [r[0] for r in self._con.execute(
                f"SELECT e.id FROM entities e WHERE {where} ORDER BY e.created_at, e.id LIMIT ? OFFSET ?",
                [*params, limit, offset]).fetchall()]
            return self._cache.get_many(ids)

    def count(self, filters: SearchFilters | None = None) -> int:
        nf = check_filters(filters)
        where, params = where_sql(nf)
        with self._reading("count"):
            return int(self._con.execute(f"SELECT count(*) FROM entities e WHERE {where}", params).fetchall()[0][0])

    def search_text(self, query: str, k: int, filters: SearchFilters | None = None) -> builtins.list[tuple[str, float]]:
        if self.bm25 == "numba":
            return super().search_text(query, k, filters)
        return self.search_text_sql(query, k, filters)

    def search_text_sql(self, query: str, k: int, filters: SearchFilters | None = None) -> builtins.list[tuple[str, float]]:
        """BM25 scored in DuckDB over the postings table (same formula as the numba kernel)."""
        query = check_query_text(query)
        k = check_k(k)
        nf = check_filters(filters)
        terms = query_terms(query)
        if not terms or nf.empty:
            return []
        where, params = where_sql(nf)
        sql = bm25_sql(where)
        with self._reading("search_text"):
            rows = self._con.execute(sql, [terms, BM25_K1, BM25_K1, BM25_B, BM25_B, *params, k]).fetchall()
        return [(str(i), float(s)) for i, s in rows]

    # --- sources ---------------------------------------------------------------------
    def add_source(self, source: Source) -> None:
        src = check_source(source)
        with self._writing("add_source"):
            self._con.execute(
                "INSERT INTO sources VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                [src.id, src.text_hash, src.text, src.created_at, dumps(dict(src.metadata))])

    @staticmethod
    def _source(row: Any) -> Source | None:
        if row is None:
            return None
        return Source(str(row[0]), str(row[1]), str(row[2]), int(row[3]), json.loads(row[4]))

    def get_source(self, source_id: str) -> Source | None:
        sid = check_id(source_id, "source_id")
        with self._reading("get_source"):
            rows = self._con.execute(
                "SELECT id, text_hash, text, created_at, metadata FROM sources WHERE id = ?", [sid]).fetchall()
            return self._source(rows[0] if rows else None)

    def find_source_by_hash(self, text_hash: str) -> Source | None:
        if not isinstance(text_hash, str):
            raise TypeError(f"text_hash must be str, not {type(text_hash).__name__}")
        with self._reading("find_source_by_hash"):
            rows = self._con.execute(
                "SELECT id, text_hash, text, created_at, metadata FROM sources WHERE text_hash = ? "
                "ORDER BY created_at, id LIMIT 1", [text_hash]).fetchall()
            return self._source(rows[0] if rows else None)

    # --- evolution -------------------------------------------------------------------
    def add_relations(self, relations: Sequence[EvolutionRelation]) -> None:
        rels = check_relations(relations)
        if not rels:
            return
        with self._lock:
            self._check_writable()
            for r in rels:
                for end in (r.source_id, r.target_id):
                    if end not in self._cache:
                        raise ValidationError(f"relation {r.id} refers to entity {end}, which is not stored")
            last = list({r.id: r for r in rels}.values())
            with self._writing("add_relations"):
                insert_arrow(self._con, "relations", relations_table(last), replace=True)

    def relations_for(self, entity_id: str) -> builtins.list[EvolutionRelation]:
        eid = check_id(entity_id)
        with self._reading("relations_for"):
            rows = self._con.execute(
                "SELECT id, source_id, target_id, evolution_type, reason, confidence, created_at FROM relations "
                "WHERE source_id = ? OR target_id = ? ORDER BY created_at, id", [eid, eid]).fetchall()
        return [EvolutionRelation(source_id=r[1], target_id=r[2], evolution_type=r[3], reason=r[4],
                                  confidence=r[5], id=r[0], created_at=r[6]) for r in rows]

    def history(self, entity_id: str) -> builtins.list[HistoryRecord]:
        eid = check_id(entity_id)
        with self._reading("history"):
            rows = self._con.execute(
                "SELECT entity_id, seq, op, at_ms, snapshot FROM history WHERE entity_id = ? ORDER BY seq",
                [eid]).fetchall()
        return [HistoryRecord(r[0], int(r[1]), r[2], int(r[3]), json.loads(r[4])) for r in rows]

    # --- lifecycle -------------------------------------------------------------------
    def save_index(self) -> bool:
        """Save the vector index cache now (it reflects the committed state). False when there
        is nothing to save (in memory, read_only, no vectors yet)."""
        with self._lock:
            self._check_open()
            if self._depth:
                raise StorageError("save_index() inside a transaction: the index would not match a commit")
            if self.read_only or self.index_path is None or self._cache.index is None:
                return False
            self._cache.index.save(self.index_path, self._generation)
            self._commits_since_save = 0
            self._index_dirty = False
            return True

    def _save_index_quietly(self) -> None:
        try:
            if self.index_path is not None and self._cache.index is not None and not self.read_only:
                self._cache.index.save(self.index_path, self._generation)
                self._commits_since_save = 0
                self._index_dirty = False
        except (IndexCacheError, OSError) as exc:
            log.warning("could not save the vector index cache (it will be rebuilt on open): %s", exc)

    def checkpoint(self) -> None:
        """Write DuckDB's WAL into the database file and save the index cache."""
        with self._lock:
            self._check_writable()
            if self._depth:
                raise StorageError("checkpoint() inside a transaction")
            try:
                self._con.execute("CHECKPOINT")
            except duckdb.Error as exc:
                raise StorageError(f"checkpoint failed: {exc}") from exc
            self._save_index_quietly()

    def build_vector_index(self) -> bool:
        """Build the HNSW graph now, waiting for it (searches build it on a thread when first
        needed, serving exact results meanwhile). False when the store is below ``hnsw_threshold``."""
        with self._lock:
            index = self._cache.index
        if index is None or len(index) < index.hnsw_threshold:
            return False
        index.build_graph()
        return True

    def close(self) -> None:
        """Roll back an open transaction, save the index cache, close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._depth:
                    self._finish(commit=False)
                if self._index_dirty:
                    self._save_index_quietly()
            finally:
                self._closed = True
                try:
                    self._con.close()
                except duckdb.Error as exc:
                    log.warning("closing %s: %s", self.path, exc)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"entities={len(self._cache)}, generation={self._generation}"
        return f"DuckDBStorageBackend({self.path!r}, dim={self.dim}, {state})"
