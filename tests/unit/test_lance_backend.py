"""LanceStorageBackend: what is particular to it (the shared behaviour is the contract suite)."""

from __future__ import annotations

import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import umi
from umi.storage.base import SearchFilters, Source
from umi.storage.lance import LanceStorageBackend
from umi.storage.text import bm25_scores, document_terms
from umi.types import Entity, EvolutionRelation

pytest.importorskip("lancedb", reason="the lance extra is not installed")


@pytest.fixture
def store(tmp_path: Path):
    b = LanceStorageBackend.connect(tmp_path / "store", dim=8)
    yield b
    b.close()


def _ent(i: int, dim: int = 8, **kw) -> Entity:
    rng = np.random.default_rng(i)
    return Entity(kw.pop("entity_type", "person"), kw.pop("name", f"Person {i}"), kw.pop("content", f"fact {i}"),
                  embedding=rng.normal(size=dim).astype(np.float32), created_at=kw.pop("created_at", 1_000 + i), **kw)


def test_connect_checks_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        LanceStorageBackend.connect(42)  # type: ignore[arg-type]
    with pytest.raises(umi.InvalidConfigError, match="dim must be between 1 and 65536, got 0"):
        LanceStorageBackend.connect(tmp_path / "a", dim=0)
    with pytest.raises(umi.InvalidConfigError, match="hnsw_threshold must be >= 0"):
        LanceStorageBackend.connect(tmp_path / "a", hnsw_threshold=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(umi.InvalidConfigError, match="is not a folder"):
        LanceStorageBackend.connect(tmp_path / "file")


def test_missing_driver_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lancedb", None)
    with pytest.raises(umi.BackendNotInstalledError) as info:
        LanceStorageBackend.connect(tmp_path / "x")
    assert info.value.extra == "lance"
    assert "umi[lance]" in str(info.value)


def test_one_process_at_a_time(tmp_path: Path) -> None:
    a = LanceStorageBackend.connect(tmp_path / "s")
    with pytest.raises(umi.StorageLockedError) as info:
        LanceStorageBackend.connect(tmp_path / "s")
    assert info.value.path == str(tmp_path / "s")
    a.close()
    b = LanceStorageBackend.connect(tmp_path / "s")
    b.close()


def test_data_survives_reopen_with_dim_and_generation(tmp_path: Path) -> None:
    a = LanceStorageBackend.connect(tmp_path / "s")
    ents = [_ent(i) for i in range(20)]
    a.upsert(ents)
    a.supersede(ents[0].id, 9_000)
    a.add_source(Source.for_text("hello", 3))
    a.add_relations([EvolutionRelation(ents[0].id, ents[1].id, "update", created_at=5)])
    gen = a.generation
    a.close()
    b = LanceStorageBackend.connect(tmp_path / "s")
    assert (b.dim, b.generation, b.count(), b.count(SearchFilters(include_superseded=True))) == (8, gen, 19, 20)
    assert b.get(ents[3].id) == ents[3]
    assert [h.op for h in b.history(ents[0].id)] == ["create", "supersede"]
    assert b.search_text("fact 3", 1)[0][0] == ents[3].id
    b.close()
    with pytest.raises(umi.InvalidConfigError, match="holds 8-d vectors; it cannot be opened with dim=4"):
        LanceStorageBackend.connect(tmp_path / "s", dim=4)


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    LanceStorageBackend.connect(tmp_path / "s").close()
    state = json.loads((tmp_path / "s" / "state.json").read_text())
    (tmp_path / "s" / "state.json").write_text(json.dumps(dict(state, schema_version=7)))
    with pytest.raises(umi.SchemaVersionError) as info:
        LanceStorageBackend.connect(tmp_path / "s")
    assert (info.value.found, info.value.supported) == (7, 4)
    # the refused open released its lock
    (tmp_path / "s" / "state.json").write_text(json.dumps(state))
    LanceStorageBackend.connect(tmp_path / "s").close()


def test_rollback_restores_every_table_and_the_dimension(tmp_path: Path) -> None:
    b = LanceStorageBackend.connect(tmp_path / "s")
    plain = Entity("note", "plain", "no vector here")
    b.upsert([plain])
    gen = b.generation
    with pytest.raises(umi.StorageError, match="RuntimeError: boom"), b.transaction():
        b.upsert([_ent(1)])
        assert b.dim == 8
        b.supersede(plain.id, 50)
        b.add_source(Source.for_text("src", 1))
        b.add_relations([EvolutionRelation(plain.id, _ent(1).id, "extend")])
        raise RuntimeError("boom")
    assert (b.dim, b.generation, b.count(), b.get(plain.id).valid_to) == (None, gen, 1, None)
    assert b.find_source_by_hash(Source.for_text("src", 1).text_hash) is None
    assert b.relations_for(plain.id) == []
    assert [h.op for h in b.history(plain.id)] == ["create"]
    assert [i for i, _ in b.search_text("vector", 5)] == [plain.id]
    # a 4-d vector is welcome now: the rolled-back 8 was forgotten
    b.upsert([_ent(2, dim=4)])
    assert b.dim == 4
    b.close()


def _crash_inside_transaction(path: str) -> None:
    import os

    b = LanceStorageBackend.connect(path)
    history = b._durable.t["history"]

    class Dies:  # the process dies inside the commit: entities written, history and sources not
        def __getattr__(self, name: str) -> object:
            if name in ("add", "merge_insert", "update", "delete"):
                os._exit(3)
            return getattr(history, name)

    b._durable.t["history"] = Dies()
    with b.transaction():
        b.upsert([_ent(100), _ent(101)])
        b.add_source(Source.for_text("never committed", 1))
    b._durable.t["history"] = history
    os._exit(4)


def test_a_crash_mid_transaction_is_rolled_back_on_open(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    b = LanceStorageBackend.connect(path)
    keep = _ent(1)
    b.upsert([keep])
    gen = b.generation
    b.close()
    p = multiprocessing.get_context("spawn").Process(target=_crash_inside_transaction, args=(path,))
    p.start()
    p.join(120)
    assert p.exitcode == 3
    assert (Path(path) / "journal.json").exists()
    b = LanceStorageBackend.connect(path)
    assert not (Path(path) / "journal.json").exists()
    assert (b.count(), b.generation, b.get(keep.id)) == (1, gen, keep)
    assert b.get(_ent(100).id) is None
    assert b.find_source_by_hash(Source.for_text("never committed", 1).text_hash) is None
    assert b.history(_ent(100).id) == []
    b.close()


def test_a_journal_left_after_the_commit_point_is_not_rolled_back(tmp_path: Path) -> None:
    b = LanceStorageBackend.connect(tmp_path / "s")
    b.upsert([_ent(1)])
    versions = {n: t.version for n, t in b._durable.t.items()}
    gen = b.generation
    b.upsert([_ent(2)])  # committed: generation gen + 1
    b.close()
    # a crash between writing state.json and removing the journal leaves this behind
    (tmp_path / "s" / "journal.json").write_text(json.dumps({"generation": gen, "versions": versions}))
    b = LanceStorageBackend.connect(tmp_path / "s")
    assert (b.count(), b.generation) == (2, gen + 1)
    b.close()


def test_vector_search_is_exact_and_rescored(store: LanceStorageBackend) -> None:
    ents = [_ent(i, entity_type="note" if i % 7 == 0 else "person") for i in range(150)]
    store.upsert(ents)
    q = np.random.default_rng(10**9).normal(size=8).astype(np.float32)
    m = np.stack([e.embedding for e in ents]).astype(np.float64)
    q64 = q.astype(np.float64)
    sims = (m @ q64) / (np.linalg.norm(m, axis=1) * np.linalg.norm(q64))
    f = SearchFilters(entity_types=("note",))
    for filters, pool in ((None, range(150)), (f, [i for i in range(150) if i % 7 == 0])):
        want = sorted(((ents[i].id, float(sims[i])) for i in pool), key=lambda p: (-p[1], p[0]))[:10]
        got = store.search_vector(q, 10, filters)
        assert [i for i, _ in got] == [i for i, _ in want]
        # scored by the shared in-process index (float32 vectors), as in every cached backend
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-6)
    assert store.search_vector(ents[5].embedding, 1)[0] == (ents[5].id, pytest.approx(1.0, abs=1e-6))


def test_optimize_compacts(tmp_path: Path) -> None:
    b = LanceStorageBackend.connect(tmp_path / "s", dim=8)
    for start in range(0, 300, 30):
        b.upsert([_ent(i) for i in range(start, start + 30)])
    q = _ent(42).embedding
    before = b.search_vector(q, 5)
    b.optimize()
    after = b.search_vector(q, 5)
    assert after == before and after[0][0] == _ent(42).id
    assert b.count() == 300 and b.get(_ent(7).id) == _ent(7)
    with pytest.raises(umi.StorageError, match="inside a transaction"), b.transaction():
        b.optimize()
    b.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(st.lists(st.sampled_from(["alpha", "beta", "gamma", "engineers", "acme", "x1"]),
                              max_size=8), min_size=1, max_size=10),
       query=st.lists(st.sampled_from(["alpha", "beta", "engineer", "acme", "zeta"]), min_size=1, max_size=4),
       meta=st.lists(st.sampled_from([1, 1.0, True, "1", None]), min_size=10, max_size=10))
def test_bm25_and_filters_equal_the_reference(tmp_path_factory: pytest.TempPathFactory, docs: list[list[str]],
                                              query: list[str], meta: list[object]) -> None:
    b = LanceStorageBackend.connect(tmp_path_factory.mktemp("bm25") / "s")
    try:
        ents = [Entity("note", f"doc{i}", " ".join(w), metadata={"m": meta[i]}, created_at=i)
                for i, w in enumerate(docs)]
        b.upsert(ents)
        text = " ".join(query)
        ref = bm25_scores(text, [(e.id, *document_terms(e.name, e.content)) for e in ents])
        for value in (1, 1.0, True, None):
            f = SearchFilters(metadata={"m": value})
            want = sorted(((i, s) for i, s in ref.items() if f.matches(next(e for e in ents if e.id == i))),
                          key=lambda p: (-p[1], p[0]))[:5]
            assert b.search_text(text, 5, f) == want
            assert b.count(f) == sum(f.matches(e) for e in ents)
    finally:
        b.close()


def test_awkward_text_and_ids_round_trip(store: LanceStorageBackend) -> None:
    e = Entity("note", "quote ' and \\ and \x00", "content 'x' ü🙂", id="id with ' quote",
               metadata={"key": "v'al\x00", "f": 0.1}, created_at=3)
    store.upsert([e])
    assert store.get("id with ' quote") == e
    assert store.get_many(["id with ' quote", "nope", "id with ' quote"]) == [e, e]
    assert store.find_by_name("QUOTE ' AND \\ AND \x00") == [e]
    assert store.list(SearchFilters(metadata={"key": "v'al\x00"})) == [e]
    assert store.count(SearchFilters(metadata={"key": "v'al"})) == 0


def test_a_failed_commit_restores_every_table_and_the_cache(tmp_path: Path) -> None:
    b = LanceStorageBackend.connect(tmp_path / "s")
    keep = _ent(1)
    b.upsert([keep])
    versions = {n: t.version for n, t in b._durable.t.items()}
    history = b._durable.t["history"]

    class Fails:  # the history write fails after the entities table was written
        def __getattr__(self, name: str) -> object:
            if name in ("add", "merge_insert", "update"):
                raise OSError("disk full")
            return getattr(history, name)

    b._durable.t["history"] = Fails()
    with pytest.raises(umi.StorageError, match="commit failed and was rolled back") as info:
        with b.transaction():
            b.upsert([_ent(2)])
            b.supersede(keep.id, 5_000)
    assert isinstance(info.value.__cause__, OSError)
    b._durable.t["history"] = history
    assert {n: t.version for n, t in b._durable.t.items() if n != "entities"} == {
        n: v for n, v in versions.items() if n != "entities"}
    assert b._durable.t["entities"].count_rows() == 1  # restored to the journaled version
    assert not (tmp_path / "s" / "journal.json").exists()
    assert (b.count(), b.generation, b.get(keep.id)) == (1, 1, keep)
    assert b.get(_ent(2).id) is None and [i for i, _ in b.search_vector(_ent(2).embedding, 5)] == [keep.id]
    b.upsert([_ent(3)])
    b.close()
    b = LanceStorageBackend.connect(tmp_path / "s")
    assert sorted(e.id for e in b.list()) == sorted([keep.id, _ent(3).id])
    b.close()
