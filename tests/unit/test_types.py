"""Entity ids, validation and round trips; EvolutionRelation rules; options and config."""

import dataclasses
from datetime import timedelta

import numpy as np
import pytest

import umi
from umi import Entity, EntityType, EvolutionRelation, EvolutionType, MemoryConfig, RecallOptions, RememberOptions
from umi.types import entity_id_for, normalize_content, normalize_name


def test_same_fact_same_id_new_fact_new_id():
    a = Entity("person", "Alice  Smith", "Works at Acme.")
    b = Entity(EntityType.PERSON, "alice smith", "works at acme")
    c = Entity("person", "Alice Smith", "Works at Initech.")
    d = Entity("organization", "Alice Smith", "Works at Acme.")
    assert a.id == b.id == entity_id_for("person", "ALICE SMITH", "works  at ACME")
    assert len({a.id, c.id, d.id}) == 3
    assert a.id == "%s" % a.id and len(a.id) == 36 and a.id[14] == "5"  # UUIDv5
    assert normalize_name(" Ｆｕｌｌ  Width ") == "full width" and normalize_content("Hi there!") == "hi there"


def test_entity_defaults_and_validation():
    e = Entity("note", "n", "c", created_at=1000)
    assert (e.updated_at, e.valid_from, e.valid_to, e.importance, e.confidence) == (1000, 1000, None, 0.5, 1.0)
    assert e.is_current and e.is_valid_at(1000) and not e.is_valid_at(999)
    assert Entity("event", "x", "y", created_at=5, event_time=3).valid_from == 3
    with pytest.raises(umi.InvalidEntityTypeError, match="unknown entity type 'alien'.*person"):
        Entity("alien", "x", "y")
    with pytest.raises(umi.InvalidImportanceError, match=r"\[0, 1\]"):
        Entity("note", "x", "y", importance=1.5)
    with pytest.raises(umi.InvalidConfidenceError):
        Entity("note", "x", "y", confidence=-0.1)
    with pytest.raises(umi.ValidationError, match="name must not be empty"):
        Entity("note", "  ", "y")
    with pytest.raises(umi.ValidationError, match="512"):
        Entity("note", "x" * 513, "y")
    with pytest.raises(TypeError):
        Entity("note", b"x", "y")
    with pytest.raises(umi.InvalidFilterError, match="scalar"):
        Entity("note", "x", "y", metadata={"a": {"$gt": 1}})
    with pytest.raises(umi.InvalidFilterError, match="not allowed"):
        Entity("note", "x", "y", metadata={"$where": 1})
    with pytest.raises(umi.ValidationError, match="finite"):
        Entity("note", "x", "y", embedding=np.array([1.0, np.nan]))


def test_entity_round_trips_through_dict():
    e = Entity("project", "Apollo", "Ships in May", metadata={"k": 1, "b": True, "s": "x", "n": None},
               embedding=np.arange(4, dtype=np.float32), created_at=10, event_time=7, source_id="src")
    back = Entity.from_dict(e.to_dict(with_embedding=True))
    assert back == e and back.embedding.dtype == np.float32
    assert "embedding" not in e.to_dict()


def test_evolution_relation_rules():
    r = EvolutionRelation("a", "b", "update", "moved", 0.7, created_at=5)
    assert r.type is EvolutionType.UPDATE and r.type.supersedes and not EvolutionType.EXTEND.supersedes
    assert r.id == EvolutionRelation("a", "b", EvolutionType.UPDATE, "other reason", 0.1).id
    with pytest.raises(umi.ValidationError, match="two different entities"):
        EvolutionRelation("a", "a", "update")
    with pytest.raises(umi.InvalidEvolutionTypeError, match="expected one of: update, extend, derive, contradict"):
        EvolutionRelation("a", "b", "replace")
    with pytest.raises(umi.InvalidConfidenceError):
        EvolutionRelation("a", "b", "extend", confidence=2)


def test_options_are_immutable_and_chainable():
    o = RememberOptions()
    o2 = o.without_extraction().with_importance(0.8).without_evolution().without_embeddings()
    assert (o.extract_entities, o.importance) == (True, 0.5)
    assert (o2.extract_entities, o2.importance, o2.detect_evolutions, o2.generate_embeddings) == (False, 0.8, False, False)
    assert o2.with_embeddings().generate_embeddings
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.importance = 1.0  # frozen
    r = RecallOptions().with_limit(5).fast_only().with_time_range(1, 2).with_entity_types("person", EntityType.TASK)
    assert (r.limit, r.deep_search, r.time_range, r.entity_types) == (5, False, (1, 2), (EntityType.PERSON, EntityType.TASK))
    assert RecallOptions().with_deep_search().deep_search is True
    with pytest.raises(umi.InvalidLimitError):
        RecallOptions(limit=101)
    with pytest.raises(umi.InvalidImportanceError):
        RememberOptions(importance=2)
    with pytest.raises(umi.InvalidFilterError, match="after its end"):  # SearchFilters' rule, the one rule
        RecallOptions(time_range=(5, 1))
    md = {"a": 1}
    opts = RecallOptions(metadata=md)
    md["a"] = 2
    assert opts.metadata == {"a": 1}  # copied, never aliased


def test_memory_config_validates_every_field():
    c = MemoryConfig(working_memory_ttl=60)
    assert c.working_memory_ttl == timedelta(seconds=60)
    assert c.with_recall_limit(7).recall_limit == 7 and c.recall_limit == 10
    for bad in (dict(core_memory_bytes=1023), dict(core_memory_bytes=16 * 1024 * 1024 + 1), dict(recall_limit=0),
                dict(working_memory_ttl=timedelta(days=8)), dict(evolution_similarity=1.5)):
        with pytest.raises(umi.InvalidConfigError):
            MemoryConfig(**bad)


# --- scopes -------------------------------------------------------------------------------


def test_scope_validation_names_the_component_and_the_limit():
    from umi.errors import InvalidScopeError
    from umi.types import SCOPE_COMPONENT_CHARS_MAX, UNSET_SCOPE, Scope

    assert Scope().is_unset and UNSET_SCOPE == Scope() and not Scope("u").is_unset
    Scope("a" * SCOPE_COMPONENT_CHARS_MAX, "agent-1.x:y@z+w_", "s")
    for bad in ("", "a" * (SCOPE_COMPONENT_CHARS_MAX + 1), "alice bob", "al/ice", "é", "a\x00", "a\n"):
        with pytest.raises(InvalidScopeError) as ei:
            Scope(agent_id=bad)
        assert ei.value.component == "agent_id" and "128" in str(ei.value)
    with pytest.raises(TypeError):
        Scope(user_id=5)  # type: ignore[arg-type]
    assert issubclass(InvalidScopeError, umi.ValidationError) and umi.InvalidScopeError is InvalidScopeError


def test_scope_view_rule_and_core_scope():
    from umi.types import Scope

    rec = Scope("alice", "bot", "s1")
    assert Scope().contains(rec) and Scope("alice").contains(rec) and Scope("alice", "bot", "s1").contains(rec)
    assert not Scope("bob").contains(rec) and not Scope(session_id="s2").contains(rec)
    assert not Scope("alice").contains(Scope()) and Scope().contains(Scope())
    assert rec.core == Scope("alice", "bot") and Scope("alice").core == Scope("alice")
    assert sorted([Scope("b"), Scope(), Scope("a", "x"), Scope("a")]) == [Scope(), Scope("a"), Scope("a", "x"), Scope("b")]
    assert Scope.from_dict(rec.to_dict()) == rec and Scope.from_dict(None) == Scope()
    assert len({Scope("a"), Scope("a"), Scope(agent_id="a")}) == 2


def test_scope_is_part_of_ids_but_unset_keeps_the_old_ids():
    from umi.storage.base import Source, SearchFilters, source_id_for
    from umi.types import Scope

    # ids of facts and texts without a scope are the ones every earlier store holds
    import uuid

    from umi.types import UMI_NAMESPACE

    assert entity_id_for("person", "Alice", "works at Acme") == str(
        uuid.uuid5(UMI_NAMESPACE, "person\x1falice\x1fworks at acme"))
    old = Entity("person", "Alice", "works at Acme")
    assert old.id == entity_id_for("person", "Alice", "works at Acme") and old.scope == Scope()
    a = Entity("person", "Alice", "works at Acme", scope=Scope("alice"))
    b = Entity("person", "Alice", "works at Acme", scope=Scope("bob"))
    assert len({old.id, a.id, b.id}) == 3 and a != Entity("person", "Alice", "works at Acme")
    assert source_id_for("hi") == Source.for_text("hi", 1).id
    assert len({source_id_for("hi"), source_id_for("hi", Scope("alice")), source_id_for("hi", Scope("bob"))}) == 3
    assert Source.for_text("hi", 1, scope=Scope("alice")).scope == Scope("alice")
    d = a.to_dict()
    assert d["scope"] == {"user_id": "alice", "agent_id": None, "session_id": None}
    assert Entity.from_dict(d) == a
    # mentions are filled by recall, never part of equality or storage identity
    m = Entity("person", "Alice", "works at Acme", scope=Scope("alice"), mentions=("Acme",), created_at=a.created_at)
    assert m == a and m.to_dict()["mentions"] == ["Acme"] and "mentions" not in a.to_dict()
    with pytest.raises(TypeError):
        Entity("person", "Alice", "x", mentions="Acme")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Entity("person", "Alice", "x", scope="alice")  # type: ignore[arg-type]
    assert Entity("person", "Alice", "x", scope={"user_id": "a"}).scope == Scope("a")  # type: ignore[arg-type]
    r = EvolutionRelation(a.id, b.id, "update", scope=Scope("alice"))
    assert EvolutionRelation.from_dict(r.to_dict()) == r
    f = SearchFilters(scope=Scope("alice"), source_id="s")
    assert f.norm.scope == (("user_id", "alice"),) and f.norm.source_id == "s"
    assert SearchFilters(scope=Scope()).norm == SearchFilters().norm


def test_search_filters_refuse_a_start_after_the_end_and_normalise_once():
    from umi.errors import InvalidFilterError
    from umi.storage.base import SearchFilters

    with pytest.raises(InvalidFilterError, match="after its end"):
        SearchFilters(time_range=(5, 1))
    SearchFilters(time_range=(5, 5))
    f = SearchFilters(entity_types=["task", "person", "task"], metadata={"b": 1, "a": True})
    g = SearchFilters(entity_types=("person", "task"), metadata={"a": True, "b": 1})
    assert f == g and hash(f) == hash(g) and f.norm.cache_key == g.norm.cache_key
    assert f.norm.metadata == (("a", "bool", "true"), ("b", "int", "1"))
    assert SearchFilters(entity_types=()).empty and SearchFilters(time_range=(2**70, None)).empty
    assert SearchFilters(time_range=(-(2**70), 2**70)).norm.time_lo is None
    for bad in (dict(source_id=""), dict(source_id="a\x00")):
        with pytest.raises(InvalidFilterError):
            SearchFilters(**bad)
    with pytest.raises(TypeError):
        SearchFilters(scope="alice")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SearchFilters(include_superseded=1)  # type: ignore[arg-type]
