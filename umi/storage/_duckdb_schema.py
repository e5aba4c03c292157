"""DuckDB schema of umi's archival store: tables, forward migrations, filter SQL.

Schema versions (``umi_schema.version``, one row per applied migration):

1. ``umi_state`` (generation of the last commit that wrote no generation-tagged row — see
   :func:`stored_generation` —, vector dim, database uuid), ``entities`` (one row per
   entity; ``embedding FLOAT[dim]`` is added when the dimension is first known;
   ``updated_generation`` is the generation of the row's last write), ``entity_metadata``
   (one typed row per metadata key, for exact filtering), ``postings`` (BM25 terms),
   ``sources``, ``relations``, ``history`` (append-only; its ``generation`` column makes
   "what changed since generation g" one query, deletions included).
2. Secondary indexes for the point lookups (source by hash, relations by endpoint).
3. Scopes: ``user_id``, ``agent_id``, ``session_id`` columns (NULL = unset) on entities,
   sources, relations and history, indexed by ``user_id``; existing rows land in the unset
   scope. ``core_blocks`` and ``core_history`` (keyed by ``user_id``, ``agent_id``) and
   ``umi_meta`` (string key/value).
4. ``passages``: the passage vectors of long facts (``entity_id``, ``seq`` from 0,
   ``embedding FLOAT[]``); facts stored before have none.
5. ``history.journal`` (VARCHAR) and ``history.journal_vectors`` (BLOB): a commit that only
   inserts rows (a remember of new facts) writes its history rows alone, the first carrying the
   commit's other rows (as JSON text, vectors as float32 bytes), in one statement; they are moved
   into their tables later in one transaction and the columns set back to NULL (see
   :mod:`umi.storage._duckdb_io`). NULL everywhere whenever the store is closed cleanly.
6. No table change: the tombstones an older umi wrote (the history records of a forgotten fact)
   are re-filed under :data:`~umi.storage.base.TOMBSTONE_SCOPE` (no scope), as ``delete`` files
   them now, so no history row of a forgotten fact names whose it was.

A file written by a newer umi (higher version) is refused with
:class:`~umi.errors.SchemaVersionError`; an older one is migrated forward in one
transaction per step. Every statement with a value in it is parameterised.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import duckdb

from ..errors import InvalidConfigError, SchemaVersionError, StorageError, StorageLockedError, UmiError, ValidationError
from ..types import now_ms
from ._sidecars import check_name_length
from .base import TOMBSTONE_SCOPE, TOMBSTONE_TEXT_PREFIX
__all__ = ["SCHEMA_VERSION", "check_path", "open_connection", "prepare", "read_version", "stored_generation", "migrate",
           "add_embedding_column", "transaction", "ENTITY_COLUMNS", "SCOPE_COLUMNS"]

SCHEMA_VERSION = 6
SCOPE_COLUMNS = ("user_id", "agent_id", "session_id")

#: entity columns in table order (``embedding`` comes last, once the dimension is known)
ENTITY_COLUMNS = (
    "id", "entity_type", "name", "name_norm", "content", "metadata", "importance", "confidence",
    "created_at", "updated_at", "event_time", "valid_from", "valid_to", "source_id", "doc_len",
    "updated_generation", "user_id", "agent_id", "session_id",
)


def _v1(con: Any) -> None:
    con.execute("""
        CREATE TABLE umi_state (
            id INTEGER PRIMARY KEY,
            generation BIGINT NOT NULL,
            dim INTEGER,
            db_uuid VARCHAR NOT NULL
        )""")
    con.execute("INSERT INTO umi_state VALUES (1, 0, NULL, ?)", [str(uuid.uuid4())])
    con.execute("""
        CREATE TABLE entities (
            id VARCHAR PRIMARY KEY,
            entity_type VARCHAR NOT NULL,
            name VARCHAR NOT NULL,
            name_norm VARCHAR NOT NULL,
            content VARCHAR NOT NULL,
            metadata VARCHAR NOT NULL,
            importance DOUBLE NOT NULL,
            confidence DOUBLE NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            event_time BIGINT,
            valid_from BIGINT,
            valid_to BIGINT,
            source_id VARCHAR,
            doc_len INTEGER NOT NULL,
            updated_generation BIGINT NOT NULL
        )""")
    con.execute("""
        CREATE TABLE entity_metadata (
            entity_id VARCHAR NOT NULL,
            key VARCHAR NOT NULL,
            vtype VARCHAR NOT NULL,
            vtext VARCHAR NOT NULL
        )""")
    con.execute("""
        CREATE TABLE postings (
            term VARCHAR NOT NULL,
            entity_id VARCHAR NOT NULL,
            tf INTEGER NOT NULL
        )""")
    con.execute("""
        CREATE TABLE sources (
            id VARCHAR PRIMARY KEY,
            text_hash VARCHAR NOT NULL,
            text VARCHAR NOT NULL,
            created_at BIGINT NOT NULL,
            metadata VARCHAR NOT NULL
        )""")
    con.execute("""
        CREATE TABLE relations (
            id VARCHAR PRIMARY KEY,
            source_id VARCHAR NOT NULL,
            target_id VARCHAR NOT NULL,
            evolution_type VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            confidence DOUBLE NOT NULL,
            created_at BIGINT NOT NULL
        )""")
    con.execute("""
        CREATE TABLE history (
            entity_id VARCHAR NOT NULL,
            seq INTEGER NOT NULL,
            op VARCHAR NOT NULL,
            at_ms BIGINT NOT NULL,
            snapshot VARCHAR NOT NULL,
            generation BIGINT NOT NULL,
            PRIMARY KEY (entity_id, seq)
        )""")


def _v2(con: Any) -> None:
    con.execute("CREATE INDEX sources_by_hash ON sources (text_hash)")
    con.execute("CREATE INDEX relations_by_source ON relations (source_id)")
    con.execute("CREATE INDEX relations_by_target ON relations (target_id)")


def _v3(con: Any) -> None:
    for table in ("entities", "sources", "relations", "history"):
        for col in SCOPE_COLUMNS:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {col} VARCHAR")
        con.execute(f"CREATE INDEX {table}_by_user ON {table} (user_id)")
    con.execute("""
        CREATE TABLE core_blocks (
            user_id VARCHAR,
            agent_id VARCHAR,
            name VARCHAR NOT NULL,
            content VARCHAR NOT NULL,
            importance DOUBLE NOT NULL,
            position INTEGER NOT NULL
        )""")
    con.execute("CREATE INDEX core_blocks_by_user ON core_blocks (user_id, agent_id)")
    con.execute("""
        CREATE TABLE core_history (
            user_id VARCHAR,
            agent_id VARCHAR,
            seq INTEGER NOT NULL,
            name VARCHAR NOT NULL,
            op VARCHAR NOT NULL,
            at_ms BIGINT NOT NULL,
            content VARCHAR,
            importance DOUBLE
        )""")
    con.execute("CREATE TABLE umi_meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")


def _v4(con: Any) -> None:
    con.execute("""
        CREATE TABLE passages (
            entity_id VARCHAR NOT NULL,
            seq INTEGER NOT NULL,
            embedding FLOAT[] NOT NULL
        )""")  # no key: DuckDB checks one eagerly, so a fact rewritten in one transaction (delete, insert) would clash


def _v5(con: Any) -> None:
    # not indexed: an insert pays nothing for them; read (IS NOT NULL) only at open and when moved
    con.execute("ALTER TABLE history ADD COLUMN journal VARCHAR")
    con.execute("ALTER TABLE history ADD COLUMN journal_vectors BLOB")


def _v6(con: Any) -> None:
    filed = TOMBSTONE_SCOPE.to_dict()
    con.execute("UPDATE history SET " + ", ".join(f"{c} = ?" for c in filed) + " WHERE starts_with(snapshot, ?)",
                [*filed.values(), TOMBSTONE_TEXT_PREFIX])


MIGRATIONS: dict[int, Callable[[Any], None]] = {1: _v1, 2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6}


def check_path(path: str) -> str:
    """Refuse what DuckDB would open as something other than a database file: a NUL byte
    (DuckDB cuts the path there), a directory; and a file name too long for the files umi keeps
    beside it (:func:`~umi.storage._sidecars.check_name_length`). Returns the path."""
    if "\x00" in path:
        raise ValidationError(f"database path {path!r} contains a NUL byte")
    if os.path.isdir(path):
        raise StorageError(f"database path {path!r} is a directory; give a file path (e.g. {os.path.join(path, 'umi.duckdb')!r})")
    check_name_length(path)
    return path


def open_connection(path: str | None, read_only: bool) -> Any:
    """A DuckDB connection to ``path`` (``None``: in memory); a lock held by another process
    raises :class:`~umi.errors.StorageLockedError`. A path that DuckDB opens as an in-memory
    database (an existing ``.json``/``.csv``/``.parquet``... file is read as data) is refused:
    writes there would vanish."""
    if path is None:
        return duckdb.connect(":memory:")
    check_path(path)
    try:
        con = duckdb.connect(path, read_only=read_only)
    except duckdb.IOException as exc:
        msg = str(exc)
        if "lock" in msg.lower():
            raise StorageLockedError(
                f"the database {path!r} is locked by another process: {msg}. DuckDB lets one process "
                "write a file at a time; close it there, or open it read_only=True once no process "
                "holds it for writing",
                path=path,
            ) from exc
        raise StorageError(f"cannot open database {path!r}: {msg}") from exc
    except duckdb.Error as exc:
        if "in-memory database in read-only mode" in str(exc):  # what DuckDB says of such a file, read_only
            raise _not_a_database(path) from exc
        raise StorageError(f"cannot open database {path!r}: {exc}") from exc
    try:
        opened = con.execute(
            "SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    except duckdb.Error as exc:
        con.close()
        raise StorageError(f"cannot open database {path!r}: {exc}") from exc
    if not opened or opened[0][0] is None:
        con.close()
        raise _not_a_database(path)
    return con


def _not_a_database(path: str) -> StorageError:
    return StorageError(
        f"{path!r} is not a DuckDB database: DuckDB opens it as an in-memory database (it reads "
        "files such as .json, .jsonl, .csv, .tsv or .parquet as data), so nothing would be kept. "
        "Give the path of a new or existing umi database file (e.g. ending in .duckdb)")


def prepare(con: Any, path: str, read_only: bool, dim: int | None) -> tuple[int, int | None, str]:
    """Create or migrate the schema (refusing a newer one), check or fix the vector dimension.
    Returns (generation, dim, database uuid)."""
    try:
        found = read_version(con)
        if found > SCHEMA_VERSION:
            migrate(con, found, now_ms())  # raises SchemaVersionError
        if found < SCHEMA_VERSION:
            if read_only:
                what = "is not a umi database yet" if found == 0 else f"has schema version {found}"
                raise SchemaVersionError(
                    f"{path!r} {what}; this umi needs version {SCHEMA_VERSION}. Open it once "
                    "without read_only to create or migrate it",
                    found=found, supported=SCHEMA_VERSION,
                )
            migrate(con, found, now_ms())
        stored_dim, db_uuid = con.execute("SELECT dim, db_uuid FROM umi_state WHERE id = 1").fetchall()[0]
        gen = stored_generation(con)
    except UmiError:
        raise
    except duckdb.Error as exc:
        raise StorageError(f"cannot read the schema of {path!r}: {exc}") from exc
    if stored_dim is not None and dim is not None and int(stored_dim) != dim:
        raise InvalidConfigError(
            f"{path!r} holds {int(stored_dim)}-d vectors but dim={dim} was asked for; "
            "open it with the dimension it was built with"
        )
    if stored_dim is None and dim is not None:
        if read_only:
            raise StorageError(f"{path!r} has no vector dimension yet and is open read_only; cannot fix dim={dim}")
        with transaction(con):
            add_embedding_column(con, dim)
        stored_dim = dim
    return int(gen), None if stored_dim is None else int(stored_dim), str(db_uuid)


def stored_generation(con: Any) -> int:
    """The generation of the last commit. A commit tags the rows it writes with its generation
    (``history.generation``, ``entities.updated_generation``) and writes ``umi_state.generation``
    only when it writes neither (core blocks, sources or relations alone, metadata), so the
    generation rides in the commit's own statements: it is the greatest of the three."""
    return int(con.execute(
        "SELECT greatest((SELECT generation FROM umi_state WHERE id = 1), "
        "(SELECT coalesce(max(generation), 0) FROM history), "
        "(SELECT coalesce(max(updated_generation), 0) FROM entities))").fetchall()[0][0])


def read_version(con: Any) -> int:
    """The schema version of the open database; 0 for an empty one."""
    has = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = 'umi_schema'"
    ).fetchall()[0][0]
    if not has:
        return 0
    row = con.execute("SELECT max(version) FROM umi_schema").fetchall()[0]
    return int(row[0] or 0)


def migrate(con: Any, found: int, now_ms: int, *, upto: int = SCHEMA_VERSION) -> int:
    """Apply migrations ``found + 1 .. upto``, each in its own transaction. Returns the new version."""
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the database has schema version {found}, newer than this umi supports ({SCHEMA_VERSION}); "
            "upgrade umi to open it",
            found=found, supported=SCHEMA_VERSION,
        )
    for v in range(found + 1, upto + 1):
        with transaction(con):
            if v == 1:
                con.execute("CREATE TABLE umi_schema (version INTEGER NOT NULL, applied_at BIGINT NOT NULL)")
            MIGRATIONS[v](con)
            con.execute("INSERT INTO umi_schema VALUES (?, ?)", [v, now_ms])
    return max(found, upto)


@contextmanager
def transaction(con: Any) -> Iterator[None]:
    """One DuckDB transaction around the block: COMMIT when it ends, ROLLBACK when it (or the
    COMMIT) raises."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        try:
            con.execute("ROLLBACK")
        except duckdb.Error:
            pass  # a failed COMMIT has already ended the transaction
        raise


def add_embedding_column(con: Any, dim: int) -> None:
    """Fix the store's vector dimension (inside the caller's transaction)."""
    con.execute(f"ALTER TABLE entities ADD COLUMN embedding FLOAT[{int(dim)}]")
    con.execute("UPDATE umi_state SET dim = ? WHERE id = 1", [int(dim)])
