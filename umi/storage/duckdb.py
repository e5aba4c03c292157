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
import pyarrow.compute as pc

from ..errors import (
    IndexCacheError,
    InvalidConfigError,
    SchemaVersionError,
    StorageError,
    StorageLockedError,
    UmiError,
    ValidationError,
)
from ..types import Entity, EntityType, EvolutionRelation, normalize_name, now_ms
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
    make_entity,
    meta_key,
    snapshot_of,
)
from ._duckdb_schema import ENTITY_COLUMNS, SCHEMA_VERSION, add_embedding_column, migrate, read_version, where_sql
from ._hotcache import TYPE_CODES, EntityCache, LoadedRows
from ._reads import CachedReads
from .base import HistoryRecord, SearchFilters, Source, StorageBackend
from .text import BM25_B, BM25_K1, document_terms, query_terms

__all__ = ["DuckDBStorageBackend", "INDEX_SUFFIX"]

log = logging.getLogger("umi.storage.duckdb")

#: the vector index cache lives at ``<database path> + INDEX_SUFFIX``
INDEX_SUFFIX = ".umiidx"

_TYPES = {t.value: t for t in EntityType}


def _make_index(params: dict[str, int], dim: int) -> Any:
    from ..index import VectorIndex

    return VectorIndex(dim, **params)


def _check_pos_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


class DuckDBStorageBackend(CachedReads, StorageBackend):
    """Archival memory in one DuckDB file. Open with :meth:`connect`."""

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
        self.index_path: str | None = None if self.in_memory else spath + INDEX_SUFFIX
        self.save_index_every = save_index_every
        self.bm25 = bm25
        self.index_load_status = "rebuilt"
        self._lock = threading.RLock()
        self._closed = True
        self._depth = 0
        self._wrote = False
        self._rollback_only = False
        self._pending_gen = 0
        self._seq_undo: dict[str, int | None] = {}
        self._commits_since_save = 0
        self._index_dirty = False
        self._dim_before: int | None = None
        self._con = self._open(spath, read_only)
        try:
            self._init_schema(dim)
            self._cache = EntityCache(dim=self._dim_stored, index_factory=self._new_index)
            self._load_cache()
            self._open_index()
        except BaseException:
            self._con.close()
            raise
        self._closed = False

    # --- opening -----------------------------------------------------------------------
    def _open(self, spath: str, read_only: bool) -> Any:
        try:
            if self.in_memory:
                return duckdb.connect(":memory:")
            return duckdb.connect(spath, read_only=read_only)
        except duckdb.IOException as exc:
            msg = str(exc)
            if "lock" in msg.lower():
                raise StorageLockedError(
                    f"the database {spath!r} is locked by another process: {msg}. DuckDB lets one process "
                    "write a file at a time; close it there, or open it read_only=True once no process "
                    "holds it for writing",
                    path=spath,
                ) from exc
            raise StorageError(f"cannot open database {spath!r}: {msg}") from exc
        except duckdb.Error as exc:
            raise StorageError(f"cannot open database {spath!r}: {exc}") from exc

    def _init_schema(self, dim: int | None) -> None:
        con = self._con
        try:
            found = read_version(con)
            if found > SCHEMA_VERSION:
                migrate(con, found, now_ms())  # raises SchemaVersionError
            if found < SCHEMA_VERSION:
                if self.read_only:
                    what = "is not a umi database yet" if found == 0 else f"has schema version {found}"
                    raise SchemaVersionError(
                        f"{self.path!r} {what}; this umi needs version {SCHEMA_VERSION}. Open it once "
                        "without read_only to create or migrate it",
                        found=found, supported=SCHEMA_VERSION,
                    )
                migrate(con, found, now_ms())
            gen, stored_dim, db_uuid = con.execute(
                "SELECT generation, dim, db_uuid FROM umi_state WHERE id = 1").fetchall()[0]
        except UmiError:
            raise
        except duckdb.Error as exc:
            raise StorageError(f"cannot read the schema of {self.path!r}: {exc}") from exc
        self._generation = int(gen)
        self.db_uuid = str(db_uuid)
        if stored_dim is not None and dim is not None and int(stored_dim) != dim:
            raise InvalidConfigError(
                f"{self.path!r} holds {int(stored_dim)}-d vectors but dim={dim} was asked for; "
                "open it with the dimension it was built with"
            )
        if stored_dim is None and dim is not None:
            if self.read_only:
                raise StorageError(f"{self.path!r} has no vector dimension yet and is open read_only; "
                                   f"cannot fix dim={dim}")
            con.execute("BEGIN TRANSACTION")
            try:
                add_embedding_column(con, dim)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            stored_dim = dim
        self._dim_stored = None if stored_dim is None else int(stored_dim)

    @property
    def _new_index(self) -> Callable[[int], Any]:
        # a partial, not a bound method: the cache must not hold the backend (and its connection) in a cycle
        return functools.partial(_make_index, dict(self._index_params))

    def _load_cache(self) -> None:
        """Fill the cache from DuckDB: columns, vectors, metadata codes and postings, all read
        in bulk through Arrow; Entity objects are built on first use."""
        con = self._con
        dim = self._cache.dim
        tbl = con.sql(
            "SELECT id, entity_type, name, name_norm, content, metadata, importance, confidence, created_at, "
            "updated_at, event_time, valid_from, valid_to, source_id, doc_len"
            f"{', embedding' if dim else ''} FROM entities").to_arrow_table()
        n = tbl.num_rows
        # rows are numbered in the order read (sorting wide rows costs more than the rest of the load);
        # the metadata and postings queries join on this numbering
        self._con.register("_umi_rowmap", pa.table({"id": tbl.column("id"), "rn": pa.array(np.arange(n))}))
        try:
            meta = self._load_metadata_codes(n)
            terms, offsets, prow, ptf = self._load_postings()
        finally:
            self._con.unregister("_umi_rowmap")
        ids = tbl.column("id").to_pylist()
        etype = tbl.column("entity_type").combine_chunks().dictionary_encode()
        lut = np.array([TYPE_CODES[_TYPES[v]] for v in etype.dictionary.to_pylist()] or [0], np.int8)
        type_codes = lut[etype.indices.to_numpy(zero_copy_only=False)] if n else np.zeros(0, np.int8)
        ev = tbl.column("event_time")
        vt = tbl.column("valid_to")
        has_vec = np.zeros(n, bool)
        vectors = None
        if dim and n:
            col = tbl.column("embedding").combine_chunks()
            has_vec = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
            flat = col.values if col.offset == 0 else col.flatten()
            vectors = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)[:n]
        lists = {c: tbl.column(c).to_pylist() for c in (
            "name", "content", "metadata", "importance", "confidence", "created_at", "updated_at",
            "event_time", "valid_from", "valid_to", "source_id")}
        types = [_TYPES[v] for v in etype.dictionary.to_pylist()]
        tidx = etype.indices.to_numpy(zero_copy_only=False).tolist() if n else []

        def materialise(i: int) -> Entity:
            return make_entity({
                "entity_type": types[tidx[i]], "name": lists["name"][i], "content": lists["content"][i],
                "metadata": json.loads(lists["metadata"][i]), "embedding": None,
                "importance": lists["importance"][i], "confidence": lists["confidence"][i],
                "created_at": lists["created_at"][i], "updated_at": lists["updated_at"][i],
                "event_time": lists["event_time"][i], "valid_from": lists["valid_from"][i],
                "valid_to": lists["valid_to"][i], "source_id": lists["source_id"][i], "id": ids[i], "score": None,
            })

        self._cache.bulk_load(LoadedRows(
            ids=ids,
            name_norm=tbl.column("name_norm").to_pylist(),
            type_codes=type_codes,
            created=tbl.column("created_at").to_numpy(),
            has_event=np.asarray(ev.is_valid().to_numpy(zero_copy_only=False), bool),
            event=pc.fill_null(ev, 0).to_numpy(),
            valid_to=pc.fill_null(vt, pa.scalar(np.iinfo(np.int64).max, pa.int64())).to_numpy(),
            doc_len=tbl.column("doc_len").to_numpy().astype(np.float64),
            vectors=vectors, has_vec=has_vec, metadata=meta,
            terms=terms, term_offsets=offsets, posting_rows=prow, posting_tfs=ptf,
            materialise=materialise,
        ))
        seq = con.sql("SELECT entity_id, max(seq) AS s FROM history GROUP BY entity_id").to_arrow_table()
        self._seq = dict(zip(seq.column("entity_id").to_pylist(), seq.column("s").to_pylist()))

    def _load_metadata_codes(self, n: int) -> dict[str, tuple[np.ndarray, dict[tuple[str, str], int]]]:
        tbl = self._con.sql("""
            SELECT m.key, m.vtype, m.vtext, r.rn FROM entity_metadata m JOIN _umi_rowmap r ON m.entity_id = r.id
            ORDER BY m.key""").to_arrow_table()
        out: dict[str, tuple[np.ndarray, dict[tuple[str, str], int]]] = {}
        if tbl.num_rows == 0:
            return out
        keys = tbl.column("key").combine_chunks().dictionary_encode()
        kidx = keys.indices.to_numpy(zero_copy_only=False)
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(kidx)) + 1, [kidx.shape[0]]))
        pair = pc.binary_join_element_wise(tbl.column("vtype"), tbl.column("vtext"), "\x1f").combine_chunks()
        rn = tbl.column("rn").to_numpy()
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            enc = pair.slice(a, b - a).dictionary_encode()
            codes = np.zeros(n, np.int32)
            codes[rn[a:b]] = enc.indices.to_numpy(zero_copy_only=False) + 1
            vals = {tuple(v.split("\x1f", 1)): c + 1 for c, v in enumerate(enc.dictionary.to_pylist())}
            out[keys.dictionary[int(kidx[a])].as_py()] = (codes, vals)  # type: ignore[misc]
        return out

    def _load_postings(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        tbl = self._con.sql("""
            SELECT p.term, list(r.rn) AS rows, list(p.tf) AS tfs
            FROM postings p JOIN _umi_rowmap r ON p.entity_id = r.id GROUP BY p.term""").to_arrow_table()
        if tbl.num_rows == 0:
            return [], np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        rows = tbl.column("rows").combine_chunks()
        tfs = tbl.column("tfs").combine_chunks()
        offsets = rows.offsets.to_numpy().astype(np.int64)
        flat_rows = rows.values.to_numpy(zero_copy_only=False).astype(np.int64)
        flat_tfs = tfs.values.to_numpy(zero_copy_only=False).astype(np.float64)
        if int(offsets[0]) != 0:  # a sliced list array: rebase
            flat_rows = flat_rows[offsets[0]:offsets[-1]]
            flat_tfs = flat_tfs[offsets[0]:offsets[-1]]
            offsets = offsets - offsets[0]
        return tbl.column("term").to_pylist(), offsets, flat_rows, flat_tfs

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

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

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

    def _begin(self) -> None:
        self._con.execute("BEGIN TRANSACTION")
        self._cache.begin()
        self._depth = 1
        self._wrote = False
        self._rollback_only = False
        self._pending_gen = self._generation + 1
        self._seq_undo = {}
        self._dim_before = self._dim_stored

    def _rollback(self) -> None:
        try:
            self._con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # a failed COMMIT has already ended the transaction
        try:
            self._cache.rollback()
        except Exception:  # noqa: BLE001 - the cache is rebuilt from the source of truth
            log.exception("cache rollback failed; reloading it from the database")
            self._cache = EntityCache(dim=self._dim_stored, index_factory=self._new_index)
            self._load_cache()
            self._cache.rebuild_index()
        for eid, old in self._seq_undo.items():
            if old is None:
                self._seq.pop(eid, None)
            else:
                self._seq[eid] = old
        self._seq_undo = {}
        self._dim_stored = self._dim_before
        self._depth = 0
        self._wrote = False
        self._rollback_only = False

    def _commit(self) -> None:
        try:
            if self._wrote:
                self._con.execute("UPDATE umi_state SET generation = ? WHERE id = 1", [self._pending_gen])
            self._con.execute("COMMIT")
        except BaseException as exc:
            self._rollback()
            if isinstance(exc, duckdb.Error):
                raise StorageError(f"commit failed and was rolled back: {exc}") from exc
            raise
        self._cache.commit()
        if self._wrote:
            self._generation = self._pending_gen
            self._commits_since_save += 1
            self._index_dirty = True
        self._seq_undo = {}
        self._depth = 0
        self._wrote = False
        if self.save_index_every is not None and self._commits_since_save >= self.save_index_every:
            self._save_index_quietly()

    @contextmanager
    def _writing(self, op: str) -> Iterator[None]:
        with self._lock:
            self._check_writable()
            if self._depth:
                try:
                    yield
                except BaseException:
                    self._rollback_only = True
                    raise
                self._wrote = True
                return
            self._begin()
            try:
                yield
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, UmiError) or not isinstance(exc, Exception):
                    raise
                raise StorageError(f"{op}() failed and was rolled back: {type(exc).__name__}: {exc}") from exc
            self._wrote = True
            self._commit()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together or not at all. Nested use joins the outer one;
        an error anywhere inside rolls the whole transaction back."""
        with self._lock:
            self._check_writable()
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
            self._begin()
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
            self._commit()

    def _next_seq(self, eid: str) -> int:
        old = self._seq.get(eid)
        if eid not in self._seq_undo:
            self._seq_undo[eid] = old
        seq = (old or 0) + 1
        self._seq[eid] = seq
        return seq

    def _insert_arrow(self, table: str, columns: Sequence[str], data: pa.Table, *, replace: bool = False) -> None:
        name = f"_umi_batch_{table}"
        self._con.register(name, data)
        try:
            cols = ", ".join(columns)
            verb = "INSERT OR REPLACE INTO" if replace else "INSERT INTO"
            self._con.execute(f"{verb} {table} ({cols}) SELECT {cols} FROM {name}")
        finally:
            self._con.unregister(name)

    def _history_rows(self, recs: list[tuple[str, str, int, dict[str, Any]]]) -> None:
        if not recs:
            return
        data = pa.table({
            "entity_id": pa.array([r[0] for r in recs], pa.string()),
            "seq": pa.array([self._next_seq(r[0]) for r in recs], pa.int32()),
            "op": pa.array([r[1] for r in recs], pa.string()),
            "at_ms": pa.array([r[2] for r in recs], pa.int64()),
            "snapshot": pa.array([dumps(r[3]) for r in recs], pa.string()),
            "generation": pa.array([self._pending_gen] * len(recs), pa.int64()),
        })
        self._insert_arrow("history", data.column_names, data)

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
        gen = self._pending_gen
        cols: dict[str, pa.Array] = {
            "id": pa.array([e.id for e in batch], pa.string()),
            "entity_type": pa.array([e.entity_type.value for e in batch], pa.string()),
            "name": pa.array([e.name for e in batch], pa.string()),
            "name_norm": pa.array([normalize_name(e.name) for e in batch], pa.string()),
            "content": pa.array([e.content for e in batch], pa.string()),
            "metadata": pa.array([dumps(e.metadata) for e in batch], pa.string()),
            "importance": pa.array([e.importance for e in batch], pa.float64()),
            "confidence": pa.array([e.confidence for e in batch], pa.float64()),
            "created_at": pa.array([e.created_at for e in batch], pa.int64()),
            "updated_at": pa.array([e.updated_at for e in batch], pa.int64()),
            "event_time": pa.array([e.event_time for e in batch], pa.int64()),
            "valid_from": pa.array([e.valid_from for e in batch], pa.int64()),
            "valid_to": pa.array([e.valid_to for e in batch], pa.int64()),
            "source_id": pa.array([e.source_id for e in batch], pa.string()),
        }
        terms = [v[1][0] for v in last.values()]
        doc_lens = [v[1][1] for v in last.values()]
        cols["doc_len"] = pa.array(doc_lens, pa.int32())
        cols["updated_generation"] = pa.array([gen] * len(batch), pa.int64())
        if dim is not None:
            has = np.array([e.embedding is not None for e in batch], bool)
            mat = np.zeros((len(batch), dim), np.float32)
            for i, e in enumerate(batch):
                if e.embedding is not None:
                    mat[i] = e.embedding
            values = pa.array(mat.reshape(-1), pa.float32())
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~has))
        data = pa.table(cols)
        # INSERT OR REPLACE costs ~2.5x a plain INSERT in DuckDB: use it only for ids already stored
        known = np.array([e.id in self._cache for e in batch], bool)
        if not known.any():
            self._insert_arrow("entities", data.column_names, data)
        elif known.all():
            self._insert_arrow("entities", data.column_names, data, replace=True)
        else:
            self._insert_arrow("entities", data.column_names, data.filter(pa.array(~known)))
            self._insert_arrow("entities", data.column_names, data.filter(pa.array(known)), replace=True)
        existing = [e.id for e in batch if e.id in self._cache]
        if existing:
            ids = pa.table({"id": pa.array(existing, pa.string())})
            self._con.register("_umi_batch_ids", ids)
            try:
                self._con.execute("DELETE FROM postings WHERE entity_id IN (SELECT id FROM _umi_batch_ids)")
                self._con.execute("DELETE FROM entity_metadata WHERE entity_id IN (SELECT id FROM _umi_batch_ids)")
            finally:
                self._con.unregister("_umi_batch_ids")
        p_term, p_id, p_tf = [], [], []
        for e, tf in zip(batch, terms):
            for t, n in tf.items():
                p_term.append(t)
                p_id.append(e.id)
                p_tf.append(n)
        if p_term:
            self._insert_arrow("postings", ("term", "entity_id", "tf"), pa.table({
                "term": pa.array(p_term, pa.string()), "entity_id": pa.array(p_id, pa.string()),
                "tf": pa.array(p_tf, pa.int32())}))
        m_id, m_key, m_type, m_text = [], [], [], []
        for e in batch:
            for k, v in e.metadata.items():
                vt, vx = meta_key(v)
                m_id.append(e.id)
                m_key.append(k)
                m_type.append(vt)
                m_text.append(vx)
        if m_id:
            self._insert_arrow("entity_metadata", ("entity_id", "key", "vtype", "vtext"), pa.table({
                "entity_id": pa.array(m_id, pa.string()), "key": pa.array(m_key, pa.string()),
                "vtype": pa.array(m_type, pa.string()), "vtext": pa.array(m_text, pa.string())}))

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

    def search_text(self, query: str, k: int, filters: SearchFilters | None = None) -> list[tuple[str, float]]:
        if self.bm25 == "numba":
            return super().search_text(query, k, filters)
        return self.search_text_sql(query, k, filters)

    def search_text_sql(self, query: str, k: int, filters: SearchFilters | None = None) -> list[tuple[str, float]]:
        """BM25 scored in DuckDB over the postings table (same formula as the numba kernel)."""
        query = check_query_text(query)
        k = check_k(k)
        nf = check_filters(filters)
        terms = query_terms(query)
        if not terms or nf.empty:
            return []
        where, params = where_sql(nf)
        sql = f"""
            WITH q AS (SELECT unnest(?::VARCHAR[]) AS term),
            st AS (SELECT count(*)::DOUBLE AS n, coalesce(avg(doc_len), 0)::DOUBLE AS avgdl FROM entities),
            df AS (SELECT p.term, count(*)::DOUBLE AS df FROM postings p JOIN q ON p.term = q.term
                   GROUP BY p.term)
            SELECT p.entity_id AS id,
                   sum(ln(1 + (st.n - df.df + 0.5) / (df.df + 0.5)) * p.tf * (? + 1)
                       / (p.tf + ? * (1 - ? + ? * e.doc_len / st.avgdl))) AS score
            FROM postings p JOIN df ON p.term = df.term JOIN entities e ON e.id = p.entity_id CROSS JOIN st
            WHERE {where}
            GROUP BY p.entity_id
            ORDER BY score DESC, id
            LIMIT ?"""
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
                self._insert_arrow("relations", (
                    "id", "source_id", "target_id", "evolution_type", "reason", "confidence", "created_at"),
                    pa.table({
                        "id": pa.array([r.id for r in last], pa.string()),
                        "source_id": pa.array([r.source_id for r in last], pa.string()),
                        "target_id": pa.array([r.target_id for r in last], pa.string()),
                        "evolution_type": pa.array([r.evolution_type.value for r in last], pa.string()),
                        "reason": pa.array([r.reason for r in last], pa.string()),
                        "confidence": pa.array([r.confidence for r in last], pa.float64()),
                        "created_at": pa.array([r.created_at for r in last], pa.int64()),
                    }), replace=True)

    def relations_for(self, entity_id: str) -> list[EvolutionRelation]:
        eid = check_id(entity_id)
        with self._reading("relations_for"):
            rows = self._con.execute(
                "SELECT id, source_id, target_id, evolution_type, reason, confidence, created_at FROM relations "
                "WHERE source_id = ? OR target_id = ? ORDER BY created_at, id", [eid, eid]).fetchall()
        return [EvolutionRelation(source_id=r[1], target_id=r[2], evolution_type=r[3], reason=r[4],
                                  confidence=r[5], id=r[0], created_at=r[6]) for r in rows]

    def history(self, entity_id: str) -> list[HistoryRecord]:
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

    def close(self) -> None:
        """Roll back an open transaction, save the index cache, close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._depth:
                    self._rollback()
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
