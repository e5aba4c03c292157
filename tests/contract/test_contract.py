"""The storage contract: every backend in BACKEND_FACTORIES must pass all of this unchanged."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from contract_helpers import T0, ent, vec

from umi.errors import (
    EmptyQueryError,
    InvalidEntityTypeError,
    InvalidFilterError,
    InvalidLimitError,
    StorageError,
    TextTooLongError,
    ValidationError,
)
from umi.storage.base import SearchFilters, Source, StorageBackend
from umi.types import Entity, EntityType, EvolutionRelation, entity_id_for


def ids(pairs: list[tuple[str, float]]) -> list[str]:
    return [i for i, _ in pairs]


def names(ents: list[Entity]) -> list[str]:
    return [e.name for e in ents]


# --- entities -----------------------------------------------------------------------------


def test_upsert_get_round_trips_every_field(backend: StorageBackend) -> None:
    e = Entity("person", "Alice Smith", "Alice works at Acme.", metadata={
        "i": 1, "f": 1.0, "b": True, "n": None, "s": "x", "neg": -7, "big": 2**70, "uni": "é東"},
        embedding=vec(0.1, -0.2, 0.3, 0.4), importance=0.7, confidence=0.25, created_at=T0,
        updated_at=T0 + 5, event_time=T0 - 86_400_000, valid_from=T0 - 1000, source_id="src-1")
    backend.upsert([e])
    got = backend.get(e.id)
    assert got == e
    assert got is not e
    assert got.embedding is not None and got.embedding.dtype == np.float32
    assert np.array_equal(got.embedding, e.embedding)
    assert {k: type(v) for k, v in got.metadata.items()} == {k: type(v) for k, v in e.metadata.items()}
    assert got.entity_type is EntityType.PERSON


def test_get_returns_copies_and_the_store_keeps_its_own(backend: StorageBackend) -> None:
    e = ent("Bob", "likes tea", emb=vec(1, 0, 0), meta={"k": "v"})
    backend.upsert([e])
    e.content = "changed after upsert"
    e.metadata["k"] = "changed"
    assert e.embedding is not None
    e.embedding[0] = 5.0  # the caller's array
    got = backend.get(e.id)
    assert got is not None
    got.metadata["k"] = "mutated"
    got.embedding[1] = 9.0  # type: ignore[index]
    many = backend.get_many([e.id])[0]  # recall scores and annotates these in place
    many.score, many.mentions, many.content = 0.5, ("Bob",), "changed in a get_many result"
    again = backend.get(e.id)
    assert again is not None
    assert again.content == "likes tea"
    assert again.score is None and again.mentions == ()
    assert again.metadata == {"k": "v"}
    assert np.array_equal(again.embedding, vec(1, 0, 0))  # type: ignore[arg-type]


def test_get_missing_and_get_many_order(backend: StorageBackend) -> None:
    a, b, c = ent("A", "one", t=1), ent("B", "two", t=2), ent("C", "three", t=3)
    backend.upsert([a, b, c])
    assert backend.get("no-such-id") is None
    got = backend.get_many([c.id, "missing", a.id, c.id])
    assert [g.id for g in got] == [c.id, a.id, c.id]
    assert backend.get_many([]) == []


def test_upsert_replaces_by_id_with_one_history_record_each(backend: StorageBackend) -> None:
    e = ent("Carol", "is a designer", t=1, emb=vec(1, 0))
    backend.upsert([e])
    e2 = ent("Carol", "is a designer", t=1, emb=vec(0, 1), meta={"v": 2}, importance=0.9)
    assert e2.id == e.id
    backend.upsert([e2])
    assert backend.count(SearchFilters(include_superseded=True)) == 1
    assert backend.get(e.id) == e2
    hist = backend.history(e.id)
    assert [(h.op, h.seq) for h in hist] == [("create", 1), ("update", 2)]
    assert hist[1].snapshot["metadata"] == {"v": 2}
    assert "embedding" not in hist[1].snapshot
    assert ids(backend.search_vector(vec(0, 1), 1)) == [e.id]
    assert backend.search_vector(vec(0, 1), 1)[0][1] == pytest.approx(1.0, abs=1e-6)


def test_same_id_twice_in_one_batch_last_wins(backend: StorageBackend) -> None:
    a = ent("Dan", "runs", t=1, meta={"n": 1})
    b = ent("Dan", "runs", t=1, meta={"n": 2})
    backend.upsert([a, b])
    got = backend.get(a.id)
    assert got is not None and got.metadata == {"n": 2}
    assert [h.op for h in backend.history(a.id)] == ["create", "update"]
    assert backend.count() == 1


def test_empty_upsert_is_a_no_op(backend: StorageBackend) -> None:
    g = backend.generation
    backend.upsert([])
    backend.add_relations([])
    assert backend.generation == g
    assert backend.count() == 0


def test_upsert_rejects_bad_input_and_stores_nothing_of_the_batch(backend: StorageBackend) -> None:
    good = ent("Eve", "fine", emb=vec(1, 0, 0))
    with pytest.raises(TypeError):
        backend.upsert(good)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backend.upsert([good, "not an entity"])  # type: ignore[list-item]
    with pytest.raises(ValidationError, match="0.* 3|3.* 2|2.*3"):
        backend.upsert([good, ent("Eve2", "wrong dim", emb=vec(1, 0))])
    with pytest.raises(ValidationError, match="zero"):
        backend.upsert([ent("Z", "zero", emb=vec(0, 0, 0))])
    bad_time = ent("T", "far future")
    bad_time.updated_at = 2**63
    with pytest.raises(ValidationError, match="updated_at"):
        backend.upsert([good, bad_time])
    mutated = ent("M", "x")
    mutated.importance = 3.0  # changed after construction: re-validated on upsert
    with pytest.raises(ValidationError, match="importance"):
        backend.upsert([mutated])
    assert backend.count(SearchFilters(include_superseded=True)) == 0
    assert backend.get(good.id) is None
    assert backend.generation == 0


def test_dim_is_fixed_by_the_first_vector_and_named_on_mismatch(backend: StorageBackend) -> None:
    assert backend.dim is None
    backend.upsert([ent("NoVec", "text only")])
    assert backend.dim is None
    backend.upsert([ent("V", "vector", emb=vec(1, 2, 3))])
    assert backend.dim == 3
    with pytest.raises(ValidationError) as info:
        backend.upsert([ent("W", "other", emb=vec(1, 2, 3, 4))])
    assert "4" in str(info.value) and "3" in str(info.value)
    with pytest.raises(ValidationError) as info:
        backend.search_vector(vec(1, 2), 3)
    assert "2" in str(info.value) and "3" in str(info.value)


def test_upsert_without_vector_drops_the_old_vector(backend: StorageBackend) -> None:
    e = ent("F", "has vector", emb=vec(1, 0))
    other = ent("G", "other", emb=vec(0.9, 0.1))
    backend.upsert([e, other])
    assert ids(backend.search_vector(vec(1, 0), 5)) == [e.id, other.id]
    backend.upsert([ent("F", "has vector")])
    assert ids(backend.search_vector(vec(1, 0), 5)) == [other.id]
    got = backend.get(e.id)
    assert got is not None and got.embedding is None


def test_delete(backend: StorageBackend) -> None:
    e = ent("Gina", "loves climbing", emb=vec(0, 1), meta={"m": 1})
    keep = ent("Hal", "loves climbing too", emb=vec(1, 0))
    backend.upsert([e, keep])
    g = backend.generation
    assert backend.delete(e.id, at=T0 + 99) is True
    assert backend.generation > g
    assert backend.get(e.id) is None
    assert backend.count(SearchFilters(include_superseded=True)) == 1
    assert e.id not in ids(backend.search_vector(vec(0, 1), 5))
    assert e.id not in ids(backend.search_text("climbing", 5))
    assert backend.find_by_name("Gina") == []
    assert backend.list(SearchFilters(metadata={"m": 1})) == []
    hist = backend.history(e.id)
    assert [h.op for h in hist] == ["create", "delete"]
    assert hist[-1].at == T0 + 99
    # forget: every snapshot is a tombstone, nothing of the content is left
    assert [dict(h.snapshot) for h in hist] == [{"id": e.id, "forgotten": True}] * 2
    g = backend.generation
    assert backend.delete(e.id) is False
    assert backend.delete("never-existed") is False
    assert backend.generation == g
    backend.upsert([e])  # re-created after delete: history continues
    assert [h.op for h in backend.history(e.id)] == ["create", "delete", "create"]
    assert [h.seq for h in backend.history(e.id)] == [1, 2, 3]


def test_list_orders_by_created_at_then_id_and_pages(backend: StorageBackend) -> None:
    ents = [ent(f"N{i}", f"fact {i}", t=i // 3) for i in range(10)]  # ties on created_at
    backend.upsert(ents)
    want = sorted(ents, key=lambda e: (e.created_at, e.id))
    assert [e.id for e in backend.list(limit=100)] == [e.id for e in want]
    pages = [backend.list(limit=3, offset=o) for o in range(0, 12, 3)]
    assert [e.id for p in pages for e in p] == [e.id for e in want]
    assert backend.list(limit=5, offset=10) == []
    assert [e.id for e in backend.iter_all(batch=4)] == [e.id for e in want]
    with pytest.raises(InvalidLimitError):
        backend.list(limit=0)
    with pytest.raises(InvalidLimitError):
        backend.list(offset=-1)
    with pytest.raises(TypeError):
        backend.list(limit="10")  # type: ignore[arg-type]


def test_filters_none_means_current_only(backend: StorageBackend) -> None:
    old, new = ent("P", "old fact", t=1), ent("P", "new fact", t=2)
    backend.upsert([old, new])
    backend.supersede(old.id, T0 + 2)
    assert backend.count() == backend.count(SearchFilters()) == 1
    assert backend.count(SearchFilters(include_superseded=True)) == 2
    assert [e.id for e in backend.list()] == [new.id]
    assert [e.id for e in backend.iter_all()] == [old.id, new.id]


def test_filters_types_time_metadata(backend: StorageBackend) -> None:
    a = ent("A", "a", etype="person", t=10, meta={"team": 1, "flag": True}, event_time=T0 + 500)
    b = ent("B", "b", etype="organization", t=20, meta={"team": 1.0})
    c = ent("C", "c", etype="project", t=30, meta={"team": "1", "flag": 1})
    d = ent("D", "d", etype="person", t=40, meta={"team": None})
    backend.upsert([a, b, c, d])

    def got(**kw: object) -> list[str]:
        return names(backend.list(SearchFilters(**kw)))  # type: ignore[arg-type]

    assert got(entity_types=("person",)) == ["A", "D"]
    assert got(entity_types=["organization", EntityType.PROJECT]) == ["B", "C"]
    assert got(entity_types="person") == ["A", "D"]
    assert got(time_range=(T0 + 20, T0 + 30)) == ["B", "C"]
    assert got(time_range=(None, T0 + 10)) == ["A"]
    assert got(time_range=(T0 + 35, None)) == ["D"]
    assert got(time_range=(T0 + 500, T0 + 500), time_field="event_time") == ["A"]
    assert got(time_range=(None, None), time_field="event_time") == ["A"]
    assert got(time_range=(2**70, None)) == []
    assert got(time_range=(-(2**70), 2**70)) == ["A", "B", "C", "D"]
    # metadata equality is typed: 1, 1.0, "1", True and None are all different
    assert got(metadata={"team": 1}) == ["A"]
    assert got(metadata={"team": 1.0}) == ["B"]
    assert got(metadata={"team": "1"}) == ["C"]
    assert got(metadata={"team": None}) == ["D"]
    assert got(metadata={"flag": True}) == ["A"]
    assert got(metadata={"flag": 1}) == ["C"]
    assert got(metadata={"team": 1, "flag": True}) == ["A"]
    assert got(metadata={"team": 1, "flag": 1}) == []
    assert got(metadata={"nokey": 1}) == []
    assert got(entity_types=("person",), metadata={"team": None}, time_range=(T0 + 40, T0 + 40)) == ["D"]
    for kw, n in [({"entity_types": ("person",)}, 2), ({"metadata": {"team": 1}}, 1), ({}, 4)]:
        assert backend.count(SearchFilters(**kw)) == n  # type: ignore[arg-type]


def test_metadata_filter_injection_is_rejected_or_matches_nothing(backend: StorageBackend) -> None:
    evil = "x' OR 1=1 --"
    a = ent("A", "plain", meta={"a": 1})
    b = ent("B", "holds the evil string", meta={"a": evil})
    backend.upsert([a, b])
    caller = {"a": {"$gt": 1}}
    with pytest.raises(InvalidFilterError):
        SearchFilters(metadata=caller)
    assert caller == {"a": {"$gt": 1}}
    for bad in ({"a": [1, 2]}, {"$where": 1}, {"a'; DROP TABLE entities; --": 1}, {"": 1}):
        with pytest.raises(ValidationError):
            SearchFilters(metadata=bad)
    assert names(backend.list(SearchFilters(metadata={"a": evil}))) == ["B"]
    for value in ("x' OR '1'='1", "1 OR 1=1", "%", "_", "' --", "\\", '"'):
        assert backend.list(SearchFilters(metadata={"a": value})) == []
        assert backend.count(SearchFilters(metadata={"a": value})) == 0
        assert backend.search_text("plain", 5, SearchFilters(metadata={"a": value})) == []
    assert backend.count(SearchFilters(include_superseded=True)) == 2


def test_caller_filter_objects_are_not_mutated(backend: StorageBackend) -> None:
    backend.upsert([ent("A", "x", meta={"k": "v"}, emb=vec(1, 0))])
    meta = {"k": "v"}
    types = ["person"]
    f = SearchFilters(entity_types=types, metadata=meta)  # type: ignore[arg-type]
    for call in (lambda: backend.list(f), lambda: backend.count(f), lambda: backend.search_text("x", 3, f),
                 lambda: backend.search_vector(vec(1, 0), 3, f), lambda: backend.find_by_name("A", filters=f)):
        call()
    assert meta == {"k": "v"} and types == ["person"]
    assert f.metadata == {"k": "v"} and f.entity_types == (EntityType.PERSON,)


def test_find_by_name_normalises(backend: StorageBackend) -> None:
    a = ent("Alice  Smith", "one", t=1)
    b = ent("alice smith", "two", t=2, etype="organization")
    c = ent("Ａｌｉｃｅ Smith", "three (full-width letters)", t=3)
    other = ent("Alice", "not the same name", t=4)
    backend.upsert([a, b, c, other])
    assert names(backend.find_by_name("  ALICE   SMITH ")) == ["Alice  Smith", "alice smith", "Ａｌｉｃｅ Smith"]
    assert [e.id for e in backend.find_by_name("alice smith", "organization")] == [b.id]
    assert [e.id for e in backend.find_by_name("alice smith", EntityType.PERSON)] == [a.id, c.id]
    backend.supersede(a.id, T0 + 10)
    assert [e.id for e in backend.find_by_name("alice smith")] == [b.id, c.id]
    assert [e.id for e in backend.find_by_name("alice smith", filters=SearchFilters(include_superseded=True))] == [
        a.id, b.id, c.id]
    assert backend.find_by_name("nobody") == []
    with pytest.raises(InvalidEntityTypeError):
        backend.find_by_name("alice", "alien")
    with pytest.raises(ValidationError):
        backend.find_by_name("   ")
    with pytest.raises(TypeError):
        backend.find_by_name(None)  # type: ignore[arg-type]


def test_find_by_names_is_each_name_read_once_merged(backend: StorageBackend) -> None:
    """The recall name signals' read (one statement on Postgres): the facts filed under any of
    the names, each once, oldest first, as find_by_name of each name would find them."""
    a = ent("Alice  Smith", "one", t=1)
    b = ent("alice smith", "two", t=2, etype="organization")
    bob = ent("Bob", "bob's", t=3)
    old = ent("Bob", "bob's old one", t=0)
    other = ent("Alice", "not the same name", t=4)
    backend.upsert([a, b, bob, old, other])
    backend.supersede(old.id, T0 + 10)
    got = backend.find_by_names(["ALICE SMITH", "bob", "alice  smith", "nobody"])
    assert [e.id for e in got] == [a.id, b.id, bob.id]  # each once, oldest first, current only
    every = SearchFilters(include_superseded=True)
    assert [e.id for e in backend.find_by_names(("bob",), filters=every)] == [old.id, bob.id]
    merged = {e.id for n in ("Alice Smith", "Bob") for e in backend.find_by_name(n, filters=every)}
    assert {e.id for e in backend.find_by_names(["Alice Smith", "Bob"], filters=every)} == merged
    assert backend.find_by_names([]) == [] and backend.find_by_names(["nobody"]) == []
    with pytest.raises(ValidationError):
        backend.find_by_names(["bob", "   "])
    with pytest.raises(TypeError):
        backend.find_by_names("bob")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backend.find_by_names(["bob", None])  # type: ignore[list-item]


# --- vector search --------------------------------------------------------------------------


def test_search_vector_scores_order_and_ties(backend: StorageBackend) -> None:
    a = ent("A", "a", emb=vec(1, 0, 0))
    b = ent("B", "b", emb=vec(1, 1, 0))
    c = ent("C", "c", emb=vec(0, 1, 0))
    tie1 = ent("T1", "t", emb=vec(0, 0, 2))
    tie2 = ent("T2", "t", emb=vec(0, 0, 1))
    novec = ent("N", "no vector")
    backend.upsert([a, b, c, tie1, tie2, novec])
    res = backend.search_vector(vec(2, 0, 0), 3)
    assert ids(res) == [a.id, b.id] + sorted([c.id, tie1.id, tie2.id])[:1]
    assert res[0][1] == pytest.approx(1.0, abs=1e-6)
    assert res[1][1] == pytest.approx(np.sqrt(0.5), abs=1e-6)
    ties = backend.search_vector(vec(0, 0, 1), 2)
    assert ids(ties) == sorted([tie1.id, tie2.id])
    assert ties[0][1] == ties[1][1]
    assert novec.id not in ids(backend.search_vector(vec(1, 1, 1), 10))
    assert len(backend.search_vector(vec(1, 1, 1), 10)) == 5


def test_search_vector_filters_inside_the_search(backend: StorageBackend) -> None:
    rng = np.random.default_rng(7)
    near = [ent(f"near{i}", "n", emb=(vec(1, 0, 0, 0) + 0.01 * rng.standard_normal(4)).astype(np.float32),
                meta={"keep": False}) for i in range(30)]
    far = [ent(f"far{i}", "f", emb=(vec(0, 1, 0, 0) + 0.3 * rng.standard_normal(4)).astype(np.float32),
               meta={"keep": True}) for i in range(5)]
    backend.upsert(near + far)
    res = backend.search_vector(vec(1, 0, 0, 0), 3, SearchFilters(metadata={"keep": True}))
    assert len(res) == 3
    assert set(ids(res)) <= {e.id for e in far}
    assert [s for _, s in res] == sorted((s for _, s in res), reverse=True)
    assert backend.search_vector(vec(1, 0, 0, 0), 3, SearchFilters(metadata={"keep": "nope"})) == []


def test_search_vector_many_answers_each_query_as_its_own_search(backend: StorageBackend) -> None:
    # the deep recall path searches every query variant in one call: each answer must be the one
    # search_vector gives, scores and tie order included, filters applied inside
    rng = np.random.default_rng(11)
    ents = [ent(f"E{i}", "e", emb=rng.standard_normal(8).astype(np.float32), meta={"odd": i % 2 == 1})
            for i in range(60)]
    ents += [ent("T1", "t", emb=vec(0, 0, 0, 0, 0, 0, 0, 3)), ent("T2", "t", emb=vec(0, 0, 0, 0, 0, 0, 0, 1))]
    backend.upsert(ents)
    queries = [rng.standard_normal(8).astype(np.float32) for _ in range(3)] + [vec(0, 0, 0, 0, 0, 0, 0, 1)]
    for filters in (None, SearchFilters(metadata={"odd": True})):
        got = backend.search_vector_many(queries, 5, filters)
        assert got == [backend.search_vector(q, 5, filters) for q in queries]
        assert all(len(hits) == 5 for hits in got)
    assert backend.search_vector_many([], 5) == []
    with pytest.raises(ValidationError, match="zero"):
        backend.search_vector_many([queries[0], np.zeros(8, np.float32)], 5)


def test_search_content_answers_each_query_as_its_own_searches(backend: StorageBackend) -> None:
    # recall asks for its vector and keyword searches in one call (an in-process store runs the
    # keyword kernel beside the index walk): each answer must be what the two searches give alone
    rng = np.random.default_rng(12)
    words = ["apple pie", "apple tart", "pear pie", "plum jam", "apple jam"]
    ents = [ent(f"E{i}", words[i % 5], emb=rng.standard_normal(8).astype(np.float32), meta={"odd": i % 2 == 1})
            for i in range(40)]
    backend.upsert(ents)
    qs = ["apple pie", "jam", "nothing matches this", "pear"]
    vs = [rng.standard_normal(8).astype(np.float32), None, rng.standard_normal(8).astype(np.float32), None]
    for filters in (None, SearchFilters(metadata={"odd": True})):
        for q_at in ([0], [1], [0, 1, 2, 3], [0, 2]):
            got = backend.search_content([qs[i] for i in q_at], [vs[i] for i in q_at], 6, filters)
            want = [(None if vs[i] is None else backend.search_vector(vs[i], 6, filters),
                     backend.search_text(qs[i], 6, filters)) for i in q_at]
            assert got == want
    assert [len(v or []) for v, _ in backend.search_content(qs, vs, 6)] == [6, 0, 6, 0]
    assert backend.search_content([], [], 6) == []
    with pytest.raises(ValueError, match="one vector"):
        backend.search_content(["apple"], [], 6)
    with pytest.raises(ValidationError, match="zero"):
        backend.search_content(["apple"], [np.zeros(8, np.float32)], 6)


def test_search_content_before_any_vector_is_stored(backend: StorageBackend) -> None:
    backend.upsert([ent("A", "apple pie")])
    got = backend.search_content(["apple"], [vec(1, 0)], 5)
    assert got == [([], backend.search_text("apple", 5))] and got[0][1]


def test_search_content_needs_one_vector_or_none_per_query(backend: StorageBackend) -> None:
    backend.upsert([ent("A", "apple pie", emb=vec(1, 0))])
    with pytest.raises(ValidationError, match="one vector \\(or None\\) per query: 2 queries, 1 vectors"):
        backend.search_content(["apple", "pie"], [vec(1, 0)], 5)


def test_search_vector_validation(backend: StorageBackend) -> None:
    assert backend.search_vector(vec(1, 0), 5) == []  # nothing stored yet
    backend.upsert([ent("A", "a", emb=vec(1, 0))])
    with pytest.raises(ValidationError, match="zero"):
        backend.search_vector(vec(0, 0), 5)
    with pytest.raises(ValidationError):
        backend.search_vector(np.array([np.nan, 1.0]), 5)
    with pytest.raises(InvalidLimitError):
        backend.search_vector(vec(1, 0), 0)
    with pytest.raises(InvalidLimitError):
        backend.search_vector(vec(1, 0), 10_001)
    with pytest.raises(TypeError):
        backend.search_vector("not a vector", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backend.search_vector(vec(1, 0), 2.5)  # type: ignore[arg-type]
    assert ids(backend.search_vector([1.0, 0.0], 5)) == [entity_id_for("person", "A", "a")]


# --- keyword search ---------------------------------------------------------------------------


def test_bm25_exact_term_match_ranks_first(backend: StorageBackend) -> None:
    docs = [
        ent("Alice", "works as a software engineer at Acme", t=1),
        ent("Bob", "enjoys hiking and cooking on weekends", t=2),
        ent("Carol", "is a painter who lives in Lisbon", t=3),
        ent("Dave", "engineer of bridges, not software", t=4),
    ]
    backend.upsert(docs)
    assert ids(backend.search_text("Lisbon", 5)) == [docs[2].id]
    res = backend.search_text("hiking", 5)
    assert ids(res) == [docs[1].id] and res[0][1] > 0
    assert ids(backend.search_text("software engineer Acme", 2))[0] == docs[0].id
    assert backend.search_text("nonexistentword", 5) == []


def test_bm25_idf_rare_term_outranks_common_term(backend: StorageBackend) -> None:
    common = [ent(f"P{i}", "coffee every morning", t=i) for i in range(8)]
    rare_doc = ent("Q", "tea ceremony", t=20)
    common_doc = ent("R", "coffee with friends", t=21)
    backend.upsert(common + [rare_doc, common_doc])
    res = dict(backend.search_text("tea coffee", 20))
    assert ids(backend.search_text("tea coffee", 1)) == [rare_doc.id]
    assert res[rare_doc.id] > res[common_doc.id] > 0


def test_bm25_ranking_ties_and_length_normalisation(backend: StorageBackend) -> None:
    short = ent("S", "kayak", t=1)
    long_ = ent("L", "kayak trip with many other words about rivers lakes and mountains", t=2)
    twin1 = ent("X", "canoe", t=3)
    twin2 = ent("Y", "canoe", t=4)
    backend.upsert([short, long_, twin1, twin2])
    assert ids(backend.search_text("kayak", 5)) == [short.id, long_.id]
    tied = backend.search_text("canoe", 5)
    assert ids(tied) == sorted([twin1.id, twin2.id])
    assert tied[0][1] == pytest.approx(tied[1][1])


def test_bm25_filters_inside_and_query_validation(backend: StorageBackend) -> None:
    many = [ent(f"M{i}", "piano lessons", t=i, meta={"grp": "a"}) for i in range(20)]
    one = ent("Z", "piano tuning", t=50, meta={"grp": "b"})
    backend.upsert(many + [one])
    res = backend.search_text("piano", 1, SearchFilters(metadata={"grp": "b"}))
    assert ids(res) == [one.id]
    assert backend.search_text("the of and", 5) == []  # only stop words
    with pytest.raises(EmptyQueryError):
        backend.search_text("   ", 5)
    with pytest.raises(TypeError):
        backend.search_text(b"piano", 5)  # type: ignore[arg-type]
    with pytest.raises(InvalidLimitError):
        backend.search_text("piano", 0)
    with pytest.raises(TextTooLongError):
        backend.search_text("x" * 100_001, 5)


def test_bm25_follows_updates_and_supersession(backend: StorageBackend) -> None:
    e = ent("U", "violin", t=1)
    backend.upsert([e])
    assert ids(backend.search_text("violin", 5)) == [e.id]
    e2 = ent("U", "violin", t=1, meta={"x": 1})
    backend.upsert([e2])
    assert ids(backend.search_text("violin", 5)) == [e.id]
    backend.supersede(e.id, T0 + 5)
    assert backend.search_text("violin", 5) == []
    assert ids(backend.search_text("violin", 5, SearchFilters(include_superseded=True))) == [e.id]


# --- sources --------------------------------------------------------------------------------


def test_sources(backend: StorageBackend) -> None:
    s = Source.for_text("Alice works at Acme", T0, {"channel": "chat"})
    backend.add_source(s)
    assert backend.get_source(s.id) == s
    assert backend.find_source_by_hash(s.text_hash) == s
    assert backend.get_source("missing") is None
    assert backend.find_source_by_hash("0" * 64) is None
    backend.add_source(Source(s.id, s.text_hash, s.text, T0 + 100, {"channel": "other"}))
    assert backend.get_source(s.id) == s  # the first record of a text is kept
    with pytest.raises(ValidationError, match="sha256"):
        backend.add_source(Source("x", "deadbeef", "text", T0))
    with pytest.raises(TypeError):
        backend.add_source("text")  # type: ignore[arg-type]


# --- evolution --------------------------------------------------------------------------------


def test_relations(backend: StorageBackend) -> None:
    a, b, c = ent("A", "v1", t=1), ent("A", "v2", t=2), ent("A", "v3", t=3)
    backend.upsert([a, b, c])
    r1 = EvolutionRelation(a.id, b.id, "update", reason="newer", confidence=0.9, created_at=T0 + 2)
    r2 = EvolutionRelation(b.id, c.id, "extend", created_at=T0 + 3)
    r0 = EvolutionRelation(a.id, c.id, "derive", created_at=T0 + 2)
    backend.add_relations([r2, r1, r0])
    assert backend.relations_for(a.id) == sorted([r1, r0], key=lambda r: (r.created_at, r.id))
    assert backend.relations_for(b.id) == [r1, r2]
    assert backend.relations_for(c.id) == sorted([r0, r2], key=lambda r: (r.created_at, r.id))
    assert backend.relations_for("nobody") == []
    r1b = EvolutionRelation(a.id, b.id, "update", reason="restated", confidence=0.5, created_at=T0 + 2)
    backend.add_relations([r1b])
    assert [r.reason for r in backend.relations_for(b.id)] == ["restated", ""]
    g = backend.generation
    with pytest.raises(ValidationError, match="not stored"):
        backend.add_relations([EvolutionRelation(a.id, "ghost", "update")])
    with pytest.raises(TypeError):
        backend.add_relations([("a", "b")])  # type: ignore[list-item]
    assert backend.generation == g


def test_supersede_keeps_the_row_and_as_of_shows_history(backend: StorageBackend) -> None:
    old = ent("Job", "Alice works at Acme", t=0)
    new = ent("Job", "Alice works at Globex", t=100)
    backend.upsert([old, new])
    assert backend.supersede(old.id, T0 + 100) is True
    assert backend.supersede(old.id, T0 + 200) is False
    assert backend.supersede("missing", T0) is False
    got = backend.get(old.id)
    assert got is not None and got.valid_to == T0 + 100
    assert [h.op for h in backend.history(old.id)] == ["create", "supersede"]
    assert backend.history(old.id)[-1].snapshot["valid_to"] == T0 + 100
    assert backend.count(SearchFilters(include_superseded=True)) == 2

    def at(t: int) -> list[str]:
        return [e.content for e in backend.list(SearchFilters(as_of=T0 + t))]

    assert at(-1) == []
    assert at(0) == ["Alice works at Acme"]
    assert at(99) == ["Alice works at Acme"]
    assert at(100) == ["Alice works at Globex"]
    assert at(10_000) == ["Alice works at Globex"]
    assert backend.count(SearchFilters(as_of=T0 + 50)) == 1
    assert ids(backend.search_text("Acme", 5, SearchFilters(as_of=T0 + 50))) == [old.id]
    assert backend.search_text("Acme", 5) == []
    with pytest.raises(TypeError):
        backend.supersede(old.id, "later")  # type: ignore[arg-type]


def test_history_is_ordered_and_snapshots_the_state_after_each_change(backend: StorageBackend) -> None:
    e = ent("H", "v", t=0, meta={"n": 0})
    backend.upsert([e])
    backend.upsert([ent("H", "v", t=0, meta={"n": 1}, updated_at=T0 + 10)])
    backend.supersede(e.id, T0 + 20)
    assert backend.revive(e.id, T0 + 25) is True
    hist = backend.history(e.id)
    assert [(h.seq, h.op, h.at) for h in hist] == [
        (1, "create", T0), (2, "update", T0 + 10), (3, "supersede", T0 + 20), (4, "revive", T0 + 25)]
    assert [h.snapshot["metadata"]["n"] for h in hist] == [0, 1, 1, 1]
    assert [h.snapshot["valid_to"] for h in hist] == [None, None, T0 + 20, None]
    assert all(h.entity_id == e.id for h in hist)
    backend.delete(e.id, at=T0 + 30)
    assert [(h.seq, h.op, h.at, dict(h.snapshot)) for h in backend.history(e.id)][-1] == (
        5, "delete", T0 + 30, {"id": e.id, "forgotten": True})
    assert backend.history("never") == []


# --- transactions and generation ------------------------------------------------------------


def _state(b: StorageBackend, probe_vec: np.ndarray) -> tuple:
    every = SearchFilters(include_superseded=True)
    return (
        [e.to_dict(with_embedding=True) for e in b.list(every, limit=1000)],
        b.count(), b.count(every),
        b.search_vector(probe_vec, 10, every) if b.dim else [],
        b.search_text("alpha beta gamma", 10, every),
        [e.id for e in b.find_by_name("same name", filters=every)],
        b.generation, b.dim,
    )


def test_rollback_leaves_nothing_anywhere(backend: StorageBackend) -> None:
    base = [ent("same name", "alpha one", t=1, emb=vec(1, 0, 0)), ent("Other", "beta two", t=2, emb=vec(0, 1, 0))]
    backend.upsert(base)
    src = Source.for_text("kept", T0)
    backend.add_source(src)
    before = _state(backend, vec(1, 1, 0))
    hist_before = backend.history(base[0].id)
    with pytest.raises(StorageError) as info:
        with backend.transaction():
            backend.upsert([ent("same name", "gamma new", t=3, emb=vec(0, 0, 1))])
            backend.upsert([ent("same name", "alpha one", t=1, emb=vec(0, 1, 1), meta={"changed": True})])
            backend.supersede(base[1].id, T0 + 5)
            backend.delete(base[0].id)
            backend.add_source(Source.for_text("rolled back", T0))
            backend.add_relations([EvolutionRelation(base[1].id, entity_id_for("person", "same name", "gamma new"),
                                                     "update")])
            assert backend.count() == 1  # reads inside see the transaction's own writes
            raise RuntimeError("boom")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _state(backend, vec(1, 1, 0)) == before
    assert backend.history(base[0].id) == hist_before
    assert backend.get_source(Source.for_text("rolled back", T0).id) is None
    assert backend.relations_for(base[1].id) == []
    assert ids(backend.search_vector(vec(1, 0, 0), 1)) == [base[0].id]


def test_rollback_of_the_first_vector_forgets_the_dimension(backend: StorageBackend) -> None:
    with pytest.raises(StorageError):
        with backend.transaction():
            backend.upsert([ent("A", "a", emb=vec(1, 0, 0))])
            assert backend.dim == 3
            raise KeyError("x")
    assert backend.dim is None
    backend.upsert([ent("B", "b", emb=vec(1, 0))])
    assert backend.dim == 2
    assert len(backend.search_vector(vec(1, 0), 5)) == 1


def test_transaction_commits_together_and_bumps_generation(backend: StorageBackend) -> None:
    g0 = backend.generation
    backend.upsert([ent("A", "a")])
    g1 = backend.generation
    assert g1 > g0
    with backend.transaction():
        backend.upsert([ent("B", "b")])
        backend.upsert([ent("C", "c")])
        with backend.transaction():  # nested: joins the outer one
            backend.upsert([ent("D", "d")])
        backend.add_source(Source.for_text("s", T0))
    g2 = backend.generation
    assert g2 > g1
    assert backend.count() == 4
    with backend.transaction():
        pass
    assert backend.generation == g2  # nothing written, nothing committed
    backend.supersede(entity_id_for("person", "A", "a"), T0)
    assert backend.generation > g2


def test_umi_errors_pass_through_and_others_are_wrapped(backend: StorageBackend) -> None:
    with pytest.raises(InvalidLimitError):
        with backend.transaction():
            backend.upsert([ent("A", "a")])
            backend.list(limit=0)
    assert backend.count() == 0
    with pytest.raises(StorageError) as info:
        with backend.transaction():
            backend.upsert([ent("A", "a")])
            raise ZeroDivisionError("bad math")
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert backend.count() == 0


def test_an_error_caught_inside_still_rolls_back_everything(backend: StorageBackend) -> None:
    with pytest.raises(StorageError, match="rolled back"):
        with backend.transaction():
            backend.upsert([ent("A", "a")])
            try:
                with backend.transaction():
                    backend.upsert([ent("B", "b")])
                    raise ValueError("inner")
            except ValueError:
                pass
    assert backend.count() == 0
    assert backend.generation == 0


def test_failed_validation_inside_a_transaction_does_not_poison_it(backend: StorageBackend) -> None:
    with backend.transaction():
        backend.upsert([ent("A", "a", emb=vec(1, 0))])
        with pytest.raises(ValidationError):
            backend.upsert([ent("B", "b", emb=vec(1, 0, 0))])
        backend.upsert([ent("C", "c")])
    assert sorted(names(backend.list())) == ["A", "C"]


def test_readers_in_other_threads_never_see_a_partial_transaction(backend: StorageBackend) -> None:
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append(backend.count())
                backend.search_text("batch", 5)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(15):
            with backend.transaction():
                for j in range(4):
                    backend.upsert([ent(f"E{i}-{j}", "batch member", t=i)])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert seen and all(n % 4 == 0 for n in seen)
    assert backend.count() == 60


def test_closed_backend_refuses_calls(backend: StorageBackend) -> None:
    backend.upsert([ent("A", "a")])
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(StorageError):
        backend.count()
    with pytest.raises(StorageError):
        backend.upsert([ent("B", "b")])
    with pytest.raises(StorageError):
        with backend.transaction():
            pass


def test_ids_and_types_are_validated(backend: StorageBackend) -> None:
    for bad in ("", "x" * 257, "a\x00b"):
        with pytest.raises(ValidationError):
            backend.get(bad)
    with pytest.raises(TypeError):
        backend.get(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backend.get_many("abc")  # type: ignore[arg-type]
    for bad in ("", "x" * 257, "a\x00b"):  # one bad id among good ones is found too
        with pytest.raises(ValidationError):
            backend.get_many(["fine", bad, "also-fine"])
    with pytest.raises(TypeError):
        backend.get_many(["fine", 5])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        backend.count(filters={"metadata": {}})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backend.delete(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backend.history(1)  # type: ignore[arg-type]
