"""Recall reads a fused ranking's candidates without copying them (``peek_many``) and hydrates
only the statements it returns: the answer is the one the plain ``get_many`` path gives — ids,
order, scores, mentions, every field —, and what it hands out is the caller's own."""

from __future__ import annotations

import numpy as np
import pytest

import umi
from umi import RecallOptions
from umi.pipeline.time import is_temporal_query, query_time_range, time_matches
from umi.providers.sim import SimEmbeddingProvider
from umi.sim.clock import SimClock
from umi.storage.sim import SimStorageBackend

NAMES = "Alice Bob Carol Dan Erin Frank Grace Heidi".split()
ORGS = "Acme Globex Initech Hooli".split()


@pytest.fixture(scope="module")
def memory():
    """Rule extraction: a sentence about several names is one statement of several facets."""
    m = umi.Memory(storage=SimStorageBackend(seed=5), llm=None, embedder=SimEmbeddingProvider(5, 64),
                   clock=SimClock(start_ms=1_700_000_000_000))
    rng = np.random.default_rng(11)
    texts = []
    for i in range(120):
        a, b, c = rng.choice(NAMES, 3, replace=False)
        org = ORGS[i % len(ORGS)]
        texts.append(f"{a}, {b} and {c} founded {org} Labs number {i}." if i % 3 == 0
                     else f"{a} works at {org} with {b} on project {i}.")
    m.remember_many_sync(texts)
    yield m
    m.close()


QUERIES = ["Who founded Acme Labs?", "Alice works at Globex", "Bob and Carol", "Initech project",
           "Who works with Dan now?", "Hooli Labs number 9", "What did Erin do last week?"]


def _answer(hits):
    return [(e.id, e.score, e.mentions, e.name, e.content, e.metadata, e.scope, e.valid_to,
             None if e.embedding is None else e.embedding.tolist()) for e in hits]


@pytest.mark.parametrize("limit", [1, 3, 10, 25, 60])
@pytest.mark.parametrize("deep", [False, True])
def test_recall_equals_the_get_many_path(memory, monkeypatch, limit, deep):
    opts = RecallOptions(limit=limit, deep_search=deep)
    got = [_answer(memory.recall_sync(q, opts)) for q in QUERIES]
    monkeypatch.setattr(memory.storage, "peek_many", None, raising=False)  # the plain path
    monkeypatch.setattr(memory.storage, "peek_by_name", None, raising=False)
    want = [_answer(memory.recall_sync(q, opts)) for q in QUERIES]
    assert got == want
    assert any(len(r[2]) > 1 for ans in got for r in ans)  # statements of several facets were found


def test_only_the_statements_returned_are_hydrated(memory, monkeypatch):
    asked: list[int] = []
    real = memory.storage.get_many

    def counting(ids):
        asked.append(len(ids))
        return real(ids)

    monkeypatch.setattr(memory.storage, "get_many", counting)
    hits = memory.recall_sync("Alice works at Globex", RecallOptions(limit=5, deep_search=False))
    assert len(hits) == 5 and sum(asked) == 5


@pytest.mark.parametrize("query", ["Who works with Dan now?", "When did Alice work at Globex?",
                                   "What did Erin do last week?", "Who founded Acme Labs?"])
def test_signals_hydrate_nothing_for_questions(memory, monkeypatch, query):
    """The tell, time and name signals read their candidates uncopied: a question's recall copies
    only the statements it returns, as a plain query's does."""
    asked: list[int] = []
    real_get_many, real_find = memory.storage.get_many, memory.storage.find_by_name

    def counting(ids):
        asked.append(len(ids))
        return real_get_many(ids)

    def finding(*args, **kwargs):
        found = real_find(*args, **kwargs)
        asked.append(len(found))
        return found

    monkeypatch.setattr(memory.storage, "get_many", counting)
    monkeypatch.setattr(memory.storage, "find_by_name", finding)
    hits = memory.recall_sync(query, RecallOptions(limit=5, deep_search=False))
    assert len(hits) == 5 and sum(asked) == 5


@pytest.mark.parametrize("deep", [False, True])
def test_uncopied_reads_are_the_same_reads_for_the_sim_faults(memory, monkeypatch, deep):
    """Reading uncopied changes no read the Sim fault injector sees: the same operations, in order."""
    def reads_of(q):
        seen: list[str] = []
        real = type(memory.storage)._fault_read

        def record(self, op):
            seen.append(op)
            return real(self, op)

        with monkeypatch.context() as mp:
            mp.setattr(type(memory.storage), "_fault_read", record)
            memory.recall_sync(q, RecallOptions(limit=5, deep_search=deep))
        return seen

    got = [reads_of(q) for q in QUERIES]
    monkeypatch.setattr(memory.storage, "peek_many", None, raising=False)
    monkeypatch.setattr(memory.storage, "peek_by_name", None, raising=False)
    want = [reads_of(q) for q in QUERIES]
    assert got == want and all("get_many" in r for r in got)
    assert any("find_by_name" in r for r in got)


def test_results_are_the_callers_own_and_the_store_is_untouched(memory):
    hits = memory.recall_sync("Who founded Acme Labs?", RecallOptions(limit=5, deep_search=False))
    for e in hits:
        stored = memory.storage.get(e.id)
        assert stored.score is None and stored.mentions == ()
        before = stored.embedding.copy()
        e.embedding[:] = 0.0
        e.metadata["x"] = 1
        again = memory.storage.get(e.id)
        assert np.array_equal(again.embedding, before) and "x" not in again.metadata
        assert memory.storage.peek_many([e.id])[0].score is None


@pytest.mark.parametrize("q", ["What did Erin do last week?", "When did Bob join?", "Alice 2024-02-30 and 2024-03-01", "Alice on 2024-02-30",
                               "meet me tomorrow or the day before yesterday", "since March 3rd, 2021",
                               "Where does Carol work now?", "plain words only", "in two weeks, last Monday"])
@pytest.mark.parametrize("now", [0, 1_700_000_000_000, 1_709_164_800_000])
def test_shared_time_matches_give_the_same_answers(q, now):
    m = time_matches(q)
    assert query_time_range(q, now, m) == query_time_range(q, now)
    assert is_temporal_query(q, m) == is_temporal_query(q)
