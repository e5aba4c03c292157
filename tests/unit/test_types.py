"""Entity ids, validation and round trips; EvolutionRelation rules; options and config."""

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
    with pytest.raises(Exception):
        o.importance = 1.0  # frozen
    r = RecallOptions().with_limit(5).fast_only().with_time_range(1, 2).with_entity_types("person", EntityType.TASK)
    assert (r.limit, r.deep_search, r.time_range, r.entity_types) == (5, False, (1, 2), (EntityType.PERSON, EntityType.TASK))
    assert RecallOptions().with_deep_search().deep_search is True
    with pytest.raises(umi.InvalidLimitError):
        RecallOptions(limit=101)
    with pytest.raises(umi.InvalidImportanceError):
        RememberOptions(importance=2)
    with pytest.raises(umi.InvalidConfigError, match="after end"):
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
