"""Memory on the Sim path: the remember / recall pipelines end to end, validation, degradation."""

import asyncio
import contextlib
import os

import numpy as np
import pytest

import umi
from umi import (
    EmptyQueryError,
    EmptyTextError,
    EntityType,
    EvolutionType,
    InvalidLimitError,
    RecallOptions,
    RememberOptions,
    TextTooLongError,
)
from umi.sim import FaultInjector, FaultType



def exported(m):
    """What ``m.export`` writes, as records."""
    import io
    import json

    buf = io.StringIO()
    m.export_sync(buf)
    return [json.loads(line) for line in buf.getvalue().splitlines()]

@pytest.fixture
def memory():
    m = umi.Memory.sim(seed=42)
    yield m
    m.close()


def by_name(entities, name):
    return [e for e in entities if e.name == name]


def test_remember_extracts_typed_entities_with_provenance(memory):
    r = memory.remember_sync("Alice is a software engineer at Acme Corp")
    assert r.entity_count == 2 and not r.has_evolutions and not r.duplicate
    assert [(e.name, e.entity_type) for e in r.entities] == [("Alice", EntityType.PERSON),
                                                             ("Acme Corp", EntityType.ORGANIZATION)]
    assert all(e.source_id == r.source_id and e.embedding is not None and e.valid_to is None for e in r.entities)
    assert memory.count_sync() == 2
    stored = memory.get_sync(r.entities[0].id)
    assert stored.content == "Alice is a software engineer at Acme Corp" and stored.entity_type == EntityType.PERSON
    assert r.usage.calls == 1  # one extraction call; no candidates, so no evolution call


def test_same_text_twice_adds_nothing_and_says_so(memory):
    memory.remember_sync("Bob lives in Berlin")
    r = memory.remember_sync("Bob lives in Berlin")
    assert r.duplicate and r.entity_count == 0 and "remembered before" in r.warnings[0]
    assert memory.count_sync() == 2


def test_same_fact_in_new_words_is_one_entity(memory):
    memory.remember_sync("Bob lives in Berlin.")
    r = memory.remember_sync("Bob  lives in Berlin")  # another source text, same normalised fact
    assert not r.duplicate and r.entity_count == 0 and "already known" in r.warnings[0]
    assert memory.count_sync() == 2


def test_update_supersedes_the_old_fact_and_recall_hides_it(memory):
    first = memory.remember_sync("Alice works at Acme Corp")
    old_alice = by_name(first.entities, "Alice")[0]
    second = memory.remember_sync("Alice left Acme and now works at Initech")
    assert second.has_evolutions
    ev = [e for e in second.evolutions if e.source_id == old_alice.id][0]
    new_alice = by_name(second.entities, "Alice")[0]
    assert ev.type == EvolutionType.UPDATE and ev.target_id == new_alice.id and ev.confidence > 0.5
    old = memory.get_sync(old_alice.id)
    assert old is not None and old.valid_to is not None  # kept, with valid_to set
    hits = memory.recall_sync("Where does Alice work?")
    ids = [h.id for h in hits]
    assert new_alice.id in ids and old_alice.id not in ids
    # the Acme Corp facet of the same superseded statement is retired too
    assert all(h.content != "Alice works at Acme Corp" for h in hits)
    with_history = memory.recall_sync("Where does Alice work?", RecallOptions(include_superseded=True))
    assert old_alice.id in [h.id for h in with_history]
    as_of = memory.recall_sync("Alice", RecallOptions(as_of=old_alice.created_at))
    assert [h.id for h in as_of if h.name == "Alice"] == [old_alice.id]
    assert [r.op for r in memory.history_sync(old_alice.id)] == ["create", "supersede"]
    rels = memory.relations_sync(old_alice.id)
    assert [(r.source_id, r.target_id) for r in rels if r.target_id == new_alice.id] == [(old_alice.id, new_alice.id)]


def test_extend_keeps_both_facts_current(memory):
    a = memory.remember_sync("Carol lives in Paris")
    b = memory.remember_sync("Carol has two cats")
    (ev,) = [e for e in b.evolutions if e.source_id == by_name(a.entities, "Carol")[0].id]
    assert ev.evolution_type == EvolutionType.EXTEND
    assert memory.get_sync(ev.source_id).valid_to is None
    assert memory.count_sync(include_superseded=False) == memory.count_sync()


def test_contradiction_supersedes(memory):
    a = memory.remember_sync("Dave owns a red car")
    b = memory.remember_sync("Dave does not own a red car")
    (ev,) = [e for e in b.evolutions if e.source_id == by_name(a.entities, "Dave")[0].id]
    assert ev.evolution_type == EvolutionType.CONTRADICT
    assert memory.get_sync(ev.source_id).valid_to is not None


def test_recall_ranks_and_scores_deterministically(memory):
    for t in ["Alice works at Acme Corp", "Bob lives in Berlin", "Carol manages Project Apollo at Acme Corp",
              "Erin plays the violin"]:
        memory.remember_sync(t)
    hits = memory.recall_sync("Acme Corp", RecallOptions(limit=3))
    assert len(hits) == 3
    assert hits[0].name == "Acme Corp"
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    again = memory.recall_sync("Acme Corp", RecallOptions(limit=3))
    assert [(h.id, h.score) for h in again] == [(h.id, h.score) for h in hits]


def test_recall_filters_apply_inside_search(memory):
    memory.remember_sync("Alice works at Acme Corp", RememberOptions(metadata={"session": "s1"}))
    memory.remember_sync("Bob works at Acme Corp", RememberOptions(metadata={"session": "s2"}))
    orgs = memory.recall_sync("Acme Corp", RecallOptions(entity_types=("organization",)))
    assert orgs and {h.entity_type for h in orgs} == {EntityType.ORGANIZATION}
    s2 = memory.recall_sync("works at Acme", RecallOptions(metadata={"session": "s2"}))
    assert s2 and all(h.metadata == {"session": "s2"} for h in s2)
    people = memory.recall_sync("who works at Acme", RecallOptions(entity_types=("person",), limit=1))
    assert len(people) == 1 and people[0].entity_type == EntityType.PERSON


def test_deep_search_rewrites_with_the_llm(memory):
    memory.remember_sync("Alice works at Acme Corp")
    before = memory.llm.calls["rewrite_query"]
    memory.recall_sync("Acme", RecallOptions(deep_search=False))
    assert memory.llm.calls["rewrite_query"] == before
    hits = memory.recall_sync("Who is the employer of Alice?", RecallOptions().with_deep_search())
    assert memory.llm.calls["rewrite_query"] == before + 1
    assert hits and hits[0].name in ("Alice", "Acme Corp")


def test_without_extraction_stores_one_note(memory):
    r = memory.remember_sync("Meeting notes: ship v2 by Friday", RememberOptions().without_extraction().with_importance(0.9))
    (e,) = r.entities
    assert e.entity_type == EntityType.NOTE and e.content == "Meeting notes: ship v2 by Friday" and e.importance == 0.9
    assert memory.llm.calls["extract_entities"] == 0


def test_without_embeddings_is_still_found_by_keywords(memory):
    r = memory.remember_sync("Frank collects vintage stamps", RememberOptions().without_embeddings())
    assert all(e.embedding is None for e in r.entities)
    hits = memory.recall_sync("vintage stamps")
    assert by_name(hits, "Frank")


def test_validation_errors_name_the_limit(memory):
    with pytest.raises(EmptyTextError):
        memory.remember_sync("   \n ")
    with pytest.raises(TextTooLongError, match="100000") as ei:
        memory.remember_sync("x" * 100_001)
    assert ei.value.limit == 100_000 and ei.value.actual == 100_001
    memory.remember_sync("é" * 50_000)  # 100,000 bytes exactly: accepted
    with pytest.raises(EmptyQueryError):
        memory.recall_sync("")
    for bad in (0, 101):
        with pytest.raises(InvalidLimitError, match="between 1 and 100"):
            memory.recall_sync("x", RecallOptions(limit=bad))
    with pytest.raises(umi.ValidationError, match="unknown entity type"):
        RecallOptions(entity_types=("alien",))
    with pytest.raises(TypeError):
        memory.remember_sync(b"bytes")
    with pytest.raises(TypeError):
        memory.recall_sync("x", {"limit": 3})
    assert memory.count_sync() == 1  # only the accepted 100,000-byte text, as one note


def test_forget_removes_from_storage_and_search(memory):
    r = memory.remember_sync("Grace studies marine biology")
    gid = by_name(r.entities, "Grace")[0].id
    assert memory.forget_sync(gid) is True
    assert memory.get_sync(gid) is None
    assert gid not in [h.id for h in memory.recall_sync("marine biology Grace")]
    assert memory.forget_sync(gid) is False
    assert [h.op for h in memory.history_sync(gid)] == ["create", "delete"]


def test_extraction_failure_degrades_to_one_note_with_warning():
    faults = FaultInjector(seed=1, probabilities={FaultType.LLM_INVALID_RESPONSE: 1.0})
    with umi.Memory.sim(seed=1, faults=faults) as m:
        r = m.remember_sync("Heidi works at Globex")
        (e,) = r.entities
        assert e.entity_type == EntityType.NOTE and e.content == "Heidi works at Globex"
        assert "extraction failed" in r.warnings[0] and "InvalidResponseError" in r.warnings[0]
        assert m.count_sync() == 1


def test_embedding_failure_stores_without_vectors_with_warning():
    faults = FaultInjector(seed=1, probabilities={FaultType.EMBEDDING_FAIL: 1.0})
    with umi.Memory.sim(seed=1, faults=faults) as m:
        r = m.remember_sync("Ivan works at Hooli")
        assert r.entity_count == 2 and all(e.embedding is None for e in r.entities)
        assert any("embedding failed" in w for w in r.warnings)
        assert by_name(m.recall_sync("Hooli"), "Hooli")  # keyword + name search still work


def test_storage_failure_raises_and_leaves_nothing():
    faults = FaultInjector(seed=3, probabilities={FaultType.STORAGE_WRITE_FAIL: 1.0})
    with umi.Memory.sim(seed=3, faults=faults) as m:
        with pytest.raises(umi.StorageError):
            m.remember_sync("Judy works at Umbrella Corp")
        faults.set_probability(FaultType.STORAGE_WRITE_FAIL, 0.0)
        assert m.count_sync() == 0
        # the embedder's identity goes in with the first write's transaction: rolled back with it
        assert m.storage.get_meta("embedder") is None
        r = m.remember_sync("Judy works at Umbrella Corp")  # not a duplicate: no source was kept
        assert not r.duplicate and r.entity_count == 2
        assert m.storage.get_meta("embedder") == f"sim|seed=3|{m.embedder.dim}"


async def test_async_api_and_context_manager():
    async with umi.Memory.sim(seed=5) as m:
        r = await m.remember("Kim works at Stark Industries")
        assert r.entity_count == 2
        hits = await m.recall("Stark Industries")
        assert hits[0].name == "Stark Industries"
        assert await m.count() == 2
        assert (await m.get(hits[0].id)).name == "Stark Industries"
        assert await m.forget(hits[0].id) is True


def test_closed_memory_refuses_work():
    m = umi.Memory.sim(seed=1)
    view = m.scoped(user_id="ann")
    m.close()
    m.close()  # idempotent
    with pytest.raises(umi.MemoryClosedError, match="closed"):
        m.remember_sync("x")
    with pytest.raises(umi.MemoryClosedError, match="closed"):
        asyncio.run(m.recall("x"))
    with pytest.raises(umi.MemoryClosedError, match="closed"):  # closing the Memory closed its views
        view.count_sync()
    with pytest.raises(umi.MemoryClosedError, match="closed"):
        view.core.set_block("persona", "x")


def test_sim_clock_consults_clock_skew_faults():
    faults = FaultInjector(seed=2, probabilities={FaultType.CLOCK_SKEW: 1.0})
    with umi.Memory.sim(seed=2, faults=faults) as m:
        r = m.remember_sync("Ivan works at Hooli")
        # the first skewed reading is ahead by clock_skew_ms; the engine's clock never goes back
        assert m.clock.skews >= 1
        assert all(e.created_at >= umi.sim.SIM_EPOCH_MS + faults.clock_skew_ms for e in r.entities)
        later = m.remember_sync("Ivan now works at Initech")
        assert min(e.created_at for e in later.entities) > max(e.created_at for e in r.entities)
    with umi.Memory.sim(seed=2) as calm:  # no faults: the clock reads its own time
        assert calm.remember_sync("Ivan works at Hooli").entities[0].created_at < umi.sim.SIM_EPOCH_MS + 1000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX")
def test_close_in_a_forked_child_touches_nothing_of_the_parent():
    m = umi.Memory.sim(seed=6)
    m.remember_sync("Lena works at Acme")
    closed_providers = []
    m.llm.aclose = m.embedder.aclose = lambda: closed_providers.append(1)  # would run on the loop
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            try:
                m.close()  # the loop is the parent's: only marks this Memory closed
                msg = f"ok {len(closed_providers)}"
                try:
                    m.count_sync()
                    msg += " | still open"
                except umi.MemoryClosedError:
                    pass
            except BaseException as exc:  # noqa: BLE001
                msg = f"close raised {type(exc).__name__}: {exc}"
            os.write(w, msg.encode()[:4000])
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert msg == "ok 0", msg
    assert m.count_sync() == 2  # the parent's loop and store are unaffected
    del m.llm.aclose, m.embedder.aclose
    m.close()


def test_core_and_working_are_sized_by_config():
    cfg = umi.MemoryConfig(core_memory_bytes=2048, working_memory_bytes=4096, recall_limit=3)
    with umi.Memory.sim(seed=1, config=cfg) as m:
        assert m.core.max_bytes == 2048 and m.working.max_bytes == 4096
        for i in range(6):
            m.remember_sync(f"Person{i} works at Acme Corp")
        assert len(m.recall_sync("Acme Corp")) == 3


def test_sync_twin_works_inside_a_running_loop_thread():
    async def main():
        with umi.Memory.sim(seed=2) as m:
            # called from a coroutine's thread: blocks this loop, but does not deadlock
            r = m.remember_sync("Liam lives in Lisbon")
            hits = await asyncio.gather(m.recall("Lisbon"), m.recall("Liam"))
            return r, hits

    r, (a, b) = asyncio.run(main())
    assert r.entity_count == 2 and a and b


# --- remember_many -------------------------------------------------------------

STORY = [
    "Alice works at Acme Corp",
    "Bob lives in Berlin",
    "Alice left Acme and now works at Initech",  # supersedes a fact of the same chunk
    "Bob lives in Berlin",  # the same text twice in one chunk
    "Carol has two cats",
    "Alice works at Acme Corp",  # told again after it was superseded: restated, revived
    "Dave owns a red car",
    "Dave does not own a red car",
]


def outcome(results):
    return [(r.duplicate, [e.id for e in r.entities],
             sorted((ev.source_id, ev.target_id, ev.evolution_type.value) for ev in r.evolutions),
             r.warnings) for r in results]


def stored(m):
    return sorted((d["id"], d["valid_to"] is None) for d in exported(m) if d["kind"] == "entity")


@pytest.mark.parametrize("chunk_size", [1, 3, 128])
def test_remember_many_gives_what_remembering_one_by_one_gives(chunk_size):
    with umi.Memory.sim(seed=9) as one, umi.Memory.sim(seed=9) as many:
        singles = [one.remember_sync(t) for t in STORY]
        batch = many.remember_many_sync(STORY, chunk_size=chunk_size)
        assert outcome(batch) == outcome(singles)
        assert stored(many) == stored(one)
        # the chunk's own texts evolve each other: text 2 updates text 0, text 5 restates text 0
        assert {ev.source_id for ev in batch[2].evolutions} >= {e.id for e in batch[0].entities}
        assert batch[5].evolutions and batch[7].evolutions[0].evolution_type == EvolutionType.CONTRADICT


def test_remember_many_batches_embeddings_and_transactions(monkeypatch):
    texts = [f"Person{i} plays the violin" for i in range(7)]
    with umi.Memory.sim(seed=2) as m:
        m.remember_sync("warm up: record the embedder")
        embed_calls, commits, progress = [], [], []
        real_aembed, real_tx = m.embedder.aembed, m.storage.transaction

        async def aembed(batch, *, kind="passage"):
            embed_calls.append(len(batch))
            return await real_aembed(batch, kind=kind)

        depth = [0]

        @contextlib.contextmanager
        def transaction():  # count the outermost transactions: the commits
            commits.append(1) if depth[0] == 0 else None
            depth[0] += 1
            try:
                with real_tx():
                    yield
            finally:
                depth[0] -= 1

        monkeypatch.setattr(m.embedder, "aembed", aembed)
        monkeypatch.setattr(m.storage, "transaction", transaction)
        results = m.remember_many_sync(texts, RememberOptions().without_evolution(), chunk_size=3,
                                       progress=lambda done, total: progress.append((done, total)))
        assert [r.entity_count for r in results] == [1] * 7
        assert embed_calls == [3, 3, 1] and len(commits) == 3  # one batch, one transaction per chunk
        assert progress == [(3, 7), (6, 7), (7, 7)]


def test_remember_many_validates_every_text_before_storing_any():
    with umi.Memory.sim(seed=2) as m:
        with pytest.raises(EmptyTextError) as ei:
            m.remember_many_sync(["Erin plays chess", "Frank sails", "   "])
        assert "texts[2]; nothing was stored" in ei.value.__notes__
        with pytest.raises(TypeError, match="single str"):
            m.remember_many_sync("Erin plays chess")
        with pytest.raises(umi.InvalidConfigError, match=r"\[1, 10000\]"):
            m.remember_many_sync(["x"], chunk_size=0)
        assert m.count_sync() == 0
        assert m.remember_many_sync([]) == []


def test_a_failed_chunk_leaves_the_chunks_before_it():
    faults = FaultInjector(seed=4, probabilities={})
    with umi.Memory.sim(seed=4, faults=faults) as m:
        seen = []

        def progress(done, total):
            seen.append(done)
            if done == 2:
                faults.set_probability(FaultType.STORAGE_WRITE_FAIL, 1.0)

        with pytest.raises(umi.StorageError):
            m.remember_many_sync(["Gus plays golf", "Hal plays hockey", "Ian plays tennis"],
                                 chunk_size=2, progress=progress)
        faults.set_probability(FaultType.STORAGE_WRITE_FAIL, 0.0)
        assert seen == [2] and sorted(e.name for e in m.recall_sync("plays")) == ["Gus", "Hal"]


# --- update --------------------------------------------------------------------

def test_update_is_a_correction_with_history_and_a_new_vector(memory):
    r = memory.remember_sync("Alice works at Acme Corp")
    alice = by_name(r.entities, "Alice")[0]
    acme = by_name(r.entities, "Acme Corp")[0]
    u = memory.update_sync(alice.id, "Alice now leads the Apollo project")
    (new,) = u.entities
    assert (new.name, new.entity_type, new.confidence) == ("Alice", EntityType.PERSON, 1.0)
    assert new.embedding is not None and not np.allclose(new.embedding, memory.get_sync(alice.id).embedding)
    assert memory.get_sync(alice.id).valid_to == new.created_at  # kept, superseded
    assert memory.get_sync(acme.id).valid_to is not None  # the other facet of the same statement too
    rels = memory.relations_sync(alice.id)
    assert [(x.source_id, x.target_id, x.evolution_type) for x in rels] == [(alice.id, new.id, EvolutionType.UPDATE)]
    assert [h.op for h in memory.history_sync(alice.id)] == ["create", "supersede"]
    hits = memory.recall_sync("What does Alice do?")
    assert new.id in [h.id for h in hits] and alice.id not in [h.id for h in hits]
    assert memory.get_sync(new.id).source_id == u.source_id
    with pytest.raises(umi.ValidationError, match="superseded"):
        memory.update_sync(alice.id, "Alice retired")
    with pytest.raises(umi.ValidationError, match="no fact with id"):
        memory.update_sync("no-such-id", "x")
    with pytest.raises(EmptyTextError):
        memory.update_sync(new.id, "  ")
    same = memory.update_sync(new.id, "Alice now leads the Apollo project")
    assert same.entities == [] and "same fact" in same.warnings[0]


def test_update_stays_in_the_facts_scope():
    with umi.Memory.sim(seed=3) as m:
        alice, bob = m.scoped(user_id="alice"), m.scoped(user_id="bob")
        fact = alice.remember_sync("Kim lives in Oslo").entities[0]
        with pytest.raises(umi.ValidationError, match="no fact with id"):
            bob.update_sync(fact.id, "Kim lives in Rome")
        new = m.update_sync(fact.id, "Kim lives in Rome").entities[0]  # the admin corrects alice's fact
        assert new.scope == umi.Scope(user_id="alice") and alice.get_sync(new.id) is not None
        assert bob.recall_sync("Kim") == []


# --- faces -----------------------------------------------------------------------

def test_every_verb_has_a_generated_blocking_twin():
    import inspect

    verbs = [n for n, f in vars(umi.Memory).items() if inspect.iscoroutinefunction(f) and not n.startswith("_")
             and n not in ("aclose",)]
    assert set(verbs) >= {"remember", "remember_many", "update", "recall", "get", "forget", "forget_source",
                          "forget_scope", "count", "history", "relations", "core_history", "export", "import_"}
    for n in verbs:
        twin = getattr(umi.Memory, n.rstrip("_") + "_sync")
        assert twin.__name__ == n.rstrip("_") + "_sync" and inspect.signature(twin) == inspect.signature(getattr(umi.Memory, n))


def test_config_sizes_every_scopes_core_and_working_memory():
    cfg = umi.MemoryConfig(core_memory_bytes=1024, working_memory_bytes=2048)
    with umi.Memory.sim(seed=1, config=cfg) as m:
        v = m.scoped(user_id="zed")
        assert v.core.max_bytes == 1024 and v.working.max_bytes == 2048
        with pytest.raises(umi.CoreMemoryFullError):
            v.core.set_block("human", "x" * 1025)
