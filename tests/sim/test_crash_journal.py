"""The DuckDB journal under SIGKILL, and every read path over journaled commits.

A commit that only inserts rows is appended to the commit log beside the database file and
synced (the journal); its rows are moved into the tables later, in one transaction (see
``umi.storage._duckdb_io`` and ``umi.storage._commit_log``). A child process writes
acknowledged transactions (a fact with a vector and metadata, its source; the first also a
relation) and is killed with SIGKILL either with every commit still in the log, half way
through moving them into the tables, or after moving them in but before the log is emptied.
Every acknowledged write must then be there, once: through a read_only open (which leaves the
files as they are) and a writable one (which removes the log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

from umi.storage.base import SearchFilters, Source

from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity, EvolutionRelation

T0 = 1_700_000_000_000
N = 12


def logged(path: Path) -> int:
    """How many commits the log beside ``path`` holds (0: no log)."""
    from umi.storage._commit_log import LOG_SUFFIX, MAGIC, read_log

    log = str(path) + LOG_SUFFIX
    if not os.path.exists(log):
        return 0
    with open(log, "rb") as f:
        db_uuid = f.read(len(MAGIC) + 36)[len(MAGIC):].decode("ascii")  # (the header's: read while the store is open)
    return len(read_log(log, db_uuid)[0])

CHILD = r"""
import os, signal, sys
import numpy as np
import umi.storage._duckdb_io as io
from umi.storage.base import SearchFilters, Source
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity, EvolutionRelation
sys.path.insert(0, os.path.dirname(sys.argv[4]))
from test_crash_journal import write_one

path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
b = DuckDBStorageBackend.connect(path, dim=8)
b.upsert([Entity("person", "first", "written before the journaled ones", created_at=1)])
ids = []
for i in range(n):
    ids.append(write_one(b, i))
    print("ACK", ids[-1], flush=True)
if mode == "during":
    real = io.insert_rows

    def dying(con, table, rows, *, replace=False):
        if table == "postings":  # every entry's entities are in, the transaction still open
            os.kill(os.getpid(), signal.SIGKILL)
        return real(con, table, rows, replace=replace)

    io.insert_rows = dying
    b.delete(ids[0])  # a write by key moves the journal into the tables first
    print("NOT KILLED", flush=True)
if mode == "moved":
    import umi.storage._commit_log as cl

    def dying(self):  # the journal is in the tables (committed); the log not emptied yet
        os.kill(os.getpid(), signal.SIGKILL)

    cl.CommitLog.empty = dying
    b.delete(ids[0])
    print("NOT KILLED", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def vec(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(8).astype(np.float32)


def fact(i: int) -> tuple[Entity, Source]:
    src = Source.for_text(f"the text of journal fact {i}", T0 + i)
    return Entity("person", f"name {i}", f"journal fact {i} zebra{i}", metadata={"i": i}, embedding=vec(i),
                  created_at=T0 + i, source_id=src.id), src


def companion(i: int) -> Entity:
    return Entity("note", f"companion {i}", f"what fact {i} extends", created_at=T0 + i)


def write_one(b: DuckDBStorageBackend, i: int) -> str:
    """One transaction: a fact, its source; for the first fact also a companion fact and a
    relation between the two (adding a relation reads the relations of its ends first: a read
    that moves the journal into the tables, so only the first transaction has one)."""
    e, src = fact(i)
    with b.transaction():
        b.add_source(src)
        if i:
            b.upsert([e])
        else:
            c = companion(i)
            b.upsert([e, c])
            b.add_relations([EvolutionRelation(e.id, c.id, "extend", id=f"rel{i}", created_at=T0 + i)])
    return e.id


def raw(path: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def check_every_write(b: DuckDBStorageBackend, ids: list[str]) -> None:
    assert b.count() == len(ids) + 2
    for i, eid in enumerate(ids):
        e, src = fact(i)
        got = b.get(eid)
        assert got is not None and got.content == e.content and got.metadata == {"i": i}
        assert got.embedding is not None and np.array_equal(got.embedding, vec(i))
        assert [h.op for h in b.history(eid)] == ["create"]
        assert b.get_source(src.id) == src and b.find_source_by_hash(src.text_hash) == src
        assert b.entity_ids_for_source(src.id) == [eid]
        assert [(r.source_id, r.target_id) for r in b.relations_for(eid)] == ([(eid, companion(i).id)] if i == 0 else [])
        assert b.search_text(f"zebra{i}", 1)[0][0] == eid
        assert b.search_vector(vec(i), 1)[0][0] == eid
    assert b.get(companion(0).id) is not None
    assert len(list(b.iter_sources())) == len(ids) and len(list(b.iter_relations())) == 1


@pytest.mark.parametrize("mode", ["after", "during", "moved"])
def test_a_kill_before_or_during_materialisation_loses_no_acknowledged_write(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "journal.duckdb"
    from child_process import child_env  # (here, not at the top: the child imports this module)

    here = os.path.abspath(__file__)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(N), here], capture_output=True,
                          text=True, timeout=300, env=child_env(), cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "NOT KILLED" not in proc.stdout
    ids = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ACK ")]
    assert len(ids) == N
    # the kill left every commit in the log (the one during materialisation rolled back); "moved":
    # in the tables too, and the log not emptied
    assert logged(path) == N + 1
    assert raw(path, "SELECT count(*) FROM entities") == [(N + 2 if mode == "moved" else 0,)]
    with DuckDBStorageBackend.connect(path, read_only=True) as b:
        check_every_write(b, ids)
        assert b.generation == N + 1
    assert logged(path) == N + 1  # a read_only open writes nothing
    with DuckDBStorageBackend.connect(path) as b:
        check_every_write(b, ids)
        assert b.generation == N + 1
        assert logged(path) == 0  # moved in (or found there) at open, and the log removed
        ids.append(write_one(b, N))
        assert logged(path) == 1
    assert logged(path) == 0 and not os.path.exists(str(path) + ".umilog")
    assert raw(path, "SELECT count(*), count(DISTINCT id) FROM entities") == [(N + 3, N + 3)]
    assert raw(path, "SELECT count(*) FROM postings p WHERE NOT EXISTS "
                     "(SELECT 1 FROM entities e WHERE e.id = p.entity_id)") == [(0,)]
    with DuckDBStorageBackend.connect(path, read_only=True) as b:
        check_every_write(b, ids)


def journaled(path: Path) -> tuple[DuckDBStorageBackend, list[str]]:
    """A store whose four commits are all in the journal."""
    b = DuckDBStorageBackend.connect(path, dim=8)
    b.upsert([Entity("person", "first", "written before the journaled ones", created_at=1)])
    b._durable.materialise()  # type: ignore[attr-defined]
    ids: list[str] = []
    for i in range(4):
        ids.append(write_one(b, i))
    assert b._durable._journal_n == 4  # type: ignore[attr-defined]
    return b, ids


def test_every_database_read_sees_journaled_commits(tmp_path: Path) -> None:
    """History, sources, relations, orphans, vectors, the load, the changed-since check, raw SQL,
    a checkpoint, the iterations an export runs: each reads the tables only after the journal is
    moved into them (each on a store of its own, its four commits journaled)."""
    srcs = [fact(i)[1] for i in range(4)]
    reads = {
        "history": lambda b, d, ids: sorted(r[0] for r in d.load_history(ids)) == sorted(ids),
        "sources": lambda b, d, ids: sorted(s.id for s in d.load_sources(ids=[s.id for s in srcs])) == sorted(
            s.id for s in srcs),
        "sources by hash": lambda b, d, ids: len(d.load_sources(hashes=[s.text_hash for s in srcs])) == 4,
        "relations": lambda b, d, ids: len(d.load_relations(ids)) == 1,
        "orphans": lambda b, d, ids: d.load_orphans().sources == frozenset(),
        "vectors": lambda b, d, ids: sorted(d._fetch_vectors(8, ids)[0]) == sorted(ids),
        "load": lambda b, d, ids: len(d.load(8).rows.ids) == 6,
        "changed since": lambda b, d, ids: set(ids) <= set(b._changed_since(1)),
        "raw SQL": lambda b, d, ids: b._con.execute("SELECT count(*) FROM entities").fetchall() == [(6,)],
        "checkpoint": lambda b, d, ids: b.checkpoint() is None and raw_count(b, "entities") == 6,
        "export": lambda b, d, ids: (len(list(b.iter_sources())) == 4 and len(list(b.iter_relations())) == 1
                                     and len(list(b.iter_history())) == 6),
    }
    for n, (what, read) in enumerate(reads.items()):
        b, ids = journaled(tmp_path / f"reads{n}.duckdb")
        with b:
            durable = b._durable  # type: ignore[attr-defined]
            assert raw_count(b, "entities") == 1 and durable._journal_n == 4 and logged(b.path) == 4
            assert read(b, durable, ids), what


def test_a_read_keyed_away_from_the_journal_leaves_it_pending(tmp_path: Path) -> None:
    """A keyed read moves the journal only when it holds a row of that table with one of the keys:
    the relations of a fact none of whose relations are journaled, the history of a fact written
    before, a source by another id, vectors of a fact written before."""
    b, ids = journaled(tmp_path / "keyed.duckdb")
    with b:
        durable = b._durable  # type: ignore[attr-defined]
        first = [e.id for e in b.list() if e.name == "first"]
        assert durable.load_relations(first) == [] and durable.load_relations([ids[3]]) == []
        assert [r[0] for r in durable.load_history(first)] == first
        assert durable.load_sources(ids=["no such source"]) == []
        assert durable._fetch_vectors(8, first)[0] == []  # (it has no vector)
        assert durable._journal_n == 4
        assert [r.target_id for r in durable.load_relations([ids[0]])] == [companion(0).id]  # journaled: moved
        assert durable._journal_n == 0


def test_a_write_by_key_applies_after_the_journaled_commits(tmp_path: Path) -> None:
    b, ids = journaled(tmp_path / "bykey.duckdb")
    with b:
        assert b.supersede(ids[1], T0 + 100) and b.delete(ids[2], at=T0 + 101)
        assert b._durable._journal_n == 0 and logged(b.path) == 0  # type: ignore[attr-defined]
    with DuckDBStorageBackend.connect(tmp_path / "bykey.duckdb", read_only=True) as b:
        assert b.get(ids[1]).valid_to == T0 + 100 and b.get(ids[2]) is None  # type: ignore[union-attr]
        assert [h.op for h in b.history(ids[1])] == ["create", "supersede"]
        assert b.count() == 4 and b.count(SearchFilters(include_superseded=True)) == 5


def test_an_older_file_is_migrated_to_the_journal_schema(tmp_path: Path) -> None:
    from umi.storage._duckdb_schema import SCHEMA_VERSION, migrate

    path = tmp_path / "v4.duckdb"
    con = duckdb.connect(str(path))
    migrate(con, 0, T0, upto=4)
    con.close()
    with DuckDBStorageBackend.connect(path, dim=8) as b:
        b.upsert([Entity("person", "first", "written before the journaled ones", created_at=1)])
        ids = [write_one(b, i) for i in range(3)]
        assert b._durable._journal_n >= 2  # type: ignore[attr-defined]
    assert raw(path, "SELECT max(version) FROM umi_schema") == [(SCHEMA_VERSION,)] and SCHEMA_VERSION >= 5
    assert raw(path, "SELECT count(*) FROM entities") == [(5,)]
    with DuckDBStorageBackend.connect(path, read_only=True) as b:
        check_every_write(b, ids)


def raw_count(b: DuckDBStorageBackend, table: str) -> int:
    sql = table if table.startswith("SELECT") else f"SELECT count(*) FROM {table}"
    return int(b._durable._con.execute(sql).fetchall()[0][0])  # type: ignore[attr-defined]
