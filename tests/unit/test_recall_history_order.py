"""Recall with history (``include_superseded=True``): a superseded fact never ranks above the fact
that replaced it, along a chain of updates too; without history the old facts stay out."""

from __future__ import annotations

from rule_memory import rules_memory

import umi
from umi import RecallOptions
from umi.pipeline.recall import RecallResult, below_replacements
from umi.types import Entity, EvolutionRelation

HISTORY = RecallOptions(limit=10, include_superseded=True)


def test_the_replacement_outranks_the_fact_it_retired() -> None:
    with rules_memory(7) as m:
        old = m.remember_sync("Alice is a software engineer at Acme Corp.")
        m.remember_sync("Bob lives in Berlin and loves climbing.")
        new = m.remember_sync("Alice left Acme Corp and now works at Initech.")
        assert any(ev.evolution_type.value == "update" for ev in new.evolutions)
        was = {e.id for e in old.entities if e.name == "Alice"}
        now = {e.id for e in new.entities if e.name == "Alice"}
        hits = m.recall_sync("Alice", HISTORY)
        order = [h.id for h in hits]
        assert was & set(order) and now & set(order)
        first_new = min(order.index(i) for i in now if i in order)
        assert all(order.index(i) > first_new for i in was if i in order)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(h.valid_to is not None for h in hits if h.id in was)
        # without history the retired fact is not recalled at all
        assert not was & {h.id for h in m.recall_sync("Alice", RecallOptions(limit=10))}


def _fact(i: str, score: float, superseded: bool) -> Entity:
    e = Entity(entity_type="person", name="Ann", content=f"fact {i}", id=i, valid_to=5 if superseded else None)
    e.score = score
    return e


class _Relations:
    def __init__(self, rels: list[EvolutionRelation]) -> None:
        self.rels = rels

    def relations_for(self, entity_id: str) -> list[EvolutionRelation]:
        return [r for r in self.rels if entity_id in (r.source_id, r.target_id)]


class _Ctx:
    def __init__(self, rels: list[EvolutionRelation]) -> None:
        self.storage = _Relations(rels)


def test_a_chain_is_ordered_newest_first_and_unrelated_facts_keep_their_place() -> None:
    # a -> b -> c (updates), x unrelated, d extended by c (an extend retires nothing)
    rels = [EvolutionRelation("a", "b", "update"), EvolutionRelation("b", "c", "contradict"),
            EvolutionRelation("d", "c", "extend")]
    found = RecallResult([_fact("a", 0.9, True), _fact("x", 0.8, False), _fact("b", 0.7, True),
                          _fact("d", 0.6, True), _fact("c", 0.5, False)], ["w"])
    out = below_replacements(_Ctx(rels), found)  # type: ignore[arg-type]
    assert [e.id for e in out] == ["x", "d", "c", "b", "a"]
    assert list(out.warnings) == ["w"]
    assert [e.score for e in out] == sorted((e.score for e in out), reverse=True)
    assert out[2].score == 0.5 and out[3].score < 0.5 and out[4].score < out[3].score


def test_a_replacement_outside_the_results_caps_nothing_and_a_cycle_ends() -> None:
    rels = [EvolutionRelation("a", "gone", "update"), EvolutionRelation("p", "q", "update"),
            EvolutionRelation("q", "p", "update")]
    found = RecallResult([_fact("a", 0.9, True), _fact("p", 0.8, True), _fact("q", 0.7, True)], [])
    out = below_replacements(_Ctx(rels), found)  # type: ignore[arg-type]
    assert out[0].id == "a" and out[0].score == 0.9
    assert {e.id for e in out} == {"a", "p", "q"} and len(out) == 3
