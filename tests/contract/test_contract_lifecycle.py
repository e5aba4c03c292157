"""The storage contract, part 2: scopes, forget, revive, provenance, export/import, core blocks,
store metadata, capability flags. Runs on every backend of the contract fixture."""

from __future__ import annotations

import pytest
from contract_helpers import T0, ent, vec

from umi.errors import InvalidImportanceError, StorageError, UmiError, ValidationError
from umi.storage.base import TOMBSTONE_SCOPE, HistoryRecord, SearchFilters, Source, StorageBackend
from umi.types import CoreBlockRecord, CoreHistoryRecord, EvolutionRelation, Scope

ALICE = Scope("alice")
ALICE_BOT = Scope("alice", "bot")
ALICE_BOT_S1 = Scope("alice", "bot", "s1")
BOB = Scope("bob")
EVERY = SearchFilters(include_superseded=True)


def ids(pairs: list) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p.id for p in pairs]


# --- capability flags ----------------------------------------------------------------------------


def test_capability_flags_are_booleans(backend: StorageBackend) -> None:
    for flag in ("supports_concurrent_writers", "supports_multiple_processes", "durable"):
        assert isinstance(getattr(type(backend), flag), bool)
        assert isinstance(getattr(backend, flag), bool)
    if backend.supports_multiple_processes:
        assert backend.durable


# --- scopes ------------------------------------------------------------------------------------


def _scoped_store(b: StorageBackend) -> dict[str, object]:
    facts = {
        "unset": ent("Acme", "acme ships anvils", etype="organization", emb=vec(1, 0, 0)),
        "alice": ent("Alice", "alice drinks tea", emb=vec(0, 1, 0), t=1, scope=ALICE),
        "alice_bot": ent("Alice", "alice drinks tea", emb=vec(0, 1, 0), t=2, scope=ALICE_BOT),
        "alice_bot_s1": ent("Alice", "alice drinks green tea", emb=vec(0, 1, 0.1), t=3, scope=ALICE_BOT_S1),
        "bob": ent("Bob", "bob drinks tea", emb=vec(0, 1, 0.2), t=4, scope=BOB),
    }
    b.upsert(list(facts.values()))
    return facts


def test_scope_is_stored_and_filters_every_read_by_the_view_rule(backend: StorageBackend) -> None:
    facts = _scoped_store(backend)
    # the same fact told in two scopes is two entities
    assert len({f.id for f in facts.values()}) == 5  # type: ignore[attr-defined]
    for key, f in facts.items():
        got = backend.get(f.id)  # type: ignore[attr-defined]
        assert got is not None and got.scope == f.scope and got == f  # type: ignore[attr-defined]
    views = {
        None: ["unset", "alice", "alice_bot", "alice_bot_s1", "bob"],
        Scope(): ["unset", "alice", "alice_bot", "alice_bot_s1", "bob"],
        ALICE: ["alice", "alice_bot", "alice_bot_s1"],
        ALICE_BOT: ["alice_bot", "alice_bot_s1"],
        ALICE_BOT_S1: ["alice_bot_s1"],
        Scope(agent_id="bot"): ["alice_bot", "alice_bot_s1"],
        Scope(session_id="s1"): ["alice_bot_s1"],
        BOB: ["bob"],
        Scope("carol"): [],
        Scope("bob", "bot"): [],
    }
    for view, want_keys in views.items():
        f = SearchFilters(scope=view)
        want = sorted(facts[k].id for k in want_keys)  # type: ignore[attr-defined]
        assert sorted(ids(backend.list(f))) == want, view
        assert backend.count(f) == len(want), view
        assert sorted(ids(backend.search_vector(vec(0, 1, 0), 10, f))) == sorted(
            facts[k].id for k in want_keys if facts[k].embedding is not None), view  # type: ignore[attr-defined]
        assert sorted(ids(backend.search_text("tea anvils", 10, f))) == want, view
        assert sorted(ids(backend.find_by_name("alice", filters=f))) == sorted(
            facts[k].id for k in want_keys if k.startswith("alice")), view  # type: ignore[attr-defined]


def test_scope_combines_with_every_other_filter(backend: StorageBackend) -> None:
    facts = _scoped_store(backend)
    a = facts["alice"]
    backend.supersede(a.id, T0 + 10)  # type: ignore[attr-defined]
    assert backend.count(SearchFilters(scope=ALICE)) == 2
    assert backend.count(SearchFilters(scope=ALICE, include_superseded=True)) == 3
    assert backend.count(SearchFilters(scope=ALICE, as_of=T0 + 5)) == 3
    assert backend.count(SearchFilters(scope=ALICE, entity_types=["organization"])) == 0
    assert backend.count(SearchFilters(scope=ALICE, time_range=(T0 + 2, T0 + 3))) == 2


def test_source_id_filter_and_entity_ids_for_source(backend: StorageBackend) -> None:
    s1 = Source.for_text("one text", T0, scope=ALICE)
    s2 = Source.for_text("one text", T0, scope=BOB)
    assert s1.id != s2.id
    backend.add_source(s1)
    backend.add_source(s2)
    a = ent("A", "first", source_id=s1.id, scope=ALICE)
    b = ent("B", "second", source_id=s1.id, t=1, scope=ALICE)
    c = ent("C", "third", source_id=s2.id, t=2, scope=BOB)
    backend.upsert([a, b, c])
    backend.supersede(b.id, T0 + 5)
    assert sorted(ids(backend.list(SearchFilters(source_id=s1.id, include_superseded=True)))) == sorted([a.id, b.id])
    assert ids(backend.list(SearchFilters(source_id=s1.id))) == [a.id]
    assert backend.count(SearchFilters(source_id="nope")) == 0
    assert backend.entity_ids_for_source(s1.id) == sorted([a.id, b.id])  # superseded included, sorted
    assert backend.entity_ids_for_source(s2.id) == [c.id]
    assert backend.entity_ids_for_source("nope") == []
    assert backend.get_source(s1.id) == s1 and backend.get_source(s2.id).scope == BOB  # type: ignore[union-attr]
    # the hash lookup sees every scope and returns the earliest
    assert backend.find_source_by_hash(s1.text_hash).id == min(s1.id, s2.id)  # type: ignore[union-attr]


# --- forget ------------------------------------------------------------------------------------


def test_forget_removes_the_fact_everywhere(backend: StorageBackend) -> None:
    src = Source.for_text("Gina climbs. Hal too.", T0, scope=ALICE)
    backend.add_source(src)
    old = ent("Gina", "gina climbs rocks", emb=vec(0, 1, 0), source_id=src.id, scope=ALICE, meta={"m": 1})
    new = ent("Gina", "gina climbs walls", emb=vec(0, 1, 1), t=5, source_id=src.id, scope=ALICE)
    other = ent("Hal", "hal climbs too", emb=vec(1, 0, 0), t=6, scope=ALICE)
    backend.upsert([old, new, other])
    backend.supersede(old.id, T0 + 5)
    backend.add_relations([EvolutionRelation(old.id, new.id, "update", created_at=T0 + 5, scope=ALICE),
                           EvolutionRelation(new.id, other.id, "extend", created_at=T0 + 6, scope=ALICE)])
    g = backend.generation
    assert backend.delete(new.id, at=T0 + 20) is True
    assert backend.generation > g
    assert backend.get(new.id) is None
    assert new.id not in ids(backend.search_vector(vec(0, 1, 1), 10, EVERY))
    assert new.id not in ids(backend.search_text("walls", 10, EVERY))
    assert backend.search_text("walls", 10, EVERY) == []
    assert new.id not in ids(backend.find_by_name("gina", filters=EVERY))
    # relations touching it are gone, others stay
    assert backend.relations_for(new.id) == []
    assert backend.relations_for(old.id) == [] and backend.relations_for(other.id) == []
    assert list(backend.iter_relations()) == []
    # history: tombstones only
    hist = backend.history(new.id)
    assert [(h.seq, h.op) for h in hist] == [(1, "create"), (2, "delete")]
    assert all(dict(h.snapshot) == {"id": new.id, "forgotten": True} for h in hist)
    assert hist[-1].at == T0 + 20
    # filed under no scope: whose it was is forgotten too (was: ALICE, on every record)
    assert all(h.scope == TOMBSTONE_SCOPE for h in hist)
    assert new.id not in {h.entity_id for h in backend.iter_history(ALICE)}
    # delete revives nothing: old stays superseded
    assert backend.get(old.id).valid_to == T0 + 5  # type: ignore[union-attr]
    # the source stays while `old` comes from it, and goes with the last fact
    assert backend.get_source(src.id) is not None
    assert backend.delete(old.id, at=T0 + 21) is True
    assert backend.get_source(src.id) is None
    assert backend.entity_ids_for_source(src.id) == []
    assert backend.find_source_by_hash(src.text_hash) is None
    # the other fact is untouched; its history keeps its content
    assert backend.get(other.id) == other and backend.history(other.id)[0].snapshot["content"] == "hal climbs too"
    # remembering the same text and fact again works
    backend.add_source(src)
    backend.upsert([new])
    assert backend.get(new.id) == new and backend.get_source(src.id) == src
    assert [h.op for h in backend.history(new.id)] == ["create", "delete", "create"]
    assert backend.history(new.id)[-1].snapshot["content"] == "gina climbs walls"


def test_forget_rolls_back_with_its_transaction(backend: StorageBackend) -> None:
    src = Source.for_text("x", T0)
    backend.add_source(src)
    a = ent("A", "alpha fact", emb=vec(1, 0), source_id=src.id)
    b = ent("B", "beta fact", emb=vec(0, 1), t=1)
    backend.upsert([a, b])
    backend.add_relations([EvolutionRelation(a.id, b.id, "extend", created_at=T0 + 1)])
    before = (backend.history(a.id), backend.relations_for(a.id), backend.get_source(src.id), backend.generation)
    with pytest.raises(StorageError):
        with backend.transaction():
            assert backend.delete(a.id, at=T0 + 9)
            assert backend.get(a.id) is None
            raise RuntimeError("abort")
    assert backend.get(a.id) == a
    assert (backend.history(a.id), backend.relations_for(a.id), backend.get_source(src.id),
            backend.generation) == before
    assert ids(backend.search_text("alpha", 5)) == [a.id] and ids(backend.search_vector(vec(1, 0), 1)) == [a.id]


# --- revive ------------------------------------------------------------------------------------


def test_revive_makes_a_superseded_fact_current_again(backend: StorageBackend) -> None:
    a = ent("A", "alpha", emb=vec(1, 0), scope=ALICE)
    backend.upsert([a])
    assert backend.revive(a.id, T0 + 1) is False  # already current
    assert backend.revive("nope", T0 + 1) is False
    backend.supersede(a.id, T0 + 10)
    g = backend.generation
    assert backend.revive(a.id, T0 + 30) is True
    assert backend.generation > g
    got = backend.get(a.id)
    assert got is not None and got.valid_to is None and got.updated_at == T0 + 30
    assert backend.count() == 1 and ids(backend.search_text("alpha", 5)) == [a.id]
    h = backend.history(a.id)
    assert [(x.op, x.at) for x in h] == [("create", T0), ("supersede", T0 + 10), ("revive", T0 + 30)]
    assert h[-1].snapshot["valid_to"] is None and h[-1].scope == ALICE
    # as_of still answers with the stored validity of the moment asked
    assert backend.count(SearchFilters(as_of=T0 + 20)) == 1  # valid_to cleared: current throughout
    assert backend.revive(a.id, T0 + 40) is False


# --- export / import ----------------------------------------------------------------------------


def _populate(b: StorageBackend) -> None:
    s1 = Source.for_text("text one", T0 + 2, {"k": 1}, scope=ALICE)
    s2 = Source.for_text("text two", T0 + 1, scope=BOB)
    b.add_source(s1)
    b.add_source(s2)
    x = ent("X", "x fact", emb=vec(1, 0), source_id=s1.id, scope=ALICE)
    y = ent("Y", "y fact", emb=vec(0, 1), t=1, source_id=s2.id, scope=BOB)
    z = ent("Z", "z fact", t=2, scope=ALICE_BOT)
    b.upsert([x, y, z])
    b.supersede(x.id, T0 + 3)
    b.add_relations([EvolutionRelation(x.id, z.id, "update", created_at=T0 + 3, scope=ALICE),
                     EvolutionRelation(y.id, x.id, "derive", created_at=T0 + 1, scope=BOB)])


def test_iter_sources_relations_history_order_and_scope(backend: StorageBackend) -> None:
    _populate(backend)
    srcs = list(backend.iter_sources())
    assert [s.text for s in srcs] == ["text two", "text one"]  # created_at order
    assert [s.text for s in backend.iter_sources(ALICE)] == ["text one"]
    assert [s.text for s in backend.iter_sources(Scope("carol"))] == []
    rels = list(backend.iter_relations())
    assert [r.evolution_type.value for r in rels] == ["derive", "update"]
    assert [r.evolution_type.value for r in backend.iter_relations(ALICE)] == ["update"]
    hist = list(backend.iter_history())
    assert [(h.entity_id, h.seq) for h in hist] == sorted((h.entity_id, h.seq) for h in hist)
    assert len(hist) == 4
    assert {h.entity_id for h in backend.iter_history(ALICE)} == {
        e.id for e in backend.list(SearchFilters(scope=ALICE, include_superseded=True))}
    assert list(backend.iter_history(BOB))[0].scope == BOB


def test_restore_writes_exactly_the_records(make_backend) -> None:  # type: ignore[no-untyped-def]
    src_store = make_backend()
    _populate(src_store)
    ents = src_store.list(EVERY)
    srcs = list(src_store.iter_sources())
    rels = list(src_store.iter_relations())
    hist = list(src_store.iter_history())
    dst = make_backend()
    g = dst.generation
    with dst.transaction():
        dst.restore(ents, srcs, rels, hist)
    assert dst.generation > g
    assert [e.to_dict(with_embedding=True) for e in dst.list(EVERY)] == [e.to_dict(with_embedding=True) for e in ents]
    assert list(dst.iter_sources()) == srcs
    assert list(dst.iter_relations()) == rels
    assert list(dst.iter_history()) == hist  # no history generated, seqs kept
    assert dst.search_text("fact", 10, EVERY) == src_store.search_text("fact", 10, EVERY)
    assert dst.search_vector(vec(1, 1), 10, EVERY) == src_store.search_vector(vec(1, 1), 10, EVERY)
    # later writes continue the history sequence
    x = ents[0]
    assert dst.revive(x.id, T0 + 50)
    assert [h.seq for h in dst.history(x.id)] == [1, 2, 3]


def test_restore_is_all_or_nothing(make_backend) -> None:  # type: ignore[no-untyped-def]
    dst = make_backend()
    a = ent("A", "a fact", emb=vec(1, 0))
    dangling = EvolutionRelation(a.id, "not-stored", "update", created_at=T0)
    with pytest.raises(ValidationError, match="not stored"):
        dst.restore([a], [], [dangling], [])
    # one endpoint rule for every relation given, as add_relations: a later record of the same id
    # does not excuse an earlier dangling one
    b = ent("B", "b fact", emb=vec(0, 1))
    twice = [EvolutionRelation(a.id, "not-stored", "update", id="rel-1", created_at=T0),
             EvolutionRelation(a.id, b.id, "update", id="rel-1", created_at=T0)]
    with pytest.raises(ValidationError, match="not-stored"):
        dst.restore([a, b], [], twice, [])
    assert dst.count(EVERY) == 0 and dst.generation == 0
    with pytest.raises(StorageError):
        with dst.transaction():
            dst.restore([a], [Source.for_text("t", T0)], [],
                        [HistoryRecord(a.id, 1, "create", T0, {"id": a.id})])
            raise RuntimeError("import failed at line 3")
    assert dst.count(EVERY) == 0 and list(dst.iter_sources()) == [] and list(dst.iter_history()) == []
    with pytest.raises(ValidationError):
        dst.restore([], [], [], [HistoryRecord(a.id, 0, "create", T0, {})])
    with pytest.raises(ValidationError):
        dst.restore([], [], [], [HistoryRecord(a.id, 1, "explode", T0, {})])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dst.restore([], [], [], [{"entity_id": a.id}])  # type: ignore[list-item]


# --- core blocks ---------------------------------------------------------------------------------


def test_core_blocks_order_replace_remove_clear_and_history(backend: StorageBackend) -> None:
    sc = ALICE_BOT
    assert backend.core_blocks(sc) == []
    g = backend.generation
    backend.set_core_block(sc, "persona", "kind", 0.5, T0)
    backend.set_core_block(sc, "human", "likes tea", 0.9, T0 + 1)
    backend.set_core_block(sc, "goals", "ship", 0.1, T0 + 2)
    assert backend.generation == g + 3
    assert backend.core_blocks(sc) == [CoreBlockRecord("persona", "kind", 0.5, 0),
                                       CoreBlockRecord("human", "likes tea", 0.9, 1),
                                       CoreBlockRecord("goals", "ship", 0.1, 2)]
    backend.set_core_block(sc, "human", "likes coffee", 0.8, T0 + 3)  # keeps its place
    assert [(b.name, b.content, b.position) for b in backend.core_blocks(sc)] == [
        ("persona", "kind", 0), ("human", "likes coffee", 1), ("goals", "ship", 2)]
    # session is ignored: the blocks belong to (user, agent)
    assert backend.core_blocks(ALICE_BOT_S1) == backend.core_blocks(sc)
    assert backend.core_blocks(ALICE) == [] and backend.core_blocks(Scope()) == []
    assert backend.remove_core_block(sc, "persona", T0 + 4) is True
    assert backend.remove_core_block(sc, "persona", T0 + 5) is False
    assert [(b.name, b.position) for b in backend.core_blocks(sc)] == [("human", 0), ("goals", 1)]
    g = backend.generation
    assert backend.clear_core_blocks(Scope("nobody"), T0) == 0 and backend.generation == g
    assert backend.clear_core_blocks(ALICE_BOT_S1, T0 + 6) == 2
    assert backend.core_blocks(sc) == []
    hist = backend.core_history(sc)
    assert [(h.seq, h.op, h.name, h.at) for h in hist] == [
        (1, "set", "persona", T0), (2, "set", "human", T0 + 1), (3, "set", "goals", T0 + 2),
        (4, "set", "human", T0 + 3), (5, "remove", "persona", T0 + 4), (6, "clear", "", T0 + 6)]
    assert hist[3] == CoreHistoryRecord(sc, "human", 4, "set", T0 + 3, "likes coffee", 0.8)
    assert hist[4].content is None and hist[4].importance is None
    assert [h.seq for h in backend.core_history(sc, "human")] == [2, 4, 6]  # its records and the clear
    assert backend.core_history(ALICE) == []
    backend.set_core_block(sc, "persona", "back", 0.5, T0 + 7)
    assert backend.core_blocks(sc) == [CoreBlockRecord("persona", "back", 0.5, 0)]


def test_core_scopes_lists_the_scopes_with_blocks_a_view_sees_for_export(backend: StorageBackend) -> None:
    assert backend.core_scopes() == []
    backend.set_core_block(Scope("bob", "bot"), "persona", "b", 0.5, T0)
    backend.set_core_block(ALICE_BOT, "persona", "a", 0.5, T0)
    backend.set_core_block(Scope(), "persona", "c", 0.5, T0)
    backend.set_core_block(ALICE, "human", "d", 0.5, T0)
    backend.set_core_block(Scope("carol"), "human", "e", 0.5, T0)
    backend.clear_core_blocks(Scope("carol"), T0 + 1)  # history but no block: not listed
    assert backend.core_scopes() == backend.core_scopes(Scope()) == [Scope(), ALICE, ALICE_BOT, Scope("bob", "bot")]
    assert backend.core_scopes(ALICE) == [ALICE, ALICE_BOT]
    assert backend.core_scopes(ALICE_BOT_S1) == [ALICE_BOT]  # session ignored
    assert backend.core_scopes(Scope(agent_id="bot")) == [ALICE_BOT, Scope("bob", "bot")]
    assert backend.core_scopes(Scope("carol")) == []


def test_core_blocks_of_two_agents_never_mix(backend: StorageBackend) -> None:
    backend.set_core_block(ALICE_BOT, "persona", "a", 0.5, T0)
    backend.set_core_block(Scope("alice", "other"), "persona", "b", 0.5, T0)
    backend.set_core_block(Scope(), "persona", "c", 0.5, T0)
    assert [b.content for b in backend.core_blocks(ALICE_BOT)] == ["a"]
    assert [b.content for b in backend.core_blocks(Scope("alice", "other"))] == ["b"]
    assert [b.content for b in backend.core_blocks(Scope())] == ["c"]
    backend.clear_core_blocks(ALICE_BOT, T0 + 1)
    assert [b.content for b in backend.core_blocks(Scope("alice", "other"))] == ["b"]
    assert [b.content for b in backend.core_blocks(Scope())] == ["c"]


def test_forget_core_deletes_blocks_and_history_of_every_matching_scope(backend: StorageBackend) -> None:
    alice_other, bob, bob_bot = Scope("alice", "other"), Scope("bob"), Scope("bob", "bot")
    writes = [(ALICE, "persona", "alice-user-secret"), (ALICE_BOT, "human", "alice-bot-secret"),
              (ALICE_BOT, "goals", "alice-bot-goal"), (alice_other, "persona", "alice-other-secret"),
              (bob, "persona", "bob-user"), (bob_bot, "persona", "bob-bot"), (Scope(), "persona", "unset")]
    for i, (sc, name, content) in enumerate(writes):
        backend.set_core_block(sc, name, content, 0.5, T0 + i)
    backend.remove_core_block(ALICE_BOT, "goals", T0 + 10)  # history of alice holds more than the blocks
    backend.clear_core_blocks(alice_other, T0 + 11)  # no blocks left here, only history
    bob_before = {sc: (backend.core_blocks(sc), backend.core_history(sc)) for sc in (bob, bob_bot, Scope())}
    g = backend.generation
    assert backend.forget_core(Scope("nobody")) == 0 and backend.generation == g  # nothing matched: no write
    # a session in the scope is ignored (core blocks belong to user and agent)
    assert backend.forget_core(ALICE_BOT_S1) == 1
    assert backend.core_blocks(ALICE_BOT) == [] and backend.core_history(ALICE_BOT) == []
    assert [b.content for b in backend.core_blocks(ALICE)] == ["alice-user-secret"]
    g = backend.generation
    assert backend.forget_core(ALICE) == 1  # alice's user-level blocks and every agent of alice
    assert backend.generation > g
    for sc in (ALICE, ALICE_BOT, alice_other):
        assert backend.core_blocks(sc) == [] and backend.core_history(sc) == [], sc
    for sc, (blocks, hist) in bob_before.items():
        assert (backend.core_blocks(sc), backend.core_history(sc)) == (blocks, hist), sc
    assert backend.forget_core(ALICE) == 0  # history went too: nothing is left to forget
    # a scope written again after forget starts a fresh history
    backend.set_core_block(ALICE_BOT, "persona", "new", 0.5, T0 + 20)
    assert [(h.seq, h.content) for h in backend.core_history(ALICE_BOT)] == [(1, "new")]
    # inside a transaction that rolls back, nothing is forgotten
    with pytest.raises(StorageError):
        with backend.transaction():
            assert backend.forget_core(Scope(agent_id="bot")) == 2  # every user's "bot" agent
            raise RuntimeError("no")
    assert [b.content for b in backend.core_blocks(bob_bot)] == ["bob-bot"]
    assert [b.content for b in backend.core_blocks(ALICE_BOT)] == ["new"]
    # a set, then a forget, in one transaction: the forget wins, with no history of the set
    with backend.transaction():
        backend.set_core_block(bob, "extra", "bob-extra", 0.5, T0 + 21)
        assert backend.forget_core(bob) == 3
    with pytest.raises(TypeError):
        backend.forget_core("bob")  # type: ignore[arg-type]
    for sc in (ALICE, alice_other, bob, bob_bot):
        assert backend.core_blocks(sc) == [] and backend.core_history(sc) == [], sc
    assert [b.content for b in backend.core_blocks(ALICE_BOT)] == ["new"]
    assert [b.content for b in backend.core_blocks(Scope())] == ["unset"]
    assert backend.forget_core(Scope()) == 2  # the unset scope sees every core scope
    assert backend.core_blocks(ALICE_BOT) == [] and backend.core_history(Scope()) == []


def test_core_block_writes_are_validated_and_transactional(backend: StorageBackend) -> None:
    sc = ALICE_BOT
    for bad in ("", "a b", "x" * 65, "é"):
        with pytest.raises(ValidationError):
            backend.set_core_block(sc, bad, "c", 0.5, T0)
    with pytest.raises(InvalidImportanceError):
        backend.set_core_block(sc, "n", "c", 1.5, T0)
    with pytest.raises(TypeError):
        backend.set_core_block(sc, "n", b"c", 0.5, T0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backend.set_core_block("alice", "n", "c", 0.5, T0)  # type: ignore[arg-type]
    assert backend.core_blocks(sc) == [] and backend.core_history(sc) == []
    backend.set_core_block(sc, "keep", "k", 0.5, T0)
    with pytest.raises(StorageError):
        with backend.transaction():
            backend.set_core_block(sc, "new", "n", 0.5, T0 + 1)
            backend.remove_core_block(sc, "keep", T0 + 1)
            raise RuntimeError("budget exceeded upstream")
    assert backend.core_blocks(sc) == [CoreBlockRecord("keep", "k", 0.5, 0)]
    assert [h.seq for h in backend.core_history(sc)] == [1]


# --- store metadata -----------------------------------------------------------------------------


def test_store_metadata(backend: StorageBackend) -> None:
    assert backend.get_meta("embedder") is None
    g = backend.generation
    backend.set_meta("embedder", "sim|sim-embed|3")
    assert backend.generation > g
    assert backend.get_meta("embedder") == "sim|sim-embed|3"
    backend.set_meta("embedder", "local|e5|384")
    assert backend.get_meta("embedder") == "local|e5|384"
    with pytest.raises(StorageError):
        with backend.transaction():
            backend.set_meta("embedder", "other|x|1")
            backend.set_meta("new", "v")
            raise RuntimeError("no")
    assert backend.get_meta("embedder") == "local|e5|384" and backend.get_meta("new") is None
    with pytest.raises(TypeError):
        backend.set_meta("k", 1)  # type: ignore[arg-type]
    with pytest.raises(UmiError):
        backend.set_meta("", "v")


def test_new_calls_refuse_bad_ids_and_a_closed_store(make_backend) -> None:  # type: ignore[no-untyped-def]
    b = make_backend()
    for call in (lambda: b.revive("", T0), lambda: b.entity_ids_for_source(""), lambda: b.delete_source("")):
        with pytest.raises(ValidationError):
            call()
    with pytest.raises(TypeError):
        b.revive(5, T0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        list(b.iter_sources("alice"))  # type: ignore[arg-type]
    assert b.delete_source("nope") is False
    b.close()
    for call in (lambda: b.core_blocks(ALICE), lambda: b.get_meta("k"), lambda: list(b.iter_sources()),
                 lambda: b.set_core_block(ALICE, "n", "c", 0.5, T0), lambda: b.revive("x", T0)):
        with pytest.raises(StorageError):
            call()
