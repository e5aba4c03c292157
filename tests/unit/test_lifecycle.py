"""The memory lifecycle as a user lives it: nothing told is lost, statements not copies,
restating revives, forget forgets, import/export round trips, uniform degradation.

Every example of issue 10 is here with its exact text.
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import numpy as np
import pytest

import umi
from umi import EntityType, EvolutionType, RecallOptions, RememberOptions
from umi.providers.base import EmbeddingProvider, LLMProvider
from umi.providers.sim import SimEmbeddingProvider, SimLLMProvider
from umi.storage.base import SearchFilters


@pytest.fixture
def memory():
    m = umi.Memory.sim(seed=7)
    yield m
    m.close()


@pytest.fixture
def rules():
    """The embedded default's pipeline (rule extraction, no LLM) on the Sim store and embedder."""
    from umi.sim.clock import SimClock
    from umi.storage.sim import SimStorageBackend

    m = umi.Memory(storage=SimStorageBackend(seed=3), llm=None,
                               embedder=SimEmbeddingProvider(3, 64), clock=SimClock(start_ms=1_700_000_000_000))
    yield m
    m.close()


def contents(hits):
    return [h.content for h in hits]


def export_lines(m, embeddings=True):
    buf = io.StringIO()
    m.export_sync(buf, embeddings=embeddings)
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def state(m):
    """Everything an export holds but the header."""
    return [r for r in export_lines(m) if r["kind"] != "header"]


# --- 1. every sentence is kept -------------------------------------------------------------


def test_issue_example_unattached_sentence_is_kept_as_a_note_and_found(rules):
    r = rules.remember_sync("Alice works at Acme Corp.\nwe agreed the budget is five million dollars")
    notes = [e for e in r.entities if e.entity_type == EntityType.NOTE]
    assert [n.content for n in notes] == ["we agreed the budget is five million dollars"]
    assert any("1 sentence(s)" in w and "note" in w for w in r.warnings)
    assert {(e.name, e.entity_type) for e in r.entities} >= {("Alice", EntityType.PERSON),
                                                             ("Acme Corp", EntityType.ORGANIZATION)}
    hits = rules.recall_sync("budget five million")
    assert "we agreed the budget is five million dollars" in contents(hits)[:1]


def test_issue_example_sentence_starts_and_amounts_are_not_people(rules):
    r = rules.remember_sync("Budget is tight this quarter.")
    assert [(e.entity_type, e.content) for e in r.entities] == [(EntityType.NOTE, "Budget is tight this quarter.")]
    r = rules.remember_sync("We raised 5M from investors.")
    assert all(e.name != "5M" and e.entity_type != EntityType.PERSON for e in r.entities)


def test_a_llm_that_leaves_a_sentence_out_still_keeps_it():
    class Forgetful(SimLLMProvider):
        def complete_json(self, system, prompt, schema, *, task):
            res = super().complete_json(system, prompt, schema, task=task)
            if task == "extract_entities":
                res.data = {"entities": [e for e in res.data["entities"] if "Paris" not in e["content"]]}
            return res

    from umi.sim.clock import SimClock
    from umi.storage.sim import SimStorageBackend

    with umi.Memory(storage=SimStorageBackend(seed=1), llm=Forgetful(1),
                                embedder=SimEmbeddingProvider(1, 64), clock=SimClock(start_ms=10**12)) as m:
        r = m.remember_sync("Bob plays chess. Carol moved to Paris last spring.")
        assert "Carol moved to Paris last spring." in [e.content for e in r.entities
                                                      if e.entity_type == EntityType.NOTE]
        assert any("note" in w for w in r.warnings)


# --- 2. statements, not copies -------------------------------------------------------------


def test_issue_example_one_sentence_about_three_names_is_one_result(rules):
    rules.remember_sync("Alice, Bob and Carol founded Zephyr Labs.")
    rules.remember_sync("Dana collects vintage maps.")
    rules.remember_sync("Erin bakes sourdough bread.")
    hits = rules.recall_sync("Who founded Zephyr Labs?", RecallOptions(limit=3))
    assert contents(hits).count("Alice, Bob and Carol founded Zephyr Labs.") == 1
    (founders,) = [h for h in hits if h.content.startswith("Alice, Bob")]
    assert founders.mentions == ("Alice", "Bob", "Carol", "Zephyr Labs")
    assert len(hits) == 3 and len(set(contents(hits))) == 3  # limit counts statements
    assert isinstance(hits, umi.RecallResult) and hits.warnings == ()


# --- 3. restating revives; as_of answers history -------------------------------------------


def test_issue_example_restated_fact_is_current_again_and_history_holds(rules):
    first = rules.remember_sync("Alice works at Acme Corp.")
    t1 = rules._engine.now_ms()
    second = rules.remember_sync("Alice now works at Initech")
    t2 = rules._engine.now_ms()
    assert {e.content for e in second.entities} == {"Alice now works at Initech"}
    third = rules.remember_sync("Alice works at Acme Corp.")  # told again, word for word
    t3 = rules._engine.now_ms()
    assert not third.duplicate and not any("already known" in w for w in third.warnings)
    old_alice = [e for e in first.entities if e.name == "Alice"][0]
    assert rules.get_sync(old_alice.id).valid_to is None  # current again
    new_alice = [e for e in second.entities if e.name == "Alice"][0]
    assert rules.get_sync(new_alice.id).valid_to is not None  # what replaced it is retired...
    back = [r for r in third.evolutions if r.source_id == new_alice.id and r.target_id == old_alice.id]
    assert back and back[0].evolution_type == EvolutionType.UPDATE and "restated" in back[0].reason  # ...saying so
    assert [h.op for h in rules.history_sync(old_alice.id)] == ["create", "supersede", "revive"]
    now = contents(rules.recall_sync("Where does Alice work?"))
    assert "Alice works at Acme Corp." in now and "Alice now works at Initech" not in now

    def at(t):
        return {h.content for h in rules.recall_sync("Alice works", RecallOptions(as_of=t)) if "Alice" in h.content}

    assert at(t1) == {"Alice works at Acme Corp."}
    assert at(t2) == {"Alice now works at Initech"}
    assert at(t3) == {"Alice works at Acme Corp."}


def test_issue_example_remember_after_forgetting_every_fact_stores_again(rules):
    r = rules.remember_sync("Grace studies marine biology")
    for e in r.entities:
        rules.forget_sync(e.id)
    again = rules.remember_sync("Grace studies marine biology")
    assert not again.duplicate and again.entity_count == len(r.entities)
    assert contents(rules.recall_sync("marine biology")) == ["Grace studies marine biology"]


# --- 4. forget that forgets ------------------------------------------------------------------


def test_issue_example_forget_scrubs_history_source_relations_and_revives(rules):
    first = rules.remember_sync("Bob lives in Berlin")
    second = rules.remember_sync("Bob moved to Munich")
    old = [e for e in first.entities if e.name == "Bob"][0]
    new = [e for e in second.entities if e.name == "Bob"][0]
    assert rules.get_sync(old.id).valid_to is not None
    assert rules.forget_sync(new.id) is True
    for e in second.entities:  # the whole statement, every facet
        assert rules.get_sync(e.id) is None
        assert all(set(h.snapshot) <= {"id", "forgotten"} for h in rules.history_sync(e.id))
        assert rules.relations_sync(e.id) == []
    assert rules.get_sync(old.id).valid_to is None  # what it alone had superseded is current again
    assert [h.op for h in rules.history_sync(old.id)] == ["create", "supersede", "revive"]
    dump = json.dumps(export_lines(rules))
    assert "Munich" not in dump
    assert contents(rules.recall_sync("Where does Bob live?"))[:1] == ["Bob lives in Berlin"]
    # the export re-imports whole: no dangling relation
    with _mem(None, SimEmbeddingProvider(3, 64)) as other:
        buf = io.StringIO()
        rules.export_sync(buf)
        buf.seek(0)
        other.import_sync(buf)
        assert state(other) == state(rules)


def test_forget_keeps_superseded_what_something_else_still_supersedes(rules):
    rules.remember_sync("Bob lives in Berlin")
    a = rules.remember_sync("Bob moved to Munich")
    b = rules.remember_sync("Bob moved to Hamburg")
    munich = [e for e in a.entities if e.name == "Bob"][0]
    hamburg = [e for e in b.entities if e.name == "Bob"][0]
    assert rules.get_sync(munich.id).valid_to is not None
    rules.forget_sync(hamburg.id)
    assert rules.get_sync(munich.id).valid_to is None
    berlin = rules.recall_sync("Bob lives in Berlin", RecallOptions(include_superseded=True))
    assert [h.valid_to is not None for h in berlin if h.content == "Bob lives in Berlin"] == [True]


def test_forget_source_and_bulk_forget_return_counts(rules):
    r = rules.remember_sync("Alice works at Acme Corp. Remind me to call Bob tomorrow.")
    rules.remember_sync("Dan sings opera")
    n = rules.forget_sync(where=SearchFilters(entity_types=("task",)))
    assert n == 1 and rules.count_sync(include_superseded=True) == len(r.entities) - 1 + 1
    assert rules.forget_source_sync(r.source_id) == len(r.entities) - 1
    assert rules.count_sync() == 1 and rules.forget_source_sync(r.source_id) == 0
    assert "Acme" not in json.dumps(export_lines(rules))
    with pytest.raises(TypeError):
        rules.forget_sync("x", where=SearchFilters())
    with pytest.raises(TypeError):
        rules.forget_sync(where={"entity_types": ["task"]})


def test_a_forget_racing_a_remember_never_returns_true_with_the_fact_back():
    async def main():
        async with umi.Memory.sim(seed=11) as m:
            for i in range(40):
                first = await m.remember(f"Ivy{i} works at Hooli")
                ivy = [e for e in first.entities if e.name == f"Ivy{i}"][0]
                forgot, again = await asyncio.gather(m.forget(ivy.id), m.remember(f"Ivy{i}  works at Hooli"))
                back = await m.get(ivy.id)
                stored_again = ivy.id in [e.id for e in again.entities]
                assert not (forgot and back is not None and not stored_again), i

    asyncio.run(main())


# --- 5. export / import ------------------------------------------------------------------


def story(m):
    m.remember_sync("Alice works at Acme Corp.")
    m.remember_sync("Alice now works at Initech")
    m.remember_sync("Alice works at Acme Corp.")
    m.remember_sync("Bob lives in Berlin")
    r = m.remember_sync("Bob moved to Munich")
    m.remember_sync("Carol, Dan and Erin met at the Rust Conference.")
    m.forget_sync([e for e in r.entities if e.name == "Bob"][0].id)


def test_export_import_round_trip_after_remember_supersede_restate_forget(memory, tmp_path):
    story(memory)
    path = tmp_path / "dump.jsonl"
    n = memory.export_sync(path)  # without vectors: the import embeds them again
    lines = path.read_text().splitlines()
    assert n == len(lines) and json.loads(lines[0])["kind"] == "header"
    kinds = {json.loads(x)["kind"] for x in lines}
    assert kinds == {"header", "source", "entity", "relation", "history"}
    seen = []
    with umi.Memory.sim(seed=7) as other:
        counts = other.import_sync(path, progress=lambda done, total: seen.append((done, total)))
        assert counts["entities"] == memory.count_sync() and counts["embedded"] == counts["entities"]
        assert seen and seen[-1][0] == seen[-1][1] == counts["entities"]
        assert state(other) == state(memory)  # vectors, validity, relations, history, sources
        q = "Where does Alice work?"
        assert [(h.id, h.score) for h in other.recall_sync(q)] == [(h.id, h.score) for h in memory.recall_sync(q)]


def test_an_import_failing_at_line_n_leaves_the_store_as_it_was(memory, tmp_path):
    story(memory)
    good = [json.dumps(r) for r in export_lines(memory)]
    with umi.Memory.sim(seed=7) as other:
        other.remember_sync("Zoe paints murals")
        before = state(other)
        for n, bad in [(5, "{not json"), (len(good), json.dumps({"kind": "entity", "name": "x"})),
                       (3, json.dumps({"kind": "alien"}))]:
            lines = good[: n - 1] + [bad] + good[n - 1 :]
            path = tmp_path / f"bad{n}.jsonl"
            path.write_text("\n".join(lines) + "\n")
            with pytest.raises(umi.ValidationError, match=rf"bad{n}\.jsonl:{n}:"):
                other.import_sync(path)
            assert state(other) == before
        # a relation whose fact is in neither the store nor the file: refused whole, nothing written
        lines = [x for x in good if json.loads(x).get("name") != "Initech"]
        rel_gap = [json.loads(x) for x in good if json.loads(x)["kind"] == "entity"]
        lines = [x for x in good if not (json.loads(x)["kind"] == "entity" and json.loads(x)["id"] == rel_gap[0]["id"])]
        path = tmp_path / "gap.jsonl"
        path.write_text("\n".join(lines) + "\n")
        rels = [json.loads(x) for x in good if json.loads(x)["kind"] == "relation"]
        if any(rel_gap[0]["id"] in (r["source_id"], r["target_id"]) for r in rels):
            with pytest.raises(umi.ValidationError, match="neither stored nor in the file"):
                other.import_sync(path)
            assert state(other) == before


def test_cli_export_refuses_its_own_database_and_round_trips(tmp_path, capsys):
    from umi.cli import main

    db = str(tmp_path / "own.duckdb")
    for text in ("Bob lives in Berlin", "Bob moved to Munich", "Alice, Bob and Carol founded Zephyr Labs."):
        assert main(["remember", text, "--db", db], out=io.StringIO()) == 0
    assert main(["export", "--db", db, "--out", db], out=io.StringIO()) == 2
    assert "own database" in capsys.readouterr().err
    with umi.Memory(db) as m:
        m.forget_sync(m.recall_sync("Zephyr Labs")[0].id)
    dump = tmp_path / "dump.jsonl"
    assert main(["export", "--db", db, "--out", str(dump)], out=io.StringIO()) == 0  # no vectors in the file
    assert "embedding" not in dump.read_text() and "Zephyr" not in dump.read_text()
    other = str(tmp_path / "other.duckdb")
    out = io.StringIO()
    assert main(["import", str(dump), "--db", other], out=out) == 0
    assert "entities=4" in out.getvalue() and "embedded=4" in out.getvalue()  # re-embedded...
    assert "4/4" in capsys.readouterr().err  # ...with a progress bar
    again = tmp_path / "again.jsonl"
    assert main(["export", "--db", other, "--out", str(again)], out=io.StringIO()) == 0
    assert again.read_text() == dump.read_text()
    with umi.Memory(db) as a, umi.Memory(other) as b:
        q = "Where does Bob live?"
        assert [(h.id, round(h.score, 6)) for h in a.recall_sync(q)] == [(h.id, round(h.score, 6)) for h in b.recall_sync(q)]


# --- 6. uniform degradation ------------------------------------------------------------------


class Broken(LLMProvider):
    name = "broken"

    def complete_json(self, system, prompt, schema, *, task):
        raise ConnectionError("connection reset by peer")


class BrokenEmbedder(EmbeddingProvider):
    name = "broken-embedder"
    dim = 64

    def __init__(self):
        self.fail = False
        self.inner = SimEmbeddingProvider(1, 64)

    def embed(self, texts, *, kind="passage"):
        if self.fail:
            raise ConnectionError("embedding service unreachable")
        return self.inner.embed(texts, kind=kind)


def _mem(llm, embedder):
    from umi.sim.clock import SimClock
    from umi.storage.sim import SimStorageBackend

    return umi.Memory(storage=SimStorageBackend(seed=2), llm=llm, embedder=embedder,
                                  clock=SimClock(start_ms=10**12))


def test_issue_example_custom_llm_raising_connection_error_keeps_the_text_as_a_note():
    with _mem(Broken(), SimEmbeddingProvider(1, 64)) as m:
        r = m.remember_sync("Heidi works at Globex")
        assert [(e.entity_type, e.content) for e in r.entities] == [(EntityType.NOTE, "Heidi works at Globex")]
        assert "extraction failed" in r.warnings[0] and "ConnectionError" in r.warnings[0]
        hits = m.recall_sync("Who is Heidi's employer?", RecallOptions(deep_search=True))
        assert contents(hits) == ["Heidi works at Globex"]
        assert any("query rewriting failed" in w and "ConnectionError" in w for w in hits.warnings)


def test_embedder_raising_anything_degrades_remember_and_recall_visibly():
    emb = BrokenEmbedder()
    with _mem(None, emb) as m:
        m.remember_sync("Ivan works at Hooli")
        emb.fail = True
        r = m.remember_sync("Judy works at Umbrella Corp")
        assert any("embedding failed" in w and "EmbeddingError" in w for w in r.warnings)
        hits = m.recall_sync("Umbrella Corp")
        assert "Judy works at Umbrella Corp" in contents(hits)
        assert len(hits.warnings) == 1 and "query embedding failed" in hits.warnings[0]
        assert "ConnectionError" in hits.warnings[0]


def test_evolution_classifier_raising_keeps_facts_without_relations():
    class BadEvolution(SimLLMProvider):
        def complete_json(self, system, prompt, schema, *, task):
            if task == "classify_evolution":
                raise RuntimeError("model crashed")
            return super().complete_json(system, prompt, schema, task=task)

    with _mem(BadEvolution(1), SimEmbeddingProvider(1, 64)) as m:
        m.remember_sync("Kim works at Stark Industries")
        r = m.remember_sync("Kim now works at Wayne Enterprises")
        assert r.entity_count == 2 and not r.evolutions
        assert any("evolution detection failed" in w and "RuntimeError" in w for w in r.warnings)


class Hesitant(SimLLMProvider):
    """Proposes every evolution at a fixed confidence."""

    def __init__(self, confidence):
        super().__init__(1)
        self.confidence = confidence

    def complete_json(self, system, prompt, schema, *, task):
        res = super().complete_json(system, prompt, schema, task=task)
        if task == "classify_evolution":
            for rel in res.data["relations"]:
                rel["confidence"] = self.confidence
        return res


@pytest.mark.parametrize("confidence, retired", [(0.5, False), (0.74, False), (0.75, True), (0.95, True)])
def test_issue_example_supersession_needs_supersede_confidence(confidence, retired):
    with _mem(Hesitant(confidence), SimEmbeddingProvider(1, 64)) as m:
        assert m.config.supersede_confidence == 0.75
        a = m.remember_sync("Liam lives in Lisbon")
        b = m.remember_sync("Liam moved to Madrid")
        old = [e for e in a.entities if e.name == "Liam"][0]
        (rel,) = [r for r in b.evolutions if r.source_id == old.id]
        assert rel.evolution_type == EvolutionType.UPDATE and rel.confidence == confidence  # recorded either way
        assert (m.get_sync(old.id).valid_to is not None) is retired
        assert any("under supersede_confidence" in w for w in b.warnings) is not retired


def test_supersede_confidence_is_a_checked_config_field():
    assert umi.MemoryConfig().with_supersede_confidence(0.9).supersede_confidence == 0.9
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(umi.InvalidConfigError, match="supersede_confidence"):
            umi.MemoryConfig(supersede_confidence=bad)


# --- the write lock is not held across a slow model ----------------------------------------


def test_two_writers_with_a_slow_llm_do_not_wait_for_each_other():
    """Four remembers whose model calls each wait (bounded) until all four calls of that task are
    in flight at once. If the write lock were held across a model call, the calls would run one
    at a time: each would give up waiting and the peak concurrency would be 1, not 4. Counting
    calls in flight instead of timing them keeps the test deterministic on a loaded machine."""
    writers = 4

    class Gated(SimLLMProvider):
        def __init__(self, seed):
            super().__init__(seed)
            self.in_flight: dict[str, int] = {}
            self.peak: dict[str, int] = {}
            self.calls: dict[str, int] = {}

        async def acomplete_json(self, system, prompt, schema, *, task):
            self.calls[task] = self.calls.get(task, 0) + 1
            self.in_flight[task] = self.in_flight.get(task, 0) + 1
            self.peak[task] = max(self.peak.get(task, 0), self.in_flight[task])
            try:
                for _ in range(200):  # at most 2 s: a serialised caller stops waiting and goes on
                    if self.in_flight[task] >= writers or self.peak[task] >= writers:
                        break
                    await asyncio.sleep(0.01)
                return self.complete_json(system, prompt, schema, task=task)
            finally:
                self.in_flight[task] -= 1

    llm = Gated(1)

    async def main():
        async with _mem(llm, SimEmbeddingProvider(1, 64)) as m:
            olds = ["Sara works at Acme Corp", "Tom works at Acme Corp", "Uma works at Acme Corp",
                    "Vic works at Acme Corp"]
            for t in olds:  # one at a time: their facts are the candidates the next ones classify against
                await m.remember(t)
            llm.peak.clear()
            llm.calls.clear()
            news = ["Sara now works at Cyberdyne", "Tom now works at Soylent", "Uma now works at Tyrell",
                    "Vic now works at Oscorp"]
            rs = await asyncio.gather(*(m.remember(t) for t in news))
            seen = dict(llm.peak), dict(llm.calls)
            assert all(r.has_evolutions for r in rs)
            for t, old in zip(news, olds):  # each update retired its own person's old fact
                hits = await m.recall(t.split()[0], RecallOptions(limit=5))
                assert old not in [e.content for e in hits] and t in [e.content for e in hits]
            return seen

    peak, calls = asyncio.run(main())
    assert calls["extract_entities"] >= writers and calls["classify_evolution"] >= writers
    # every writer's model calls were in flight at the same time: no lock across the model
    assert peak == {"extract_entities": writers, "classify_evolution": writers}


def test_remember_many_is_remembering_one_by_one():
    texts = ["Alice works at Acme Corp.", "Alice now works at Initech", "Bob lives in Berlin",
             "Alice works at Acme Corp.", "Bob moved to Munich", "Bob lives in Berlin", "we agreed on a budget"]
    with _mem(None, SimEmbeddingProvider(4, 64)) as one, _mem(None, SimEmbeddingProvider(4, 64)) as many:
        singles = [one.remember_sync(t) for t in texts]
        batch = many.remember_many_sync(texts, chunk_size=3)
        def outcome(rs):
            return [(r.duplicate, sorted(e.id for e in r.entities),
                     sorted((x.source_id, x.target_id, x.evolution_type) for x in r.evolutions)) for r in rs]

        assert outcome(batch) == outcome(singles)

        def shape(m):  # times differ (one clock tick per call); the facts, validity and links do not
            return sorted((r["kind"], r.get("source_id"), r.get("target_id"), r.get("entity_id"), r.get("name"),
                           r.get("valid_to") is None, r.get("op")) for r in state(m))

        assert shape(many) == shape(one)
