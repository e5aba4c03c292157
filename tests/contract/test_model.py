"""Every backend against a plain-Python model of the contract (hypothesis state machine).

The model is a dict of entities plus ``SearchFilters.matches`` (the reference filter
semantics), an exact cosine scan and :func:`umi.storage.text.bm25_scores` (the reference
BM25). Writes, committed transactions and rolled-back transactions are applied to both;
after each step ``list``, ``count``, ``find_by_name``, ``search_vector`` and
``search_text`` under drawn filters must agree with the model.
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
from umi.storage.base import SearchFilters, StorageBackend
from umi.storage.text import bm25_scores, document_terms
from umi.types import Entity, EntityType, normalize_name

DIM = 3
NAMES = ["Alice", "alice ", "Bob Smith", "bob  smith", "ACME", "Zoë"]
WORDS = ["coffee", "tea", "engineer", "engineers", "paris", "acme", "runs", "the", "of", "zoë"]
TYPES = ["person", "organization", "note"]
META_VALUES = [None, True, False, 0, 1, 1.0, 0.0, "1", "x", "x' OR 1=1 --"]

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
)


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

    def teardown(self) -> None:
        self.store.close()

    # --- writes ----------------------------------------------------------------------
    @rule(batch=st.lists(entities(), min_size=1, max_size=4))
    def upsert(self, batch: list[Entity]) -> None:
        self.store.upsert(batch)
        for e in batch:
            self.model[e.id] = e

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        eid = data.draw(st.sampled_from(sorted(self.model)))
        assert self.store.delete(eid, at=T0 + 99) is True
        del self.model[eid]

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

    @rule(batch=st.lists(entities(), min_size=1, max_size=3), commit=st.booleans(), data=st.data())
    def transaction(self, batch: list[Entity], commit: bool, data: st.DataObject) -> None:
        victim = data.draw(st.sampled_from(sorted(self.model))) if self.model else None
        try:
            with self.store.transaction():
                self.store.upsert(batch)
                if victim is not None and victim not in {e.id for e in batch}:
                    self.store.delete(victim)
                if not commit:
                    raise RuntimeError("roll back")
        except StorageError:
            assert not commit
            return
        for e in batch:
            self.model[e.id] = e
        if victim is not None and victim not in {e.id for e in batch}:
            del self.model[victim]

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
