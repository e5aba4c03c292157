"""Memory.remember / recall with the real AnthropicProvider (real SDK) against a loopback Messages API.

The loopback "Claude" answers each task from its request (extraction by a table of texts,
evolution by comparing names), so these tests check what Memory does with real provider
traffic: usage accounting, evolution calls, and how provider failures degrade.
"""

from __future__ import annotations

import gc
import json
import warnings

import pytest
from loopback_api import (
    ANTHROPIC_MESSAGES,
    Recorded,
    Reply,
    anthropic_error,
    anthropic_tool_message,
    anthropic_usage,
)
from provider_harness import API_KEY, record_sleeps

import umi
from umi.pipeline.schemas import read_tag
from umi.sim.faults import FaultInjector, FaultType

ALICE_ACME = "Alice is a software engineer at Acme Corp."
ALICE_GLOBEX = "Alice now works as a manager at Globex."
EXTRACTIONS = {
    ALICE_ACME: [
        {"name": "Alice", "entity_type": "person", "content": "Alice is a software engineer at Acme Corp.",
         "confidence": 0.95},
        {"name": "Acme Corp", "entity_type": "organization", "content": "Acme Corp employs Alice as a software engineer."},
    ],
    ALICE_GLOBEX: [
        {"name": "Alice", "entity_type": "person", "content": "Alice works as a manager at Globex.", "confidence": 0.9},
    ],
}


def fake_claude(rec: Recorded) -> Reply:
    """Answer the task the request forces, from the request's own prompt."""
    task = rec.body["tool_choice"]["name"]
    prompt = rec.body["messages"][0]["content"]
    usage = anthropic_usage(input_tokens=100 + len(prompt) // 4, output_tokens=50, cache_read=900)
    if task == "extract_entities":
        answer = {"entities": EXTRACTIONS.get(read_tag(prompt, "text"), [])}
    elif task == "classify_evolution":
        new = json.loads(read_tag(prompt, "new_fact"))
        older = json.loads(read_tag(prompt, "older_facts"))
        answer = {"relations": [
            {"candidate_id": o["id"], "evolution_type": "update" if o["name"] == new["name"] else "none",
             "reason": "a new job replaces the old one", "confidence": 0.9}
            for o in older
        ]}
    else:
        answer = {"queries": ["Alice employer", "Alice job"]}
    return Reply(200, anthropic_tool_message(task, answer, usage=usage))


def tasks_sent(api) -> list[str]:
    return [r.body["tool_choice"]["name"] for r in api.requests_to(ANTHROPIC_MESSAGES)]


@pytest.fixture
def build(api):
    made = []

    def build(*, faults=None, max_retries=2):
        llm = umi.AnthropicProvider(base_url=api.anthropic_url, api_key=API_KEY, timeout=5, max_retries=max_retries)
        sleeps = record_sleeps(llm)
        memory = (umi.MemoryBuilder()
                  .with_llm(llm)
                  .with_embedder(umi.SimEmbeddingProvider(seed=1))
                  .with_storage(umi.SimStorageBackend(seed=1, faults=faults))
                  .build())
        made.append(memory)
        return memory, sleeps

    yield build
    for m in made:
        # Close the provider first, while the Memory's loop still runs, so its async client is closed on
        # that loop. Memory.close() alone does not (yet) do this: see the last test of this module.
        m.llm.close()
        m.close()


def test_remember_and_recall_through_claude(api, build):
    api.set_default(ANTHROPIC_MESSAGES, fake_claude)
    memory, _ = build()
    result = memory.remember_sync(ALICE_ACME)

    assert sorted((e.name, e.entity_type.value) for e in result.entities) == [
        ("Acme Corp", "organization"), ("Alice", "person")]
    assert result.warnings == [] and result.evolutions == []
    assert tasks_sent(api) == ["extract_entities"]  # nothing older to compare with: no evolution call
    (req,) = api.requests_to(ANTHROPIC_MESSAGES)
    assert req.error is None
    assert result.usage.calls == 1
    assert result.usage.input_tokens == 100 + len(req.body["messages"][0]["content"]) // 4
    assert (result.usage.output_tokens, result.usage.cache_read_input_tokens) == (50, 900)
    assert memory.count_sync() == 2

    hits = memory.recall_sync("Who works at Acme Corp?", umi.RecallOptions(deep_search=False))
    assert {h.name for h in hits} == {"Alice", "Acme Corp"}


async def test_a_new_fact_updates_the_old_one_with_one_evolution_call(api, build):
    api.set_default(ANTHROPIC_MESSAGES, fake_claude)
    memory, _ = build()
    first = await memory.remember(ALICE_ACME)
    old_alice = next(e for e in first.entities if e.name == "Alice")

    second = await memory.remember(ALICE_GLOBEX)

    assert tasks_sent(api) == ["extract_entities", "extract_entities", "classify_evolution"]
    assert second.usage.calls == 2  # 1 extraction + 1 evolution call for the one new entity with candidates
    (new_alice,) = second.entities
    updates = [r for r in second.evolutions if r.source_id == old_alice.id]
    assert [(r.target_id, r.evolution_type) for r in updates] == [(new_alice.id, umi.EvolutionType.UPDATE)]
    current = await memory.recall("Alice", umi.RecallOptions(deep_search=False, entity_types=["person"]))
    assert [e.id for e in current] == [new_alice.id]
    history = await memory.recall("Alice", umi.RecallOptions(deep_search=False, entity_types=["person"],
                                                             include_superseded=True))
    assert sorted(e.id for e in history) == sorted([old_alice.id, new_alice.id])


@pytest.mark.parametrize("failure", ["schema", "overloaded"])
def test_an_extraction_failure_degrades_to_one_note_and_a_warning(api, build, failure):
    if failure == "schema":
        bad = {"entities": [{"name": "Alice", "entity_type": "robot", "content": "x"}]}
        api.script(ANTHROPIC_MESSAGES, Reply(200, anthropic_tool_message("extract_entities", bad)))
        expect = "InvalidResponseError"
    else:
        api.script(ANTHROPIC_MESSAGES, *[Reply(529, anthropic_error("overloaded_error", "Overloaded")) for _ in range(3)])
        expect = "RateLimitError (status 529)"
    memory, sleeps = build(max_retries=2)
    result = memory.remember_sync(ALICE_ACME)

    (note,) = result.entities
    assert (note.entity_type, note.content) == (umi.EntityType.NOTE, ALICE_ACME)
    (warning,) = result.warnings
    assert warning.startswith("extraction failed, stored the text as one note") and expect in warning
    assert result.usage.calls == 0  # no successful call to account for
    assert memory.count_sync() == 1  # the note, and nothing from the failed extraction
    assert [e.id for e in memory.recall_sync("software engineer", umi.RecallOptions(deep_search=False))] == [note.id]
    assert len(sleeps.waits) == (2 if failure == "overloaded" else 0)


def test_a_storage_failure_after_a_good_extraction_leaves_nothing_written(api, build):
    api.set_default(ANTHROPIC_MESSAGES, fake_claude)
    faults = FaultInjector(seed=1, probabilities={FaultType.STORAGE_WRITE_FAIL: 1.0})
    memory, _ = build(faults=faults)
    with pytest.raises(umi.StorageError):
        memory.remember_sync(ALICE_ACME)
    assert tasks_sent(api) == ["extract_entities"]
    assert memory.count_sync() == 0
    assert memory.storage.get_meta("embedder") is None  # recorded in the first write's transaction: rolled back
    assert memory.recall_sync("Alice", umi.RecallOptions(deep_search=False)) == []


def test_deep_recall_asks_claude_to_rewrite_the_query(api, build):
    api.set_default(ANTHROPIC_MESSAGES, fake_claude)
    memory, _ = build()
    memory.remember_sync(ALICE_ACME)
    hits = memory.recall_sync("Where is Alice employed?", umi.RecallOptions(deep_search=True))
    assert tasks_sent(api) == ["extract_entities", "rewrite_query"]
    assert "Alice" in {h.name for h in hits}


def test_memory_close_alone_releases_the_providers_connections(api, build):
    """Memory.close() must let providers close their async clients on the Memory's loop before that
    loop closes (``await provider.aclose()`` there); else the pooled connections leak (ResourceWarning)."""
    api.set_default(ANTHROPIC_MESSAGES, fake_claude)
    memory, _ = build()
    memory.remember_sync(ALICE_ACME)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memory.close()
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_memory_with_anthropic_builds_a_working_memory_on_a_file(api, tmp_path):
    """The vendor class method: options reach the provider; the store is the DuckDB file asked for;
    with no OpenAI key the local embedder serves the vectors."""
    api.set_default(ANTHROPIC_MESSAGES, fake_claude)
    db = tmp_path / "claude.duckdb"
    memory = umi.Memory.with_anthropic(API_KEY, db_path=db, base_url=api.anthropic_url, timeout=5, max_retries=0)
    try:
        assert isinstance(memory.llm, umi.AnthropicProvider) and memory.llm.timeout == 5
        assert type(memory.embedder).__name__ == "LocalEmbeddingProvider"
        told = memory.remember_sync(ALICE_ACME)
        assert sorted(e.name for e in told.entities) == ["Acme Corp", "Alice"]
        assert tasks_sent(api) == ["extract_entities"]
        memory.llm.close()
    finally:
        memory.close()
    reopened = umi.Memory(db, embedder=umi.LocalEmbeddingProvider())
    try:
        assert reopened.count_sync() == 2
    finally:
        reopened.close()
