"""Bulk reads and writes of the DuckDB backend.

Writes gather the rows of each DuckDB table column by column (:class:`Rows`) and insert them
in one statement: a few rows as list parameters, more as ``INSERT ... SELECT`` from an Arrow
table (DuckDB's bulk path, ~25x faster than ``executemany``). The cache load reads every
table it needs in one query each, through Arrow, and turns the columns into numpy arrays
without a per-row Python loop, except where Python objects are the result (ids, names).
"""

from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

from .._index_file import fsync_file
from ..errors import StorageError
from ..types import CoreBlockRecord, CoreHistoryRecord, Entity, EntityType, EvolutionRelation, Scope, normalize_name
from ._common import core_key, dumps, make_entity, meta_key, relation_from_row, source_from_row, stored_scope
from ._duckdb_schema import transaction
from ._overlap import Background
from ._hotcache import TYPE_CODES, LoadedRows, id_order_keys_arrow
from .text import document_terms
from .base import TOMBSTONE_SCOPE, HistoryRecord, Source, tombstone
from ._commit_log import CommitLog, read_log, remove_log
from ._sidecars import DATABASE_FILES, LOG_SUFFIX
from .cached import ChangeSet, DurableStore, Loaded, Orphans

__all__ = [
    "Rows",
    "insert_rows",
    "delete_rows_of",
    "entities_rows",
    "postings_rows",
    "metadata_rows",
    "history_rows",
    "sources_rows",
    "relations_rows",
    "load_rows",
    "load_postings",
    "load_metadata",
    "metadata_counts",
    "fetch_vectors",
    "DuckDBDurable",
]

_TYPES = {t.value: t for t in EntityType}
#: rows per block of Python values made on demand by the cache load's ``materialise``
_BLOCK_ROWS = 512
_I64_MAX = np.iinfo(np.int64).max


# --- writes ---------------------------------------------------------------------------------


#: Batches up to this many rows go in as one parameterised statement; larger ones through Arrow.
SMALL_BATCH_ROWS = 32
#: up to this many rows (and with a vector column) that statement is a VALUES list, else unnest
VALUES_ROWS_MAX = 4

_ARROW_TYPES = {"VARCHAR": pa.string(), "INTEGER": pa.int32(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(),
                "BLOB": pa.binary()}


class Rows:
    """Rows of one table, column by column: name -> (DuckDB type, values). Values are a list,
    except for a vector column (type ``FLOAT[d]``): a float32 matrix and a has-vector mask.
    Plain lists, not Arrow: a remember() writes one or a few rows, where building Arrow arrays
    costs more than the insert; :meth:`arrow` builds them for bulk batches."""

    __slots__ = ("n", "columns")

    def __init__(self, n: int, columns: dict[str, tuple[str, Any]]) -> None:
        self.n = n
        self.columns = columns

    def arrow(self) -> pa.Table:
        out: dict[str, pa.Array] = {}
        for name, (sql, values) in self.columns.items():
            if sql in _ARROW_TYPES:
                out[name] = pa.array(values, _ARROW_TYPES[sql])
            else:
                mat, has = values
                flat = pa.array(mat.reshape(-1), pa.float32())
                out[name] = pa.FixedSizeListArray.from_arrays(flat, mat.shape[1], mask=pa.array(~has))
        return pa.table(out)


def insert_rows(con: Any, table: str, rows: Rows, *, replace: bool = False) -> None:
    """``INSERT [OR REPLACE] INTO table (columns) ...``: one statement, whatever the size.

    ``replace`` only for rows that may already be stored: any ``ON CONFLICT`` clause (``OR
    REPLACE`` is one) costs DuckDB ~5x a plain insert of a row."""
    n = rows.n
    if n == 0:
        return
    names = ", ".join(rows.columns)
    verb = "INSERT OR REPLACE INTO" if replace else "INSERT INTO"
    if n > SMALL_BATCH_ROWS:
        name = f"_umi_batch_{table}"
        con.register(name, rows.arrow())
        try:
            con.execute(f"{verb} {table} ({names}) SELECT {names} FROM {name}")
        finally:
            con.unregister(name)
        return
    # Registering an Arrow table costs ~2 ms, an executemany a statement per row; one remember()
    # writes a few rows into each of four tables. A few rows go as parameters of one statement:
    # a VALUES row per row (cheapest for a row or two; the only form for a vector column, as
    # unnesting FLOAT[d][] costs more), else each column as one list parameter, unnested.
    types = [sql for sql, _ in rows.columns.values()]
    if n > VALUES_ROWS_MAX and all(t in _ARROW_TYPES for t in types):
        sel = ", ".join(f"unnest(?::{t}[])" for t in types)
        con.execute(f"{verb} {table} ({names}) SELECT {sel}", [v for _, v in rows.columns.values()])
        return
    cols = []
    for sql, values in rows.columns.values():
        if sql in _ARROW_TYPES:
            cols.append(values)
        else:
            mat, has = values
            cols.append([mat[i].tolist() if has[i] else None for i in range(n)])
    row = "(" + ", ".join("?" for _ in cols) + ")"
    con.execute(f"{verb} {table} ({names}) VALUES {', '.join([row] * n)}", [v for r in zip(*cols) for v in r])


def delete_rows_of(con: Any, tables: Sequence[str], entity_ids: list[str], key: str = "entity_id") -> None:
    """Delete the rows whose ``key`` is one of ``entity_ids`` from each of ``tables``: one statement each."""
    for table in tables:
        con.execute(f"DELETE FROM {table} WHERE {key} IN (SELECT unnest(?::VARCHAR[]))", [entity_ids])


_V, _I, _B, _D = "VARCHAR", "INTEGER", "BIGINT", "DOUBLE"


def _scope_columns(scopes: list[Scope]) -> dict[str, tuple[str, list[Any]]]:
    return {"user_id": (_V, [s.user_id for s in scopes]), "agent_id": (_V, [s.agent_id for s in scopes]),
            "session_id": (_V, [s.session_id for s in scopes])}


def entities_rows(batch: list[Entity], terms: list[tuple[dict[str, int], int]], generation: int,
                  dim: int | None) -> Rows:
    cols: dict[str, tuple[str, Any]] = {
        "id": (_V, [e.id for e in batch]),
        "entity_type": (_V, [e.entity_type.value for e in batch]),
        "name": (_V, [e.name for e in batch]),
        "name_norm": (_V, [normalize_name(e.name) for e in batch]),
        "content": (_V, [e.content for e in batch]),
        "metadata": (_V, [dumps(e.metadata) for e in batch]),
        "importance": (_D, [e.importance for e in batch]),
        "confidence": (_D, [e.confidence for e in batch]),
        "created_at": (_B, [e.created_at for e in batch]),
        "updated_at": (_B, [e.updated_at for e in batch]),
        "event_time": (_B, [e.event_time for e in batch]),
        "valid_from": (_B, [e.valid_from for e in batch]),
        "valid_to": (_B, [e.valid_to for e in batch]),
        "source_id": (_V, [e.source_id for e in batch]),
        "doc_len": (_I, [t[1] for t in terms]),
        "updated_generation": (_B, [generation] * len(batch)),
        **_scope_columns([e.scope for e in batch]),
    }
    if dim is not None:
        has = np.array([e.embedding is not None for e in batch], bool)
        mat = np.zeros((len(batch), dim), np.float32)
        for i, e in enumerate(batch):
            if e.embedding is not None:
                mat[i] = e.embedding
        cols["embedding"] = (f"FLOAT[{dim}]", (mat, has))
    return Rows(len(batch), cols)


def passages_rows(batch: list[Entity]) -> Rows:
    """A row per passage vector of the long facts in ``batch``."""
    long = [e for e in batch if e.passage_embeddings is not None]
    mats = [e.passage_embeddings for e in long]
    ids = [e.id for e, m in zip(long, mats) for _ in range(m.shape[0])]  # type: ignore[union-attr]
    seqs = [i for m in mats for i in range(m.shape[0])]  # type: ignore[union-attr]
    mat = np.concatenate(mats) if mats else np.zeros((0, 1), np.float32)  # type: ignore[arg-type]
    return Rows(len(ids), {"entity_id": (_V, ids), "seq": (_I, seqs),
                           "embedding": (f"FLOAT[{mat.shape[1]}]", (mat, np.ones(len(ids), bool)))})


def load_passages(con: Any) -> dict[str, np.ndarray]:
    """Entity id -> its passage vectors (a row per passage, in order)."""
    tbl = con.sql("SELECT entity_id, list(embedding ORDER BY seq) AS vecs FROM passages "
                  "GROUP BY entity_id").to_arrow_table()
    return {eid: np.asarray(vecs, np.float32) for eid, vecs in
            zip(tbl.column("entity_id").to_pylist(), tbl.column("vecs").to_pylist())}


def postings_rows(batch: list[Entity], terms: list[dict[str, int]]) -> Rows:
    p_term: list[str] = []
    p_id: list[str] = []
    p_tf: list[int] = []
    for e, tf in zip(batch, terms):
        p_term.extend(tf)
        p_tf.extend(tf.values())
        p_id.extend([e.id] * len(tf))
    return Rows(len(p_term), {"term": (_V, p_term), "entity_id": (_V, p_id), "tf": (_I, p_tf)})


def metadata_rows(batch: list[Entity]) -> Rows:
    m_id: list[str] = []
    m_key: list[str] = []
    m_type: list[str] = []
    m_text: list[str] = []
    for e in batch:
        for k, v in e.metadata.items():
            vt, vx = meta_key(v)
            m_id.append(e.id)
            m_key.append(k)
            m_type.append(vt)
            m_text.append(vx)
    return Rows(len(m_id), {"entity_id": (_V, m_id), "key": (_V, m_key), "vtype": (_V, m_type), "vtext": (_V, m_text)})


def history_rows(recs: list[HistoryRecord], generation: int) -> Rows:
    return Rows(len(recs), {
        "entity_id": (_V, [r.entity_id for r in recs]),
        "seq": (_I, [r.seq for r in recs]),
        "op": (_V, [r.op for r in recs]),
        "at_ms": (_B, [r.at for r in recs]),
        "snapshot": (_V, [dumps(dict(r.snapshot)) for r in recs]),
        "generation": (_B, [generation] * len(recs)),
        **_scope_columns([r.scope for r in recs]),
    })


def sources_rows(srcs: list[Source]) -> Rows:
    return Rows(len(srcs), {
        "id": (_V, [s.id for s in srcs]),
        "text_hash": (_V, [s.text_hash for s in srcs]),
        "text": (_V, [s.text for s in srcs]),
        "created_at": (_B, [s.created_at for s in srcs]),
        "metadata": (_V, [dumps(dict(s.metadata)) for s in srcs]),
        **_scope_columns([s.scope for s in srcs]),
    })


def relations_rows(rels: list[EvolutionRelation]) -> Rows:
    return Rows(len(rels), {
        "id": (_V, [r.id for r in rels]),
        "source_id": (_V, [r.source_id for r in rels]),
        "target_id": (_V, [r.target_id for r in rels]),
        "evolution_type": (_V, [r.evolution_type.value for r in rels]),
        "reason": (_V, [r.reason for r in rels]),
        "confidence": (_D, [r.confidence for r in rels]),
        "created_at": (_B, [r.created_at for r in rels]),
        **_scope_columns([r.scope for r in rels]),
    })


# --- the cache load -------------------------------------------------------------------------


def load_rows(con: Any, dim: int | None, *, with_vectors: bool = True, with_postings: bool = True,
              with_metadata: bool = True) -> LoadedRows:
    """Everything the entity cache needs.

    Rows are numbered in the order DuckDB returns them (sorting wide rows costs more than the
    rest of the load). The metadata codes are read meanwhile on a second connection (a helper
    thread: DuckDB runs the join without the GIL while this one turns columns into Python
    values), keyed by DuckDB's ``rowid``, which both queries read from the same unchanged table;
    the postings query joins on the row numbering through a registered Arrow table. Entity
    objects are built on first use (``materialise``), and so are
    the vectors when ``with_vectors`` is False (a reopen with a valid vector index cache: the
    vectors are ~90 % of the bytes and search reads the index's copy). Without
    ``with_postings`` the postings are left empty, for the caller to fill
    (:meth:`EntityCache.adopt_postings` from the keyword index cache, or :func:`load_postings`).
    Without ``with_metadata`` the metadata codes are left out too (the keyword index cache
    holds them: :meth:`EntityCache.adopt_metadata`, else :func:`load_metadata`).
    """
    if not with_metadata:
        return _load_rows(con, dim, with_vectors, with_postings, None)
    cur = con.cursor()
    meta_reader = Background(functools.partial(_metadata_groups, cur), "umi-load")
    try:
        return _load_rows(con, dim, with_vectors, with_postings, meta_reader)
    finally:
        meta_reader.join()
        cur.close()


def load_metadata(con: Any, rowids: np.ndarray) -> dict[str, tuple[np.ndarray, dict[tuple[str, str], int]]]:
    """The metadata codes of cache rows whose DuckDB ``rowid`` are ``rowids`` (a load without
    ``with_metadata``, the table unchanged since: see :func:`_metadata_codes`)."""
    return _metadata_codes(_metadata_groups(con), rowids, rowids.shape[0])


def metadata_counts(con: Any) -> dict[str, int]:
    """``meta:<key>`` -> how many stored entities have that metadata key."""
    return {"meta:" + k: int(c) for k, c in con.execute(
        "SELECT key, count(*) FROM entity_metadata GROUP BY key").fetchall()}


def _load_rows(con: Any, dim: int | None, with_vectors: bool, with_postings: bool,
               meta_reader: Background | None) -> LoadedRows:
    vec_col = ", embedding" if dim and with_vectors else ""
    tbl = con.sql(
        "SELECT rowid AS _rowid, id, entity_type, name, name_norm, content, metadata, importance, confidence, "
        "created_at, updated_at, event_time, valid_from, valid_to, source_id, doc_len, user_id, agent_id, "
        f"session_id{vec_col} FROM entities").to_arrow_table()
    n = tbl.num_rows
    if with_postings:
        con.register("_umi_rowmap", pa.table({"id": tbl.column("id"), "rn": pa.array(np.arange(n))}))
        try:
            terms, offsets, prow, ptf = _postings(con)
        finally:
            con.unregister("_umi_rowmap")
    else:
        terms, offsets, prow, ptf = [], np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    ids = tbl.column("id").to_pylist()
    etype = tbl.column("entity_type").combine_chunks().dictionary_encode()
    types = [_TYPES[v] for v in etype.dictionary.to_pylist()]
    lut = np.array([TYPE_CODES[t] for t in types] or [0], np.int8)
    tidx_np = etype.indices.to_numpy(zero_copy_only=False)
    has_vec = np.zeros(n, bool)
    vectors = None
    fetch = None
    if dim and n and with_vectors:
        has_vec, vectors = _vector_matrix(tbl.column("embedding"), dim)
    elif dim and n:
        # the rows without a vector, by a filter DuckDB answers from the validity data alone
        # (``embedding IS NOT NULL`` as a column reads every vector: ~0.25 s at 100k x 384)
        missing = {r[0] for r in con.execute("SELECT id FROM entities WHERE embedding IS NULL").fetchall()}
        has_vec = np.ones(n, bool)
        if missing:
            has_vec = np.fromiter((i not in missing for i in ids), bool, n)
        fetch = functools.partial(fetch_vectors, con, dim)
    fields = tbl.select(["name", "content", "metadata", "importance", "confidence", "created_at", "updated_at",
                         "event_time", "valid_from", "valid_to", "source_id", "user_id", "agent_id", "session_id"])
    # Python values are made per block of rows when a row of it is first needed (making them for
    # every row at open cost ~0.3 s at 100k rows; a recall touches a few dozen)
    blocks: dict[int, list[list[Any]]] = {}

    def materialise(i: int) -> Entity:
        b, j = divmod(i, _BLOCK_ROWS)
        cols = blocks.get(b)
        if cols is None:
            cols = blocks[b] = [c.to_pylist() for c in fields.slice(b * _BLOCK_ROWS, _BLOCK_ROWS).columns]
        name, content, metadata, imp, conf, ca, ua, ev, vf, vt, sid, u, a, sess = (c[j] for c in cols)
        return make_entity({
            "entity_type": types[tidx_np[i]], "name": name, "content": content,
            "metadata": json.loads(metadata), "embedding": None, "importance": imp, "confidence": conf,
            "created_at": ca, "updated_at": ua, "event_time": ev, "valid_from": vf, "valid_to": vt,
            "source_id": sid, "id": ids[i], "score": None, "scope": stored_scope(u, a, sess), "mentions": (),
        })

    ev = tbl.column("event_time")
    rowids = tbl.column("_rowid").to_numpy()
    meta = {} if meta_reader is None else _metadata_codes(meta_reader.result(), rowids, n)  # type: ignore[arg-type]
    for col in ("user_id", "agent_id", "session_id", "source_id"):
        coded = _coded_column(tbl.column(col), n)
        if coded is not None:
            meta[col] = coded
    rows = LoadedRows(
        ids=ids,
        name_norm=tbl.column("name_norm").to_pylist,
        type_codes=lut[tidx_np] if n else np.zeros(0, np.int8),
        created=tbl.column("created_at").to_numpy(),
        has_event=np.asarray(ev.is_valid().to_numpy(zero_copy_only=False), bool),
        event=pc.fill_null(ev, 0).to_numpy(),
        valid_to=pc.fill_null(tbl.column("valid_to"), pa.scalar(_I64_MAX, pa.int64())).to_numpy(),
        doc_len=tbl.column("doc_len").to_numpy().astype(np.float64),
        vectors=vectors, has_vec=has_vec, metadata=meta,
        terms=terms, term_offsets=offsets, posting_rows=prow, posting_tfs=ptf,
        materialise=materialise, fetch_vectors=fetch, id_keys=id_order_keys_arrow(tbl.column("id")),
        row_keys=rowids,
    )
    return rows


def _vector_matrix(column: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(valid per row, float32 (rows, dim)) of a FLOAT[dim] column; null rows hold junk."""
    col = column.combine_chunks()
    n = len(col)
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    flat = col.values.slice(col.offset * dim, n * dim)  # null rows keep their (unused) slots
    return valid, np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)[:n]


def fetch_vectors(con: Any, dim: int, ids: list[str]) -> tuple[list[str], np.ndarray]:
    """The stored vectors of ``ids`` (those that have one): (ids, float32 (n, dim)), any order."""
    with _read_errors("vectors"):
        tbl = _rows_for_ids(con, "SELECT e.id, e.embedding FROM entities e", "e.id", ids)
    if tbl.num_rows == 0:
        return [], np.zeros((0, dim), np.float32)
    valid, mat = _vector_matrix(tbl.column("embedding"), dim)
    got = tbl.column("id").to_pylist()
    if not valid.all():
        got = [i for i, ok in zip(got, valid.tolist()) if ok]
        mat = mat[valid]
    return got, mat


def _coded_column(col: Any, n: int) -> tuple[np.ndarray, dict[Any, int]] | None:
    """int32 codes (0 = null) and value -> code of a string column."""
    enc = col.combine_chunks().dictionary_encode()
    if len(enc.dictionary) == 0:
        return None
    idx = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int32) + 1
    return idx, {v: c + 1 for c, v in enumerate(enc.dictionary.to_pylist())}


#: one metadata key's values: (rowids of the entities that have it, their value codes from 1,
#: (type tag, canonical text) -> code)
_MetaGroup = tuple[np.ndarray, np.ndarray, dict[tuple[str, str], int]]


def _metadata_groups(con: Any) -> dict[str, _MetaGroup]:
    """Every metadata key's values, coded, by entity ``rowid`` (see :func:`_metadata_codes`)."""
    tbl = con.sql("""
        SELECT m.key, m.vtype || chr(31) || m.vtext AS pair, e.rowid AS rid
        FROM entity_metadata m JOIN entities e ON m.entity_id = e.id""").to_arrow_table()
    out: dict[str, _MetaGroup] = {}
    if tbl.num_rows == 0:
        return out
    # grouped by key here, not by an ORDER BY (a sort of every row in DuckDB costs more)
    keys = tbl.column("key").combine_chunks().dictionary_encode()
    kidx = keys.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(kidx, kind="stable")
    bounds = np.searchsorted(kidx[order], np.arange(len(keys.dictionary) + 1))
    pair = tbl.column("pair").combine_chunks()
    rid = tbl.column("rid").to_numpy()
    for k, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):  # (every key has rows)
        take = order[a:b]
        enc = pair.take(pa.array(take)).dictionary_encode()
        vals = {tuple(v.split("\x1f", 1)): c + 1 for c, v in enumerate(enc.dictionary.to_pylist())}
        out["meta:" + keys.dictionary[k].as_py()] = (rid[take], enc.indices.to_numpy(zero_copy_only=False) + 1, vals)
    return out


def _metadata_codes(groups: dict[str, _MetaGroup], rowids: np.ndarray,
                    n: int) -> dict[str, tuple[np.ndarray, dict[tuple[str, str], int]]]:
    """Per metadata key: (int32 value code per cache row, 0 = absent; value -> code), from
    :func:`_metadata_groups` and the ``rowid`` of each cache row."""
    out: dict[str, tuple[np.ndarray, dict[tuple[str, str], int]]] = {}
    if not groups:
        return out
    order = None if n < 2 or bool(np.all(rowids[1:] > rowids[:-1])) else np.argsort(rowids)
    ranked = rowids if order is None else rowids[order]
    for key, (rid, codes_of, vals) in groups.items():
        pos = np.searchsorted(ranked, rid)
        if pos.shape[0] and (int(pos.max()) >= n or not np.array_equal(ranked[pos], rid)):
            raise StorageError("entity metadata changed while the store was loading")
        codes = np.zeros(n, np.int32)
        codes[pos if order is None else order[pos]] = codes_of
        out[key] = (codes, vals)
    return out


def load_postings(con: Any, row_ids: Sequence[str | None]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Every posting in the database as CSR over the cache rows of ``row_ids`` (None: a dead row)."""
    live = [(i, r) for r, i in enumerate(row_ids) if i is not None]
    con.register("_umi_rowmap", pa.table({"id": pa.array([i for i, _ in live], pa.string()),
                                          "rn": pa.array([r for _, r in live], pa.int64())}))
    try:
        return _postings(con)
    finally:
        con.unregister("_umi_rowmap")


def _postings(con: Any) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    tbl = con.sql("""
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


def copy_database(con: Any, path: str) -> None:
    """Every table of ``con``'s database, checkpointed first, copied into a new DuckDB file at
    ``path`` (schema, indexes and rows; deleted rows and freed blocks left behind), checkpointed
    and synced to disk."""
    remove_database_files(path)
    name = con.execute("SELECT current_database()").fetchall()[0][0]
    con.execute("CHECKPOINT")
    con.execute(f"ATTACH {_sql_text(path)} AS umi_compact")
    try:
        con.execute(f"COPY FROM DATABASE {_sql_ident(name)} TO umi_compact")
        con.execute("CHECKPOINT umi_compact")
    finally:
        con.execute("DETACH umi_compact")
    fsync_file(Path(path))


def remove_database_files(path: str) -> None:
    """``path`` and the files that go with it (its write-ahead log, its commit log), if they exist."""
    for p in (path, *(path + suffix for suffix in DATABASE_FILES)):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


# --- the journal ---------------------------------------------------------------------------
#
# A commit that only inserts rows (a remember of new facts) is journaled: its rows, every table's
# (history included), are one entry (JSON text and float32 vector bytes, :func:`journal_entry`),
# appended to the commit log beside the database file and synced (:mod:`._commit_log`) — no
# DuckDB statement at all (a DuckDB transaction of one row costs ~1-1.5 ms of CPU before its
# sync; the append ~0.2 ms). The entries wait in memory; :meth:`DuckDBDurable.materialise` moves
# them into the tables in one transaction (one INSERT per table for all of them,
# :func:`move_in`) and removes the log; the durable store runs it before anything reads the
# tables (see :attr:`DuckDBDurable.con`) and before any commit that is not journaled. An opening
# store moves in what a crash left in the log (:func:`replay_log`). umi before the log kept the
# journal in the ``history`` table of the file (schema 5, :func:`materialise_journal`).

#: the schema version that added the journal columns of ``history`` (:func:`materialise_journal`)
JOURNAL_SCHEMA = 5
#: a commit of at most this many rows (entities, history, sources, relations) may be journaled;
#: a larger one gains nothing (its statements are few per row) and goes to the tables directly
JOURNAL_COMMIT_ROWS_MAX = 32
#: pending entries (or bytes) that make the next commit materialise the journal first
JOURNAL_ENTRIES_MAX = 256
JOURNAL_BYTES_MAX = 8 << 20


def journal_entry(tables: list[tuple[str, Rows]]) -> tuple[str, bytes | None]:
    """The journal row of an insert-only commit: (JSON text of every table's columns, float32
    bytes of its vector columns or None). Raises UnicodeEncodeError for text that is not valid
    UTF-8 (a lone surrogate), which the caller writes directly instead (DuckDB refuses it at once)."""
    out = []
    blobs: list[bytes] = []
    for table, rows in tables:
        if rows.n == 0:
            continue
        cols = []
        for name, (sql, values) in rows.columns.items():
            if sql in _ARROW_TYPES:
                cols.append([name, sql, values])
            else:
                mat, has = values
                cols.append([name, sql, has.tolist()])
                blobs.append(np.ascontiguousarray(mat, np.float32).tobytes())
        out.append([table, rows.n, cols])
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False)
    text.encode("utf-8")  # DuckDB's VARCHAR holds UTF-8 only
    return text, b"".join(blobs) if blobs else None


def _journal_tables(text: str, vectors: bytes | None) -> list[tuple[str, Rows]]:
    """The (table, rows) of one journal row (:func:`journal_entry` read back)."""
    out = []
    at = 0
    for table, n, cols in json.loads(text):
        columns: dict[str, tuple[str, Any]] = {}
        for name, sql, values in cols:
            if sql in _ARROW_TYPES:
                columns[name] = (sql, values)
            else:
                dim = int(sql[sql.index("[") + 1:-1])
                size = n * dim * 4
                assert vectors is not None
                mat = np.frombuffer(vectors, np.float32, n * dim, at).reshape(n, dim)
                at += size
                columns[name] = (sql, (mat, np.array(values, bool)))
        out.append((table, Rows(n, columns)))
    return out


def _concat_rows(parts: list[Rows]) -> Rows:
    """One table's rows of several journal entries (same columns), in order."""
    if len(parts) == 1:
        return parts[0]
    columns: dict[str, tuple[str, Any]] = {}
    for name, (sql, _) in parts[0].columns.items():
        if sql in _ARROW_TYPES:
            columns[name] = (sql, [v for p in parts for v in p.columns[name][1]])
        else:
            columns[name] = (sql, (np.concatenate([p.columns[name][1][0] for p in parts]),
                                   np.concatenate([p.columns[name][1][1] for p in parts])))
    return Rows(sum(p.n for p in parts), columns)


def journal_pending(con: Any) -> tuple[int, int]:
    """(entries, bytes) in the journal."""
    n, size = con.execute("SELECT count(*), coalesce(sum(strlen(journal) + coalesce(octet_length(journal_vectors), 0)), 0) "
                          "FROM history WHERE journal IS NOT NULL").fetchall()[0]
    return int(n), int(size)


#: the tables a journal entry may carry that have a primary key (``id``), and the tables whose
#: rows hang off that key (``entity_id``)
_KEYED_TABLES = {"entities": ("postings", "entity_metadata", "passages"), "sources": (), "relations": ()}


def move_in(con: Any, entries: list[list[tuple[str, Rows]]], *, clear_table: bool = False) -> None:
    """Put journal entries (each a commit's tables, in commit order) into the tables in one
    transaction: one INSERT per table (and column set) for all of them; ``clear_table``: also
    clear the journal columns of a schema-5 file (:func:`materialise_journal`). A crash before
    the COMMIT leaves the tables as they were.

    A journaled commit was acknowledged before its rows met the tables' keys: should one hold a
    key a stored row has (a relation id a caller gave again between other ends, which the cache
    had not read), the journal's row replaces the stored one (the commit's state, which the cache
    already holds) instead of failing — a failure here would fail every read, write and open of
    the file from then on. That path runs only after the plain INSERTs hit a key."""
    import duckdb

    try:
        _apply_journal(con, entries, replace=False, clear_table=clear_table)
    except duckdb.ConstraintException:
        _apply_journal(con, _last_of_each_key(entries), replace=True, clear_table=clear_table)


def materialise_journal(con: Any) -> int:
    """Move the journal a schema-5 file holds in its ``history`` table (written by umi before the
    commit log, left by a crash) into the tables and clear it, in one transaction. Returns how
    many entries were moved."""
    rows = con.execute("SELECT generation, journal, journal_vectors FROM history WHERE journal IS NOT NULL "
                       "ORDER BY generation").fetchall()
    if rows:
        move_in(con, [_journal_tables(text, vectors) for _, text, vectors in rows], clear_table=True)
    return len(rows)


def _apply_journal(con: Any, entries: list[list[tuple[str, Rows]]], *, replace: bool, clear_table: bool) -> None:
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[Rows]] = {}
    for entry in entries:
        for table, rows in entry:
            if rows.n:
                key = (table, tuple((name, sql) for name, (sql, _) in rows.columns.items()))
                groups.setdefault(key, []).append(rows)
    with transaction(con):
        if replace:  # the stored rows the journal's keys replace, and the rows hanging off them
            for table, dependents in _KEYED_TABLES.items():
                keys = [k for entry in entries for t, r in entry if t == table for k in r.columns["id"][1]]
                if keys:
                    delete_rows_of(con, dependents, keys)
                    delete_rows_of(con, (table,), keys, key="id")
        for (table, _), parts in groups.items():
            insert_rows(con, table, _concat_rows(parts))
        if clear_table:
            con.execute("UPDATE history SET journal = NULL, journal_vectors = NULL WHERE journal IS NOT NULL")


def _last_of_each_key(entries: list[list[tuple[str, Rows]]]) -> list[list[tuple[str, Rows]]]:
    """``entries`` with each keyed row (and, for an entity, its postings and metadata) kept only
    in the last entry that holds its key."""
    last: dict[tuple[str, str], int] = {}
    for n, entry in enumerate(entries):
        for table, rows in entry:
            if table in _KEYED_TABLES:
                for k in rows.columns["id"][1]:
                    last[(table, k)] = n
    out = []
    for n, entry in enumerate(entries):
        kept = []
        for table, rows in entry:
            if table == "history":  # every record stays: history is appended to, never replaced
                keep = [True] * rows.n
            elif table in _KEYED_TABLES:
                keep = [last[(table, k)] == n for k in rows.columns["id"][1]]
            else:  # postings, entity_metadata: a journal entry carries no other table
                keep = [last.get(("entities", k), n) == n for k in rows.columns["entity_id"][1]]
            kept.append((table, rows if all(keep) else _take_rows(rows, keep)))
        out.append(kept)
    return out


def _take_rows(rows: Rows, keep: list[bool]) -> Rows:
    mask = np.array(keep, bool)
    columns: dict[str, tuple[str, Any]] = {}
    for name, (sql, values) in rows.columns.items():
        if sql in _ARROW_TYPES:
            columns[name] = (sql, [v for v, k in zip(values, keep) if k])
        else:
            columns[name] = (sql, (values[0][mask], values[1][mask]))
    return Rows(int(mask.sum()), columns)


def open_journaled(con: Any, path: str | None, read_only: bool) -> Any:
    """The connection an opening store reads, with every commit of a schema-5 journal (see
    :func:`materialise_journal`) in its tables: ``con`` after moving it in; for a ``read_only``
    file with such a journal (a writer crashed), an in-memory copy of the database, moved in
    there (the file stays as it is)."""
    from ._duckdb_schema import SCHEMA_VERSION, read_version

    # (before a migration: the journal columns came with version 5; a newer file is refused later)
    if not JOURNAL_SCHEMA <= read_version(con) <= SCHEMA_VERSION or journal_pending(con)[0] == 0:
        return con
    if read_only:
        assert path is not None  # an in-memory database is never read_only
        con = _memory_copy(con, path)
    materialise_journal(con)
    return con


def replay_log(con: Any, path: str, read_only: bool, db_uuid: str, stored: int) -> tuple[Any, int]:
    """(the connection an opening store reads, its generation): the commits of the commit log
    beside ``path`` that the tables do not hold yet (a generation above ``stored``, the tables'
    own; see :mod:`._commit_log`) moved in, and the log removed; for a ``read_only`` file, moved
    into an in-memory copy of the database (the files stay as they are).

    Every commit takes the generation after the last one's, and one that is not logged moves the
    log into the tables first: the first commit of a log that the tables lack is the one after
    theirs. One further on was written against a later state of the file than the one here (an
    older copy of the database put back beside the log of a crash): :class:`~umi.StorageError`,
    nothing applied or removed."""
    log_path = path + LOG_SUFFIX
    entries, size = read_log(log_path, db_uuid)
    todo = [(generation, text, vectors) for generation, text, vectors in entries if generation > stored]
    if todo and todo[0][0] != stored + 1:
        raise StorageError(
            f"the commit log {log_path!r} does not follow the database beside it: the database's last "
            f"commit is generation {stored}, but the first commit of the log it lacks is generation "
            f"{todo[0][0]} ({_missing(stored + 1, todo[0][0] - 1)} in neither), so the log was written "
            "against a later state of the file: the database file is older than its log (a backup put "
            "back?). If that backup is meant to win, remove the log or move it away (its commits are "
            "lost) and open again; else put back the database file the log was written for")
    if todo:
        if read_only and not _in_memory(con):  # (not a copy open_journaled made already)
            con = _memory_copy(con, path)
        move_in(con, [_journal_tables(text, vectors) for _, text, vectors in todo])
    if size and not read_only:
        remove_log(log_path)
    return con, todo[-1][0] if todo else stored  # (consecutive from stored + 1)


def _missing(first: int, last: int) -> str:
    return f"commit {first} is" if first == last else f"commits {first}..{last} are"


def _in_memory(con: Any) -> bool:
    """``con`` is a database in memory (not a file; DuckDB names a file's database after its
    stem, so a file ``memory.duckdb`` is named as an in-memory one)."""
    return con.execute("SELECT path IS NULL FROM duckdb_databases() WHERE database_name = current_database()"
                       ).fetchall()[0][0]


def _memory_copy(con: Any, path: str) -> Any:
    """An in-memory copy of the database at ``path`` (``con``, read_only, is closed)."""
    import duckdb

    con.close()
    mem = duckdb.connect(":memory:")
    try:
        mem.execute(f"ATTACH {_sql_text(path)} AS umi_file (READ_ONLY)")
        mem.execute("COPY FROM DATABASE umi_file TO memory")
        mem.execute("DETACH umi_file")
    except BaseException:
        mem.close()
        raise
    return mem


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- the durable store --------------------------------------------------------------------


@contextmanager
def _read_errors(what: str) -> Iterator[None]:
    """A DuckDB failure of an on-demand read (after open) as a :class:`~umi.StorageError`."""
    import duckdb

    try:
        yield
    except duckdb.Error as exc:
        raise StorageError(f"cannot read {what} from DuckDB: {exc}") from exc


def _rows_for_ids(con: Any, select: str, id_column: str, ids: Sequence[str]) -> pa.Table:
    """``select`` (one table, aliased) restricted to ``id_column IN ids``, as Arrow: a
    parameterised ``IN`` for a few ids (the primary key / index lookup), a join with a
    registered Arrow table for many."""
    if len(ids) <= SMALL_BATCH_ROWS:
        marks = ", ".join("?" for _ in ids)
        return con.sql(f"{select} WHERE {id_column} IN ({marks})", params=list(ids)).to_arrow_table()
    con.register("_umi_want_ids", pa.table({"id": pa.array(list(ids), pa.string())}))
    try:
        return con.sql(f"{select} JOIN _umi_want_ids w ON {id_column} = w.id").to_arrow_table()
    finally:
        con.unregister("_umi_want_ids")


def _tuples_for_ids(con: Any, select: str, id_column: str, ids: Sequence[str] | None) -> list[tuple[Any, ...]]:
    """The rows of ``select`` (one table, aliased) with ``id_column`` in ``ids`` (every row when
    ``None``), as tuples. A few ids (the usual on-demand read: one entity's history, one source)
    go through ``execute`` with parameters and ``fetchall``: no relation object, no Arrow table,
    about a third of the time of :func:`_rows_for_ids` for a row or two."""
    if ids is not None and len(ids) <= SMALL_BATCH_ROWS:
        marks = ", ".join("?" for _ in ids)
        return con.execute(f"{select} WHERE {id_column} IN ({marks})", list(ids)).fetchall()
    tbl = con.sql(select).to_arrow_table() if ids is None else _rows_for_ids(con, select, id_column, ids)
    return list(zip(*(c.to_pylist() for c in tbl.columns)))


#: a statement over at least this many rows (written, or ids read) runs with DuckDB's worker
#: threads; a smaller one on the calling thread alone (see :meth:`DuckDBDurable.serial`)
PARALLEL_ROWS_MIN = 1_000


class _Writer:
    """A connection that parses each SQL text once: DuckDB parses a text every time it runs it
    (~0.1 ms of a one-row INSERT here), a parsed statement is bound and run at once. ``base`` is
    the store's connection (``con`` itself, or the one ``con`` is a cursor of)."""

    __slots__ = ("con", "base", "_parsed")
    #: parsed statements kept (a commit's texts vary only with the tables and the row count)
    PARSED_MAX = 256

    def __init__(self, con: Any, base: Any) -> None:
        self.con = con
        self.base = base
        self._parsed: dict[str, Any] = {}

    def execute(self, sql: str, params: Any = None) -> Any:
        stmt = self._parsed.get(sql)
        if stmt is None:
            stmt = self.con.extract_statements(sql)[0]
            if len(self._parsed) < self.PARSED_MAX:
                self._parsed[sql] = stmt
        return self.con.execute(stmt, params)

    def executemany(self, sql: str, params: Any) -> Any:
        return self.con.executemany(sql, params)

    def register(self, name: str, table: Any) -> Any:
        return self.con.register(name, table)

    def unregister(self, name: str) -> Any:
        return self.con.unregister(name)


def _write_keyed(con: Any, table: str, drop: list[str], changes: dict[str, Any], build: Any) -> None:
    """An ``id``-keyed table: the deleted and rewritten rows in one DELETE (``drop``: only ids the
    store may hold), the new states in one plain INSERT."""
    if drop:
        delete_rows_of(con, (table,), drop, key="id")
    put = [v for v in changes.values() if v is not None]
    if put:
        insert_rows(con, table, build(put))


class _EntityWrites:
    """What a change set does to the entity tables: stored rows deleted or rewritten, facts
    written whole (with their terms), validity changes (supersede, revive)."""

    def __init__(self, ch: ChangeSet) -> None:
        gone = [i for i, e in ch.entities.items() if e is None and ch.entity_existed.get(i)]
        self.full: list[Entity] = []
        self.terms: list[tuple[dict[str, int], int]] = []
        self.validity: list[Entity] = []
        for i, e in ch.entities.items():
            if e is None:
                continue
            t = ch.terms.get(i)
            if t is None and ch.entity_existed.get(i):
                self.validity.append(e)  # only valid_to / updated_at changed (supersede, revive)
            else:
                self.full.append(e)
                self.terms.append(t if t is not None else document_terms(e.name, e.content))
        # a stored row that is rewritten is deleted and inserted again (an ON CONFLICT costs more)
        self.rewritten = gone + [e.id for e in self.full if ch.entity_existed.get(e.id)]

    def write(self, con: Any, generation: int, dim: int | None) -> None:
        full, terms, validity = self.full, self.terms, self.validity
        if self.rewritten:
            delete_rows_of(con, ("postings", "entity_metadata", "passages"), self.rewritten)
            delete_rows_of(con, ("entities",), self.rewritten, key="id")
        if full:
            insert_rows(con, "entities", entities_rows(full, terms, generation, dim))
            insert_rows(con, "postings", postings_rows(full, [t[0] for t in terms]))
            insert_rows(con, "entity_metadata", metadata_rows(full))
            if any(e.passage_embeddings is not None for e in full):
                insert_rows(con, "passages", passages_rows(full))
        if validity:
            con.execute("UPDATE entities SET valid_to = t.valid_to, updated_at = t.updated_at, updated_generation = ? "
                        "FROM (SELECT unnest(?::VARCHAR[]) AS id, unnest(?::BIGINT[]) AS valid_to, "
                        "unnest(?::BIGINT[]) AS updated_at) t WHERE entities.id = t.id",
                        [generation, [e.id for e in validity], [e.valid_to for e in validity],
                         [e.updated_at for e in validity]])


class DuckDBDurable(DurableStore):
    """The DuckDB half of :class:`~umi.storage.duckdb.DuckDBStorageBackend`: loads what recall
    and remember read at open (entities, postings, core blocks); history, sources and relations
    are read when the cache first needs them (:meth:`load_history`, :meth:`load_sources`,
    :meth:`load_relations`: indexed lookups); writes one :class:`ChangeSet` per commit in one
    DuckDB transaction."""

    lazy = True

    def __init__(self, con: Any, dim: int | None, log: CommitLog | None = None) -> None:
        self._con = con
        self.dim = dim
        #: where a journaled commit is made durable (None: an in-memory or read_only database)
        self._log = log
        #: the journaled commits not yet in the tables (each its tables' rows), in commit order
        self._pending: list[list[tuple[str, Rows]]] = []
        #: bytes of the journal's entries, not yet in the tables
        self._journal_bytes = 0
        #: table -> the keys of its journaled rows (see :meth:`reading`)
        self._journal_keys: dict[str, set[str]] = {}
        #: read the vectors at open (False: on demand, when a vector index cache holds a copy)
        self.vectors_at_open = True
        #: read the postings and the metadata codes at open (False: the keyword index cache holds them)
        self.postings_at_open = True
        #: the DuckDB rowid of each row of a load without the metadata codes (for load_metadata)
        self.rowids_loaded: np.ndarray | None = None
        self._writers: dict[str, _Writer] = {}
        #: DuckDB's worker threads (``threads``) lent to bulk work once :meth:`serial` was called; 1: never
        self._pool = 1
        #: the worker threads are lent now (a bulk read that materialises the journal first)
        self._lent = False

    @property
    def _journal_n(self) -> int:
        """Entries in the journal, not yet in the tables."""
        return len(self._pending)

    @property
    def journal_full(self) -> bool:
        """The journal holds ``JOURNAL_ENTRIES_MAX`` entries or ``JOURNAL_BYTES_MAX`` bytes: the
        store moves it in after the commit that filled it, on a thread of its own (a move-in of
        256 entries costs ~80-160 ms, which no remember should wait for); a commit that finds it
        still full moves it in first."""
        return self._journal_n >= JOURNAL_ENTRIES_MAX or self._journal_bytes >= JOURNAL_BYTES_MAX

    @property
    def con(self) -> Any:
        """The connection, for anything that reads the tables: the gate every read passes (the
        loads, orphans, the generation checks, a checkpoint, raw SQL), which moves journaled
        commits into the tables first, so a read sees every commit there. A read of some keys of
        one table passes :meth:`reading` instead, which moves them only when the read could miss
        one. Only a journaled commit writes past both (:meth:`_commit_journal`)."""
        if self._journal_n:
            self.materialise()
        return self._con

    @con.setter
    def con(self, con: Any) -> None:
        self._con = con

    def reading(self, table: str, keys: Sequence[str] | None) -> Any:
        """The gate for a read of ``table``'s rows keyed by one of ``keys`` (entities: id;
        sources: id or text hash; relations: an end; history: entity id; None: every row): the
        journal is moved into the tables first when it holds a row of ``table`` with one of those
        keys. A remember that relates its fact to an earlier one reads that fact's relations: it
        moves the journal only when the earlier fact's relations are in it."""
        pending = self._journal_keys.get(table)
        if pending and (keys is None or not pending.isdisjoint(keys)):
            self.materialise()
        return self._con

    def materialise(self) -> None:
        """Move the journaled commits into the tables (:func:`move_in`), then remove the log."""
        if self._pending:
            with self.bulk(self._journal_n * 8):
                move_in(self._con, self._pending)
        self._pending = []
        self._journal_bytes = 0
        self._journal_keys.clear()
        if self._log is not None:
            self._log.empty()

    def serial(self) -> None:
        """From now on, run small statements on the calling thread alone and lend DuckDB's worker
        threads back only around bulk work (:meth:`bulk`: loads, scans, reads and writes of
        ``PARALLEL_ROWS_MIN`` rows or more). DuckDB hands every statement's tasks to its pool (one
        ``threads`` setting per database): a statement of a few rows gains nothing from a worker
        and pays its wake-up, and when the worker takes the task the caller waits until it is
        scheduled — on a busy machine, often a millisecond. A raw-note remember runs six such
        statements (bench_memory, interleaved A/B: ~12 % faster with one thread). ``SET threads``
        costs ~1-2.5 ms each way, nothing beside bulk work."""
        pool = int(self._con.execute("SELECT current_setting('threads')").fetchall()[0][0])
        if pool > 1:
            self._con.execute("SET threads = 1")
            self._pool = pool

    @contextmanager
    def bulk(self, rows: int | None = None) -> Iterator[None]:
        """DuckDB's worker threads for work over ``rows`` rows (None: a load or a scan)."""
        if self._pool <= 1 or self._lent or (rows is not None and rows < PARALLEL_ROWS_MIN):
            yield
            return
        self._con.execute(f"SET threads = {self._pool}")
        self._lent = True
        try:
            yield
        finally:
            self._lent = False
            self._con.execute("SET threads = 1")

    def _fetch_vectors(self, dim: int, ids: list[str]) -> tuple[list[str], np.ndarray]:
        with self.bulk(len(ids)):
            return fetch_vectors(self.reading("entities", ids), dim, ids)

    def load(self, dim: int | None) -> Loaded:
        with self.bulk():
            return self._load(dim)

    def stream_vectors(self, batch: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """Every stored vector, ``batch`` rows at a time: (ids, float32 (n, dim)), read on a cursor
        of its own, so a thread can read them beside the store's reads and writes (one snapshot:
        the caller keeps a row only while nothing has written it since the open). Only the rows a
        lazy open left unread are asked for: those are in the tables (an open moves the journal
        there first), so the journal is not consulted."""
        dim = self.dim
        assert dim is not None
        cur = self._con.cursor()
        try:
            with _read_errors("vectors"):
                reader = cur.sql("SELECT id, embedding FROM entities WHERE embedding IS NOT NULL"
                                 ).to_arrow_reader(batch)
            for rb in reader:
                _, mat = _vector_matrix(pa.chunked_array([rb.column(1)]), dim)
                yield rb.column(0).to_pylist(), mat
        finally:
            cur.close()

    def _load(self, dim: int | None) -> Loaded:
        con = self.con
        rows = load_rows(con, dim, with_vectors=self.vectors_at_open, with_postings=self.postings_at_open,
                         with_metadata=self.postings_at_open)
        self.rowids_loaded = None if self.postings_at_open else rows.row_keys
        if rows.fetch_vectors is not None and dim is not None:  # vectors read on demand: a bulk read lends the pool
            rows.fetch_vectors = functools.partial(self._fetch_vectors, dim)
        cb = con.execute("SELECT user_id, agent_id, name, content, importance, position FROM core_blocks "
                         "ORDER BY user_id NULLS FIRST, agent_id NULLS FIRST, position").fetchall()
        core_blocks = [(stored_scope(u, a, None), CoreBlockRecord(n, c, float(imp), int(pos))) for u, a, n, c, imp, pos in cb]
        ch = con.execute("SELECT user_id, agent_id, seq, name, op, at_ms, content, importance FROM core_history "
                         "ORDER BY user_id NULLS FIRST, agent_id NULLS FIRST, seq").fetchall()
        core_history = [CoreHistoryRecord(stored_scope(u, a, None), n, int(sq), op, int(at), c,
                                          None if imp is None else float(imp)) for u, a, sq, n, op, at, c, imp in ch]
        meta = dict(con.execute("SELECT key, value FROM umi_meta").fetchall())
        return Loaded(dim=dim, rows=rows,
                      core_blocks=core_blocks, core_history=core_history, meta=meta,
                      passages=load_passages(con) if dim else {})

    def load_history(self, entity_ids: Sequence[str] | None) -> list[tuple[str, int, str, int, Any, Scope]]:
        select = "SELECT h.entity_id, h.seq, h.op, h.at_ms, h.snapshot, h.user_id, h.agent_id, h.session_id FROM history h"
        with _read_errors("history"), self.bulk(None if entity_ids is None else len(entity_ids)):
            rows = _tuples_for_ids(self.reading("history", entity_ids), select, "h.entity_id", entity_ids)
        return [(e, s, op, at, snap, stored_scope(u, a, sess)) for e, s, op, at, snap, u, a, sess in rows]

    def load_sources(self, ids: Sequence[str] | None = None, hashes: Sequence[str] | None = None) -> list[Source]:
        select = "SELECT s.id, s.text_hash, s.text, s.created_at, s.metadata, s.user_id, s.agent_id, s.session_id FROM sources s"
        with _read_errors("sources"), self.bulk(None if ids is None and hashes is None
                                                 else len(ids or ()) + len(hashes or ())):
            con = self.reading("sources", None if ids is None and hashes is None else [*(ids or ()), *(hashes or ())])
            if ids is None and hashes is None:
                parts = [_tuples_for_ids(con, select, "s.id", None)]
            else:
                parts = [_tuples_for_ids(con, select, col, want)
                         for col, want in (("s.id", ids), ("s.text_hash", hashes)) if want]
        return list({r[0]: source_from_row(r) for rows in parts for r in rows}.values())

    def load_relations(self, entity_ids: Sequence[str] | None) -> list[EvolutionRelation]:
        select = ("SELECT r.id, r.source_id, r.target_id, r.evolution_type, r.reason, r.confidence, r.created_at, "
                  "r.user_id, r.agent_id, r.session_id FROM relations r")
        with _read_errors("relations"), self.bulk(None if entity_ids is None else len(entity_ids)):
            con = self.reading("relations", entity_ids)
            if entity_ids is None:
                parts = [_tuples_for_ids(con, select, "r.id", None)]
            else:
                parts = [_tuples_for_ids(con, select, col, entity_ids) for col in ("r.source_id", "r.target_id")]
        return list({r[0]: relation_from_row(r) for rows in parts for r in rows}.values())

    def load_lone_sources(self, scope: Scope | None) -> list[Source]:
        parts = {} if scope is None else {c: v for c, v in scope.to_dict().items() if v is not None}
        select = ("SELECT s.id, s.text_hash, s.text, s.created_at, s.metadata, s.user_id, s.agent_id, s.session_id "
                  "FROM sources s WHERE NOT EXISTS (SELECT 1 FROM entities e WHERE e.source_id = s.id)"
                  + "".join(f" AND s.{c} = ?" for c in parts))
        with _read_errors("sources"), self.bulk():
            return [source_from_row(r) for r in self.con.execute(select, list(parts.values())).fetchall()]

    def load_orphans(self) -> Orphans:
        with _read_errors("orphan keys"), self.bulk():
            hist = self.con.execute("SELECT DISTINCT h.entity_id FROM history h "
                                    "WHERE NOT EXISTS (SELECT 1 FROM entities e WHERE e.id = h.entity_id)").fetchall()
            srcs = self.con.execute("SELECT s.id FROM sources s "
                                    "WHERE NOT EXISTS (SELECT 1 FROM entities e WHERE e.source_id = s.id)").fetchall()
        return Orphans(frozenset(r[0] for r in hist), frozenset(r[0] for r in srcs))

    def commit(self, ch: ChangeSet, generation: int) -> None:
        """One DuckDB transaction. A small commit that only inserts rows (a remember of new facts)
        is one statement, its history rows carrying the rest (:meth:`_commit_journal`: the
        journal section above; a raw note's remember: ~1.4-1.8x a one-row insert transaction,
        was ~2.8x with a statement per table); any other commit first moves the journal into the
        tables, then writes one statement per table touched. The generation rides on the rows
        that carry one (history, entities); ``umi_state`` is written only by a commit with
        neither (see ``stored_generation``).

        A commit that only inserts rows runs on a second connection to the same database with
        DuckDB's optimizer off: an INSERT of a few rows has nothing to optimise, and the passes
        cost ~0.15 ms a statement here. A commit that deletes or updates rows by key keeps the
        optimizer, which turns those into index lookups and small joins."""
        ents = _EntityWrites(ch)
        drops = {table: [i for i in changes if existed.get(i, True)]
                 for table, changes, existed in (("sources", ch.sources, ch.source_existed),
                                                 ("relations", ch.relations, ch.relation_existed))}
        by_key = bool(ents.rewritten or ents.validity or ch.tombstoned or any(drops.values()))
        rows = (len(ch.entities) + len(ch.history) + len(ch.tombstoned) + len(ch.sources) + len(ch.relations)
                + len(ch.core_history) + sum(len(b) for b in ch.core.values()))
        if self.journal_full:  # the store moves it in beside its caller (see journal_full); not yet done
            self.materialise()
        if not by_key and self._commit_journal(ch, generation, ents, rows):
            return
        if self._journal_n:
            self.materialise()  # a write by key (or any other) applies to every earlier commit's rows
        import duckdb

        with self.bulk(rows):
            try:
                self._commit(ch, generation, ents, drops, by_key)
            except duckdb.ConstraintException:
                # a key the cache did not know the file held (a relation id given again between other
                # ends: relations are read lazily, per entity): the commit's rows replace the stored
                # ones, as when the journal is moved in (materialise_journal) and as in the Sim store
                every = {table: list(getattr(ch, table)) for table in drops}
                self._commit(ch, generation, ents, every, True)

    def _commit_journal(self, ch: ChangeSet, generation: int, ents: _EntityWrites, rows: int) -> bool:
        """Journal an insert-only commit: its rows as one entry, appended to the commit log and
        synced (see the journal section above); False (nothing written) for a commit the journal
        does not take: one that is large, fixes the dimension, has passage vectors, core blocks,
        metadata or restored history, or writes no history."""
        if (rows > JOURNAL_COMMIT_ROWS_MAX or ch.history_replace or ch.core or ch.core_forgotten
                or ch.core_history or ch.meta or (ch.dim is not None and self.dim is None)
                or not ch.history or any(e.passage_embeddings is not None for e in ents.full)):
            return False
        srcs = [v for v in ch.sources.values() if v is not None]
        rels = [v for v in ch.relations.values() if v is not None]
        hist = history_rows(ch.unique_history(), generation)
        tables = [("history", hist), ("entities", entities_rows(ents.full, ents.terms, generation, self.dim)),
                  ("postings", postings_rows(ents.full, [t[0] for t in ents.terms])),
                  ("entity_metadata", metadata_rows(ents.full)),
                  ("sources", sources_rows(srcs)), ("relations", relations_rows(rels))]
        try:
            text, vectors = journal_entry(tables)
        except UnicodeEncodeError:
            return False
        if self._log is not None:
            self._log.append(generation, text, vectors)
        self._pending.append(tables)
        self._journal_bytes += len(text) + (len(vectors) if vectors else 0)
        keys = self._journal_keys
        keys.setdefault("history", set()).update(hist.columns["entity_id"][1])
        if ents.full:
            keys.setdefault("entities", set()).update(e.id for e in ents.full)
        if srcs:
            keys.setdefault("sources", set()).update(k for s in srcs for k in (s.id, s.text_hash))
        if rels:
            keys.setdefault("relations", set()).update(k for r in rels for k in (r.source_id, r.target_id))
        return True

    def _commit(self, ch: ChangeSet, generation: int, ents: _EntityWrites, drops: dict[str, list[str]],
                by_key: bool) -> None:
        from ._duckdb_schema import add_embedding_column

        con = self._writer(optimise=by_key)
        with transaction(con):
            if ch.dim is not None and self.dim is None:
                add_embedding_column(con, ch.dim)
            dim = self.dim if self.dim is not None else ch.dim
            ents.write(con, generation, dim)
            if ch.tombstoned:
                stones = sorted(ch.tombstoned)
                filed = TOMBSTONE_SCOPE.to_dict()
                con.execute("UPDATE history SET snapshot = t.snapshot, " + ", ".join(f"{c} = ?" for c in filed)
                            + " FROM (SELECT unnest(?::VARCHAR[]) AS id, unnest(?::VARCHAR[]) AS snapshot) t "
                            "WHERE history.entity_id = t.id", [*filed.values(), stones, [dumps(tombstone(i)) for i in stones]])
            if ch.history:
                insert_rows(con, "history", history_rows(ch.unique_history(), generation), replace=ch.history_replace)
            _write_keyed(con, "sources", drops["sources"], ch.sources, sources_rows)
            _write_keyed(con, "relations", drops["relations"], ch.relations, relations_rows)
            for sc in sorted(ch.core_forgotten, key=core_key):
                for table in ("core_blocks", "core_history"):
                    con.execute(f"DELETE FROM {table} WHERE user_id IS NOT DISTINCT FROM ? "
                                "AND agent_id IS NOT DISTINCT FROM ?", [sc.user_id, sc.agent_id])
            for sc, blocks in ch.core.items():
                con.execute("DELETE FROM core_blocks WHERE user_id IS NOT DISTINCT FROM ? "
                            "AND agent_id IS NOT DISTINCT FROM ?", [sc.user_id, sc.agent_id])
                if blocks:
                    con.executemany("INSERT INTO core_blocks VALUES (?, ?, ?, ?, ?, ?)",
                                    [(sc.user_id, sc.agent_id, b.name, b.content, b.importance, b.position)
                                     for b in blocks])
            if ch.core_history:
                con.executemany("INSERT INTO core_history VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                [(r.scope.user_id, r.scope.agent_id, r.seq, r.name, r.op, r.at, r.content,
                                  r.importance) for r in ch.core_history])
            if ch.meta:
                con.executemany("INSERT OR REPLACE INTO umi_meta VALUES (?, ?)", sorted(ch.meta.items()))
            if not ch.history and all(e is None for e in ch.entities.values()):
                con.execute("UPDATE umi_state SET generation = ? WHERE id = 1", [generation])
        if ch.dim is not None and self.dim is None:
            self.dim = ch.dim

    def _writer(self, *, optimise: bool) -> _Writer:
        """The connection a commit writes through (see :meth:`commit`), made on first use."""
        key = "optimised" if optimise else "plain"
        w = self._writers.get(key)
        if w is None or w.base is not self._con:  # (a test may swap the connection)
            if w is not None and not optimise:
                w.con.close()
            if optimise:
                w = _Writer(self._con, self._con)
            else:
                cur = self._con.cursor()
                cur.execute("PRAGMA disable_optimizer")
                w = _Writer(cur, self._con)
            self._writers[key] = w
        return w

    def reconnect(self, con: Any) -> None:
        """Go on with ``con`` (the same file, opened again by a compact) after :meth:`close`."""
        self._writers = {}
        self.con = con
        if self._pool > 1:
            con.execute("SET threads = 1")

    def close(self) -> None:
        """Materialise the journal (a later read_only open then reads the file as it is; should
        this fail, the next open moves in what the log holds) and close the connection."""
        moved = False
        try:
            if self._journal_n:
                self.materialise()
            moved = True
        except Exception as exc:  # noqa: BLE001 - nothing is lost: the journal stays for the next open
            import logging

            logging.getLogger("umi.storage.duckdb").warning(
                "could not move the journal into the tables at close (the next open will): %s", exc)
        finally:
            if self._log is not None:
                self._log.close(remove=moved)
            plain = self._writers.pop("plain", None)
            if plain is not None:
                plain.con.close()
            self._con.close()
