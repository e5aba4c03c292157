"""The deep path searches each rewrite of the query by vector (all in one ``search_vector_many``)
and leaves out its keyword list — the query's own is fused already —; a rewrite whose embedding
failed is searched by keywords instead."""

from __future__ import annotations

import numpy as np
import pytest

import umi
from umi import RecallOptions
from umi.errors import EmbeddingError
from umi.pipeline import recall as recall_mod
from umi.pipeline.schemas import read_tag
from umi.providers.base import LLMResult
from umi.providers.sim import SimEmbeddingProvider
from umi.sim.clock import SimClock
from umi.storage.sim import SimStorageBackend

VARIANTS = ["Alice employer", "company Alice works for", "Alice job"]


class Rewriter(umi.SimLLMProvider):
    async def acomplete_json(self, system, prompt, schema, *, task):
        if task == "rewrite_query":
            return LLMResult(data={"queries": list(VARIANTS)}, usage=umi.Usage())
        return self.complete_json(system, prompt, schema, task=task)


class QueryOnlyEmbedder(SimEmbeddingProvider):
    """Embeds passages and the first query; fails for the rewrites."""

    async def aembed(self, texts, *, kind="passage"):
        if kind == "query" and any(t in VARIANTS for t in texts):
            raise EmbeddingError("down for rewrites")
        return self.embed(texts, kind=kind)


def _memory(embedder):
    m = umi.Memory(storage=SimStorageBackend(seed=3), llm=Rewriter(1), embedder=embedder,
                   clock=SimClock(start_ms=1_700_000_000_000))
    m.remember_many_sync([f"{n} works at {o} as an engineer" for n, o in
                          [("Alice", "Acme"), ("Bob", "Globex"), ("Carol", "Initech"), ("Dan", "Acme")]],
                         umi.RememberOptions().without_extraction())
    return m


def _spy(monkeypatch, store):
    calls: list[tuple[str, object]] = []
    content, many = store.search_content, store.search_vector_many

    def search_content(queries, vectors, k, filters=None):
        calls.append(("content", (list(queries), [v is not None for v in vectors])))
        return content(queries, vectors, k, filters)

    def search_vector_many(vectors, k, filters=None):
        calls.append(("vectors", len(vectors)))
        return many(vectors, k, filters)

    monkeypatch.setattr(store, "search_content", search_content)
    monkeypatch.setattr(store, "search_vector_many", search_vector_many)
    return calls


def test_rewrites_are_searched_by_vector_in_one_call(monkeypatch):
    m = _memory(SimEmbeddingProvider(3, 32))
    try:
        calls = _spy(monkeypatch, m.storage)
        hits = m.recall_sync("Where does Alice work?", RecallOptions(limit=3, deep_search=True))
        assert hits and hits[0].content.startswith("Alice")
        assert calls == [("content", (["Where does Alice work?"], [True])), ("vectors", 3)]
    finally:
        m.close()


def test_a_rewrite_without_a_vector_is_searched_by_keywords(monkeypatch):
    m = _memory(QueryOnlyEmbedder(3, 32))
    try:
        calls = _spy(monkeypatch, m.storage)
        hits = m.recall_sync("Where does Alice work?", RecallOptions(limit=3, deep_search=True))
        assert hits and any("embedding failed" in w for w in hits.warnings)
        assert calls == [("content", (["Where does Alice work?"], [True])),
                         ("content", (VARIANTS, [False, False, False]))]
        fused: list[list] = []
        real = recall_mod.rrf_fuse

        def capture(lists, k=60, weights=None):
            lists = [list(x) for x in lists]
            fused.append(lists)
            return real(lists, k, weights)

        monkeypatch.setattr(recall_mod, "rrf_fuse", capture)
        m.recall_sync("Where does Alice work?", RecallOptions(limit=3, deep_search=True))
        by_keywords = [[i for i, _ in m.storage.search_text(v, 20)] for v in VARIANTS]
        assert any(by_keywords) and all(ids in fused[-1] for ids in by_keywords if ids)
    finally:
        m.close()
