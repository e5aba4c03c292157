"""The storage contract, part 3: ``compact()`` leaves no forgotten text in the store's files.

A database keeps a deleted row's bytes until it rewrites the pages that held them: DuckDB in the
row group (under a delete mask) and in freed blocks, LanceDB in older table versions, Postgres in
dead tuples. ``forget`` removes a fact from every read at once; ``compact`` removes it from disk.
Runs on every backend of the contract fixture; a store kept in memory has nothing to compact."""

from __future__ import annotations

from pathlib import Path

import pytest
from contract_helpers import T0, ent, vec

from umi.errors import StorageError
from umi.storage.base import SearchFilters, Source, StorageBackend

MARK = b"xylophonic7731"
EVERY = SearchFilters(include_superseded=True)


def _store_files(backend: StorageBackend) -> list[Path]:
    """The files that hold the store's rows (None: this store keeps nothing on disk)."""
    name = type(backend).__name__
    if name == "DuckDBStorageBackend":
        base = Path(backend.path)  # type: ignore[attr-defined]
        return [p for p in (base, Path(str(base) + ".wal"), Path(str(base) + ".umiidx"),
                            Path(str(base) + ".umiterms")) if p.exists()]
    if name == "LanceStorageBackend":
        return [p for p in Path(backend.path).rglob("*") if p.is_file()]  # type: ignore[attr-defined]
    if name == "PostgresStorageBackend":
        import pg_server
        import psycopg

        server = pg_server.require_server()
        if not server.embedded:
            pytest.skip("the table files of an external server are not readable here")
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # the heap pages written so far reach their files
            rows = conn.execute(
                "SELECT pg_relation_filepath(c.oid) FROM pg_class c WHERE c.relnamespace = %s::regnamespace "
                "OR c.oid IN (SELECT reltoastrelid FROM pg_class WHERE relnamespace = %s::regnamespace)",
                (backend._names.schema, backend._names.schema)).fetchall()  # type: ignore[attr-defined]
        assert server.data_dir is not None
        return [server.data_dir / r[0] for r in rows if r[0] and (server.data_dir / r[0]).exists()]
    return []


def _marks(files: list[Path]) -> int:
    return sum(p.read_bytes().count(MARK) for p in files)


def _forgotten_store(backend: StorageBackend) -> tuple[str, str]:
    """A store where a fact (and its source text) holding MARK was written, then forgotten, beside
    a fact that stays. Returns (forgotten id, kept id)."""
    src = Source.for_text(f"Zelda plays the {MARK.decode()} marimba.", T0)
    backend.add_source(src)
    gone = ent("Zelda", f"zelda plays the {MARK.decode()} marimba", emb=vec(1, 0, 0), source_id=src.id)
    kept = ent("Hal", "hal climbs walls", emb=vec(0, 1, 0), t=1)
    backend.upsert([gone, kept])
    if hasattr(backend, "checkpoint"):
        backend.checkpoint()  # the rows reach the database file before they are deleted
    assert backend.delete(gone.id, at=T0 + 5) is True
    return gone.id, kept.id


def test_compact_leaves_no_forgotten_text_in_the_store_files(backend: StorageBackend) -> None:
    gone, kept = _forgotten_store(backend)
    files = _store_files(backend)
    if not backend.durable:
        assert backend.compact() is False  # in memory: nothing on disk
        return
    if type(backend).__name__ in ("DuckDBStorageBackend", "LanceStorageBackend"):
        assert _marks(files) > 0  # forget alone leaves the bytes on disk (what compact is for)
    assert backend.compact() is True
    assert _marks(_store_files(backend)) == 0
    # everything else reads as before, and the store goes on taking writes
    assert backend.get(gone) is None and backend.get(kept) is not None
    assert [i for i, _ in backend.search_vector(vec(0, 1, 0), 5, EVERY)] == [kept]
    assert [i for i, _ in backend.search_text("walls", 5, EVERY)] == [kept]
    assert [h.op for h in backend.history(gone)] == ["create", "delete"]
    assert all(MARK.decode() not in str(h.snapshot) for h in backend.history(gone))
    more = ent("Ivy", "ivy sails boats", emb=vec(0, 0, 1), t=2)
    backend.upsert([more])
    assert backend.get(more.id) == more
    assert backend.count(EVERY) == 2


def test_compact_inside_a_transaction_is_refused_and_changes_nothing(backend: StorageBackend) -> None:
    _, kept = _forgotten_store(backend)
    if not backend.durable:
        return
    with pytest.raises(StorageError, match="transaction"):
        with backend.transaction():
            backend.compact()
    assert backend.get(kept) is not None and backend.count(EVERY) == 1
