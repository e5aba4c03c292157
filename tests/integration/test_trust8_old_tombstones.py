"""User story (stop 23, trust): tombstones written by an older umi are re-filed under no scope.

Since stop 22, forgetting a fact files its history records (tombstones) under
``TOMBSTONE_SCOPE``. A store written before kept them under the fact's user, agent and session,
so "forget this user" left rows naming her, and her scoped view still listed the tombstones of
a fact she had forgotten. Opening such a store now re-files them once (DuckDB schema 6, Lance 4,
Postgres 4). The old-style store is made by writing a store with this umi, then putting the
tombstones back under their fact's scope and the schema version back, as the older umi left them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import umi
from umi.storage._common import dumps as common_dumps
from umi.storage._rows import dumps as rows_dumps
from umi.storage.base import TOMBSTONE_SCOPE, TOMBSTONE_TEXT_PREFIX, SearchFilters, tombstone

ALICE = "alice-5c1d"
KINDS = ["duckdb", "lance", "postgres"]


def test_every_backend_writes_tombstones_with_the_prefix_the_migration_looks_for() -> None:
    for dumps in (common_dumps, rows_dumps):
        assert dumps(tombstone("e-1")).startswith(TOMBSTONE_TEXT_PREFIX)
        assert dumps(tombstone("e'\"ü")).startswith(TOMBSTONE_TEXT_PREFIX)
        # an entity's snapshot never begins so (its first key is not "forgotten")
        assert not dumps({"confidence": 1.0, "id": "x", "metadata": {"forgotten": True}}).startswith(
            TOMBSTONE_TEXT_PREFIX)


class _Kind:
    """Open a store of one backend kind; make it old-style (tombstones under ``scope``, the schema
    version back to the one before the migration)."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        if kind == "lance":
            pytest.importorskip("lancedb", reason="the lance extra (lancedb) is not installed")
        if kind == "postgres":
            self.url: str = request.getfixturevalue("postgres_url")
            self.schema: str = request.getfixturevalue("pg_schema")

    def store(self) -> Any:
        if self.kind == "lance":
            from umi.storage.lance import LanceStorageBackend

            return LanceStorageBackend.connect(self.tmp_path / "lance")
        if self.kind == "postgres":
            from umi.storage.postgres import PostgresStorageBackend

            return PostgresStorageBackend.connect(self.url, schema=self.schema)
        from umi.storage.duckdb import DuckDBStorageBackend

        return DuckDBStorageBackend.connect(self.tmp_path / "s.duckdb")

    def memory(self) -> umi.Memory:
        return umi.Memory._from_parts(storage=self.store(), llm=None, embedder=umi.SimEmbeddingProvider(seed=1))

    def make_old(self, scope: umi.Scope) -> int:
        """File every tombstone under ``scope`` and set the schema version back; returns how many."""
        values = [scope.user_id, scope.agent_id, scope.session_id]
        if self.kind == "duckdb":
            import duckdb

            con = duckdb.connect(str(self.tmp_path / "s.duckdb"))
            try:
                n = con.execute("UPDATE history SET user_id = ?, agent_id = ?, session_id = ? "
                                "WHERE starts_with(snapshot, ?)", [*values, TOMBSTONE_TEXT_PREFIX]).fetchall()[0][0]
                con.execute("DELETE FROM umi_schema WHERE version > 5")
            finally:
                con.close()
            return int(n)
        if self.kind == "lance":
            import lancedb

            t = lancedb.connect(str(self.tmp_path / "lance" / "lance")).open_table("history")
            where = "starts_with(snapshot, '" + TOMBSTONE_TEXT_PREFIX + "')"
            n = t.count_rows(where)
            t.update(where=where, values=dict(zip(("user_id", "agent_id", "session_id"), values)))
            state_path = self.tmp_path / "lance" / "state.json"
            state = json.loads(state_path.read_text())
            state_path.write_text(json.dumps(dict(state, schema_version=3)))
            return int(n)
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True) as conn:
            history, migrations = (sql.Identifier(self.schema, "umi_" + t) for t in ("history", "migrations"))
            cur = conn.execute(sql.SQL("UPDATE {} SET user_id = %s, agent_id = %s, session_id = %s "
                                       "WHERE starts_with(snapshot, %s)").format(history),
                               [*values, TOMBSTONE_TEXT_PREFIX])
            n = cur.rowcount
            conn.execute(sql.SQL("DELETE FROM {} WHERE version > 3").format(migrations))
        return int(n)


def _history_rows(kind: _Kind) -> list[Any]:
    store = kind.store()
    try:
        return list(store.iter_history())
    finally:
        store.close()


@pytest.mark.parametrize("kind_name", KINDS)
def test_tombstones_of_an_older_umi_are_refiled_under_no_scope_at_open(
        tmp_path: Path, kind_name: str, request: pytest.FixtureRequest) -> None:
    """Alice tells two facts, forgets one, closes (with the older umi, whose tombstones kept her
    scope). The upgraded umi opens the store: her forgotten fact's history is [] in her view, as the
    README says; the unscoped view sees the tombstones, filed under no scope. She then asks to be
    forgotten: no history row names her. Was: her view listed the tombstones, and after forget_scope
    they still named her (the CHANGELOG said so: 'forget_scope does not re-file them')."""
    kind = _Kind(kind_name, tmp_path, request)
    scope = umi.Scope(user_id=ALICE, agent_id="helper")
    with kind.memory() as m:
        alice = m.scoped(user_id=ALICE, agent_id="helper")
        tea = alice.remember_sync("Alice likes tea.").entities[0].id
        alice.remember_sync("Alice works at Acme.")
        assert alice.forget_sync(tea) is True
    assert kind.make_old(scope) == 2  # create + delete, under her scope as the older umi left them

    with kind.memory() as m:  # the upgraded umi opens it
        alice = m.scoped(user_id=ALICE, agent_id="helper")
        assert alice.history_sync(tea) == []  # was: both tombstones, under her scope
        stones = m.history_sync(tea)
        assert [(h.seq, h.op) for h in stones] == [(1, "create"), (2, "delete")]
        assert all(h.scope == TOMBSTONE_SCOPE and dict(h.snapshot) == tombstone(tea) for h in stones)
        kept = alice.storage.list(SearchFilters(scope=scope), limit=10)
        assert {e.content for e in kept} == {"Alice works at Acme."}
        assert m.forget_scope_sync(user_id=ALICE) == len(kept)
    left = _history_rows(kind)  # read again after close
    assert [h for h in left if ALICE in str(h)] == []
    assert sorted((h.seq, h.op) for h in left if h.entity_id == tea) == [(1, "create"), (2, "delete")]

    with kind.memory() as m:  # opened again: nothing to re-file, nothing changed
        assert [(h.seq, h.op, h.scope) for h in m.history_sync(tea)] == [
            (1, "create", TOMBSTONE_SCOPE), (2, "delete", TOMBSTONE_SCOPE)]


def test_a_duckdb_store_of_an_older_umi_opened_read_only_asks_for_a_writable_open_first(tmp_path: Path) -> None:
    """The re-filing is a schema step, so a read_only open of an older store is refused (as for
    every migration) with the way out; once opened writable it opens read_only."""
    kind = _Kind("duckdb", tmp_path, None)  # type: ignore[arg-type]
    with kind.memory() as m:
        fact = m.remember_sync("Alice likes tea.").entities[0].id
        m.forget_sync(fact)
    kind.make_old(umi.Scope(user_id=ALICE))
    from umi.storage.duckdb import DuckDBStorageBackend

    with pytest.raises(umi.SchemaVersionError, match="without read_only"):
        DuckDBStorageBackend.connect(tmp_path / "s.duckdb", read_only=True)
    kind.store().close()
    ro = DuckDBStorageBackend.connect(tmp_path / "s.duckdb", read_only=True)
    try:
        assert [h.scope for h in ro.history(fact)] == [TOMBSTONE_SCOPE, TOMBSTONE_SCOPE]
    finally:
        ro.close()


