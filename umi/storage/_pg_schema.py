"""The Postgres backend's tables, migrations and fixed SQL (see :mod:`umi.storage.postgres`).

Migrations are forward-only: a store written by a newer umi (a higher version in the
``migrations`` table) is refused with :class:`SchemaVersionError`; an older one is brought
forward inside one transaction, under an advisory lock so that processes opening the same
store at once do not race.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import InvalidConfigError, SchemaVersionError, StorageError
from .base import TOMBSTONE_SCOPE, TOMBSTONE_TEXT_PREFIX
from ..types import now_ms

__all__ = ["SCHEMA_VERSION", "TableNames", "build_hnsw", "fix_dim", "hnsw_state", "migrate", "one_value",
           "prepare_extension"]

SCHEMA_VERSION = 4
VECTOR_DIM_MAX = 16_000  # pgvector's limit for the `vector` type
HNSW_DIM_MAX = 2_000  # pgvector's limit for an HNSW index on `vector`; above it searches are exact scans

# ``embedding::vector``: the result type stays ``vector`` once the store's first vectors type the column
# ``vector(dim)`` (fix_dim); a statement a pooled connection prepared before that would otherwise fail
# with "cached plan must not change result type" on every later read
ENTITY_COLUMNS = ("id, entity_type, name, content, metadata_json, embedding::vector, importance, confidence, "
                  "created_at, updated_at, event_time, valid_from, valid_to, source_id, user_id, agent_id, session_id")
SOURCE_COLUMNS = "id, text_hash, text, created_at, metadata_json, user_id, agent_id, session_id"
RELATION_COLUMNS = ("id, source_id, target_id, evolution_type, reason, confidence, created_at, "
                    "user_id, agent_id, session_id")
HISTORY_COLUMNS = "entity_id, seq, op, at, snapshot, user_id, agent_id, session_id"

UPSERT_ENTITIES = (
    "INSERT INTO {entities} (id, entity_type, name, name_norm, content, metadata, metadata_json, embedding, "
    "importance, confidence, created_at, updated_at, event_time, valid_from, valid_to, source_id, tsv, "
    "term_freqs, doc_len, user_id, agent_id, session_id) "
    "SELECT id, typ, nam, norm, con, meta::jsonb, mj, emb, imp, conf, cr, up, ev, vf, vt, src, "
    "array_to_tsvector(string_to_array(terms, ' ')), tf::jsonb, len, u, a, s "
    # every array goes in binary (%b): no quoting of long strings, vectors as pgvector's binary form
    "FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], "
    "%b::vector[], %b::float8[], %b::float8[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], "
    "%b::bigint[], %b::text[], %b::text[], %b::text[], %b::integer[], %b::text[], %b::text[], %b::text[]) "
    "AS v(id, typ, nam, norm, con, meta, mj, emb, imp, conf, cr, up, ev, vf, vt, src, terms, tf, len, u, a, s) "
    "ON CONFLICT (id) DO UPDATE SET entity_type = EXCLUDED.entity_type, name = EXCLUDED.name, "
    "name_norm = EXCLUDED.name_norm, content = EXCLUDED.content, metadata = EXCLUDED.metadata, "
    "metadata_json = EXCLUDED.metadata_json, embedding = EXCLUDED.embedding, "
    "importance = EXCLUDED.importance, confidence = EXCLUDED.confidence, created_at = EXCLUDED.created_at, "
    "updated_at = EXCLUDED.updated_at, event_time = EXCLUDED.event_time, valid_from = EXCLUDED.valid_from, "
    "valid_to = EXCLUDED.valid_to, source_id = EXCLUDED.source_id, tsv = EXCLUDED.tsv, "
    "term_freqs = EXCLUDED.term_freqs, doc_len = EXCLUDED.doc_len, user_id = EXCLUDED.user_id, "
    "agent_id = EXCLUDED.agent_id, session_id = EXCLUDED.session_id"
)

#: every table of a store (``TableNames.table(key)`` names it)
TABLE_KEYS = ("entities", "sources", "relations", "history", "state", "migrations", "terms", "core_blocks",
              "core_history", "meta", "passages")


class TableNames:
    """Quoted, schema-qualified table names, and SQL templates that use them as ``{entities}`` etc."""

    def __init__(self, sql: Any, schema: str | None, prefix: str) -> None:
        self.sql = sql
        self.schema = schema
        self.prefix = prefix
        self._tables = {n: self.table(n) for n in TABLE_KEYS}

    def table(self, name: str) -> Any:
        full = self.prefix + name
        return self.sql.Identifier(self.schema, full) if self.schema else self.sql.Identifier(full)

    def index(self, name: str) -> Any:
        return self.sql.Identifier(self.prefix + name)

    def q(self, template: str, **extra: Any) -> Any:
        return self.sql.SQL(template).format(**self._tables, **extra)


def prepare_extension(conn: Any) -> bool:
    """Make sure pgvector is installed; True when it has ``hnsw.iterative_scan`` (>= 0.8)."""
    import psycopg

    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if row is None:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject):
            pass  # another process created it at the same moment
        except psycopg.Error as exc:
            raise StorageError(
                "the pgvector extension is not installed in this database and could not be created "
                f"(a superuser can run CREATE EXTENSION vector there): {exc}") from exc
        row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    major_minor = tuple(int(p) for p in re.findall(r"\d+", row[0])[:2])
    return major_minor >= (0, 8)


def _migrations(n: TableNames) -> list[tuple[int, str, list[Any]]]:
    """Forward-only. Never edit a released step; append a new one."""
    q = n.q
    v1 = [
        q("CREATE TABLE {state} (singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton), "
          "generation bigint NOT NULL, dim integer, n_docs bigint NOT NULL, total_len bigint NOT NULL)"),
        q("INSERT INTO {state} (generation, dim, n_docs, total_len) VALUES (0, NULL, 0, 0)"),
        # ids compare by code point (COLLATE "C"), as Python's str does: ties break the same way everywhere
        q("CREATE TABLE {entities} (id text COLLATE \"C\" PRIMARY KEY, entity_type text NOT NULL, "
          "name text NOT NULL, name_norm text NOT NULL, content text NOT NULL, metadata jsonb NOT NULL, "
          "metadata_json text NOT NULL, embedding vector, importance double precision NOT NULL, "
          "confidence double precision NOT NULL, created_at bigint NOT NULL, updated_at bigint NOT NULL, "
          "event_time bigint, valid_from bigint, valid_to bigint, source_id text, "
          "tsv tsvector NOT NULL, term_freqs jsonb NOT NULL, doc_len integer NOT NULL)"),
        q("CREATE INDEX {i} ON {entities} (created_at, id)", i=n.index("entities_created")),
        q("CREATE INDEX {i} ON {entities} (name_norm)", i=n.index("entities_name")),
        q("CREATE INDEX {i} ON {entities} USING gin (tsv)", i=n.index("entities_tsv")),
        q("CREATE INDEX {i} ON {entities} USING gin (metadata jsonb_path_ops)", i=n.index("entities_meta")),
        q("CREATE TABLE {sources} (id text COLLATE \"C\" PRIMARY KEY, text_hash text NOT NULL, "
          "text text NOT NULL, created_at bigint NOT NULL, metadata_json text NOT NULL)"),
        q("CREATE INDEX {i} ON {sources} (text_hash, created_at, id)", i=n.index("sources_hash")),
        q("CREATE TABLE {relations} (id text COLLATE \"C\" PRIMARY KEY, source_id text NOT NULL, "
          "target_id text NOT NULL, evolution_type text NOT NULL, reason text NOT NULL, "
          "confidence double precision NOT NULL, created_at bigint NOT NULL)"),
        q("CREATE INDEX {i} ON {relations} (source_id)", i=n.index("relations_source")),
        q("CREATE INDEX {i} ON {relations} (target_id)", i=n.index("relations_target")),
        q("CREATE TABLE {history} (entity_id text COLLATE \"C\" NOT NULL, seq integer NOT NULL, "
          "op text NOT NULL, at bigint NOT NULL, snapshot text NOT NULL, PRIMARY KEY (entity_id, seq))"),
    ]
    # v2: scopes, core memory, store metadata, document frequencies.
    # Scope columns are nullable: NULL is the unset component ("not owned at that level"), so every
    # row written before v2 lands in the unset scope without a table rewrite (ADD COLUMN of a
    # nullable column with no default only changes the catalog). One composite btree per table
    # leads with user_id: every query of a user's view (`user_id = $1 [AND agent_id = $2 ...]`)
    # reads that user's rows only, so one set of tables serves thousands of users.
    scope_cols = ('ADD COLUMN user_id text COLLATE "C", ADD COLUMN agent_id text COLLATE "C", '
                  'ADD COLUMN session_id text COLLATE "C"')
    v2 = [q("ALTER TABLE {%s} %s" % (t, scope_cols)) for t in ("entities", "sources", "relations", "history")]
    v2 += [
        q("CREATE INDEX {i} ON {entities} (user_id, agent_id, session_id, created_at)", i=n.index("entities_scope")),
        # views that set agent_id but not user_id (an agent across its users)
        q("CREATE INDEX {i} ON {entities} (agent_id, session_id) WHERE agent_id IS NOT NULL",
          i=n.index("entities_agent")),
        q("CREATE INDEX {i} ON {entities} (source_id)", i=n.index("entities_source")),
        q("CREATE INDEX {i} ON {sources} (user_id, agent_id, session_id, created_at)", i=n.index("sources_scope")),
        q("CREATE INDEX {i} ON {relations} (user_id, agent_id, session_id, created_at)",
          i=n.index("relations_scope")),
        q("CREATE INDEX {i} ON {history} (user_id, agent_id, session_id, entity_id)", i=n.index("history_scope")),
        # Document frequency of each term over every stored entity: BM25's IDF reads it here, so a
        # keyword search inside one scope touches that scope's candidates only, not every posting.
        # A commit deletes the rows its changes bring to 0 (a forgotten text leaves no term of its own).
        q('CREATE TABLE {terms} (term text COLLATE "C" PRIMARY KEY, df bigint NOT NULL)'),
        q("INSERT INTO {terms} (term, df) SELECT k, count(*) FROM {entities}, jsonb_object_keys(term_freqs) AS k "
          "GROUP BY k"),
        # Core memory, keyed by (user_id, agent_id); '' is the unset component here (a primary key
        # cannot hold NULL, and a set scope value is never empty).
        q('CREATE TABLE {core_blocks} (user_id text COLLATE "C" NOT NULL, agent_id text COLLATE "C" NOT NULL, '
          'name text COLLATE "C" NOT NULL, content text NOT NULL, importance double precision NOT NULL, '
          "position bigint NOT NULL, PRIMARY KEY (user_id, agent_id, name))"),
        q('CREATE TABLE {core_history} (user_id text COLLATE "C" NOT NULL, agent_id text COLLATE "C" NOT NULL, '
          'seq bigint NOT NULL, name text COLLATE "C" NOT NULL, op text NOT NULL, at bigint NOT NULL, '
          "content text, importance double precision, PRIMARY KEY (user_id, agent_id, seq))"),
        q('CREATE TABLE {meta} (key text COLLATE "C" PRIMARY KEY, value text NOT NULL)'),
    ]
    # v3: the passage vectors of long facts (umi.pipeline.passages); they go with their fact
    v3 = [q('CREATE TABLE {passages} (entity_id text COLLATE "C" NOT NULL REFERENCES {entities} (id) '
            "ON DELETE CASCADE, seq integer NOT NULL, embedding vector NOT NULL, PRIMARY KEY (entity_id, seq))")]
    # v4: the tombstones an older umi wrote stayed filed under their fact's scope; delete files them
    # under TOMBSTONE_SCOPE (no scope) now, so no history row of a forgotten fact names whose it was
    lit = n.sql.Literal
    filed = TOMBSTONE_SCOPE.to_dict()
    v4 = [q("UPDATE {history} SET " + ", ".join(f"{c} = {{{c}}}" for c in filed) + " WHERE starts_with(snapshot, {p})",
            p=lit(TOMBSTONE_TEXT_PREFIX), **{c: lit(v) for c, v in filed.items()})]
    return [(1, "initial schema", v1), (2, "scopes, core memory, store metadata, term statistics", v2),
            (3, "passage vectors", v3), (4, "tombstones filed under no scope", v4)]


def migrate(conn: Any, n: TableNames, lock_key: int, dim: int | None, *,
            supported: int = SCHEMA_VERSION) -> int | None:
    """Create or bring forward the tables; returns the stored dimension (fixing ``dim`` if none is)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (lock_key,))
        if n.schema:
            conn.execute(n.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(n.sql.Identifier(n.schema)))
        conn.execute(n.q("CREATE TABLE IF NOT EXISTS {migrations} (version integer PRIMARY KEY, "
                         "name text NOT NULL, applied_at bigint NOT NULL)"))
        found = int(conn.execute(n.q("SELECT coalesce(max(version), 0) FROM {migrations}")).fetchone()[0])
        if found > supported:
            raise SchemaVersionError(
                f"this store has schema version {found}, written by a newer umi; this umi reads versions up to "
                f"{supported}: upgrade umi", found=found, supported=supported)
        for version, name, statements in _migrations(n):
            if found < version <= supported:
                for stmt in statements:
                    conn.execute(stmt)
                conn.execute(n.q("INSERT INTO {migrations} (version, name, applied_at) VALUES (%s, %s, %s)"),
                             (version, name, now_ms()))
        stored = one_value(conn, n.q("SELECT dim FROM {state}"))
        if dim is not None and stored is not None and stored != dim:
            raise InvalidConfigError(f"this store holds {stored}-d vectors; it cannot be opened with dim={dim}")
        if stored is None and dim is not None:
            fix_dim(conn, n, dim)
            stored = dim
    return None if stored is None else int(stored)


def one_value(conn: Any, query: Any, params: Any = ()) -> Any:
    """The first column of the one row ``query`` returns; :class:`StorageError` when it returns none
    (a row umi always keeps, such as the state row, was deleted outside umi)."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        text = query if isinstance(query, str) else query.as_string(conn)
        raise StorageError(f"PostgreSQL returned no row for {text!r}, which umi always finds one for: "
                           "the umi tables were changed outside umi")
    return row[0]


def fix_dim(conn: Any, n: TableNames, dim: int) -> None:
    """Type the embedding column ``vector(dim)`` (in the caller's transaction).

    The HNSW index is not built here: below the exact-search threshold it would only slow
    every insert down (about 2.5x at 384-d) without ever being used. See :func:`build_hnsw`.
    """
    conn.execute(n.q("ALTER TABLE {entities} ALTER COLUMN embedding TYPE vector({d})", d=n.sql.Literal(dim)))
    conn.execute(n.q("UPDATE {state} SET dim = %s"), (dim,))


HNSW_INDEX = "entities_embedding_hnsw"


def hnsw_state(conn: Any, n: TableNames) -> bool | None:
    """True: a valid HNSW index exists; False: an invalid one (a failed build); None: none."""
    name = n.index(HNSW_INDEX) if not n.schema else n.sql.Identifier(n.schema, n.prefix + HNSW_INDEX)
    row = conn.execute("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
                       (name.as_string(conn),)).fetchone()
    return None if row is None else bool(row[0])


def build_hnsw(conn: Any, n: TableNames, lock_key: int, *, wait: bool = False) -> bool:
    """Build the HNSW index without blocking writers (``CONCURRENTLY``), once per store.

    ``conn`` must be in autocommit mode. Only one process builds at a time (a session advisory
    lock: ``wait=False`` leaves the build to whoever holds it, ``wait=True`` waits for them and
    then checks); a failed earlier build (an invalid index) is dropped first. True when a valid
    index exists afterwards.
    """
    if wait:
        conn.execute("SELECT pg_advisory_lock(%s::bigint)", (lock_key,))
    elif not conn.execute("SELECT pg_try_advisory_lock(%s::bigint)", (lock_key,)).fetchone()[0]:
        return bool(hnsw_state(conn, n))  # another process is building it
    try:
        state = hnsw_state(conn, n)
        if state is False:
            qualified = n.index(HNSW_INDEX) if not n.schema else n.sql.Identifier(n.schema, n.prefix + HNSW_INDEX)
            conn.execute(n.sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(qualified))
        if state is not True:
            conn.execute(n.q("CREATE INDEX CONCURRENTLY IF NOT EXISTS {i} ON {entities} "
                             "USING hnsw (embedding vector_cosine_ops)", i=n.index(HNSW_INDEX)))
        return bool(hnsw_state(conn, n))
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s::bigint)", (lock_key,))
