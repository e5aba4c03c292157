"""Adversarial review of the DuckDB journal (schema 5) and ``compact()``.

A small insert-only commit is one INSERT of its history rows, the first carrying the commit's
other rows; they are moved into the tables ("materialised") later, in one transaction. A row a
journaled commit carries is checked against the tables' keys only then, after the commit was
acknowledged. Each test here pins a way that went wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from umi.errors import StorageError, StorageLockedError
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity, EvolutionRelation

JOURNAL = "SELECT count(*) FROM history WHERE journal IS NOT NULL"


def _facts(n: int) -> list[Entity]:
    return [Entity("note", f"n{i}", f"content {i}", embedding=np.full(4, i + 1, np.float32) + np.arange(4),
                   created_at=1 + i) for i in range(n)]


def _rel(src: str, dst: str, rid: str, reason: str, at: int) -> EvolutionRelation:
    return EvolutionRelation(source_id=src, target_id=dst, evolution_type="update", reason=reason, id=rid,
                             created_at=at)


def _store_with_r1(db: Path, n: int) -> list[Entity]:
    """A closed store at ``db`` holding ``n`` facts and relation R1 between the first two."""
    es = _facts(n)
    with DuckDBStorageBackend.connect(db, dim=4) as b:
        b.upsert(es)
        b.add_relations([_rel(es[0].id, es[1].id, "R1", "first", 10)])
    return es


def test_a_journaled_relation_whose_id_is_stored_with_other_ends_does_not_brick_the_store(tmp_path: Path) -> None:
    """A relation id given by the caller, stored (after a reopen the cache has not read it: the
    relations are read per entity), then told again between two other facts together with a new
    fact: an insert-only commit, journaled. The tables hold that id already, so moving the journal
    in failed on the primary key — every read of the tables, every later write, the close, and
    every later open (read_only too) failed with a ConstraintException: the file could no longer
    be opened. The commit was acknowledged, so the relation it wrote replaces the stored one (as
    the cache already said, and as the Sim store does)."""
    db = tmp_path / "rel.duckdb"
    es = _store_with_r1(db, 4)
    new = Entity("note", "new", "a new fact", embedding=np.full(4, 9, np.float32) + np.arange(4), created_at=30)
    with DuckDBStorageBackend.connect(db, dim=4) as b:
        with b.transaction():
            b.upsert([new])
            b.add_relations([_rel(es[2].id, new.id, "R1", "second", 20)])
        assert b._durable._journal_n == 1  # (the case under test: journaled)
        assert [r.reason for r in b.iter_relations()] == ["second"]  # a read of every relation moves the journal
        assert b.relations_for(es[0].id) == []
        assert b.delete(es[3].id, at=100)  # a write by key moves it too
        assert b.count() == 4
    for read_only in (True, False):
        with DuckDBStorageBackend.connect(db, read_only=read_only) as b:
            rels = list(b.iter_relations())
            assert [(r.id, r.source_id, r.target_id, r.reason) for r in rels] == [("R1", es[2].id, new.id, "second")]
            assert b.get(new.id) is not None and b.get(es[3].id) is None
            assert b.count() == 4


def test_a_relation_id_stored_with_other_ends_is_replaced_by_a_direct_commit_too(tmp_path: Path) -> None:
    """The same relation id told again, in a commit that is not journaled (it also supersedes a
    fact: a write by key): it was refused with the key error while the journaled path and the Sim
    store replace the stored relation. One rule for all three: the commit's relation replaces it."""
    db = tmp_path / "rel.duckdb"
    es = _store_with_r1(db, 4)
    with DuckDBStorageBackend.connect(db, dim=4) as b:
        with b.transaction():
            assert b.supersede(es[2].id, 50)
            b.add_relations([_rel(es[2].id, es[3].id, "R1", "second", 20)])
        assert b._durable._journal_n == 0  # (the case under test: direct)
        assert [(r.source_id, r.reason) for r in b.iter_relations()] == [(es[2].id, "second")]
        assert b.get(es[2].id).valid_to == 50  # type: ignore[union-attr]
    with DuckDBStorageBackend.connect(db, read_only=True) as b:
        assert [(r.id, r.source_id, r.target_id) for r in b.iter_relations()] == [("R1", es[2].id, es[3].id)]
        assert b.relations_for(es[0].id) == [] and b.get(es[2].id).valid_to == 50  # type: ignore[union-attr]


def test_a_journal_that_conflicts_at_open_is_still_readable(tmp_path: Path) -> None:
    """The same conflict left in the file by a writer that died before moving the journal in (the
    journal is as a crash leaves it): a read_only open and a writable one both open the file."""
    db = tmp_path / "crashed.duckdb"
    es = _store_with_r1(db, 3)
    new = Entity("note", "new", "a new fact", embedding=np.full(4, 9, np.float32) + np.arange(4), created_at=30)
    b = DuckDBStorageBackend.connect(db, dim=4)
    raw = b._durable
    raw.materialise = lambda: None  # type: ignore[method-assign]  # the writer never moves it in
    with b.transaction():
        b.upsert([new])
        b.add_relations([_rel(es[2].id, new.id, "R1", "second", 20)])
    raw._log.close()  # close as a crash would: the commit left in the log
    raw._log = None
    raw._pending = []
    b.close()
    from umi.storage._commit_log import LOG_SUFFIX, read_log

    assert len(read_log(str(db) + LOG_SUFFIX, b.db_uuid)[0]) == 1
    for read_only in (True, False):
        with DuckDBStorageBackend.connect(db, read_only=read_only) as b:
            assert [(r.id, r.source_id, r.reason) for r in b.iter_relations()] == [("R1", es[2].id, "second")]
            assert b.get(new.id) is not None


@pytest.mark.parametrize("where", ["log", "schema 5"])
def test_a_journal_whose_keys_are_stored_or_repeated_replaces_those_rows_whole(tmp_path: Path, where: str) -> None:
    """The replacing path of moving the journal in, for every keyed table: a journaled fact whose
    id is stored (its old postings and metadata go with it), a source and a relation journaled
    twice (the later entry wins). Written as journal entries directly (a cache that knew every
    key would not write them), then moved in: pending entries of the commit log through the gate;
    the journal a schema-5 file kept in its history table (umi before the log) at the next open."""
    from umi.storage import _duckdb_io as io
    from umi.storage.base import Source

    db = tmp_path / "keys.duckdb"
    old = Entity("note", "x", "old words here", metadata={"k": 1}, embedding=np.arange(1, 5, dtype=np.float32),
                 created_at=1)
    other = _facts(1)[0]
    with DuckDBStorageBackend.connect(db, dim=4) as b:
        b.upsert([old, other])
        raw = b._durable
        con = raw.con
        new = Entity("note", "x", "new text", metadata={"j": "v"}, embedding=np.arange(4, 0, -1, dtype=np.float32),
                     created_at=5, id=old.id)
        terms = [({"new": 1, "text": 1}, 2)]
        src1, src2 = (Source("S1", "h", t, at, {}) for t, at in (("first", 6), ("second", 7)))
        for gen, (ents, src, reason) in enumerate([([new], src1, "one"), ([], src2, "two")], start=10):
            tables = [("entities", io.entities_rows(ents, terms[:len(ents)], gen, 4)),
                      ("postings", io.postings_rows(ents, [t[0] for t in terms[:len(ents)]])),
                      ("entity_metadata", io.metadata_rows(ents)), ("sources", io.sources_rows([src])),
                      ("relations", io.relations_rows([_rel(old.id, other.id, "R", reason, gen)]))]
            if where == "log":
                raw._pending.append(tables)
            else:
                text, vectors = io.journal_entry(tables)
                con.execute("INSERT INTO history (entity_id, seq, op, at_ms, snapshot, generation, journal, "
                            "journal_vectors) VALUES (?, 99, 'create', 0, '{}', ?, ?, ?)", [f"h{gen}", gen, text, vectors])
    with DuckDBStorageBackend.connect(db, dim=4) as b:  # the open moves in a schema-5 journal
        con = b._durable.con
        assert con.execute(JOURNAL).fetchall()[0][0] == 0
        assert con.execute("SELECT content, embedding FROM entities WHERE id = ?", [old.id]).fetchall() == [
            ("new text", (4.0, 3.0, 2.0, 1.0))]
        assert sorted(con.execute("SELECT term FROM postings WHERE entity_id = ?", [old.id]).fetchall()) == [
            ("new",), ("text",)]
        assert con.execute("SELECT key FROM entity_metadata WHERE entity_id = ?", [old.id]).fetchall() == [("j",)]
        assert con.execute("SELECT text FROM sources").fetchall() == [("second",)]
        assert con.execute("SELECT reason FROM relations").fetchall() == [("two",)]
        assert con.execute("SELECT count(*) FROM entities").fetchall() == [(2,)]


RACING_OPEN = r"""
import sys
import numpy as np
from umi.errors import StorageLockedError
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

try:
    b = DuckDBStorageBackend.connect(sys.argv[1])
except StorageLockedError:
    print("REFUSED", flush=True)
    raise SystemExit(0)
b.upsert([Entity("note", "racer", "written by the other process", embedding=np.ones(4, np.float32), created_at=7)])
b.close()
print("ACK", flush=True)
"""


def _race(db: Path) -> str:
    """Another process opens ``db`` now and, if it may, writes a fact and closes: its output."""
    import subprocess
    import sys

    from child_process import child_env

    done = subprocess.run([sys.executable, "-c", RACING_OPEN, str(db)], capture_output=True, text=True, timeout=120,
                          env=child_env(), cwd=db.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("when", ["at the rename", "before the reopen"])
def test_a_process_that_opens_the_file_while_it_is_compacted_loses_nothing(tmp_path: Path, when: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """compact() renames a new file over the database. Another process that opens the file while
    the compact runs is refused (both files are open, so locked, across the rename); one that
    opens it once the compact closed them, before the store opens the new file again, gets the
    new file with every commit in it; when it writes there, the store (whose cache no longer
    matches the file) is refused and closed. Nobody writes to the replaced file."""
    from umi.storage import duckdb as umi_duckdb

    db = tmp_path / "raced.duckdb"
    b = DuckDBStorageBackend.connect(db, dim=4)
    b.upsert(_facts(2))
    seen: list[str] = []
    if when == "at the rename":
        real_replace = umi_duckdb.os.replace

        def replace(src: str, dst: str) -> None:
            if str(src).endswith(umi_duckdb.COMPACT_SUFFIX):
                seen.append(_race(db))
            real_replace(src, dst)

        monkeypatch.setattr(umi_duckdb.os, "replace", replace)
        assert b.compact() is True
        assert seen == ["REFUSED\n"]
        b.upsert([Entity("note", "after", "written after the compact", embedding=np.ones(4, np.float32),
                         created_at=9)])
        b.close()
    else:
        real_open = umi_duckdb.open_connection

        def open_connection(path: str, read_only: bool) -> object:
            seen.append(_race(db))
            return real_open(path, read_only)

        monkeypatch.setattr(umi_duckdb, "open_connection", open_connection)
        with pytest.raises(StorageLockedError, match="another process .* while it was compacted"):
            b.compact()  # the racer wrote to the new file before the store opened it again
        assert seen == ["ACK\n"]
        with pytest.raises(StorageError, match="closed"):
            b.get("anything")
        b.close()
    with DuckDBStorageBackend.connect(db, read_only=True) as r:
        names = sorted(e.name for e in r.iter_all())
    assert names == (["after", "n0", "n1"] if when == "at the rename" else ["n0", "n1", "racer"])
