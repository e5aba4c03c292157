"""DuckDBStorageBackend: what is particular to it (the shared behaviour is the contract suite):
file locking, read_only, the vector index cache, schema versions, persistence, bulk writes,
and SQL BM25 agreeing with the numba kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from umi.errors import InvalidConfigError, SchemaVersionError, StorageError, StorageLockedError, ValidationError
from umi.index import VectorIndex
from umi.storage._duckdb_schema import SCHEMA_VERSION, migrate
from umi.storage.base import SearchFilters, Source, source_id_for, text_hash
from umi.storage.duckdb import INDEX_SUFFIX, DuckDBStorageBackend
from umi.types import Entity, EvolutionRelation

T0 = 1_700_000_000_000


def ent(i: int, *, emb: np.ndarray | None = None, content: str | None = None, meta: dict | None = None) -> Entity:
    return Entity("person", f"name {i}", content or f"fact number {i}", metadata=meta or {}, embedding=emb,
                  created_at=T0 + i)


def unit(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "umi.duckdb"


def fill(path: Path, n: int, seed: int = 0, **connect: Any) -> list[Entity]:
    rng = np.random.default_rng(seed)
    vecs = unit(rng, n)
    ents = [ent(i, emb=vecs[i]) for i in range(n)]
    with DuckDBStorageBackend.connect(path, **connect) as b:
        b.upsert(ents)
    return ents


def search_all(b: DuckDBStorageBackend, ents: list[Entity]) -> list[list[str]]:
    return [[i for i, _ in b.search_vector(e.embedding, 3)] for e in ents if e.embedding is not None]


# --- locking and read_only ------------------------------------------------------------------


def test_a_file_held_by_another_process_raises_storage_locked(db: Path) -> None:
    fill(db, 3)
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, duckdb
            con = duckdb.connect({str(db)!r})
            print("ready", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        try:
            assert holder.stdout.readline().strip() == "ready"
            for read_only in (False, True):
                with pytest.raises(StorageLockedError) as info:
                    DuckDBStorageBackend.connect(db, read_only=read_only)
                assert info.value.path == str(db)
                assert "locked by another process" in str(info.value)
                assert isinstance(info.value, StorageError)
        finally:
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.wait(timeout=30)
    with DuckDBStorageBackend.connect(db) as b:  # free again
        assert b.count() == 3


def test_read_only_reads_and_refuses_writes(db: Path) -> None:
    ents = fill(db, 5)
    with DuckDBStorageBackend.connect(db, read_only=True) as b:
        assert b.read_only and b.count() == 5
        assert b.get(ents[2].id) == ents[2]
        assert [i for i, _ in b.search_vector(ents[1].embedding, 1)] == [ents[1].id]
        assert [i for i, _ in b.search_text("number", 5)] != []
        g = b.generation
        for write in (lambda: b.upsert([ent(9)]), lambda: b.delete(ents[0].id), lambda: b.supersede(ents[0].id, T0),
                      lambda: b.add_source(Source.for_text("x", T0)), lambda: b.checkpoint()):
            with pytest.raises(StorageError, match="read_only"):
                write()
        with pytest.raises(StorageError, match="read_only"):
            with b.transaction():
                pass
        assert b.save_index() is False
        assert b.generation == g and b.count() == 5


def test_read_only_cannot_create_or_migrate(tmp_path: Path) -> None:
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    with pytest.raises(SchemaVersionError, match="not a umi database"):
        DuckDBStorageBackend.connect(empty, read_only=True)
    with pytest.raises(StorageError):
        DuckDBStorageBackend.connect(tmp_path / "missing.duckdb", read_only=True)


# --- schema -----------------------------------------------------------------------------------


def test_a_newer_schema_is_refused(db: Path) -> None:
    fill(db, 1)
    con = duckdb.connect(str(db))
    con.execute("INSERT INTO umi_schema VALUES (99, 0)")
    con.close()
    with pytest.raises(SchemaVersionError) as info:
        DuckDBStorageBackend.connect(db)
    assert info.value.found == 99 and info.value.supported == SCHEMA_VERSION
    assert "99" in str(info.value) and str(SCHEMA_VERSION) in str(info.value)


def test_an_older_schema_is_migrated_forward(db: Path) -> None:
    con = duckdb.connect(str(db))
    assert migrate(con, 0, T0, upto=1) == 1
    con.close()
    with pytest.raises(SchemaVersionError) as info:
        DuckDBStorageBackend.connect(db, read_only=True)
    assert info.value.found == 1
    with DuckDBStorageBackend.connect(db) as b:
        b.upsert([ent(1)])
    con = duckdb.connect(str(db))
    versions = [r[0] for r in con.execute("SELECT version FROM umi_schema ORDER BY version").fetchall()]
    indexes = {r[0] for r in con.execute("SELECT index_name FROM duckdb_indexes()").fetchall()}
    con.close()
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert {"sources_by_hash", "relations_by_source", "relations_by_target"} <= indexes


def test_dim_at_connect_is_fixed_and_checked(db: Path) -> None:
    with DuckDBStorageBackend.connect(db, dim=4) as b:
        assert b.dim == 4
        with pytest.raises(ValidationError, match="4"):
            b.upsert([ent(1, emb=np.ones(3, np.float32))])
    con = duckdb.connect(str(db))
    coltype = con.execute("SELECT data_type FROM duckdb_columns() WHERE table_name = 'entities' "
                          "AND column_name = 'embedding'").fetchall()
    con.close()
    assert coltype == [("FLOAT[4]",)]
    with pytest.raises(InvalidConfigError) as info:
        DuckDBStorageBackend.connect(db, dim=8)
    assert "4" in str(info.value) and "8" in str(info.value)
    with DuckDBStorageBackend.connect(db, dim=4) as b:
        assert b.dim == 4


def test_connect_validates_its_arguments(db: Path) -> None:
    with pytest.raises(TypeError):
        DuckDBStorageBackend.connect(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError):
        DuckDBStorageBackend.connect(db, dim=0)
    with pytest.raises(TypeError):
        DuckDBStorageBackend.connect(db, read_only="no")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError):
        DuckDBStorageBackend.connect(db, save_index_every=0)


# --- persistence -------------------------------------------------------------------------------


def test_everything_survives_reopening(db: Path) -> None:
    rng = np.random.default_rng(3)
    a = Entity(
        "organization", "Acme", "makes anvils", metadata={"k": 1.5, "b": False, "s": "é"},
        embedding=unit(rng, 1)[0], created_at=T0, event_time=T0 - 5, source_id="s1")
    b_ = ent(2, content="Acme was founded in 1950")
    src = Source.for_text("Acme makes anvils", T0, {"via": "chat"})
    with DuckDBStorageBackend.connect(db) as s:
        s.upsert([a, b_])
        s.supersede(b_.id, T0 + 10)
        s.add_relations([EvolutionRelation(b_.id, a.id, "extend", reason="r", created_at=T0 + 1)])
        s.add_source(src)
        gen = s.generation
        hist = s.history(b_.id)
    with DuckDBStorageBackend.connect(db) as s:
        assert s.generation == gen
        assert s.get(a.id) == a
        got_b = s.get(b_.id)
        assert got_b is not None and got_b.valid_to == T0 + 10
        assert s.history(b_.id) == hist
        assert [r.reason for r in s.relations_for(a.id)] == ["r"]
        assert s.get_source(src.id) == src
        assert s.find_by_name("ACME")[0].id == a.id
        assert [i for i, _ in s.search_text("anvils", 3)] == [a.id]
        assert [i for i, _ in s.search_text("founded", 3, SearchFilters(include_superseded=True))] == [b_.id]
        assert s.list(SearchFilters(metadata={"k": 1.5}))[0].id == a.id
        s.upsert([ent(3)])  # writes after a lazy load keep every structure in step
        assert s.count() == 2


def test_generation_lives_in_duckdb(db: Path) -> None:
    """The generation rides on the rows a commit writes (history, entities); a commit writing
    neither (a source alone, a meta key) records it in umi_state. Reopened, the store knows it."""
    with DuckDBStorageBackend.connect(db) as b:
        for i in range(3):
            b.upsert([ent(i)])
        with b.transaction():
            b.upsert([ent(10)])
            b.upsert([ent(11)])
        assert b.generation == 4
        con = b._con
        assert con.execute("SELECT generation FROM umi_state").fetchall() == [(0,)]  # not written: rode along
        assert con.execute("SELECT DISTINCT generation FROM history WHERE entity_id IN (?, ?)",
                           [ent(10).id, ent(11).id]).fetchall() == [(4,)]
        b.add_source(Source(source_id_for("a text"), text_hash("a text"), "a text", T0))  # no history, no entity row
        b.set_meta("k", "v")
        assert b.generation == 6
        assert con.execute("SELECT generation FROM umi_state").fetchall() == [(6,)]
        b.supersede(ent(0).id, T0 + 50)  # a validity change tags its row and its history record
        b.delete(ent(1).id)  # only its history record (the delete) carries 8
        assert b.generation == 8
    with DuckDBStorageBackend.connect(db, read_only=True) as b:
        assert b.generation == 8
    con = duckdb.connect(str(db))
    con.execute("DELETE FROM history WHERE generation >= 7")  # ent(0)'s row still carries 7
    con.close()
    with DuckDBStorageBackend.connect(db, read_only=True) as b:
        assert b.generation == 7


def test_rolled_back_dimension_is_not_persisted(db: Path) -> None:
    with DuckDBStorageBackend.connect(db) as b:
        with pytest.raises(StorageError):
            with b.transaction():
                b.upsert([ent(1, emb=np.ones(5, np.float32))])
                raise RuntimeError("no")
    with DuckDBStorageBackend.connect(db) as b:
        assert b.dim is None and b.count() == 0
        b.upsert([ent(1, emb=np.ones(2, np.float32))])
        assert b.dim == 2


def test_close_inside_a_transaction_rolls_it_back(db: Path) -> None:
    b = DuckDBStorageBackend.connect(db)
    with pytest.raises(StorageError):
        with b.transaction():
            b.upsert([ent(1)])
            b.close()
    with DuckDBStorageBackend.connect(db) as b2:
        assert b2.count() == 0


# --- bulk writes ---------------------------------------------------------------------------------


class _CountingConnection:
    """Forwards to a DuckDB connection and counts the statements sent (the SQL text of a parsed
    statement too), on it and on its cursors, leaving out PRAGMAs and SETs (connection settings)."""

    def __init__(self, con: Any, parent: "_CountingConnection | None" = None) -> None:
        self._con = con
        self._root: _CountingConnection = self if parent is None else parent._root
        self.statements: list[str] = self._root.statements if parent is not None else []
        #: (statement, whether DuckDB's optimizer was on for it), on it and its cursors
        self.runs: list[tuple[str, bool]] = self._root.runs if parent is not None else []
        self.optimizer = True
        self.executemany_calls = 0

    def execute(self, sql: Any, *args: Any) -> Any:
        text = sql if isinstance(sql, str) else sql.query
        if text == "PRAGMA disable_optimizer":
            self.optimizer = False
        if not text.startswith(("PRAGMA", "SET ")):
            self.statements.append(text)
            self.runs.append((" ".join(text.split()[:3]), self.optimizer))
        return self._con.execute(sql, *args)

    def cursor(self) -> "_CountingConnection":
        return _CountingConnection(self._con.cursor(), self)

    def executemany(self, *args: Any) -> Any:  # pragma: no cover - must not be used
        self._root.executemany_calls += 1
        return self._con.executemany(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def test_upsert_uses_a_constant_number_of_bulk_statements(db: Path) -> None:
    rng = np.random.default_rng(1)
    with DuckDBStorageBackend.connect(db, dim=8) as b:
        spy = _CountingConnection(b._con)
        b._durable.con = spy
        vecs = unit(rng, 750)
        b.upsert([ent(i, emb=vecs[i], meta={"i": i}) for i in range(500)])
        first = len(spy.statements)
        spy.statements.clear()
        b.upsert([ent(i, emb=vecs[i], meta={"i": -i}) for i in range(250, 750)])  # half new, half replaced
        second = len(spy.statements)
        b._durable.con = spy._con
        assert spy.executemany_calls == 0
        assert first <= 8 and second <= 12
        assert b.count() == 750
        assert b.list(SearchFilters(metadata={"i": -300}))[0].id == ent(300).id
        assert b.list(SearchFilters(metadata={"i": 300})) == []


# --- the vector index cache -------------------------------------------------------------------------


def test_valid_cache_is_loaded_not_rebuilt(db: Path) -> None:
    ents = fill(db, 40)
    assert os.path.exists(str(db) + INDEX_SUFFIX)
    with DuckDBStorageBackend.connect(db) as b:
        assert b.index_load_status == "loaded"
        assert all(r[0] == e.id for r, e in zip(search_all(b, ents), ents))


def test_cache_behind_is_caught_up_including_deletions(db: Path) -> None:
    ents = fill(db, 30)
    idx = str(db) + INDEX_SUFFIX
    stale = Path(str(db) + ".stale")
    shutil.copy(idx, stale)
    rng = np.random.default_rng(9)
    extra = [ent(100 + i, emb=unit(rng, 1)[0]) for i in range(5)]
    with DuckDBStorageBackend.connect(db) as b:
        b.upsert(extra)
        b.delete(ents[0].id)
        b.upsert([ent(1, emb=-ents[1].embedding)])  # type: ignore[operator]  # vector changed
        b.upsert([ent(2)])  # vector dropped
        want_gen = b.generation
    shutil.copy(stale, idx)  # as if the process had died before saving the index
    _, stale_gen = VectorIndex.load(idx)
    assert stale_gen < want_gen
    with DuckDBStorageBackend.connect(db) as b:
        assert b.index_load_status == "caught_up"
        live = [e for e in ents[3:] + extra]
        assert all(r[0] == e.id for r, e in zip(search_all(b, live), live))
        assert ents[0].id not in {i for i, _ in b.search_vector(ents[0].embedding, 40)}
        assert ents[2].id not in {i for i, _ in b.search_vector(ents[2].embedding, 40)}
        assert b.search_vector(-ents[1].embedding, 1)[0][0] == ents[1].id  # type: ignore[operator]
        assert len(b.search_vector(ents[5].embedding, 100)) == 30 - 2 + 5  # no phantoms
    _, saved_gen = VectorIndex.load(idx)
    assert saved_gen == want_gen  # close saved the caught-up index


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "other_database", "future"])
def test_unusable_cache_is_rebuilt(db: Path, tmp_path: Path, damage: str) -> None:
    ents = fill(db, 25)
    idx = Path(str(db) + INDEX_SUFFIX)
    if damage == "missing":
        idx.unlink()
    elif damage == "truncated":
        idx.write_bytes(idx.read_bytes()[:100])
    elif damage == "garbage":
        data = bytearray(idx.read_bytes())
        data[len(data) // 2] ^= 0xFF
        idx.write_bytes(bytes(data))
    elif damage == "other_database":  # same generation, different vectors
        other = tmp_path / "other.duckdb"
        fill(other, 25, seed=5)
        shutil.copy(str(other) + INDEX_SUFFIX, idx)
    elif damage == "future":
        index, gen = VectorIndex.load(idx)
        index.save(idx, gen + 10)
    with DuckDBStorageBackend.connect(db) as b:
        assert b.index_load_status == "rebuilt"
        assert all(r[0] == e.id for r, e in zip(search_all(b, ents), ents))
    with DuckDBStorageBackend.connect(db) as b:
        assert b.index_load_status == "loaded"


def test_save_index_every_n_commits(db: Path) -> None:
    rng = np.random.default_rng(2)
    with DuckDBStorageBackend.connect(db, save_index_every=3) as b:
        for i in range(7):
            b.upsert([ent(i, emb=unit(rng, 1)[0])])
        _, gen = VectorIndex.load(str(db) + INDEX_SUFFIX)
        assert gen == 6
        assert b.save_index() is True
        assert VectorIndex.load(str(db) + INDEX_SUFFIX)[1] == 7
        with pytest.raises(StorageError, match="transaction"):
            with b.transaction():
                b.save_index()


def test_in_memory_store_has_no_index_file(tmp_path: Path) -> None:
    with DuckDBStorageBackend.connect(":memory:") as b:
        b.upsert([ent(1, emb=np.ones(3, np.float32))])
        assert b.index_path is None and b.save_index() is False
        b.checkpoint()


def test_a_failure_half_way_through_a_write_rolls_everything_back(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import umi.storage._duckdb_io as mod

    real = mod.insert_rows

    def failing(con: Any, table: str, data: Any, *, replace: bool = False) -> None:
        if table == "postings":  # entities are already inserted at this point
            raise RuntimeError("disk full")
        real(con, table, data, replace=replace)

    # the writes straight to the tables (a journaled commit's failure: test_a_failed_materialisation_...)
    monkeypatch.setattr(mod, "JOURNAL_COMMIT_ROWS_MAX", 0)
    with DuckDBStorageBackend.connect(db) as b:
        keep = ent(0, emb=np.ones(4, np.float32))
        b.upsert([keep])
        monkeypatch.setattr(mod, "insert_rows", failing)
        with pytest.raises(StorageError, match="rolled back") as info:
            b.upsert([ent(1, emb=np.ones(4, np.float32)), ent(2)])
        assert isinstance(info.value.__cause__, RuntimeError)
        # writes reach DuckDB at commit: the failing commit rolls the whole transaction back
        with pytest.raises(StorageError, match="commit failed and was rolled back") as outer:
            with b.transaction():
                assert b.supersede(keep.id, T0 + 1)
                b.upsert([ent(4)])
                assert b.count() == 1  # inside: the supersession hides keep, ent(4) is there
        assert isinstance(outer.value.__cause__, RuntimeError)
        monkeypatch.setattr(mod, "insert_rows", real)
        assert b.count() == 1 and b.generation == 1
        assert b.get(keep.id) == keep  # the supersession was rolled back too
        assert [i for i, _ in b.search_vector(np.ones(4, np.float32), 10)] == [keep.id]
        assert b.search_text("fact", 10) == [(keep.id, pytest.approx(b.search_text("fact", 1)[0][1]))]
        b.upsert([ent(5)])
        assert b.count() == 2
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM entities").fetchall() == [(2,)]
    assert con.execute("SELECT count(DISTINCT entity_id) FROM history").fetchall() == [(2,)]
    con.close()


def test_bm25_ties_past_k_are_broken_by_id(tmp_path):
    """Many equal documents tie at the k-th score: the smallest ids win, after every better row."""
    from umi import Entity
    from umi.storage.duckdb import DuckDBStorageBackend

    with DuckDBStorageBackend.connect(str(tmp_path / "ties.duckdb")) as st:
        same = [Entity("note", f"n{i:03d}", "alpha beta gamma") for i in range(60)]
        best = Entity("note", "best", "alpha alpha beta gamma")
        st.upsert(same + [best])
        got = st.search_text("alpha", 5)
        assert got[0][0] == best.id and got[0][1] > got[1][1]
        tied = sorted(e.id for e in same)[:4]
        assert [i for i, _ in got[1:]] == tied
        assert len({s for _, s in got[1:]}) == 1


# --- migration from a store written by an earlier umi -------------------------------------------

LEGACY = Path(__file__).parent.parent / "data" / "store_v2_5ac6732.duckdb.gz"


def test_a_store_written_by_schema_2_opens_and_its_facts_land_in_the_unset_scope(tmp_path: Path) -> None:
    """tests/data/store_v2_5ac6732.duckdb.gz was written by main at 5ac6732 (schema 2): 4 facts
    (one superseded by an `update` relation), 1 source with 2 of them, vectors of 3 dimensions."""
    import gzip

    from umi.storage.base import source_id_for
    from umi.types import Scope

    path = tmp_path / "old.duckdb"
    path.write_bytes(gzip.decompress(LEGACY.read_bytes()))
    with DuckDBStorageBackend.connect(path) as b:
        assert b.generation == 4 and b.dim == 3
        every = SearchFilters(include_superseded=True)
        ents = b.list(every)
        assert len(ents) == 4 and b.count() == 3
        assert all(e.scope == Scope() for e in ents)
        assert b.count(SearchFilters(include_superseded=True, scope=Scope())) == 4
        assert b.count(SearchFilters(scope=Scope("alice"))) == 0
        src_id = source_id_for("Alice works at Acme. Bob likes tea.")  # the old id is still the id
        src = b.get_source(src_id)
        assert src is not None and src.scope == Scope() and dict(src.metadata) == {"channel": "chat"}
        assert len(b.entity_ids_for_source(src_id)) == 2
        alice_old = next(e for e in ents if e.content == "Alice works at Acme")
        assert alice_old.valid_to is not None and alice_old.metadata == {"lang": "en"}
        rels = b.relations_for(alice_old.id)
        assert len(rels) == 1 and rels[0].scope == Scope()
        assert [h.op for h in b.history(alice_old.id)] == ["create", "supersede"]
        assert [i for i, _ in b.search_vector(np.array([1, 0, 0], np.float32), 1, every)] == [alice_old.id]
        assert b.search_text("budget", 1)[0][0] == next(e.id for e in ents if e.name == "budget")
        # new primitives work on the migrated file
        b.set_core_block(Scope("alice", "bot"), "persona", "kind", 0.5, T0)
        assert b.delete(alice_old.id, at=T0 + 50)
        b.set_meta("embedder", "sim|m|3")
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT max(version) FROM umi_schema").fetchall() == [(SCHEMA_VERSION,)]
    con.close()
    with DuckDBStorageBackend.connect(path) as b:
        assert b.count(SearchFilters(include_superseded=True)) == 3
        assert [(c.name, c.content) for c in b.core_blocks(Scope("alice", "bot", "s1"))] == [("persona", "kind")]
        assert b.get_meta("embedder") == "sim|m|3"


# --- the storage root: what a path may be, one store per file per process -------------------------


def test_a_nul_byte_in_the_path_is_refused_not_truncated(tmp_path: Path) -> None:
    victim = tmp_path / "alice"
    fill(victim, 1)
    for ro in (False, True):
        with pytest.raises(ValidationError, match="NUL"):
            DuckDBStorageBackend.connect(str(tmp_path / "alice\x00.bob.duckdb"), read_only=ro)


@pytest.mark.parametrize("suffix,body", [(".json", '{"a": 1}\n'), (".jsonl", '{"a": 1}\n{"a": 2}\n'),
                                         (".csv", "a,b\n1,2\n"), (".tsv", "a\tb\n1\t2\n")])
def test_a_data_file_that_duckdb_would_open_in_memory_is_refused(tmp_path: Path, suffix: str, body: str) -> None:
    p = tmp_path / f"notes{suffix}"
    p.write_text(body)
    for read_only in (False, True):  # read_only: DuckDB's own words were "Cannot launch in-memory database..."
        with pytest.raises(StorageError, match="not a DuckDB database"):
            DuckDBStorageBackend.connect(p, read_only=read_only)
    assert p.read_text() == body  # untouched
    with DuckDBStorageBackend.connect(p.with_suffix(".duckdb")) as b:  # the next open is not blocked
        b.upsert([ent(1)])


def test_a_parquet_file_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), p)
    with pytest.raises(StorageError, match="in-memory"):
        DuckDBStorageBackend.connect(p)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="directory"):
        DuckDBStorageBackend.connect(tmp_path)


def test_one_open_store_per_file_per_process(db: Path, tmp_path: Path) -> None:
    first = DuckDBStorageBackend.connect(db)
    first.upsert([ent(1)])
    for kw in ({}, {"read_only": True}):
        with pytest.raises(StorageLockedError, match="already open in this process") as info:
            DuckDBStorageBackend.connect(db, **kw)
        assert info.value.path == str(db)
    # the same file through another spelling of its path
    link = tmp_path / "link.duckdb"
    os.symlink(db, link)
    with pytest.raises(StorageLockedError):
        DuckDBStorageBackend.connect(tmp_path / "." / "umi.duckdb")
    with pytest.raises(StorageLockedError):
        DuckDBStorageBackend.connect(link)
    assert first.count() == 1  # the refused opens did not disturb the open store
    first.close()
    with DuckDBStorageBackend.connect(db) as again:
        assert again.count() == 1
    with DuckDBStorageBackend.connect(":memory:") as m1, DuckDBStorageBackend.connect(":memory:") as m2:
        m1.upsert([ent(1)])
        assert m2.count() == 0  # in-memory stores are separate


def test_a_corrupt_file_at_open_is_a_storage_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.duckdb"
    p.write_bytes(b"\x00garbage" * 4096)
    with pytest.raises(StorageError):
        DuckDBStorageBackend.connect(p)
    fill(p.with_name("ok.duckdb"), 2)
    raw = bytearray(p.with_name("ok.duckdb").read_bytes())
    raw[5000:9000] = os.urandom(4000)
    p.with_name("ok.duckdb").write_bytes(bytes(raw))
    try:
        DuckDBStorageBackend.connect(p.with_name("ok.duckdb")).close()
    except StorageError:
        pass  # typed: fine (the damage may also miss every block that is read)


# --- forget leaves nothing in the file --------------------------------------------------------------


def test_forgotten_text_is_in_no_table_of_the_file(db: Path) -> None:
    from umi.types import Scope

    secret = "Zebulon hides the key under the blue flowerpot"
    sc = Scope("alice")
    with DuckDBStorageBackend.connect(db, dim=4) as b:
        src = Source.for_text(secret + ". Alice likes tea.", T0, {"note": secret}, scope=sc)
        b.add_source(src)
        e = Entity("note", "Zebulon", secret, metadata={"where": secret}, embedding=np.ones(4, np.float32),
                   created_at=T0, source_id=src.id, scope=sc)
        keep = Entity("person", "Alice", "Alice likes tea", created_at=T0 + 1, scope=sc)
        other = Entity("person", "Alice", "Alice likes coffee", created_at=T0 + 2, scope=sc, source_id=src.id)
        b.upsert([e, keep, other])
        b.upsert([Entity("note", "Zebulon", secret, metadata={"where": secret, "v": 2},
                         embedding=np.ones(4, np.float32), created_at=T0, source_id=src.id, scope=sc)])
        b.supersede(e.id, T0 + 5)
        b.add_relations([EvolutionRelation(e.id, keep.id, "update", reason=secret, scope=sc)])
        b.checkpoint()
        assert b.delete(e.id, at=T0 + 9)
        assert b.get_source(src.id) is not None  # `other` still comes from it
        assert b.delete(other.id, at=T0 + 10)
        assert b.get_source(src.id) is None  # no remaining fact: the source text is gone
        assert b.relations_for(keep.id) == []
        assert all(dict(h.snapshot) == {"id": e.id, "forgotten": True} for h in b.history(e.id))
        b.checkpoint()
    con = duckdb.connect(str(db), read_only=True)
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()]
    assert {"entities", "sources", "relations", "history", "postings", "entity_metadata", "core_blocks"} <= set(tables)
    hits = []
    for t in tables:
        cols = [r[0] for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND data_type = 'VARCHAR'", [t]).fetchall()]
        for c in cols:
            for needle in ("Zebulon", "zebulon", "flowerpot", "coffee"):
                n = con.execute(f'SELECT count(*) FROM "{t}" WHERE strpos("{c}", ?) > 0', [needle]).fetchall()[0][0]
                if n:
                    hits.append((t, c, needle, n))
    con.close()
    assert hits == []


def test_injected_commit_failures_hit_duckdb_too(db: Path) -> None:
    """Fault injection wraps any durable store: a failing commit rolls back cache and file."""
    from umi.sim.faults import FaultInjector, FaultType
    from umi.types import Scope

    faults = FaultInjector(seed=1)
    with DuckDBStorageBackend.connect(db, faults=faults) as b:
        keep = ent(1, emb=np.ones(4, np.float32))
        b.upsert([keep])
        faults.force(FaultType.STORAGE_WRITE_FAIL, 1)
        with pytest.raises(StorageError, match="injected storage failure at commit"):
            with b.transaction():
                b.upsert([ent(2, emb=np.ones(4, np.float32))])
                b.delete(keep.id)
                b.set_core_block(Scope("u", "a"), "persona", "p", 0.5, T0)
        assert (b.count(), b.generation, b.get(keep.id)) == (1, 1, keep)
        assert b.core_blocks(Scope("u", "a")) == [] and [h.op for h in b.history(keep.id)] == ["create"]
        b.upsert([ent(3)])
    with DuckDBStorageBackend.connect(db) as b:
        assert sorted(e.id for e in b.list()) == sorted([keep.id, ent(3).id]) and b.generation == 2
    with pytest.raises(TypeError):
        DuckDBStorageBackend.connect(":memory:", faults="often")  # type: ignore[arg-type]


# --- statements per commit ------------------------------------------------------------------------


def test_a_raw_note_is_one_synced_append_to_the_commit_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """remember() of a raw note writes no DuckDB statement: its history record, fact, postings
    and source are one entry appended to the commit log and synced (one sync per remember, and
    one for the log's header), a commit that survives a crash when remember returns. The entries
    reach the tables later (here: at close), and the log is removed then."""
    import umi
    import umi.storage._commit_log as cl

    syncs: list[int] = []
    real_sync = cl._sync
    monkeypatch.setattr(cl, "_sync", lambda fd: (syncs.append(fd), real_sync(fd)))
    path = tmp_path / "notes.duckdb"
    opts = umi.RememberOptions().without_extraction()
    with umi.Memory(str(path), embedder=umi.SimEmbeddingProvider(0, 16)) as m:
        m.remember_sync("the first write also records the embedder", opts)
        durable = m.storage._durable  # type: ignore[attr-defined]
        spy = _CountingConnection(durable.con)
        durable.con = spy
        try:
            for i in range(3):
                m.remember_sync(f"note {i}: Alice moved to Lisbon", opts)
                assert len(syncs) == i + 2 and durable._journal_n == i + 1
        finally:
            durable.con = spy._con
        generation = m.storage.generation
        assert os.path.getsize(str(path) + cl.LOG_SUFFIX) > 3 * 16 * 4  # the three entries, vectors too
    assert not os.path.exists(str(path) + cl.LOG_SUFFIX)
    assert spy.executemany_calls == 0
    assert spy.statements == []
    with umi.Memory(str(path), embedder=umi.SimEmbeddingProvider(0, 16)) as m:  # all of it is there
        assert m.storage.generation == generation == 4
        assert m.count_sync() == 4
        assert [e.content for e in m.recall_sync("note 2 Lisbon", umi.RecallOptions(limit=1))] == [
            "note 2: Alice moved to Lisbon"]


def test_inserts_alone_commit_without_the_optimizer_and_writes_by_key_with_it(db: Path) -> None:
    """A commit that only inserts rows, too many for the journal (a remember of new facts is
    journaled), runs where DuckDB's optimizer is off: inserts have nothing to optimise. One that
    updates or deletes rows by key runs where it is on (those become index lookups and small
    joins). Each sees what the other committed."""
    from umi.storage._duckdb_io import JOURNAL_COMMIT_ROWS_MAX

    filler = [ent(10 + i) for i in range(JOURNAL_COMMIT_ROWS_MAX)]
    with DuckDBStorageBackend.connect(db, dim=4) as b:
        b.upsert([ent(0)])  # the first write also reads the store's orphan keys
        b.checkpoint()  # (the journal moved in)
        spy = _CountingConnection(b._con)
        b._durable.con = spy
        keep, gone = ent(1, emb=np.ones(4, np.float32)), ent(2, emb=np.full(4, 2.0, np.float32))
        b.upsert([keep, gone, *filler[:JOURNAL_COMMIT_ROWS_MAX // 2]])
        inserts, spy.runs[:] = list(spy.runs), []
        assert b.supersede(keep.id, T0 + 10) and b.delete(gone.id, at=T0 + 11)
        by_key, spy.runs[:] = list(spy.runs), []
        b.upsert([ent(3), *filler[JOURNAL_COMMIT_ROWS_MAX // 2:]])
        again = list(spy.runs)
        b._durable.con = spy._con
    assert "INSERT INTO entities" in [s for s, _ in inserts] and "INSERT INTO history" in [s for s, _ in inserts]
    assert {on for _, on in inserts} == {on for _, on in again} == {False}
    assert "UPDATE entities SET" in [s for s, _ in by_key] and "DELETE FROM entities" in [s for s, _ in by_key]
    assert {on for _, on in by_key} == {True}
    with DuckDBStorageBackend.connect(db) as b:
        assert b.get(keep.id).valid_to == T0 + 10 and b.get(gone.id) is None  # type: ignore[union-attr]
        assert [h.op for h in b.history(keep.id)] == ["create", "supersede"]
        assert sorted(e.id for e in b.list(SearchFilters(include_superseded=True))) == sorted(
            [ent(0).id, keep.id, ent(3).id, *(e.id for e in filler)])


def test_inline_reads_only_while_every_read_is_in_memory(tmp_path) -> None:
    # recall reads inline on its loop (no thread hop) only when no read can reach the database:
    # a store whose vectors are still to be fetched on demand after a reopen keeps the hop
    import numpy as np

    from umi.storage.base import StorageBackend

    path = tmp_path / "inline.duckdb"
    st = DuckDBStorageBackend.connect(path, dim=4)
    st.upsert([Entity("note", f"n{i}", f"text {i}", embedding=np.full(4, i + 1, np.float32)) for i in range(5)])
    assert st.inline_read_lock() is st._lock
    st.close()
    st = DuckDBStorageBackend.connect(path, dim=4, vectors="on_demand")
    try:
        assert st.inline_read_lock() is None
        assert len(st.get_many([e.id for e in st.list()])) == 5  # reads work, on a thread
        assert st.inline_read_lock() is None  # (those five are held, the store does not know it is all)
    finally:
        st.close()
    st = DuckDBStorageBackend.connect(path, dim=4)  # vectors="background": all read on a thread of its own
    try:
        assert st.wait_for_vectors(30)
        assert st.inline_read_lock() is st._lock
    finally:
        st.close()
    assert StorageBackend.inline_read_lock(st) is None  # the protocol's default: always hop


def test_inline_reads_of_a_source_only_when_memory_answers_for_it(tmp_path) -> None:
    # remember's duplicate check reads inline only when the text's source is known without the
    # database: a reopened (lazy) store asks DuckDB for a source it has not read, until its orphan
    # keys are read (then a new text's source is known to be absent)
    path = tmp_path / "sources.duckdb"
    told = Source.for_text("told before", T0)
    with DuckDBStorageBackend.connect(path) as st:
        st.add_source(told)
    st = DuckDBStorageBackend.connect(path)
    try:
        new, other = Source.for_text("never told", T0), Source.for_text("nor this", T0)
        assert st.inline_read_lock() is st._lock
        assert st.inline_read_lock([told.id]) is None and st.inline_read_lock([new.id]) is None
        assert st.get_source(told.id) == told  # read from the database
        assert st.get_source(new.id) is None
        assert st.inline_read_lock([told.id, new.id]) is st._lock
        assert st.inline_read_lock([other.id]) is st._lock  # the orphan keys were read: absent
    finally:
        st.close()


class _ThreadSettings:
    """Forwards to a DuckDB connection and keeps the ``SET threads`` statements sent to it."""

    def __init__(self, con: Any) -> None:
        self._con = con
        self.sets: list[str] = []

    def execute(self, sql: Any, *args: Any) -> Any:
        text = sql if isinstance(sql, str) else sql.query
        if text.startswith("SET threads"):
            self.sets.append(text)
        return self._con.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def test_duckdb_worker_threads_serve_bulk_work_only(db: Path) -> None:
    # once open, small statements (a remember's) run on the calling thread alone; a bulk write, a
    # scan or a checkpoint gets DuckDB's worker threads back for its own duration
    from umi.storage._duckdb_io import PARALLEL_ROWS_MIN

    pool = int(duckdb.connect().execute("SELECT current_setting('threads')").fetchall()[0][0])
    lent = [f"SET threads = {pool}", "SET threads = 1"] if pool > 1 else []
    with DuckDBStorageBackend.connect(db, dim=8) as b:
        def threads() -> int:
            return int(b._con.execute("SELECT current_setting('threads')").fetchall()[0][0])

        assert threads() == 1
        spy = _ThreadSettings(b._con)
        b._durable.con = spy
        vecs = unit(np.random.default_rng(2), PARALLEL_ROWS_MIN + 2)
        b.upsert([ent(0, emb=vecs[0])])
        assert spy.sets == lent  # the first write of a store reads its orphan keys: a scan
        spy.sets.clear()
        b.upsert([ent(1, emb=vecs[1])])
        assert spy.sets == []
        b.upsert([ent(i, emb=vecs[i]) for i in range(2, PARALLEL_ROWS_MIN + 2)])
        assert spy.sets == lent
        spy.sets.clear()
        b.checkpoint()
        assert spy.sets == lent
        b._durable.con = spy._con
        assert threads() == 1 and b.count() == PARALLEL_ROWS_MIN + 2


def test_a_bulk_commit_leaves_its_history_in_the_database_not_the_cache(db: Path) -> None:
    """A bulk upsert (>= HISTORY_KEEP_COMMIT_MAX records) keeps no snapshot per fact in memory;
    its history is read back when asked for, the same records as before. A small write's stays."""
    from umi.storage.cached import HISTORY_KEEP_COMMIT_MAX

    n = HISTORY_KEEP_COMMIT_MAX
    with DuckDBStorageBackend.connect(db) as b:
        b.upsert([ent(i) for i in range(n)])
        assert b._history == {}
        assert [(h.seq, h.op, h.snapshot["content"]) for h in b.history(ent(7).id)] == [(1, "create", "fact number 7")]
        revised = ent(7)
        revised.content = "fact seven, revised"
        b.upsert([revised])  # an update of a fact written in bulk
        assert [(h.seq, h.op, h.snapshot["content"]) for h in b.history(ent(7).id)] == [
            (1, "create", "fact number 7"), (2, "update", "fact seven, revised")]
        b.upsert([ent(n + 1)])  # a small commit: its record stays in the cache
        assert ent(n + 1).id in b._history
    with DuckDBStorageBackend.connect(db) as b:
        assert [h.op for h in b.history(ent(7).id)] == ["create", "update"]
        assert len(b.history(ent(n - 1).id)) == 1
