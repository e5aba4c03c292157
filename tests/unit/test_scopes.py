"""Scopes at the Memory level: whose memory a view reads and writes (user / agent / session).

Stories over the Sim memory and a DuckDB-file memory: two users told the same and
different things, evolution within one user only, forget within one scope, views that
narrow and never leave their scope, the embedder identity a store remembers.
"""

from __future__ import annotations

import numpy as np
import pytest

import umi
from umi.providers.base import EmbeddingProvider
from umi import InvalidConfigError, InvalidScopeError, RecallOptions, RememberOptions, Scope, SearchFilters



def exported(m):
    """What ``m.export`` writes, as records."""
    import io
    import json

    buf = io.StringIO()
    m.export_sync(buf)
    return [json.loads(line) for line in buf.getvalue().splitlines()]

def duckdb_memory(path, seed=7, **scope):
    return umi.Memory(str(path), llm=umi.SimLLMProvider(seed), embedder=umi.SimEmbeddingProvider(seed), **scope)


@pytest.fixture(params=["sim", "duckdb"])
def memory(request, tmp_path):
    m = umi.Memory.sim(seed=7) if request.param == "sim" else duckdb_memory(tmp_path / "scopes.duckdb")
    yield m
    m.close()


def names(entities):
    return sorted({e.name for e in entities})


def test_two_users_tell_the_same_text_and_each_keeps_their_own(memory):
    alice, bob = memory.scoped(user_id="alice"), memory.scoped(user_id="bob")
    ra = alice.remember_sync("Carol works at Acme Corp")
    rb = bob.remember_sync("Carol works at Acme Corp")
    assert not ra.duplicate and not rb.duplicate  # dedup is per exact scope
    assert ra.source_id != rb.source_id
    assert {e.id for e in ra.entities}.isdisjoint(e.id for e in rb.entities)
    assert all(e.scope == Scope(user_id="alice") for e in ra.entities)
    assert all(e.scope == Scope(user_id="bob") for e in rb.entities)
    assert alice.remember_sync("Carol works at Acme Corp").duplicate  # ...within one scope it is one text
    assert alice.count_sync() == bob.count_sync() == 2 and memory.count_sync() == 4

    hits_a = alice.recall_sync("Where does Carol work?")
    assert hits_a and {h.scope for h in hits_a} == {Scope(user_id="alice")}
    for e in rb.entities:  # bob's facts do not exist for alice, by any read
        assert alice.get_sync(e.id) is None
        assert alice.history_sync(e.id) == [] and alice.relations_sync(e.id) == []
        assert bob.get_sync(e.id) == memory.get_sync(e.id) is not None
    assert {d["id"] for d in exported(alice) if d["kind"] == "entity"} == {e.id for e in ra.entities}


def test_evolution_compares_one_users_facts_only(memory):
    alice, bob = memory.scoped(user_id="alice"), memory.scoped(user_id="bob")
    first = alice.remember_sync("Dave works at Acme Corp")
    other = bob.remember_sync("Dave left Acme and now works at Initech")
    assert other.evolutions == []  # bob's Dave is not alice's Dave
    assert all(alice.get_sync(e.id).valid_to is None for e in first.entities)
    mine = alice.remember_sync("Dave left Acme and now works at Initech")
    assert mine.has_evolutions and {r.scope for r in mine.evolutions} == {Scope(user_id="alice")}
    dave = [e for e in first.entities if e.name == "Dave"][0]
    assert alice.get_sync(dave.id).valid_to is not None  # superseded in alice's scope
    assert [r.op for r in alice.history_sync(dave.id)] == ["create", "supersede"]
    assert all(bob.get_sync(e.id).valid_to is None for e in other.entities)


def test_a_users_agent_and_session_facts_see_each_other_for_evolution(memory):
    user = memory.scoped(user_id="erin")
    s1 = user.scoped(session_id="s1")
    s2 = memory.scoped(user_id="erin", agent_id="helper", session_id="s2")
    old = s1.remember_sync("Erin lives in Paris")
    new = s2.remember_sync("Erin moved away from Paris and now lives in Lisbon")
    erin_old = [e for e in old.entities if e.name == "Erin"][0]
    assert any(r.source_id == erin_old.id for r in new.evolutions)
    assert user.get_sync(erin_old.id).valid_to is not None
    # each session sees only its own facts; the user's view sees both sessions
    assert s1.get_sync(new.entities[0].id) is None and s2.get_sync(erin_old.id) is None
    assert user.count_sync() == len(old.entities) + len(new.entities)
    assert {h.scope.session_id for h in user.recall_sync("Erin", RecallOptions(include_superseded=True))} == {"s1", "s2"}


def test_forget_never_reaches_into_another_scope(memory):
    alice, bob = memory.scoped(user_id="alice"), memory.scoped(user_id="bob")
    ra = alice.remember_sync("Frank plays the violin")
    bob.remember_sync("Frank plays the violin")
    bob.remember_sync("Grace studies marine biology")
    fid = ra.entities[0].id
    assert bob.forget_sync(fid) is False and alice.get_sync(fid) is not None
    assert bob.forget_source_sync(ra.source_id) == 0 and alice.count_sync() == 1
    n_bob = bob.count_sync()
    assert n_bob >= 2 and bob.forget_sync(where=SearchFilters(include_superseded=True)) == n_bob  # none of alice's
    assert bob.count_sync() == 0 and alice.count_sync() == 1
    assert alice.forget_sync(fid) is True and memory.count_sync() == 0


def test_forget_scope_removes_exactly_one_user(memory):
    for user in ("alice", "bob", "carol"):
        v = memory.scoped(user_id=user)
        v.remember_sync(f"{user.title()} works at Acme Corp")
        v.scoped(session_id="s9").remember_sync(f"{user.title()} left Acme and now works at Initech")
        v.core.set_block("human", f"{user} prefers short answers")
    before = {u: memory.scoped(user_id=u).count_sync() for u in ("alice", "bob", "carol")}
    assert memory.forget_scope_sync(user_id="bob") == before["bob"] > 0
    assert memory.scoped(user_id="bob").count_sync() == 0
    assert memory.scoped(user_id="bob").core.get_block("human") is None
    assert memory.core_history_sync() == [] or all(r.scope.user_id != "bob" for r in memory.core_history_sync())
    for u in ("alice", "carol"):
        assert memory.scoped(user_id=u).count_sync() == before[u]
        assert memory.scoped(user_id=u).core.get_block("human") == f"{u} prefers short answers"
    # a session of a user: only that session's facts
    alice = memory.scoped(user_id="alice")
    in_session = alice.scoped(session_id="s9").count_sync()
    assert alice.forget_scope_sync(session_id="s9") == in_session
    assert alice.count_sync() == before["alice"] - in_session
    with pytest.raises(InvalidScopeError, match="needs a scope"):
        memory.forget_scope_sync()
    with pytest.raises(InvalidScopeError, match="outside this view"):
        alice.forget_scope_sync(user_id="carol")
    assert memory.scoped(user_id="carol").count_sync() == before["carol"]


def test_filters_may_narrow_a_view_never_leave_it(memory):
    alice = memory.scoped(user_id="alice")
    alice.scoped(agent_id="a1").remember_sync("Heidi works at Globex")
    alice.scoped(agent_id="a2").remember_sync("Ivan works at Hooli")
    memory.scoped(user_id="bob", agent_id="a1").remember_sync("Judy works at Initech")
    both = alice.recall_sync("works at", RecallOptions(limit=10))
    assert sorted(h.content for h in both) == ["Heidi works at Globex", "Ivan works at Hooli"]
    assert alice.count_sync(SearchFilters(scope=Scope(agent_id="a1"), include_superseded=True)) == 2
    assert memory.count_sync(SearchFilters(scope=Scope(agent_id="a1"), include_superseded=True)) == 4
    with pytest.raises(InvalidScopeError, match="user_id='bob' is outside"):
        alice.count_sync(SearchFilters(scope=Scope(user_id="bob")))
    with pytest.raises(InvalidScopeError):
        alice.forget_sync(where=SearchFilters(scope=Scope(user_id="bob")))
    assert alice.forget_sync(where=SearchFilters(scope=Scope(agent_id="a2"))) == 2
    assert alice.count_sync() == 2 and memory.count_sync() == 4


def test_views_narrow_and_never_leave_their_scope(memory):
    alice = memory.scoped(user_id="alice")
    assert alice.scope == Scope(user_id="alice") and memory.scope == Scope()
    s1 = alice.scoped(session_id="s1")
    assert s1.scope == Scope("alice", None, "s1")
    assert alice.scoped(user_id="alice").scope == alice.scope  # restating is fine
    with pytest.raises(InvalidScopeError, match="user_id='alice'"):
        alice.scoped(user_id="bob")
    with pytest.raises(InvalidScopeError):
        alice.scoped(user_id=None)  # widening is leaving
    for bad in ("", "a b", "x" * 129, "ü"):
        with pytest.raises(InvalidScopeError):
            memory.scoped(user_id=bad)
    with pytest.raises(TypeError):
        memory.scoped(agent_id=42)
    assert "user_id=alice" in repr(alice)
    # a view shares the store and the loop: closing it leaves the Memory working
    s1.remember_sync("Judy works at Umbrella Corp")
    s1.close()
    with pytest.raises(umi.UmiError, match="closed"):
        s1.recall_sync("Judy")
    assert alice.count_sync() == 2 and memory.count_sync() == 2


def test_closing_the_memory_closes_its_views(tmp_path):
    m = duckdb_memory(tmp_path / "x.duckdb")
    v = m.scoped(user_id="kim")
    m.close()
    with pytest.raises(umi.UmiError, match="closed"):
        v.count_sync()
    with pytest.raises(umi.UmiError, match="closed"):
        v.core.set_block("human", "x")


def test_constructor_scope_and_reopen(tmp_path):
    path = tmp_path / "scoped.duckdb"
    with duckdb_memory(path, user_id="liam", agent_id="planner") as liam:
        r = liam.remember_sync("Liam lives in Lisbon")
        assert all(e.scope == Scope("liam", "planner") for e in r.entities)
    with duckdb_memory(path, user_id="mia") as mia:
        assert mia.count_sync() == 0 and mia.recall_sync("Lisbon") == []
        assert mia.get_sync(r.entities[0].id) is None
    with duckdb_memory(path) as admin:
        assert admin.count_sync() == len(r.entities)
        assert admin.scoped(user_id="liam").count_sync() == len(r.entities)
        assert admin.scoped(user_id="liam", agent_id="other").count_sync() == 0
    with pytest.raises(InvalidScopeError):
        duckdb_memory(path, user_id="no spaces allowed")


def test_builder_and_sim_take_a_scope():
    with umi.Memory.sim(seed=1, user_id="noah") as m:
        assert m.scope == Scope(user_id="noah")
        assert m.remember_sync("Noah plays chess").entities[0].scope == Scope(user_id="noah")
    b = umi.MemoryBuilder().with_storage(umi.SimStorageBackend(seed=1)).with_embedder(umi.SimEmbeddingProvider(1))
    with b.with_scope(user_id="olga", session_id="t1").build() as m:
        assert m.scope == Scope("olga", None, "t1")
    with pytest.raises(InvalidScopeError):
        umi.MemoryBuilder().with_scope(user_id="bad/id")


def test_the_store_remembers_its_embedder(tmp_path):
    path = tmp_path / "emb.duckdb"
    with duckdb_memory(path, seed=1) as m:
        assert m.storage.get_meta("embedder") is None  # recorded on the first write, not on open
        m.remember_sync("Pete sails on weekends")
        assert m.storage.get_meta("embedder") == "sim|seed=1|384"
    with pytest.raises(InvalidConfigError, match=r"'sim\|seed=1\|384'.*'sim\|seed=2\|384'"):
        duckdb_memory(path, seed=2)
    with pytest.raises(InvalidConfigError, match="384-d"):
        umi.Memory(str(path), embedder=umi.SimEmbeddingProvider(1, dim=64))
    with duckdb_memory(path, seed=1) as m:  # the same embedder opens it again
        assert m.count_sync() == 1


def test_same_text_in_two_sessions_of_one_user_is_two_sources(memory):
    alice = memory.scoped(user_id="alice")
    a = alice.scoped(session_id="s1").remember_sync("Quinn bakes bread", RememberOptions().without_extraction())
    b = alice.scoped(session_id="s2").remember_sync("Quinn bakes bread", RememberOptions().without_extraction())
    assert not b.duplicate and a.source_id != b.source_id
    assert alice.count_sync() == 2


def test_the_readme_quick_start_runs_and_says_true(tmp_path, monkeypatch):
    """The README's two-user example, run as written on the embedded default (local embedder)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(import umi\n.*?)```", readme, re.S).group(1)
    assert 'memory.scoped(user_id="alice")' in block and 'scoped(user_id="bob")' in block
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    with umi.Memory("agent.duckdb") as memory:
        alice, bob = memory.scoped(user_id="alice"), memory.scoped(user_id="bob")
        assert bob.count_sync() == 0 and alice.count_sync() > 0
        assert alice.core.get_block("human") == "Prefers short answers."  # back after the restart
        top = alice.recall_sync("Where does Alice work?")[0]
        assert "Initech" in top.content
        assert bob.recall_sync("Where does Alice work?") == []


def test_cli_user_and_agent_flags_keep_to_their_scope(tmp_path):
    import io

    from umi.cli import main

    db = str(tmp_path / "cli.duckdb")
    out = io.StringIO()
    assert main(["remember", "Rosa sails in Oslo", "--db", db, "--user", "rosa", "--raw"], out) == 0
    assert main(["remember", "Sam sails in Rome", "--db", db, "--user", "sam", "--agent", "a1", "--raw"], out) == 0
    for user, expect in (("rosa", "Rosa"), ("sam", "Sam")):
        out = io.StringIO()
        assert main(["recall", "sails", "--db", db, "--user", user], out) == 0
        assert expect in out.getvalue() and len(out.getvalue().strip().splitlines()) == 1
    out = io.StringIO()
    assert main(["recall", "sails", "--db", db, "--user", "sam", "--agent", "a2"], out) == 0
    assert "nothing found" in out.getvalue()
    out = io.StringIO()
    assert main(["export", "--db", db, "--user", "rosa"], out) == 0
    assert "Rosa" in out.getvalue() and "Sam" not in out.getvalue()
    out = io.StringIO()
    assert main(["stats", "--db", db], out) == 0 and "entities: 2" in out.getvalue()
    assert main(["recall", "x", "--db", db, "--user", "bad user"], io.StringIO()) == 2


def test_a_store_from_before_scopes_is_everyones_and_no_users(tmp_path):
    """A store written by main at 5ac6732 (schema 2, no scopes, no embedder record) opens as a
    Memory: its facts are in the unset scope — the unscoped Memory sees them, a user's view does
    not — and the first write records the embedder."""
    import gzip
    from pathlib import Path

    legacy = Path(__file__).parent.parent / "data" / "store_v2_5ac6732.duckdb.gz"
    path = tmp_path / "old.duckdb"
    path.write_bytes(gzip.decompress(legacy.read_bytes()))
    class ThreeD(EmbeddingProvider):  # the legacy store holds 3-d vectors
        name, dim = "three-d", 3

        def embed(self, texts, *, kind="passage"):
            v = np.array([[1.0 + (len(t) % 3), 1.0 + t.count("a"), 1.0] for t in texts], np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    emb = ThreeD()
    with umi.Memory(str(path), embedder=emb) as m:
        alice = m.scoped(user_id="alice")
        assert m.count_sync() == 4 and m.count_sync(include_superseded=False) == 3
        assert alice.count_sync() == 0 and alice.recall_sync("Alice works at Acme") == []
        assert [h.content for h in m.recall_sync("budget")][:1] and m.storage.get_meta("embedder") is None
        r = alice.remember_sync("Alice now works at Initech")
        assert all(e.scope == Scope(user_id="alice") for e in r.entities)
        assert m.storage.get_meta("embedder") == "three-d||3"
        assert alice.count_sync() == len(r.entities) and m.count_sync() == 4 + len(r.entities)
        assert not any(ev.source_id in {e["id"] for e in exported(m) if e["kind"] == "entity"
                                        and e.get("scope") is None} for ev in r.evolutions)
