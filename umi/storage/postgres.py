"""PostgreSQL + pgvector storage: one memory shared by many processes on many hosts.

``PostgresStorageBackend.connect("postgresql://user:pw@host:5432/db", dim=384)`` opens a
``psycopg_pool.ConnectionPool`` and creates (or migrates) the tables. Needs ``umi[postgres]``
(psycopg 3 with its pool) and the ``vector`` extension: ``connect`` runs
``CREATE EXTENSION IF NOT EXISTS vector``, which needs that right the first time.

Tables, named ``{table_prefix}…`` inside ``schema`` (default: ``umi_…`` in the connection's
``search_path``); the SQL is in :mod:`umi.storage._pg_schema`::

    migrations  version, name, applied_at          forward-only; newer than we know -> SchemaVersionError
    state       generation, dim, n_docs, total_len one row: the write counter and BM25 corpus stats
    terms       term, df                           BM25 document frequencies over every entity
    entities    … embedding vector(dim) + HNSW index (vector_cosine_ops),
                tsv tsvector (GIN) + term_freqs jsonb + doc_len for keyword search,
                metadata jsonb (GIN, jsonb_path_ops) for @> equality filters
    passages    entity_id, seq, embedding          a long fact's passage vectors (deleted with it)
    sources, relations, history (append-only, but for the tombstones of forgotten entities)
    core_blocks, core_history                      core memory per (user_id, agent_id)
    meta        key, value                         store metadata (e.g. the embedder's identity)

Scopes: entities, sources, relations and history carry ``user_id``, ``agent_id`` and
``session_id`` columns (NULL = unset), with a composite btree index led by ``user_id`` on each,
so one set of tables serves thousands of users: a user's view reads that user's rows through
the index (``SearchFilters(scope=...)``, compiled by :func:`umi.storage.filters.to_sql`, the one
filter semantics every backend shares). Core blocks are read from their table on every call
(no cache), so a block another process wrote is seen on the next read.

Concurrency is Postgres's. A write method called outside :meth:`transaction` is one
transaction; a ``transaction()`` block is one transaction on one pooled connection (nested
blocks join it, and an exception inside any of them rolls the whole block back). Writers of
one entity are serialised by a transaction-scoped advisory lock on its id, so history sequence
numbers and the corpus statistics stay exact; what a write changes (history records and their
numbers, supersede/revive, core-block positions and core history) is computed from the rows it
read under those locks by the rules the cached backends apply (:mod:`umi.storage._rules`).
When Postgres aborts a transaction for a deadlock or a serialization failure, the backend rolls
back, waits a little and *replays* the writes the block has made (it records them), up to
``max_retries`` times; then it raises :class:`StorageError`. Reads inside a block see the block's own writes.

Vector search ranks by pgvector's cosine distance (``<=>``): an exact scan below
``exact_search_rows`` rows, above it the HNSW index (``vector_cosine_ops``) with
``SET LOCAL hnsw.ef_search`` and, on pgvector >= 0.8, ``hnsw.iterative_scan`` so that filtered
searches keep walking the graph; if the walk still returns fewer than ``k`` hits, an exact scan
answers. The index is built once the store reaches ``exact_search_rows`` entities, with
``CREATE INDEX CONCURRENTLY`` in a background thread (one builder per store across processes;
writers are not blocked), or at once by :meth:`build_vector_index`: maintaining it below the
threshold would slow every insert about 2.5x for nothing. The hits are re-scored in float64
(pgvector sums in float32). Keyword search selects candidates by full-text search (a
``tsvector`` of the shared tokenizer's terms, GIN, ``@@``) and scores them, in one statement,
with exactly the BM25 of :mod:`umi.storage.text` (IDF over every stored entity: N and the
average length kept in ``state``, each term's df in ``terms``, all kept exact by every commit):
the same doubles as the reference. Only the candidates that pass the filters are read, so a
search inside one user's scope costs what that user's matches cost; an unscoped search grows
with the number of entities holding any query term. A vector search whose filters name a scope
(or a source) holding fewer than ``exact_search_rows`` vectors is an exact scan of those rows.
``ts_rank_cd`` is not used: it has no IDF, so it would rank differently from every other backend.

Metadata filters use ``metadata @> %s::jsonb`` over typed strings (``{"n": "int:1"}``), which
keep ``1``, ``1.0`` and ``True`` apart as :meth:`SearchFilters.matches` does; the exact values
are kept beside them as JSON text. Text may hold NUL characters (stored escaped).

``delete`` forgets: the row (vector, postings), the terms no other entity holds, every history
snapshot (replaced by a tombstone), the entity's relations, and its source text once no entity
comes from that source (a lock on the source id makes two blocks that forget a source's last two
facts at once see each other).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import random
import re
import struct
import threading
import weakref
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._validate import utf8_len
from ..errors import InvalidConfigError, StorageError, ValidationError
from ..index import by_score_then_id
from ..types import (CoreBlockRecord, CoreHistoryRecord, CoreOp, Entity, EntityType,
                     EvolutionRelation, Scope, check_scope, normalize_name, now_ms)
from . import _pg_schema as S
from . import _rows as R
from . import _common as C  # the boundary checks every backend shares
from . import filters as F
from ._rules import SharedWrites, core_change, history_record, upsert_entry, validity_change
from ._txn import raise_wrapped
from .base import TOMBSTONE_SCOPE, HistoryOp, HistoryRecord, SearchFilters, Source, StorageBackend, tombstone
from .text import BM25_B, BM25_K1, document_terms, query_terms

if TYPE_CHECKING:  # pragma: no cover
    from psycopg_pool import ConnectionPool

__all__ = ["PostgresStorageBackend"]

log = logging.getLogger("umi.storage.postgres")

POOL_SIZE_MAX = 256
EF_SEARCH_MAX = 1000  # pgvector's limit for hnsw.ef_search
BATCH_ROWS = 500
INDEX_RECHECK_SECS = 5.0  # while a store has no HNSW index, how often a search asks whether one was built
#: a keyword search inside a scope (or source) of fewer rows matches them one by one; a larger one uses GIN
KEYWORD_SCAN_ROWS = 5_000
ITER_BATCH = 1000  # rows per page of iter_sources / iter_relations / iter_history
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,29})?$")


@dataclass
class _Tx:
    """The open ``transaction()`` block of one thread."""

    conn: Any
    depth: int = 1
    ops: list[Callable[[Any], Any]] = field(default_factory=list)
    changed: bool = False  # some write changed a row: the commit bumps the generation
    rollback_only: bool = False
    n_delta: int = 0
    len_delta: int = 0
    #: term -> change of its document frequency, applied to {terms} at commit (in term order)
    df_delta: dict[str, int] = field(default_factory=dict)
    dim: int | None = None  # a dimension this transaction fixed (kept only if it commits)

    def reset(self) -> None:
        self.changed = False
        self.n_delta = self.len_delta = 0
        self.df_delta = {}
        self.dim = None

    def count_terms(self, terms: Iterable[str], step: int) -> None:
        for t in terms:
            self.df_delta[t] = self.df_delta.get(t, 0) + step


class PostgresStorageBackend(SharedWrites, StorageBackend):
    """Archival memory in PostgreSQL with pgvector. Create it with :meth:`connect`."""

    #: several processes (and hosts) may read and write one store at once
    supports_concurrent_writers = True
    supports_multiple_processes = True
    #: a commit is on the server's disk (as durable as the server is configured to be)
    durable = True

    def __init__(self, pool: ConnectionPool, *, schema: str | None, table_prefix: str,
                 exact_search_rows: int, ef_search: int, max_retries: int, iterative_scan: bool) -> None:
        from psycopg import sql

        self._pool = pool
        self._sql = sql
        self._schema = schema
        self._prefix = table_prefix
        self.dim: int | None = None
        self._exact_rows = exact_search_rows
        self._ef_search = ef_search
        self._max_retries = max_retries
        self._iterative = iterative_scan
        self._local = threading.local()
        self._closed = False
        self._index_valid = False
        self._adapted: weakref.WeakSet[Any] = weakref.WeakSet()  # connections that send vectors in binary
        self._vector_info: Any = None
        self._vector_dumper: type | None = None
        self._index_checked_at = time.monotonic()  # connect() asks; searches ask again after INDEX_RECHECK_SECS
        self._builder: threading.Thread | None = None
        self._builder_conn: Any = None
        self._builder_lock = threading.Lock()
        self._conninfo = ""
        self._conn_kwargs: dict[str, Any] = {}
        self._names = S.TableNames(sql, schema, table_prefix)
        self._lock_ns = int.from_bytes(hashlib.blake2b(f"{schema}.{table_prefix}".encode(), digest_size=4).digest(),
                                       "big", signed=True)

    # --- opening ------------------------------------------------------------------
    @classmethod
    def connect(cls, url: str, *, dim: int | None = None, schema: str | None = None,
                table_prefix: str = "umi_", pool_size: int = 4, exact_search_rows: int = 20_000,
                ef_search: int = 100, max_retries: int = 5,
                connect_timeout_secs: float = 10.0) -> PostgresStorageBackend:
        """Open (creating or migrating the tables) a store in the database at ``url``.

        ``dim`` fixes the embedding dimension now (else the first vector written fixes it);
        ``schema`` (created if missing) and ``table_prefix`` keep several stores apart in one
        database; ``pool_size`` is the most connections this process holds at once.
        """
        if not isinstance(url, str):
            raise TypeError(f"url must be str, not {type(url).__name__}")
        if not url.strip():
            raise InvalidConfigError("url must be a PostgreSQL connection string or URL, got an empty string")
        for what, v, lo, hi in (("pool_size", pool_size, 1, POOL_SIZE_MAX),
                                ("exact_search_rows", exact_search_rows, 0, 2**62),
                                ("ef_search", ef_search, 1, EF_SEARCH_MAX), ("max_retries", max_retries, 0, 100)):
            C.check_int(v, what, lo, hi)
        if dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, int):
                raise TypeError(f"dim must be an int or None, not {type(dim).__name__}")
            if not 1 <= dim <= S.VECTOR_DIM_MAX:
                raise InvalidConfigError(f"dim must be between 1 and {S.VECTOR_DIM_MAX} (pgvector's limit), got {dim}")
        if schema is not None:
            if not isinstance(schema, str):
                raise TypeError(f"schema must be str or None, not {type(schema).__name__}")
            if not _IDENT.match(schema):
                raise InvalidConfigError(f"schema must match {_IDENT.pattern}, got {schema!r}")
        if not isinstance(table_prefix, str):
            raise TypeError(f"table_prefix must be str, not {type(table_prefix).__name__}")
        if not _PREFIX.match(table_prefix):
            raise InvalidConfigError(f"table_prefix must match {_PREFIX.pattern}, got {table_prefix!r}")
        if isinstance(connect_timeout_secs, bool) or not isinstance(connect_timeout_secs, (int, float)):
            raise TypeError(f"connect_timeout_secs must be a number, not {type(connect_timeout_secs).__name__}")
        if not 0 < connect_timeout_secs <= 3600:
            raise InvalidConfigError(f"connect_timeout_secs must be in (0, 3600], got {connect_timeout_secs}")
        try:
            import psycopg
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError as exc:
            from ..errors import BackendNotInstalledError

            raise BackendNotInstalledError(
                "the Postgres backend needs psycopg 3 and psycopg_pool: pip install 'umi[postgres]'",
                extra="postgres") from exc
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise InvalidConfigError(f"url is not a valid PostgreSQL connection string: {exc}") from None

        pool_kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": max(1, round(connect_timeout_secs))}
        pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, name="umi", kwargs=pool_kwargs,
                              timeout=max(float(connect_timeout_secs), 30.0))
        try:
            pool.open(wait=True, timeout=connect_timeout_secs)
        except PoolTimeout as exc:
            pool.close()
            raise StorageError(f"could not connect to PostgreSQL within {connect_timeout_secs} s: {exc}") from exc
        try:
            with pool.connection() as conn:
                iterative = S.prepare_extension(conn)
            self = cls(pool, schema=schema, table_prefix=table_prefix, exact_search_rows=exact_search_rows,
                       ef_search=ef_search, max_retries=max_retries, iterative_scan=iterative)
            self._conninfo = url
            self._conn_kwargs = dict(pool_kwargs)
            with pool.connection() as conn:
                self.dim = S.migrate(conn, self._names, self._lock_ns, dim)
                n_docs = S.one_value(conn, self._q("SELECT n_docs FROM {state}"))
                self._index_valid = S.hnsw_state(conn, self._names) is True
            self._maybe_build_index(int(n_docs))
        except psycopg.Error as exc:
            pool.close()
            raise StorageError(f"could not prepare the umi tables in PostgreSQL: {exc}") from exc
        except BaseException:
            pool.close()
            raise
        return self

    def _q(self, template: str, **extra: Any) -> Any:
        return self._names.q(template, **extra)

    def _adapt(self, conn: Any) -> None:
        """Teach a pooled connection to send vectors in pgvector's binary form (once per connection)."""
        if conn in self._adapted:
            return
        from psycopg.types import TypeInfo

        if self._vector_info is None:
            self._vector_info = TypeInfo.fetch(conn, "vector")
            if self._vector_info is None:
                raise StorageError("the pgvector type 'vector' is not visible on this connection's search_path")
            self._vector_dumper = _vector_dumper(self._vector_info.oid)
        self._vector_info.register(conn)
        conn.adapters.register_dumper(_Vec, self._vector_dumper)
        self._adapted.add(conn)

    # --- transactions -------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("this PostgresStorageBackend is closed")

    def _tx(self) -> _Tx | None:
        return getattr(self._local, "tx", None)

    def _mark_changed(self) -> None:
        """A write changed a row: the open block's commit bumps the generation."""
        tx = self._tx()
        assert tx is not None
        tx.changed = True

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One Postgres transaction. Nested blocks join the outer one; see the module docstring."""
        self._check_open()
        tx = self._tx()
        if tx is not None:
            tx.depth += 1
            try:
                yield
            except BaseException:
                tx.rollback_only = True
                raise
            finally:
                tx.depth -= 1
            return
        import psycopg

        try:
            with self._pool.connection() as conn:
                tx = _Tx(conn)
                self._local.tx = tx
                try:
                    conn.execute("BEGIN")
                    try:
                        yield
                    except BaseException as exc:
                        _rollback(conn)
                        raise_wrapped(exc, "transaction rolled back")
                    if tx.rollback_only:
                        _rollback(conn)
                        raise StorageError("transaction rolled back: a write inside it failed (and the error "
                                           "was caught)")
                    self._commit(tx)
                except psycopg.Error as exc:
                    _rollback(conn)
                    raise StorageError(f"transaction rolled back: {exc}") from exc
                finally:
                    self._local.tx = None
        except psycopg.Error as exc:  # taking a pooled connection failed (PoolTimeout is one)
            raise StorageError(f"no PostgreSQL connection could be had: {exc}") from exc

    def _commit(self, tx: _Tx) -> None:
        import psycopg

        attempt = 0
        while True:
            try:
                n_docs = None
                if tx.df_delta:
                    self._apply_df(tx)
                if tx.changed:
                    n_docs = tx.conn.execute(self._q(
                        "UPDATE {state} SET generation = generation + 1, n_docs = n_docs + %s, "
                        "total_len = total_len + %s RETURNING n_docs"), (tx.n_delta, tx.len_delta)).fetchone()[0]
                tx.conn.execute("COMMIT")
            except psycopg.Error as exc:
                attempt = self._retry_or_raise(exc, attempt)
                self._replay(tx, len(tx.ops))
                continue
            if tx.dim is not None:
                self.dim = tx.dim
            if n_docs is not None:
                self._maybe_build_index(int(n_docs))
            return

    def _apply_df(self, tx: _Tx) -> None:
        """Add the block's document-frequency changes to {terms}, locking rows in term order."""
        changed = sorted((t, d) for t, d in tx.df_delta.items() if d)
        if not changed:
            return
        terms = [t for t, _ in changed]
        tx.conn.execute(self._q(
            "INSERT INTO {terms} AS t (term, df) SELECT * FROM unnest(%s::text[], %s::bigint[]) "
            "ON CONFLICT (term) DO UPDATE SET df = t.df + EXCLUDED.df"), (terms, [d for _, d in changed]))
        if any(d < 0 for _, d in changed):
            tx.conn.execute(self._q("DELETE FROM {terms} WHERE term = ANY(%s) AND df <= 0"),
                            ([t for t, d in changed if d < 0],))

    # --- the HNSW index -------------------------------------------------------------
    def _maybe_build_index(self, n_docs: int) -> None:
        """Once the store reaches ``exact_search_rows``, build the HNSW index in the background."""
        if (self._index_valid or n_docs < self._exact_rows or self.dim is None or self.dim > S.HNSW_DIM_MAX
                or self._closed):
            return
        with self._builder_lock:
            if self._builder is not None and self._builder.is_alive():
                return
            self._builder = threading.Thread(target=self._build_in_background, name="umi-pg-hnsw", daemon=True)
            self._builder.start()

    def _build_in_background(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self._conninfo, **self._conn_kwargs) as conn:  # autocommit, like the pool
                self._builder_conn = conn
                self._index_valid = S.build_hnsw(conn, self._names, self._lock_ns ^ 0x48_4E_53_57)
        except Exception as exc:  # noqa: BLE001 - a background build must never take the process down
            if not self._closed:
                log.warning("building the HNSW index of %r failed (searches stay exact): %s", self, exc)
        finally:
            self._builder_conn = None

    def build_vector_index(self) -> bool:
        """Build the HNSW index now (writers are not blocked), whatever the store's size.

        Normally it is built in the background once the store holds ``exact_search_rows``
        entities. Returns True when a valid index exists.
        """
        self._check_open()
        if self.dim is None or self.dim > S.HNSW_DIM_MAX:
            return False
        import psycopg

        builder = self._builder
        if builder is not None:
            builder.join()  # a background build of this process: let it finish first
        try:
            with self._pool.connection() as conn:
                self._index_valid = S.build_hnsw(conn, self._names, self._lock_ns ^ 0x48_4E_53_57, wait=True)
        except psycopg.Error as exc:
            raise StorageError(f"building the HNSW index failed: {exc}") from exc
        return self._index_valid

    def compact(self) -> bool:
        """``VACUUM FULL`` of umi's tables: each is rewritten into new files and its old files
        (TOAST included) removed, so the bytes of deleted and forgotten rows leave the table
        files. The server's write-ahead log and its backups keep them until the server recycles
        them. Each table is locked exclusively while it is rewritten: other sessions wait."""
        self._check_open()
        if self._tx() is not None:
            raise StorageError("compact() inside a transaction: VACUUM cannot run in one")
        import psycopg

        try:
            with self._pool.connection() as conn:  # autocommit
                for name in S.TABLE_KEYS:
                    conn.execute(self._sql.SQL("VACUUM FULL {t}").format(t=self._names.table(name)))
        except psycopg.Error as exc:
            raise StorageError(f"compact (VACUUM FULL) failed: {exc}") from exc
        return True

    def _retry_or_raise(self, exc: BaseException, attempt: int) -> int:
        """Back off and return the next attempt number; re-raise what is not worth retrying."""
        import psycopg

        if not isinstance(exc, (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)):
            raise exc
        if attempt >= self._max_retries:
            raise StorageError(
                f"gave up after {attempt + 1} attempts: {type(exc).__name__} kept recurring "
                f"(max_retries={self._max_retries}): {exc}") from exc
        # Jittered exponential backoff: the jitter only spreads retries out, it never changes a result.
        time.sleep(min(0.5, 0.005 * 2**attempt) * (1.0 + random.random()))
        return attempt + 1

    def _replay(self, tx: _Tx, n_ops: int) -> None:
        """Roll back and redo the block's first ``n_ops`` writes in a new transaction."""
        tx.conn.execute("ROLLBACK")
        tx.reset()
        tx.conn.execute("BEGIN")
        for op in tx.ops[:n_ops]:
            op(tx.conn)

    def _write(self, op: Callable[[Any], Any]) -> Any:
        """Run a write inside the open block (recorded for replay), or as a block of its own."""
        self._check_open()
        tx = self._tx()
        if tx is None:
            with self.transaction():
                return self._write(op)
        import psycopg

        if tx.rollback_only:
            raise StorageError("an earlier write in this transaction failed; the transaction will be rolled back")
        tx.ops.append(op)
        attempt = 0
        try:
            while True:
                try:
                    if attempt:
                        self._replay(tx, len(tx.ops) - 1)
                    return op(tx.conn)
                except psycopg.Error as exc:
                    attempt = self._retry_or_raise(exc, attempt)
        except BaseException as exc:
            tx.ops.pop()
            tx.rollback_only = True
            _rollback(tx.conn)
            tx.conn.execute("BEGIN")  # an empty transaction, so the block can end normally
            if isinstance(exc, psycopg.Error):
                raise StorageError(f"the write failed, and its transaction is rolled back: {exc}") from exc
            raise

    @contextmanager
    def _reading(self, snapshot: bool = False) -> Iterator[Any]:
        """A connection for reads: the block's own inside ``transaction()``, else a pooled one.

        ``snapshot=True`` runs the reads in one REPEATABLE READ READ ONLY transaction, so that
        several statements see the same data (read-only: it never fails to serialise).
        """
        import psycopg

        self._check_open()
        tx = self._tx()
        try:
            if tx is not None:
                yield tx.conn
                return
            with self._pool.connection() as conn:
                if snapshot:
                    with conn.transaction():
                        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                        yield conn
                else:
                    yield conn
        except psycopg.Error as exc:
            raise StorageError(f"a read from PostgreSQL failed: {exc}") from exc

    def _lock_ids(self, conn: Any, ids: Sequence[str]) -> None:
        """Transaction-scoped advisory locks on entity ids, always taken in one order."""
        keys = sorted({int.from_bytes(hashlib.blake2b(i.encode(), digest_size=4).digest(), "big", signed=True)
                       for i in ids})
        conn.execute("SELECT count(pg_advisory_xact_lock(%s, k)) FROM (SELECT unnest(%s::integer[]) AS k "
                     "ORDER BY 1) s", (self._lock_ns, keys))

    def _current_dim(self) -> int | None:
        tx = self._tx()
        return self.dim if self.dim is not None else (tx.dim if tx is not None else None)

    # --- entities -----------------------------------------------------------------
    def upsert(self, entities: Sequence[Entity]) -> None:
        ents, dim = C.check_entities(entities, self._current_dim())
        R.check_metadata_text(ents)
        if not ents:
            return
        chunks = _chunks(ents)

        def op(conn: Any) -> None:
            tx = self._tx()
            assert tx is not None
            self._fix_dim(conn, tx, dim)
            for chunk in chunks:
                self._upsert_chunk(conn, tx, chunk)

        self._write(op)

    def _fix_dim(self, conn: Any, tx: _Tx, dim: int | None) -> None:
        """The first vectors of a store fix its dimension (in this transaction)."""
        if dim is not None and self.dim is None and tx.dim is None:
            stored = conn.execute(self._q("SELECT dim FROM {state} FOR UPDATE")).fetchone()[0]
            if stored is None:
                S.fix_dim(conn, self._names, dim)
            elif stored != dim:
                raise ValidationError(f"the store holds {stored}-d vectors; these entities carry {dim}-d ones")
            tx.dim = dim

    def _upsert_chunk(self, conn: Any, tx: _Tx, chunk: builtins.list[Entity], *, with_history: bool = True) -> None:
        ids = [e.id for e in chunk]
        # the sources too: a block forgetting a source's last entity then sees this new one
        self._lock_ids(conn, ids + [_SOURCE_LOCK + e.source_id for e in chunk if e.source_id is not None])
        old: dict[str, int] = {}  # id -> doc_len of the stored ones
        last: dict[str, int] = {}  # id -> its last history seq (0: none)
        for eid, length, old_terms, seq in conn.execute(self._q(
                "SELECT v.id, e.doc_len, ARRAY(SELECT jsonb_object_keys(e.term_freqs)), " + (
                    "(SELECT coalesce(max(h.seq), 0) FROM {history} h WHERE h.entity_id = v.id)" if with_history
                    else "0")  # a restore writes no history of its own: no seq to read
                + " FROM unnest(%s::text[]) v(id) LEFT JOIN {entities} e ON e.id = v.id"), (ids,)).fetchall():
            last[eid] = seq
            if length is not None:
                old[eid] = length
                tx.count_terms(old_terms, -1)
        rows = []  # in the order of S.UPSERT_ENTITIES's unnest columns
        for e in chunk:
            tf, length = document_terms(e.name, e.content)
            rows.append((e.id, e.entity_type.value, R.encode_text(e.name), R.encode_text(normalize_name(e.name)),
                         R.encode_text(e.content), R.tagged_metadata(e.metadata), R.dumps(e.metadata),
                         None if e.embedding is None else _Vec(e.embedding), float(e.importance),
                         float(e.confidence), e.created_at, e.updated_at, e.event_time, e.valid_from, e.valid_to,
                         e.source_id, " ".join(tf), R.dumps(tf), length, *e.scope.as_tuple()))
            tx.len_delta += length - old.get(e.id, 0)
            tx.count_terms(tf, 1)
            tx.n_delta += 0 if e.id in old else 1
        self._adapt(conn)
        conn.execute(self._q(S.UPSERT_ENTITIES), [list(c) for c in zip(*rows)])
        self._put_passages(conn, chunk, [i for i in ids if i in old])
        if with_history:
            self._put_history(conn, [history_record(last[e.id], *upsert_entry(e, e.id in old)) for e in chunk])
        tx.changed = True

    def _put_passages(self, conn: Any, chunk: builtins.list[Entity], rewritten: builtins.list[str]) -> None:
        """The passage vectors of ``chunk`` replace those of its ``rewritten`` (already stored) ids."""
        if rewritten:
            conn.execute(self._q("DELETE FROM {passages} WHERE entity_id = ANY(%s)"), (rewritten,))
        rows = [(e.id, i, _Vec(v)) for e in chunk if e.passage_embeddings is not None
                for i, v in enumerate(e.passage_embeddings)]
        if rows:
            conn.execute(self._q("INSERT INTO {passages} (entity_id, seq, embedding) "
                                 "SELECT * FROM unnest(%b::text[], %b::integer[], %b::vector[])"),
                         [list(c) for c in zip(*rows)])

    def _put_history(self, conn: Any, recs: Sequence[HistoryRecord], *, replace: bool = False) -> None:
        """History records, appended (numbered after the entity's last one: its writers hold its lock),
        or (``replace``: restore) replacing a stored record of the same ``(entity_id, seq)``."""
        rows = list({(h.entity_id, h.seq): (h.entity_id, h.seq, h.op, h.at, R.dumps(dict(h.snapshot)),
                                            *h.scope.as_tuple()) for h in recs}.values())
        conn.execute(self._q(
            "INSERT INTO {history} (" + S.HISTORY_COLUMNS + ") SELECT * FROM unnest(%b::text[], %b::integer[], "
            "%b::text[], %b::bigint[], %b::text[], %b::text[], %b::text[], %b::text[])" + (
                " ON CONFLICT (entity_id, seq) DO UPDATE SET op = EXCLUDED.op, at = EXCLUDED.at, "
                "snapshot = EXCLUDED.snapshot, user_id = EXCLUDED.user_id, agent_id = EXCLUDED.agent_id, "
                "session_id = EXCLUDED.session_id" if replace else "")), [list(c) for c in zip(*rows)])

    def get(self, entity_id: str) -> Entity | None:
        eid = C.check_id(entity_id)
        with self._reading() as conn:
            got = self._select(conn, "id = %s", [eid])
        return got[0] if got else None

    def get_many(self, entity_ids: Sequence[str]) -> builtins.list[Entity]:
        ids = C.check_ids(entity_ids)
        if not ids:
            return []
        found: dict[str, Entity] = {}
        with self._reading() as conn:
            unique = list(dict.fromkeys(ids))
            for start in range(0, len(unique), BATCH_ROWS * 4):
                found.update((e.id, e) for e in self._select(conn, "id = ANY(%s)", [unique[start:start + BATCH_ROWS * 4]]))
        out: builtins.list[Entity] = []
        seen: set[str] = set()
        for i in filter(found.__contains__, ids):  # a repeated id gets its own copy
            out.append(C.clone_entity(found[i], found[i].embedding) if i in seen else found[i])
            seen.add(i)
        return out

    def _select(self, conn: Any, where: str | Any, params: Sequence[Any], tail: str = "") -> builtins.list[Entity]:
        query = self._sql.SQL("SELECT " + S.ENTITY_COLUMNS + ", ARRAY(SELECT vector_send(p.embedding) FROM {p} p "
                              "WHERE p.entity_id = {t}.id ORDER BY p.seq) FROM {t} WHERE {w} " + tail).format(
            t=self._names.table("entities"), p=self._names.table("passages"),
            w=self._sql.SQL(where) if isinstance(where, str) else where)
        cur = conn.cursor(binary=True)
        cur.execute(query, list(params))
        return [_row_to_entity(r) for r in cur.fetchall()]

    def delete(self, entity_id: str, at: int | None = None) -> bool:
        """Forget the entity: its row (vector, postings, terms), its history snapshots (tombstones),
        its relations, and its source text once no remaining entity comes from that source."""
        eid = C.check_id(entity_id)
        at_ms = C.check_time(at, "at", optional=True)
        when: int = now_ms() if at_ms is None else at_ms

        def op(conn: Any) -> bool:
            tx = self._tx()
            assert tx is not None
            self._lock_ids(conn, [eid])
            row = conn.execute(self._q(
                "DELETE FROM {entities} WHERE id = %s RETURNING doc_len, ARRAY(SELECT jsonb_object_keys(term_freqs)), "
                "source_id, (SELECT coalesce(max(seq), 0) FROM {history} WHERE entity_id = %s)"),
                (eid, eid)).fetchone()
            if row is None:
                return False
            length, old_terms, source_id, last = row
            tx.n_delta -= 1
            tx.len_delta -= int(length)
            tx.count_terms(old_terms, -1)
            conn.execute(self._q("UPDATE {history} SET snapshot = %s, user_id = %s, agent_id = %s, session_id = %s "
                                 "WHERE entity_id = %s"), (R.dumps(tombstone(eid)), *TOMBSTONE_SCOPE.as_tuple(), eid))
            self._put_history(conn, [history_record(last, eid, "delete", when, tombstone(eid), TOMBSTONE_SCOPE)])
            conn.execute(self._q("DELETE FROM {relations} WHERE source_id = %s OR target_id = %s"), (eid, eid))
            if source_id is not None:
                self._drop_source_if_unused(conn, source_id)
            tx.changed = True
            return True

        return bool(self._write(op))

    def _drop_source_if_unused(self, conn: Any, source_id: str) -> None:
        # The lock on the source makes two blocks that forget its last two entities at once see
        # each other's delete: the second to take it removes the text.
        self._lock_ids(conn, [_SOURCE_LOCK + source_id])
        conn.execute(self._q("DELETE FROM {sources} s WHERE s.id = %s AND NOT EXISTS "
                             "(SELECT 1 FROM {entities} e WHERE e.source_id = %s)"), (source_id, source_id))

    def _set_validity(self, eid: str, valid_to: int | None, at: int, op_name: HistoryOp) -> bool:
        def op(conn: Any) -> bool:
            self._lock_ids(conn, [eid])
            got = self._select(conn, "id = %s", [eid])
            new = validity_change(got[0], valid_to, at) if got else None
            if new is None:
                return False
            last = S.one_value(conn, self._q("UPDATE {entities} SET valid_to = %s, updated_at = %s WHERE id = %s RETURNING "
                                      "(SELECT coalesce(max(seq), 0) FROM {history} WHERE entity_id = %s)"),
                        (new.valid_to, new.updated_at, eid, eid))
            self._put_history(conn, [history_record(last, eid, op_name, at, C.snapshot_of(new), new.scope)])
            self._mark_changed()
            return True

        return bool(self._write(op))

    # --- filters, lists -------------------------------------------------------------
    def _where(self, filters: object) -> tuple[Any, builtins.list[Any]]:
        """``filters`` as a WHERE condition over {entities}: the shared compiler's Postgres dialect."""
        clause, params = F.to_sql(filters, "postgres")
        return self._sql.SQL(clause), params

    def list(self, filters: SearchFilters | None = None, limit: int = 100, offset: int = 0) -> builtins.list[Entity]:
        limit, offset = C.check_limit_offset(limit, offset)
        where, params = self._where(filters)
        with self._reading() as conn:
            return self._select(conn, where, [*params, limit, offset], "ORDER BY created_at, id LIMIT %s OFFSET %s")

    def count(self, filters: SearchFilters | None = None) -> int:
        where, params = self._where(filters)
        with self._reading() as conn:
            row = conn.execute(self._sql.SQL("SELECT count(*) FROM {t} WHERE {w}").format(
                t=self._names.table("entities"), w=where), params).fetchone()
        return int(row[0])

    def find_by_name(self, name: str, entity_type: EntityType | str | None = None,
                     filters: SearchFilters | None = None) -> builtins.list[Entity]:
        norm = C.check_name_query(name)
        utf8_len(norm, "name")
        etype = None if entity_type is None else EntityType.parse(entity_type)
        where, params = self._where(filters)
        clause = self._sql.SQL("name_norm = %s AND ") + where
        params = [R.encode_text(norm), *params]
        if etype is not None:
            clause = self._sql.SQL("entity_type = %s AND ") + clause
            params = [etype.value, *params]
        with self._reading() as conn:
            return self._select(conn, clause, params, "ORDER BY created_at, id")

    def find_by_names(self, names: Sequence[str], filters: SearchFilters | None = None) -> builtins.list[Entity]:
        """One statement for all the names (the base class's default is one per name)."""
        norms = C.check_name_queries(names)
        for norm in norms:
            utf8_len(norm, "name")
        if not norms:
            return []
        where, params = self._where(filters)
        with self._reading() as conn:
            return self._select(conn, self._sql.SQL("name_norm = ANY(%s) AND ") + where,
                                [[R.encode_text(n) for n in norms], *params], "ORDER BY created_at, id")

    # --- search -------------------------------------------------------------------
    def search_vector(self, vector: np.ndarray, k: int, filters: SearchFilters | None = None) -> builtins.list[tuple[str, float]]:
        k = C.check_k(k)
        where, params = self._where(filters)
        dim = self._current_dim()
        if dim is None:
            dim = self._stored_dim()
        q = C.check_query_vector(vector, dim)
        if q is None or dim is None:
            return []
        qvec = _Vec(q)
        margin = max(16, k)  # re-scored in float64 below; the margin absorbs pgvector's float32 rounding
        table = self._names.table("entities")
        # A long fact scores the best of its vector and its passages': the nearest passage of each fact
        # the filters let through (an exact scan: only long facts have passages), in the same statement.
        passages = self._sql.SQL(
            " UNION ALL (SELECT * FROM (SELECT DISTINCT ON (entity_id) entity_id, embedding, true FROM {p} "
            "WHERE entity_id IN (SELECT id FROM {t} WHERE embedding IS NOT NULL AND {w}) "
            "ORDER BY entity_id, embedding <=> %b::vector) b ORDER BY embedding <=> %b::vector LIMIT %s)").format(
                p=self._names.table("passages"), t=table, w=where)
        tail = [*params, qvec, qvec, k + margin]
        exact = self._sql.SQL("(SELECT id, embedding, false FROM {t} WHERE embedding IS NOT NULL AND {w} "
                              # "+ 0" keeps the planner off the (approximate) index
                              "ORDER BY (embedding <=> %b::vector) + 0, id LIMIT %s)").format(t=table, w=where) + passages
        hits: builtins.list[Any] | None = None
        indexed = self._maybe_indexed(dim)
        # without an index the exact scan is one statement: no transaction needed for a consistent answer
        with self._reading(snapshot=indexed) as conn:
            self._adapt(conn)
            if indexed and self._big_enough(conn) and not self._narrow(conn, filters, where, params):
                ef = min(EF_SEARCH_MAX, max(self._ef_search, k + margin))
                conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef),))
                if self._iterative:
                    conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
                cur = conn.cursor(binary=True)
                cur.execute(self._sql.SQL("(SELECT id, embedding, false FROM {t} WHERE embedding IS NOT NULL "
                                          "AND {w} ORDER BY embedding <=> %b::vector LIMIT %s)").format(
                                              t=table, w=where) + passages,
                            [*params, qvec, k + margin, *tail])
                hits = cur.fetchall()
                if sum(not h[2] for h in hits) < k:
                    hits = None  # the graph walk ran dry under the filter: answer exactly instead
            if hits is None:
                cur = conn.cursor(binary=True)
                cur.execute(exact, [*params, qvec, k + margin, *tail])
                hits = cur.fetchall()
        if not hits:
            return []
        scores = R.cosine_scores(np.stack([_vector_from_binary(h[1]) for h in hits]),
                                 np.asarray(vector, dtype=np.float32))
        best: dict[str, float] = {}
        for h, s in zip(hits, scores):
            best[h[0]] = max(float(s), best.get(h[0], -2.0))
        return by_score_then_id(list(best.items()))[:k]

    def _narrow(self, conn: Any, filters: object, where: Any, params: Sequence[Any]) -> bool:
        """Do the filters name a scope or a source holding fewer than ``exact_search_rows`` vectors?

        Then an exact scan of those rows (found through the scope or source index) beats walking
        the HNSW graph past everybody else's vectors: one user among thousands is a few hundred
        rows. Counting stops at the threshold, so a large scope costs a bounded index scan.
        """
        nf = F.normalise(filters)
        if not nf.scope and nf.source_id is None:
            return False
        n = conn.execute(self._sql.SQL(
            "SELECT count(*) FROM (SELECT 1 FROM {t} WHERE embedding IS NOT NULL AND {w} LIMIT %s) s").format(
                t=self._names.table("entities"), w=where), [*params, self._exact_rows]).fetchone()[0]
        return int(n) < self._exact_rows

    def _stored_dim(self) -> int | None:
        with self._reading() as conn:
            dim = conn.execute(self._q("SELECT dim FROM {state}")).fetchone()[0]
        if dim is not None and self._tx() is None:
            self.dim = dim
        return dim

    def _maybe_indexed(self, dim: int) -> bool:
        """Is there a valid HNSW index? Known once seen; while there is none, asked again at most
        every INDEX_RECHECK_SECS (another process may have built it), not on every search."""
        if dim > S.HNSW_DIM_MAX:
            return False
        if self._index_valid:
            return True
        now = time.monotonic()
        if now - self._index_checked_at < INDEX_RECHECK_SECS:
            return False
        with self._reading() as conn:
            self._index_valid = S.hnsw_state(conn, self._names) is True
        self._index_checked_at = now
        return self._index_valid

    def _big_enough(self, conn: Any) -> bool:
        """Does the table hold ``exact_search_rows`` rows (the planner's estimate)?"""
        row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass",
                           (self._names.table("entities").as_string(conn),)).fetchone()
        return row is not None and row[0] >= self._exact_rows

    def search_text(self, query: str, k: int, filters: SearchFilters | None = None) -> builtins.list[tuple[str, float]]:
        query = C.check_query_text(query)
        k = C.check_k(k)
        statement = self._text_statement(query, k, filters)
        if statement is None:
            return []
        with self._reading() as conn:  # one statement: it sees one snapshot
            rows = conn.execute(*statement).fetchall()
        return [(r[0], float(r[1])) for r in rows]

    def _text_statement(self, query: str, k: int, filters: object) -> tuple[Any, builtins.list[Any]] | None:
        """The one statement of a keyword search (None: the query has no terms)."""
        where, params = self._where(filters)
        terms = query_terms(query)
        if not terms:
            return None
        lexemes = " | ".join(_tsquery_lexeme(t) for t in terms)
        n = len(terms)
        # One statement:
        #  d: N and the average length (kept in {state}) and each query term's IDF, its df read from
        #     {terms} (kept exact by every commit) -- so the candidates below need not be all of them;
        #  c: the candidates that pass the filters, with their term frequencies (NULL where absent):
        #     found through the GIN index of the full-text match; or, when the filters name a scope
        #     or a source, through that index and matched row by row -- the planner would AND in the
        #     GIN scan, which reads every posting of a common word in the whole table (33,000 rows
        #     for "work" at 1,000 users x 100 facts: 15 ms instead of 0.3). Which of the two runs is
        #     decided inside the statement, by counting that scope's rows up to KEYWORD_SCAN_ROWS;
        #     a larger scope uses the GIN form (its rows cost more to match one by one);
        #  the score: c_1 + c_2 + ... in query-term order, each c_i the reference formula's
        #  operations in the same order, so the doubles equal umi.storage.text.bm25_scores (same
        #  libm `log` on both sides; held equal by a test).
        tfs = ", ".join(f"(term_freqs ->> %s)::float8 AS f{i}" for i in range(n))
        dfs = [f"coalesce((SELECT df FROM {{terms}} WHERE term = %s), 0)" for _ in range(n)]
        idfs = ", ".join(f"ln(1.0::float8 + ((s.n_docs - {df}) + 0.5::float8) / ({df} + 0.5::float8)) AS i{i}"
                         for i, df in enumerate(dfs))
        norm = "(%s::float8 * ((1.0::float8 - %s::float8) + %s::float8 * c.doc_len::float8 / d.avgdl))"
        score = " + ".join(f"(CASE WHEN c.f{i} IS NULL THEN 0::float8 ELSE d.i{i} * c.f{i} * %s::float8 / "
                           f"(c.f{i} + {norm}) END)" for i in range(n))
        score_params: builtins.list[Any] = [BM25_K1 + 1.0, BM25_K1, BM25_B, BM25_B] * n
        idf_params = [p for t in terms for p in (t, t)]
        nf = F.normalise(filters)
        select = "SELECT id, doc_len, " + tfs + " FROM {t} WHERE {w} AND "
        if nf.scope or nf.source_id is not None:
            cap = KEYWORD_SCAN_ROWS
            cand = ("WITH n AS (SELECT count(*) AS n FROM (SELECT 1 FROM {t} WHERE {w} LIMIT %s) x) "
                    + select + "ts_match_vq(tsv, %s::tsquery) AND (SELECT n FROM n) < %s UNION ALL "
                    + select + "tsv @@ %s::tsquery AND (SELECT n FROM n) >= %s")
            cand_params = [*params, cap, *terms, *params, lexemes, cap, *terms, *params, lexemes, cap]
        else:
            cand = select + "tsv @@ %s::tsquery"
            cand_params = [*terms, *params, lexemes]
        query_sql = self._sql.SQL(
            "WITH d AS (SELECT s.total_len::float8 / nullif(s.n_docs, 0)::float8 AS avgdl, " + idfs +
            " FROM {st} s), c AS (" + cand + ") "
            "SELECT c.id, " + score + " AS score FROM c CROSS JOIN d "
            "ORDER BY score DESC, c.id LIMIT %s").format(
                t=self._names.table("entities"), st=self._names.table("state"),
                terms=self._names.table("terms"), w=where)
        return query_sql, [*idf_params, *cand_params, *score_params, k]

    # --- sources ------------------------------------------------------------------
    def add_source(self, source: Source) -> None:
        s = _check_source(source)

        def op(conn: Any) -> None:
            hit = conn.execute(self._q(
                "INSERT INTO {sources} (" + S.SOURCE_COLUMNS + ") VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO NOTHING RETURNING id"), _source_row(s)).fetchone()
            if hit is not None:
                self._mark_changed()

        self._write(op)

    def get_source(self, source_id: str) -> Source | None:
        return self._source_where("id = %s", C.check_id(source_id, "source_id"))

    def find_source_by_hash(self, text_hash: str) -> Source | None:
        if not isinstance(text_hash, str):
            raise TypeError(f"text_hash must be str, not {type(text_hash).__name__}")
        if "\x00" in text_hash:
            return None
        utf8_len(text_hash, "text_hash")
        return self._source_where("text_hash = %s", text_hash)

    def _source_where(self, where: str, value: str) -> Source | None:
        with self._reading() as conn:
            row = conn.execute(self._sql.SQL(
                "SELECT " + S.SOURCE_COLUMNS + " FROM {t} WHERE " + where +
                " ORDER BY created_at, id LIMIT 1").format(t=self._names.table("sources")), (value,)).fetchone()
        return None if row is None else C.source_from_row(row, R.decode_text)

    def entity_ids_for_source(self, source_id: str) -> builtins.list[str]:
        sid = C.check_id(source_id, "source_id")
        with self._reading() as conn:
            return [r[0] for r in conn.execute(self._q("SELECT id FROM {entities} WHERE source_id = %s ORDER BY id"),
                                               (sid,)).fetchall()]

    def delete_source(self, source_id: str) -> bool:
        sid = C.check_id(source_id, "source_id")

        def op(conn: Any) -> bool:
            self._lock_ids(conn, [_SOURCE_LOCK + sid])
            hit = conn.execute(self._q("DELETE FROM {sources} WHERE id = %s RETURNING id"), (sid,)).fetchone()
            if hit is None:
                return False
            self._mark_changed()
            return True

        return bool(self._write(op))

    # --- evolution ----------------------------------------------------------------
    def add_relations(self, relations: Sequence[EvolutionRelation]) -> None:
        rels = _check_relations(relations)
        if not rels:
            return
        with self._reading() as conn:
            have = self._stored_ids(conn, {e for r in rels for e in (r.source_id, r.target_id)})
        C.check_endpoints(rels, have.__contains__)

        def op(conn: Any) -> None:
            self._insert_relations(conn, rels)

        self._write(op)

    def _stored_ids(self, conn: Any, ids: set[str]) -> set[str]:
        """Those of ``ids`` that are stored entities."""
        return {row[0] for row in conn.execute(self._q("SELECT id FROM {entities} WHERE id = ANY(%s)"),
                                               (sorted(ids),)).fetchall()}

    def _insert_relations(self, conn: Any, rels: Sequence[EvolutionRelation]) -> None:
        rels = list({r.id: r for r in rels}.values())  # a later duplicate of an id replaces an earlier one
        conn.execute(self._q(
            "INSERT INTO {relations} (" + S.RELATION_COLUMNS + ") "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::float8[], "
            "%s::bigint[], %s::text[], %s::text[], %s::text[]) ON CONFLICT (id) DO UPDATE SET "
            "source_id = EXCLUDED.source_id, target_id = EXCLUDED.target_id, "
            "evolution_type = EXCLUDED.evolution_type, reason = EXCLUDED.reason, confidence = EXCLUDED.confidence, "
            "created_at = EXCLUDED.created_at, user_id = EXCLUDED.user_id, agent_id = EXCLUDED.agent_id, "
            "session_id = EXCLUDED.session_id"),
            [list(c) for c in zip(*[(r.id, r.source_id, r.target_id, r.evolution_type.value, R.encode_text(r.reason),
                                     r.confidence, r.created_at, *r.scope.as_tuple()) for r in rels])])
        self._mark_changed()

    def relations_for(self, entity_id: str) -> builtins.list[EvolutionRelation]:
        eid = C.check_id(entity_id)
        with self._reading() as conn:
            rows = conn.execute(self._q(
                "SELECT " + S.RELATION_COLUMNS + " FROM {relations} "
                "WHERE source_id = %s OR target_id = %s ORDER BY created_at, id"), (eid, eid)).fetchall()
        return [C.relation_from_row(r, R.decode_text) for r in rows]

    def history(self, entity_id: str) -> builtins.list[HistoryRecord]:
        eid = C.check_id(entity_id)
        with self._reading() as conn:
            rows = conn.execute(self._q(
                "SELECT " + S.HISTORY_COLUMNS + " FROM {history} WHERE entity_id = %s ORDER BY seq"),
                (eid,)).fetchall()
        return [_row_to_history(r) for r in rows]

    # --- export / import -------------------------------------------------------------
    def _scope_where(self, scope: object) -> tuple[str, builtins.list[Any]]:
        """The view rule of ``scope`` (None: every scope) over a table's scope columns."""
        sc = check_scope(scope, "scope", optional=True)
        return F.to_sql(SearchFilters(scope=sc, include_superseded=True), "postgres")

    def _iter_rows(self, table: str, columns: str, key: tuple[str, ...], scope: object) -> Iterator[Any]:
        """Rows of ``table`` in the view, in ``key`` order, a page at a time (keyset paging: each
        page is one short read, so a slow consumer holds no connection)."""
        where, params = self._scope_where(scope)
        order = ", ".join(key)
        last: tuple[Any, ...] | None = None
        while True:
            after = f" AND ({order}) > ({', '.join(['%s'] * len(key))})" if last is not None else ""
            with self._reading() as conn:
                rows = conn.execute(self._sql.SQL(
                    "SELECT " + columns + ", " + order + " FROM {t} WHERE " + where + after +
                    " ORDER BY " + order + " LIMIT %s").format(t=self._names.table(table)),
                    [*params, *(last or ()), ITER_BATCH]).fetchall()
            for r in rows:
                yield r
            if len(rows) < ITER_BATCH:
                return
            last = tuple(rows[-1][-len(key):])

    def iter_sources(self, scope: Scope | None = None) -> Iterator[Source]:
        for r in self._iter_rows("sources", S.SOURCE_COLUMNS, ("created_at", "id"), scope):
            yield C.source_from_row(r, R.decode_text)

    def iter_relations(self, scope: Scope | None = None) -> Iterator[EvolutionRelation]:
        for r in self._iter_rows("relations", S.RELATION_COLUMNS, ("created_at", "id"), scope):
            yield C.relation_from_row(r, R.decode_text)

    def iter_history(self, scope: Scope | None = None) -> Iterator[HistoryRecord]:
        for r in self._iter_rows("history", S.HISTORY_COLUMNS, ("entity_id", "seq"), scope):
            yield _row_to_history(r)

    def restore(self, entities: Sequence[Entity], sources: Sequence[Source],
                relations: Sequence[EvolutionRelation], history: Sequence[HistoryRecord]) -> None:
        """Write exactly these records (for import), generating no history; see the protocol."""
        ents, dim = C.check_entities(entities, self._current_dim())
        R.check_metadata_text(ents)
        srcs = [_check_source(x) for x in C.check_seq(sources, "sources")]
        rels = _check_relations(relations)
        hist = [C.check_history(h, pos) for pos, h in enumerate(C.check_seq(history, "history"))]
        new_ids = {e.id for e in ents}

        def op(conn: Any) -> None:
            tx = self._tx()
            assert tx is not None
            self._fix_dim(conn, tx, dim)
            for chunk in _chunks(ents):
                self._upsert_chunk(conn, tx, chunk, with_history=False)
            if srcs:
                rows = [_source_row(x) for x in {x.id: x for x in srcs}.values()]
                conn.execute(self._q(
                    "INSERT INTO {sources} (" + S.SOURCE_COLUMNS + ") SELECT * FROM unnest(%s::text[], %s::text[], "
                    "%s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[]) ON CONFLICT (id) DO "
                    "UPDATE SET text_hash = EXCLUDED.text_hash, text = EXCLUDED.text, created_at = EXCLUDED.created_at, "
                    "metadata_json = EXCLUDED.metadata_json, user_id = EXCLUDED.user_id, "
                    "agent_id = EXCLUDED.agent_id, session_id = EXCLUDED.session_id"), [list(c) for c in zip(*rows)])
                tx.changed = True
            if rels:
                have = self._stored_ids(conn, {e for r in rels for e in (r.source_id, r.target_id)} - new_ids)
                C.check_endpoints(rels, lambda end: end in new_ids or end in have)
                self._insert_relations(conn, rels)
            if hist:
                self._put_history(conn, hist, replace=True)
                tx.changed = True

        if ents or srcs or rels or hist:
            self._write(op)

    # --- core memory blocks ------------------------------------------------------------
    # Read from the table on every call (no cache): a block another process wrote is seen on
    # the next read. Writers of one (user_id, agent_id) are serialised by an advisory lock on it,
    # so positions stay 0..n-1 and history seqs stay gapless.
    def core_blocks(self, scope: Scope) -> builtins.list[CoreBlockRecord]:
        u, a = _core_key(scope)
        with self._reading() as conn:
            return self._core_rows(conn, u, a)

    def _core_rows(self, conn: Any, u: str, a: str) -> builtins.list[CoreBlockRecord]:
        rows = conn.execute(self._q(
            "SELECT name, content, importance, position FROM {core_blocks} WHERE user_id = %s AND agent_id = %s "
            "ORDER BY position"), (u, a)).fetchall()
        return [CoreBlockRecord(r[0], R.decode_text(r[1]), float(r[2]), int(r[3])) for r in rows]

    def _edit_core(self, sc: Scope, op_name: CoreOp, at: int, name: str = "", content: str | None = None,
                   importance: float | None = None) -> int:
        u, a = C.core_key(sc)

        def op(conn: Any) -> int:
            self._lock_ids(conn, [_CORE_LOCK + u + "\x1f" + a])
            blocks = self._core_rows(conn, u, a)
            last = S.one_value(conn, self._q("SELECT coalesce(max(seq), 0) FROM {core_history} WHERE user_id = %s "
                                      "AND agent_id = %s"), (u, a))
            change = core_change(sc, blocks, int(last), op_name, at, name, content, importance)
            if change is None:
                return 0
            new, rec = change
            # one statement: the blocks no longer there go, the others are written (disjoint rows), the record
            conn.execute(self._q(
                "WITH gone AS (DELETE FROM {core_blocks} WHERE user_id = %s AND agent_id = %s AND name <> ALL(%s::text[])), "
                "put AS (INSERT INTO {core_blocks} (user_id, agent_id, name, content, importance, position) "
                "SELECT %s, %s, * FROM unnest(%s::text[], %s::text[], %s::float8[], %s::bigint[]) "
                "ON CONFLICT (user_id, agent_id, name) DO UPDATE SET content = EXCLUDED.content, "
                "importance = EXCLUDED.importance, position = EXCLUDED.position) "
                "INSERT INTO {core_history} (user_id, agent_id, seq, name, op, at, content, importance) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"),
                (u, a, [b.name for b in new], u, a, [b.name for b in new], [R.encode_text(b.content) for b in new],
                 [b.importance for b in new], [b.position for b in new], u, a, rec.seq, rec.name, rec.op, rec.at,
                 None if rec.content is None else R.encode_text(rec.content), rec.importance))
            self._mark_changed()
            return len(blocks)

        return int(self._write(op))

    def core_scopes(self, scope: Scope | None = None) -> builtins.list[Scope]:
        sc = check_scope(Scope() if scope is None else scope, "scope")
        assert sc is not None
        cond, params = self._scope_where(sc.core)  # the view rule over (user_id, agent_id); '' = unset
        with self._reading() as conn:
            rows = conn.execute(self._q(
                "SELECT DISTINCT user_id, agent_id FROM {core_blocks} WHERE " + cond), params).fetchall()
        return [C.stored_scope(u or None, a or None, None) for u, a in sorted(rows)]  # Python's order, not a collation's

    def forget_core(self, scope: Scope) -> int:
        sc = check_scope(scope, "scope")
        assert sc is not None
        cond, params = self._scope_where(sc.core)  # the view rule over (user_id, agent_id); '' = unset

        def op(conn: Any) -> int:
            keys = conn.execute(self._q(
                "SELECT user_id, agent_id FROM {core_blocks} WHERE " + cond + " UNION "
                "SELECT user_id, agent_id FROM {core_history} WHERE " + cond), params * 2).fetchall()
            if not keys:
                return 0
            self._lock_ids(conn, [_CORE_LOCK + u + "\x1f" + a for u, a in keys])
            n = conn.execute(self._q("DELETE FROM {core_blocks} WHERE " + cond), params).rowcount
            conn.execute(self._q("DELETE FROM {core_history} WHERE " + cond), params)
            self._mark_changed()
            return int(n)

        return int(self._write(op))

    def core_history(self, scope: Scope, name: str | None = None) -> builtins.list[CoreHistoryRecord]:
        u, a = _core_key(scope)
        sc = C.stored_scope(u or None, a or None, None)
        only = "" if name is None else " AND (name = %s OR op = 'clear')"
        params: builtins.list[Any] = [u, a] if name is None else [u, a, C.check_core_name(name)]
        with self._reading() as conn:
            rows = conn.execute(self._q(
                "SELECT name, seq, op, at, content, importance FROM {core_history} WHERE user_id = %s AND agent_id = %s"
                + only + " ORDER BY seq"), params).fetchall()
        return [CoreHistoryRecord(sc, r[0], int(r[1]), r[2], int(r[3]), None if r[4] is None else R.decode_text(r[4]),
                                  None if r[5] is None else float(r[5])) for r in rows]

    # --- store metadata -------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        k = C.check_meta_key(key)
        with self._reading() as conn:
            row = conn.execute(self._q("SELECT value FROM {meta} WHERE key = %s"), (R.encode_text(k),)).fetchone()
        return None if row is None else R.decode_text(row[0])

    def set_meta(self, key: str, value: str) -> None:
        k, v = (R.encode_text(x) for x in C.check_meta_entry(key, value))

        def op(conn: Any) -> None:
            hit = conn.execute(self._q(
                "INSERT INTO {meta} AS m (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE "
                "SET value = EXCLUDED.value WHERE m.value IS DISTINCT FROM EXCLUDED.value RETURNING key"),
                (k, v)).fetchone()
            if hit is not None:
                self._mark_changed()

        self._write(op)

    # --- lifecycle ----------------------------------------------------------------
    @property
    def generation(self) -> int:
        with self._reading() as conn:
            return int(conn.execute(self._q("SELECT generation FROM {state}")).fetchone()[0])

    @property
    def schema_version(self) -> int:
        with self._reading() as conn:
            return int(conn.execute(self._q("SELECT coalesce(max(version), 0) FROM {migrations}")).fetchone()[0])

    def close(self) -> None:
        """Close the pool. Safe to call twice; every later call raises StorageError."""
        if not self._closed:
            self._closed = True
            builder, conn = self._builder, self._builder_conn
            if builder is not None and builder.is_alive():
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.cancel_safe()  # an interrupted build leaves an invalid index: the next one redoes it
                builder.join(10)
            self._pool.close()

    def __repr__(self) -> str:
        where = f"{self._schema}." if self._schema else ""
        return f"<PostgresStorageBackend {where}{self._prefix}* dim={self.dim}>"


# --- helpers -----------------------------------------------------------------------


# advisory-lock keys of sources and of core-block scopes, apart from entity ids
_SOURCE_LOCK = "src\x1f"
_CORE_LOCK = "core\x1f"


def _chunks(ents: builtins.list[Entity]) -> builtins.list[builtins.list[Entity]]:
    """Batches of at most BATCH_ROWS that hold an id at most once each: an id twice in one call is
    written twice, in order (create, then update), as the other backends do."""
    chunks: builtins.list[builtins.list[Entity]] = [[]]
    seen: set[str] = set()
    for e in ents:
        if e.id in seen or len(chunks[-1]) >= BATCH_ROWS:
            chunks.append([])
            seen = set()
        chunks[-1].append(e)
        seen.add(e.id)
    return [c for c in chunks if c]


def _check_source(source: object) -> Source:
    """The shared source check, and text Postgres can store (no lone surrogate)."""
    s = C.check_source(source)
    utf8_len(s.text, "source.text")
    return s


def _check_relations(relations: object) -> builtins.list[EvolutionRelation]:
    """The shared relation checks, and reasons Postgres can store."""
    rels = C.check_relations(relations)
    for r in rels:
        utf8_len(r.reason, f"relation {r.id} reason")
    return rels




def _rollback(conn: Any) -> None:
    import psycopg

    with contextlib.suppress(psycopg.Error):
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")


class _Vec:
    """A float32 vector to send in pgvector's binary form (see PostgresStorageBackend._adapt)."""

    __slots__ = ("v",)

    def __init__(self, v: np.ndarray) -> None:
        self.v = v


def _vector_dumper(oid: int) -> type:
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    class VectorBinaryDumper(Dumper):
        # pgvector's binary form: int16 dim, int16 unused, dim big-endian float32 (exact: no text round trip)
        format = Format.BINARY

        def dump(self, obj: Any) -> bytes:
            v = obj.v
            return struct.pack(">HH", v.shape[0], 0) + np.asarray(v, dtype=">f4").tobytes()

    VectorBinaryDumper.oid = oid
    return VectorBinaryDumper


def _vector_text(v: np.ndarray) -> str:
    # repr of each float32 widened to a double is exact, and pgvector parses it back to the same float32
    return "[" + ",".join(map(repr, np.asarray(v, dtype=np.float32).astype(np.float64).tolist())) + "]"


def _vector_from_binary(b: Any) -> np.ndarray:
    """pgvector's binary form: int16 dim, int16 unused, dim big-endian float32."""
    raw = bytes(b)
    dim = int.from_bytes(raw[:2], "big")
    return np.frombuffer(raw, dtype=">f4", count=dim, offset=4).astype(np.float32)


def _tsquery_lexeme(term: str) -> str:
    # tokens are \w+ runs; quoting still makes any character literal
    return "'" + term.replace("\\", "\\\\").replace("'", "''") + "'"


def _core_key(scope: object) -> tuple[str, str]:
    """The (user_id, agent_id) key of core blocks; '' is the unset component in those tables."""
    sc = check_scope(scope, "scope")
    assert sc is not None
    return C.core_key(sc)


def _source_row(s: Source) -> tuple[Any, ...]:
    return (s.id, s.text_hash, R.encode_text(s.text), s.created_at, R.dumps(dict(s.metadata)), *s.scope.as_tuple())


def _row_to_history(r: Sequence[Any]) -> HistoryRecord:
    return HistoryRecord(r[0], int(r[1]), r[2], int(r[3]), json.loads(r[4]), C.stored_scope(r[5], r[6], r[7]))


def _row_to_entity(r: Sequence[Any]) -> Entity:
    (eid, etype, name, content, meta_json, emb, imp, conf, created, updated, event, vfrom, vto, src, u, a, sess,
     passages) = r
    return C.make_entity({
        "entity_type": EntityType(etype), "name": R.decode_text(name), "content": R.decode_text(content),
        "metadata": dict(json.loads(meta_json)),
        "embedding": None if emb is None else _vector_from_binary(emb),
        "importance": float(imp), "confidence": float(conf), "created_at": int(created), "updated_at": int(updated),
        "event_time": None if event is None else int(event), "valid_from": None if vfrom is None else int(vfrom),
        "valid_to": None if vto is None else int(vto), "source_id": src, "id": eid, "score": None,
        "scope": C.stored_scope(u, a, sess), "mentions": (),
        "passage_embeddings": np.stack([_vector_from_binary(b) for b in passages]) if passages else None})
