"""Every backend against a plain-Python model of the contract (hypothesis state machine).

The model is a dict of entities plus ``SearchFilters.matches`` (the reference filter
semantics), an exact cosine scan and :func:`umi.storage.text.bm25_scores` (the reference
BM25), and plain dicts of sources, relations, history and core blocks. Facts, sources,
relations and core blocks live in several scopes (two users, an agent, a session, and the
unset scope); writes (upsert, supersede, revive, forget, sources, relations, core blocks),
committed and rolled-back transactions are applied to both. After each step, every user's
view (entities, sources, relations, history, core blocks) must equal the model's — so no
operation in one scope changes or reveals anything in another — and ``list``, ``count``,
``find_by_name``, ``search_vector`` and ``search_text`` under drawn filters (scope and
source included) must agree with the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from contract_helpers import T0
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from umi.errors import StorageError
from umi.storage.base import SearchFilters, Source, StorageBackend
from umi.storage.text import bm25_scores, document_terms
from umi.types import CoreBlockRecord, Entity, EntityType, EvolutionRelation, Scope, normalize_name

DIM = 3
NAMES = ["Alice", "alice ", "Bob Smith", "bob  smith", "ACME", "Zoë"]
WORDS = ["coffee", "tea", "engineer", "engineers", "paris", "acme", "runs", "the", "of", "zoë"]
TYPES = ["person", "organization", "note"]
META_VALUES = [None, True, False, 0, 1, 1.0, 0.0, "1", "x", "x' OR 1=1 --"]

SCOPES = [Scope(), Scope("u1"), Scope("u1", "a"), Scope("u1", "a", "s1"), Scope("u2"), Scope("u2", "a")]
VIEWS = [None, Scope(), Scope("u1"), Scope("u2"), Scope("u1", "a"), Scope(agent_id="a"), Scope(session_id="s1")]
USERS = [Scope("u1"), Scope("u2")]
SOURCES = [Source.for_text("text one", T0, scope=Scope("u1")), Source.for_text("text one", T0 + 1, scope=Scope("u2")),
           Source.for_text("text two", T0 + 2)]
CORE_SCOPES = [Scope("u1", "a"), Scope("u2", "a"), Scope()]
metadata_st = st.dictionaries(st.sampled_from(["a", "b"]), st.sampled_from(META_VALUES), max_size=2)
vector_st = st.one_of(
    st.none(),
    st.lists(st.integers(-3, 3), min_size=DIM, max_size=DIM).filter(any).map(
        lambda xs: np.asarray(xs, dtype=np.float32)),
)


@st.composite
def entities(draw: st.DrawFn) -> Entity:
    return Entity(
        draw(st.sampled_from(TYPES)),
        draw(st.sampled_from(NAMES)),
        " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=5))),
        metadata=draw(metadata_st),
        embedding=draw(vector_st),
        created_at=T0 + draw(st.integers(0, 40)),
        event_time=draw(st.one_of(st.none(), st.integers(0, 40).map(lambda t: T0 + t))),
        scope=draw(st.sampled_from(SCOPES)),
        source_id=draw(st.sampled_from([None, *(x.id for x in SOURCES)])),
    )


times = st.one_of(st.none(), st.integers(-2, 45).map(lambda t: T0 + t))
filters_st = st.builds(
    SearchFilters,
    entity_types=st.one_of(st.none(), st.lists(st.sampled_from(TYPES), min_size=1, max_size=2).map(tuple)),
    time_range=st.one_of(st.none(), st.tuples(times, times).map(
        lambda t: t if None in t or t[0] <= t[1] else (t[1], t[0]))),
    time_field=st.sampled_from(["created_at", "event_time"]),
    metadata=st.one_of(st.none(), metadata_st),
    include_superseded=st.booleans(),
    as_of=st.one_of(st.none(), st.integers(-1, 60).map(lambda t: T0 + t)),
    scope=st.sampled_from(VIEWS),
    source_id=st.sampled_from([None, *(x.id for x in SOURCES), "no-such-source"]),
)

TOMB = "tombstone"


def _model_vector_ranking(model: dict[str, Entity], f: SearchFilters, q: np.ndarray) -> list[tuple[str, float]]:
    qn = q.astype(np.float64) / np.linalg.norm(q.astype(np.float64))
    out = []
    for e in model.values():
        if e.embedding is not None and f.matches(e):
            v = e.embedding.astype(np.float64)
            out.append((e.id, float(v @ qn / np.linalg.norm(v))))
    out.sort(key=lambda t: (-t[1], t[0]))
    return out


def _model_text_ranking(model: dict[str, Entity], f: SearchFilters, query: str) -> list[tuple[str, float]]:
    docs = [(e.id, *document_terms(e.name, e.content)) for e in model.values()]
    scores = bm25_scores(query, docs)
    out = [(i, s) for i, s in scores.items() if f.matches(model[i])]
    out.sort(key=lambda t: (-t[1], t[0]))
    return out


def assert_same_top_k(got: list[tuple[str, float]], want: list[tuple[str, float]], k: int, tol: float) -> None:
    """``got`` is a valid top-k of the full model ranking ``want``: same length, same scores (within
    ``tol``), every id scored as the model scores it, and nothing clearly better left out. Ties
    (within ``tol``) may be cut at the k-th place differently by float rounding."""
    assert len(got) == min(k, len(want)), (got, want[:k])
    model = dict(want)
    assert len({i for i, _ in got}) == len(got)
    for (gi, gs), (_, ws) in zip(got, want):
        assert gs == pytest.approx(ws, abs=tol, rel=tol)
        assert gi in model and model[gi] == pytest.approx(gs, abs=tol, rel=tol)
    if got:
        cut = got[-1][1]
        assert {i for i, s in want if s > cut + tol} <= {i for i, _ in got}
    exact_ties_broken_by_id = all(
        not (a[1] == b[1] and a[0] > b[0]) for a, b in zip(got, got[1:]))
    assert exact_ties_broken_by_id, got


class StoreMachine(RuleBasedStateMachine):
    make: Callable[[], StorageBackend]

    def __init__(self) -> None:
        super().__init__()
        self.store = type(self).make()
        self.model: dict[str, Entity] = {}
        self.sources: dict[str, Source] = {}
        self.relations: dict[str, EvolutionRelation] = {}
        self.hist: dict[str, list[tuple[str, str]]] = {}  # id -> [(op, content or TOMB)]
        self.core: dict[Scope, list[tuple[str, str, float]]] = {}

    def teardown(self) -> None:
        self.store.close()

    # --- the model's rules (one place) -----------------------------------------------
    def m_upsert(self, batch: list[Entity]) -> None:
        for e in batch:
            self.hist.setdefault(e.id, []).append(("update" if e.id in self.model else "create", e.content))
            self.model[e.id] = e

    def m_forget(self, eid: str) -> None:
        e = self.model.pop(eid)
        self.hist[eid] = [(op, TOMB) for op, _ in self.hist[eid]] + [("delete", TOMB)]
        for rid in [r.id for r in self.relations.values() if eid in (r.source_id, r.target_id)]:
            del self.relations[rid]
        if e.source_id in self.sources and not any(x.source_id == e.source_id for x in self.model.values()):
            del self.sources[e.source_id]

    # --- writes ----------------------------------------------------------------------
    @rule(batch=st.lists(entities(), min_size=1, max_size=4))
    def upsert(self, batch: list[Entity]) -> None:
        self.store.upsert(batch)
        self.m_upsert(batch)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        eid = data.draw(st.sampled_from(sorted(self.model)))
        assert self.store.delete(eid, at=T0 + 99) is True
        self.m_forget(eid)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), t=st.integers(0, 50))
    def supersede(self, data: st.DataObject, t: int) -> None:
        eid = data.draw(st.sampled_from(sorted(self.model)))
        e = self.model[eid]
        done = self.store.supersede(eid, T0 + t)
        assert done == (e.valid_to is None)
        if done:
            self.model[eid] = Entity.from_dict({**e.to_dict(with_embedding=True), "valid_to": T0 + t,
                                                "updated_at": max(e.updated_at, T0 + t)})
            self.hist[eid].append(("supersede", e.content))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), t=st.integers(0, 50))
    def revive(self, data: st.DataObject, t: int) -> None:
        eid = data.draw(st.sampled_from(sorted(self.model)))
        e = self.model[eid]
        done = self.store.revive(eid, T0 + t)
        assert done == (e.valid_to is not None)
        if done:
            self.model[eid] = Entity.from_dict({**e.to_dict(with_embedding=True), "valid_to": None,
                                                "updated_at": max(e.updated_at, T0 + t)})
            self.hist[eid].append(("revive", e.content))

    @rule(src=st.sampled_from(SOURCES))
    def add_source(self, src: Source) -> None:
        self.store.add_source(src)
        self.sources.setdefault(src.id, src)

    @precondition(lambda self: len(self.model) >= 2)
    @rule(data=st.data(), etype=st.sampled_from(["update", "extend"]))
    def add_relation(self, data: st.DataObject, etype: str) -> None:
        a, b = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=2, max_size=2, unique=True))
        r = EvolutionRelation(a, b, etype, created_at=T0 + 7, scope=self.model[b].scope)
        self.store.add_relations([r])
        self.relations[r.id] = r

    @rule(sc=st.sampled_from(CORE_SCOPES), name=st.sampled_from(["persona", "human"]),
          content=st.sampled_from(["kind", "terse", "likes tea"]), op=st.sampled_from(["set", "remove", "clear"]))
    def core_block(self, sc: Scope, name: str, content: str, op: str) -> None:
        blocks = self.core.setdefault(sc, [])
        if op == "set":
            self.store.set_core_block(sc, name, content, 0.5, T0)
            pos = next((i for i, b in enumerate(blocks) if b[0] == name), None)
            if pos is None:
                blocks.append((name, content, 0.5))
            else:
                blocks[pos] = (name, content, 0.5)
        elif op == "remove":
            had = any(b[0] == name for b in blocks)
            assert self.store.remove_core_block(sc, name, T0) is had
            blocks[:] = [b for b in blocks if b[0] != name]
        else:
            assert self.store.clear_core_blocks(sc, T0) == len(blocks)
            blocks.clear()

    @rule(batch=st.lists(entities(), min_size=1, max_size=3), commit=st.booleans(), data=st.data())
    def transaction(self, batch: list[Entity], commit: bool, data: st.DataObject) -> None:
        victim = data.draw(st.sampled_from(sorted(self.model))) if self.model else None
        if victim is not None and victim in {e.id for e in batch}:
            victim = None
        try:
            with self.store.transaction():
                self.store.upsert(batch)
                if victim is not None:
                    self.store.delete(victim, at=T0 + 98)
                if not commit:
                    raise RuntimeError("roll back")
        except StorageError:
            assert not commit
            return
        self.m_upsert(batch)
        if victim is not None:
            self.m_forget(victim)

    # --- no scope sees or changes another's --------------------------------------------
    @invariant()
    def every_view_equals_the_model(self) -> None:
        for view in USERS + [Scope(), Scope("u1", "a"), Scope(agent_id="a")]:
            f = SearchFilters(scope=view, include_superseded=True)
            want = sorted((e for e in self.model.values() if view.contains(e.scope)), key=lambda e: (e.created_at, e.id))
            assert [g.to_dict(with_embedding=True) for g in self.store.list(f, limit=1000)] == [
                w.to_dict(with_embedding=True) for w in want]
            assert list(self.store.iter_sources(view)) == sorted(
                (x for x in self.sources.values() if view.contains(x.scope)), key=lambda x: (x.created_at, x.id))
            assert list(self.store.iter_relations(view)) == sorted(
                (r for r in self.relations.values() if view.contains(r.scope)), key=lambda r: (r.created_at, r.id))
        for sc in CORE_SCOPES:
            assert self.store.core_blocks(sc) == [CoreBlockRecord(n, c, i, p)
                                                  for p, (n, c, i) in enumerate(self.core.get(sc, []))]

    @invariant()
    def history_is_the_models_and_forgotten_content_is_gone(self) -> None:
        for eid, want in self.hist.items():
            got = self.store.history(eid)
            assert [(h.seq, h.op) for h in got] == [(i + 1, op) for i, (op, _) in enumerate(want)]
            for h, (_, content) in zip(got, want):
                if content == TOMB:
                    assert dict(h.snapshot) == {"id": eid, "forgotten": True}
                else:
                    assert h.snapshot["content"] == content

    # --- reads against the model -----------------------------------------------------
    @invariant()
    def counts_agree(self) -> None:
        assert self.store.count() == sum(1 for e in self.model.values() if e.valid_to is None)
        assert self.store.count(SearchFilters(include_superseded=True)) == len(self.model)

    @rule(f=filters_st, limit=st.integers(1, 6), offset=st.integers(0, 5))
    def list_and_count(self, f: SearchFilters, limit: int, offset: int) -> None:
        want = sorted((e for e in self.model.values() if f.matches(e)), key=lambda e: (e.created_at, e.id))
        assert self.store.count(f) == len(want)
        assert [e.id for e in self.store.list(f, limit=limit, offset=offset)] == [
            e.id for e in want[offset:offset + limit]]
        got = self.store.list(f, limit=100)
        assert [g.to_dict(with_embedding=True) for g in got] == [w.to_dict(with_embedding=True) for w in want]

    @rule(f=filters_st, name=st.sampled_from(NAMES), etype=st.one_of(st.none(), st.sampled_from(TYPES)))
    def find_by_name(self, f: SearchFilters, name: str, etype: str | None) -> None:
        key = normalize_name(name)
        want = sorted((e for e in self.model.values() if normalize_name(e.name) == key and f.matches(e)
                       and (etype is None or e.entity_type == EntityType(etype))),
                      key=lambda e: (e.created_at, e.id))
        assert [e.id for e in self.store.find_by_name(name, etype, f)] == [e.id for e in want]

    @rule(f=filters_st, names=st.lists(st.sampled_from(NAMES), max_size=3))
    def find_by_names(self, f: SearchFilters, names: list[str]) -> None:
        keys = {normalize_name(n) for n in names}
        want = sorted((e for e in self.model.values() if normalize_name(e.name) in keys and f.matches(e)),
                      key=lambda e: (e.created_at, e.id))
        assert [e.id for e in self.store.find_by_names(names, f)] == [e.id for e in want]

    @rule(f=filters_st, q=vector_st.filter(lambda v: v is not None), k=st.integers(1, 5))
    def search_vector(self, f: SearchFilters, q: np.ndarray, k: int) -> None:
        if self.store.dim is None:
            assert self.store.search_vector(q, k, f) == []
            return
        assert_same_top_k(self.store.search_vector(q, k, f), _model_vector_ranking(self.model, f, q), k, 1e-5)

    @rule(f=filters_st, words=st.lists(st.sampled_from(WORDS + ["missing"]), min_size=1, max_size=3),
          k=st.integers(1, 5))
    def search_text(self, f: SearchFilters, words: list[str], k: int) -> None:
        query = " ".join(words)
        assert_same_top_k(self.store.search_text(query, k, f), _model_text_ranking(self.model, f, query), k, 1e-9)


def test_backend_agrees_with_the_model(backend_name: str, make_backend: Callable[[], StorageBackend],
                                       tmp_path: Path) -> None:
    machine = type(f"Machine_{backend_name}", (StoreMachine,), {"make": staticmethod(make_backend)})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=10, stateful_step_count=20, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]))
