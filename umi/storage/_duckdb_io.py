"""Bulk reads and writes of the DuckDB backend, through Arrow.

Writes build one Arrow table per DuckDB table and insert it with one
``INSERT ... SELECT`` from the registered table (DuckDB's bulk path, ~25x faster than
``executemany``). The cache load reads every table it needs in one query each and turns
the columns into numpy arrays without a per-row Python loop, except where Python objects
are the result (ids, names).
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

from ..errors import StorageError
from ..types import UNSET_SCOPE, CoreBlockRecord, CoreHistoryRecord, Entity, EntityType, EvolutionRelation, Scope, normalize_name
from ._common import dumps, make_entity, meta_key
from ._hotcache import TYPE_CODES, LoadedRows
from .text import document_terms
from .base import HistoryRecord, Source
from .cached import ChangeSet, DurableStore, Loaded

__all__ = [
    "insert_arrow",
    "delete_rows_of",
    "entities_table",
    "postings_table",
    "metadata_table",
    "history_table",
    "relations_table",
    "load_rows",
    "load_postings",
    "fetch_vectors",
    "DuckDBDurable",
]

_TYPES = {t.value: t for t in EntityType}
#: rows per block of Python values made on demand by the cache load's ``materialise``
_BLOCK_ROWS = 512
_I64_MAX = np.iinfo(np.int64).max


# --- writes ---------------------------------------------------------------------------------


#: Batches up to this many rows go in as parameterised inserts; larger ones through Arrow.
SMALL_BATCH_ROWS = 32


def insert_arrow(con: Any, table: str, data: pa.Table, *, replace: bool = False) -> None:
    """``INSERT [OR REPLACE] INTO table (columns of data) SELECT ... FROM data``."""
    if data.num_rows == 0:
        return
    if data.num_rows <= SMALL_BATCH_ROWS:
        # Registering an Arrow table costs ~2 ms per statement; a parameterised insert of a few
        # rows ~0.3 ms. One remember() writes a handful of rows into five tables.
        cols = data.column_names
        verb = "INSERT OR REPLACE INTO" if replace else "INSERT INTO"
        marks = ", ".join("?" for _ in cols)
        rows = [tuple(r[c] for c in cols) for r in data.to_pylist()]
        con.executemany(f"{verb} {table} ({', '.join(cols)}) VALUES ({marks})", rows)
        return
    name = f"_umi_batch_{table}"
    con.register(name, data)
    try:
        cols = ", ".join(data.column_names)
        verb = "INSERT OR REPLACE INTO" if replace else "INSERT INTO"
        con.execute(f"{verb} {table} ({cols}) SELECT {cols} FROM {name}")
    finally:
        con.unregister(name)


def delete_rows_of(con: Any, tables: Sequence[str], entity_ids: list[str]) -> None:
    """Delete the rows of ``entity_ids`` from each of ``tables`` (keyed by ``entity_id``)."""
    con.register("_umi_batch_ids", pa.table({"id": pa.array(entity_ids, pa.string())}))
    try:
        for table in tables:
            con.execute(f"DELETE FROM {table} WHERE entity_id IN (SELECT id FROM _umi_batch_ids)")
    finally:
        con.unregister("_umi_batch_ids")


def entities_table(batch: list[Entity], terms: list[tuple[dict[str, int], int]], generation: int,
                   dim: int | None) -> pa.Table:
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
        "doc_len": pa.array([t[1] for t in terms], pa.int32()),
        "updated_generation": pa.array([generation] * len(batch), pa.int64()),
        **_scope_columns([e.scope for e in batch]),
    }
    if dim is not None:
        has = np.array([e.embedding is not None for e in batch], bool)
        mat = np.zeros((len(batch), dim), np.float32)
        for i, e in enumerate(batch):
            if e.embedding is not None:
                mat[i] = e.embedding
        values = pa.array(mat.reshape(-1), pa.float32())
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~has))
    return pa.table(cols)


def postings_table(batch: list[Entity], terms: list[dict[str, int]]) -> pa.Table:
    p_term: list[str] = []
    p_id: list[str] = []
    p_tf: list[int] = []
    for e, tf in zip(batch, terms):
        p_term.extend(tf)
        p_tf.extend(tf.values())
        p_id.extend([e.id] * len(tf))
    return pa.table({"term": pa.array(p_term, pa.string()), "entity_id": pa.array(p_id, pa.string()),
                     "tf": pa.array(p_tf, pa.int32())})


def metadata_table(batch: list[Entity]) -> pa.Table:
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
    return pa.table({"entity_id": pa.array(m_id, pa.string()), "key": pa.array(m_key, pa.string()),
                     "vtype": pa.array(m_type, pa.string()), "vtext": pa.array(m_text, pa.string())})


def _scope_columns(scopes: list[Scope], names: tuple[str, ...] = ("user_id", "agent_id", "session_id")
                   ) -> dict[str, pa.Array]:
    return {n: pa.array([getattr(s, n) for s in scopes], pa.string()) for n in names}


def history_table(recs: list[HistoryRecord], generation: int) -> pa.Table:
    return pa.table({
        "entity_id": pa.array([r.entity_id for r in recs], pa.string()),
        "seq": pa.array([r.seq for r in recs], pa.int32()),
        "op": pa.array([r.op for r in recs], pa.string()),
        "at_ms": pa.array([r.at for r in recs], pa.int64()),
        "snapshot": pa.array([dumps(dict(r.snapshot)) for r in recs], pa.string()),
        "generation": pa.array([generation] * len(recs), pa.int64()),
        **_scope_columns([r.scope for r in recs]),
    })


def sources_table(srcs: list[Source]) -> pa.Table:
    return pa.table({
        "id": pa.array([s.id for s in srcs], pa.string()),
        "text_hash": pa.array([s.text_hash for s in srcs], pa.string()),
        "text": pa.array([s.text for s in srcs], pa.string()),
        "created_at": pa.array([s.created_at for s in srcs], pa.int64()),
        "metadata": pa.array([dumps(dict(s.metadata)) for s in srcs], pa.string()),
        **_scope_columns([s.scope for s in srcs]),
    })


def relations_table(rels: list[EvolutionRelation]) -> pa.Table:
    return pa.table({
        "id": pa.array([r.id for r in rels], pa.string()),
        "source_id": pa.array([r.source_id for r in rels], pa.string()),
        "target_id": pa.array([r.target_id for r in rels], pa.string()),
        "evolution_type": pa.array([r.evolution_type.value for r in rels], pa.string()),
        "reason": pa.array([r.reason for r in rels], pa.string()),
        "confidence": pa.array([r.confidence for r in rels], pa.float64()),
        "created_at": pa.array([r.created_at for r in rels], pa.int64()),
        **_scope_columns([r.scope for r in rels]),
    })


# --- the cache load -------------------------------------------------------------------------


def load_rows(con: Any, dim: int | None, *, with_vectors: bool = True, with_postings: bool = True) -> LoadedRows:
    """Everything the entity cache needs.

    Rows are numbered in the order DuckDB returns them (sorting wide rows costs more than the
    rest of the load); the metadata and postings queries join on that numbering through a
    registered Arrow table. Entity objects are built on first use (``materialise``), and so are
    the vectors when ``with_vectors`` is False (a reopen with a valid vector index cache: the
    vectors are ~90 % of the bytes and search reads the index's copy). Without
    ``with_postings`` the postings are left empty, for the caller to fill
    (:meth:`EntityCache.adopt_postings` from the keyword index cache, or :func:`load_postings`).
    """
    vec_col = ""
    if dim:
        vec_col = ", embedding" if with_vectors else ", embedding IS NOT NULL AS has_embedding"
    tbl = con.sql(
        "SELECT id, entity_type, name, name_norm, content, metadata, importance, confidence, created_at, "
        "updated_at, event_time, valid_from, valid_to, source_id, doc_len, user_id, agent_id, session_id"
        f"{vec_col} FROM entities").to_arrow_table()
    n = tbl.num_rows
    con.register("_umi_rowmap", pa.table({"id": tbl.column("id"), "rn": pa.array(np.arange(n))}))
    try:
        meta = _metadata_codes(con, n)
        if with_postings:
            terms, offsets, prow, ptf = _postings(con)
        else:
            terms, offsets, prow, ptf = [], np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    finally:
        con.unregister("_umi_rowmap")
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
        has_vec = np.asarray(tbl.column("has_embedding").to_numpy(), dtype=bool)
        fetch = functools.partial(fetch_vectors, con, dim)
    for col in ("user_id", "agent_id", "session_id", "source_id"):
        coded = _coded_column(tbl.column(col), n)
        if coded is not None:
            meta[col] = coded
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
            "source_id": sid, "id": ids[i], "score": None, "scope": _scope((u, a, sess)), "mentions": (),
        })

    ev = tbl.column("event_time")
    rows = LoadedRows(
        ids=ids,
        name_norm=tbl.column("name_norm").to_pylist(),
        type_codes=lut[tidx_np] if n else np.zeros(0, np.int8),
        created=tbl.column("created_at").to_numpy(),
        has_event=np.asarray(ev.is_valid().to_numpy(zero_copy_only=False), bool),
        event=pc.fill_null(ev, 0).to_numpy(),
        valid_to=pc.fill_null(tbl.column("valid_to"), pa.scalar(_I64_MAX, pa.int64())).to_numpy(),
        doc_len=tbl.column("doc_len").to_numpy().astype(np.float64),
        vectors=vectors, has_vec=has_vec, metadata=meta,
        terms=terms, term_offsets=offsets, posting_rows=prow, posting_tfs=ptf,
        materialise=materialise, fetch_vectors=fetch,
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


_SCOPES: dict[tuple[Any, Any, Any], Scope] = {}


def _scope(key: tuple[Any, Any, Any]) -> Scope:
    s = _SCOPES.get(key)
    if s is None:
        s = UNSET_SCOPE if key == (None, None, None) else Scope(*key)
        if len(_SCOPES) < 100_000:
            _SCOPES[key] = s
    return s


def scope_list(tbl: pa.Table) -> list[Scope]:
    """The Scope of each row of a table with user_id, agent_id, session_id columns (shared objects)."""
    cols = [tbl.column(c).to_pylist() for c in ("user_id", "agent_id", "session_id")]
    return [_scope(k) for k in zip(*cols)]


def _metadata_codes(con: Any, n: int) -> dict[str, tuple[np.ndarray, dict[tuple[str, str], int]]]:
    tbl = con.sql("""
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
        out["meta:" + keys.dictionary[int(kidx[a])].as_py()] = (codes, vals)
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


class DuckDBDurable(DurableStore):
    """The DuckDB half of :class:`~umi.storage.duckdb.DuckDBStorageBackend`: loads what recall
    and remember read at open (entities, postings, core blocks); history, sources and relations
    are read when the cache first needs them (:meth:`load_history`, :meth:`load_sources`,
    :meth:`load_relations`: indexed lookups); writes one :class:`ChangeSet` per commit in one
    DuckDB transaction."""

    lazy = True

    def __init__(self, con: Any, dim: int | None) -> None:
        self.con = con
        self.dim = dim
        #: read the vectors at open (False: on demand, when a vector index cache holds a copy)
        self.vectors_at_open = True
        #: read the postings at open (False: the keyword index cache holds them)
        self.postings_at_open = True

    def load(self, dim: int | None) -> Loaded:
        con = self.con
        rows = load_rows(con, dim, with_vectors=self.vectors_at_open, with_postings=self.postings_at_open)
        cb = con.execute("SELECT user_id, agent_id, name, content, importance, position FROM core_blocks "
                         "ORDER BY user_id NULLS FIRST, agent_id NULLS FIRST, position").fetchall()
        core_blocks = [(_scope((u, a, None)), CoreBlockRecord(n, c, float(imp), int(pos))) for u, a, n, c, imp, pos in cb]
        ch = con.execute("SELECT user_id, agent_id, seq, name, op, at_ms, content, importance FROM core_history "
                         "ORDER BY user_id NULLS FIRST, agent_id NULLS FIRST, seq").fetchall()
        core_history = [CoreHistoryRecord(_scope((u, a, None)), n, int(sq), op, int(at), c,
                                          None if imp is None else float(imp)) for u, a, sq, n, op, at, c, imp in ch]
        meta = dict(con.execute("SELECT key, value FROM umi_meta").fetchall())
        return Loaded(dim=dim, rows=rows,
                      core_blocks=core_blocks, core_history=core_history, meta=meta)

    def load_history(self, entity_ids: Sequence[str] | None) -> list[tuple[str, int, str, int, Any, Scope]]:
        cols = "h.entity_id, h.seq, h.op, h.at_ms, h.snapshot, h.user_id, h.agent_id, h.session_id"
        with _read_errors("history"):
            if entity_ids is None:
                hist = self.con.sql(f"SELECT {cols} FROM history h").to_arrow_table()
            else:
                hist = _rows_for_ids(self.con, f"SELECT {cols} FROM history h", "h.entity_id", entity_ids)
        return list(zip(*(hist.column(k).to_pylist() for k in ("entity_id", "seq", "op", "at_ms", "snapshot")),
                        scope_list(hist)))

    def load_sources(self, ids: Sequence[str] | None = None, hashes: Sequence[str] | None = None) -> list[Source]:
        select = "SELECT s.id, s.text_hash, s.text, s.created_at, s.metadata, s.user_id, s.agent_id, s.session_id FROM sources s"
        with _read_errors("sources"):
            if ids is None and hashes is None:
                tbls = [self.con.sql(select).to_arrow_table()]
            else:
                tbls = [_rows_for_ids(self.con, select, col, want)
                        for col, want in (("s.id", ids), ("s.text_hash", hashes)) if want]
        out: dict[str, Source] = {}
        for src in tbls:
            for i, h, t, c, m, sc in zip(*(src.column(k).to_pylist()
                                           for k in ("id", "text_hash", "text", "created_at", "metadata")),
                                         scope_list(src)):
                out[i] = Source(i, h, t, c, json.loads(m), sc)
        return list(out.values())

    def load_relations(self, entity_ids: Sequence[str] | None) -> list[EvolutionRelation]:
        select = ("SELECT r.id, r.source_id, r.target_id, r.evolution_type, r.reason, r.confidence, r.created_at, "
                  "r.user_id, r.agent_id, r.session_id FROM relations r")
        with _read_errors("relations"):
            if entity_ids is None:
                tbls = [self.con.sql(select).to_arrow_table()]
            else:
                tbls = [_rows_for_ids(self.con, select, col, entity_ids) for col in ("r.source_id", "r.target_id")]
        out: dict[str, EvolutionRelation] = {}
        for rel in tbls:
            for i, s_, t, et, r, c, ca, sc in zip(
                    *(rel.column(k).to_pylist() for k in ("id", "source_id", "target_id", "evolution_type", "reason",
                                                          "confidence", "created_at")),
                    scope_list(rel)):
                out[i] = EvolutionRelation(source_id=s_, target_id=t, evolution_type=et, reason=r, confidence=c,
                                           id=i, created_at=ca, scope=sc)
        return list(out.values())

    def commit(self, ch: ChangeSet, generation: int) -> None:
        from ._duckdb_schema import add_embedding_column

        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            if ch.dim is not None and self.dim is None:
                add_embedding_column(con, ch.dim)
            dim = self.dim if self.dim is not None else ch.dim
            self._entities(ch, generation, dim)
            if ch.tombstoned:
                stones = sorted(ch.tombstoned)
                con.executemany("UPDATE history SET snapshot = ? WHERE entity_id = ?",
                                [(dumps({"forgotten": True, "id": i}), i) for i in stones])
            if ch.history:
                recs = list({(r.entity_id, r.seq): r for r in ch.history}.values())
                insert_arrow(con, "history", history_table(recs, generation), replace=ch.history_replace)
            self._keyed(ch.sources, "sources", sources_table)
            self._keyed(ch.relations, "relations", relations_table)
            for sc in sorted(ch.core_forgotten, key=lambda sc: (sc.user_id or "", sc.agent_id or "")):
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
            con.execute("UPDATE umi_state SET generation = ? WHERE id = 1", [generation])
            con.execute("COMMIT")
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except duckdb_error():
                pass  # a failed COMMIT has already ended the transaction
            raise
        if ch.dim is not None and self.dim is None:
            self.dim = ch.dim

    def _entities(self, ch: ChangeSet, generation: int, dim: int | None) -> None:
        con = self.con
        gone = [i for i, e in ch.entities.items() if e is None and ch.entity_existed.get(i)]
        full: list[Entity] = []
        terms: list[tuple[dict[str, int], int]] = []
        validity: list[Entity] = []
        for i, e in ch.entities.items():
            if e is None:
                continue
            t = ch.terms.get(i)
            if t is None and ch.entity_existed.get(i):
                validity.append(e)  # only valid_to / updated_at changed (supersede, revive)
            else:
                full.append(e)
                terms.append(t if t is not None else document_terms(e.name, e.content))
        rewritten = gone + [e.id for e in full if ch.entity_existed.get(e.id)]
        if rewritten:
            delete_rows_of(con, ("postings", "entity_metadata"), rewritten)
        if gone:
            con.register("_umi_gone", pa.table({"id": pa.array(gone, pa.string())}))
            try:
                con.execute("DELETE FROM entities WHERE id IN (SELECT id FROM _umi_gone)")
            finally:
                con.unregister("_umi_gone")
        if full:
            data = entities_table(full, terms, generation, dim)
            # INSERT OR REPLACE costs ~2.5x a plain INSERT in DuckDB: use it only for ids already stored
            known = np.array([bool(ch.entity_existed.get(e.id)) for e in full], bool)
            if not known.any():
                insert_arrow(con, "entities", data)
            elif known.all():
                insert_arrow(con, "entities", data, replace=True)
            else:
                insert_arrow(con, "entities", data.filter(pa.array(~known)))
                insert_arrow(con, "entities", data.filter(pa.array(known)), replace=True)
            insert_arrow(con, "postings", postings_table(full, [t[0] for t in terms]))
            insert_arrow(con, "entity_metadata", metadata_table(full))
        if validity:
            con.executemany("UPDATE entities SET valid_to = ?, updated_at = ?, updated_generation = ? WHERE id = ?",
                            [(e.valid_to, e.updated_at, generation, e.id) for e in validity])

    def _keyed(self, changes: dict[str, Any], table: str, build: Any) -> None:
        if not changes:
            return
        con = self.con
        gone = [i for i, v in changes.items() if v is None]
        put = [v for v in changes.values() if v is not None]
        if gone:
            con.executemany(f"DELETE FROM {table} WHERE id = ?", [(i,) for i in gone])
        if put:
            insert_arrow(con, table, build(put), replace=True)

    def close(self) -> None:
        self.con.close()


def duckdb_error() -> type[BaseException]:
    import duckdb

    return duckdb.Error
