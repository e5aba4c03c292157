"""Reopening a DuckDB store reads only what recall and remember need at open.

A user with a large memory reopens it in every session: entities, postings and core blocks
come back at open (the vectors stay on disk while the vector index cache holds a copy, the
postings come from the keyword index cache), while history, sources and relations are read
from DuckDB the first time a call needs them. These tests check that the lazy parts really
are lazy, and that a lazy read after writes of the same session returns the old rows and the
new ones, in order, with the right history sequence numbers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from umi.errors import StorageError
from umi.storage.base import Source, tombstone
from umi.storage.duckdb import TERMS_SUFFIX, DuckDBStorageBackend
from umi.types import Entity, EvolutionRelation

T0 = 1_700_000_000_000


def vec(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(8).astype(np.float32)
    return v / np.linalg.norm(v)


def fact(i: int, content: str, **kw: object) -> Entity:
    return Entity("person", f"person {i}", content, embedding=vec(i), created_at=T0 + i, updated_at=T0 + i,
                  id=f"e{i}", **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """A store with history (create, update, supersede), two sources and a relation, closed."""
    path = tmp_path / "umi.duckdb"
    s1, s2 = Source.for_text("Alice joined Acme", T0), Source.for_text("Bob likes tea", T0 + 1)
    alice = fact(1, "Alice works at Acme", source_id=s1.id)
    bob = fact(2, "Bob likes tea", source_id=s2.id)
    others = [fact(i, f"filler fact {i}") for i in range(3, 300)]
    rel = EvolutionRelation(alice.id, bob.id, "extend", reason="same team", created_at=T0 + 5)
    with DuckDBStorageBackend.connect(path) as b:
        b.add_source(s1)
        b.add_source(s2)
        b.upsert([alice, bob, *others])
        b.upsert([fact(1, "Alice works at Acme as an engineer", source_id=s1.id)])
        b.supersede(alice.id, T0 + 10)
        b.add_relations([rel])
    return path, {"alice": alice, "bob": bob, "s1": s1, "s2": s2, "rel": rel, "n": 2 + len(others)}


def ops(b: DuckDBStorageBackend, eid: str) -> list[tuple[int, str]]:
    return [(h.seq, h.op) for h in b.history(eid)]


def test_reopen_leaves_history_sources_relations_and_vectors_unread_until_asked(store) -> None:
    path, w = store
    alice, bob, s1, rel = w["alice"], w["bob"], w["s1"], w["rel"]
    # on_demand: no thread reads the vectors in the background (see test_storage_vectors_background)
    with DuckDBStorageBackend.connect(path, vectors="on_demand") as b:
        assert b.index_load_status == "loaded"
        # nothing of the lazy parts is in memory after open
        assert b._history == {} and b._sources.recs == {} and b._relations.recs == {}
        # vectors and entity objects: only the few that the caches' consistency checks sampled
        assert int(b._cache._vec_pending.sum()) == w["n"] and len(b._cache._vec_read) <= 32
        assert sum(e is not None for e in b._cache._ents) <= 4
        read = set(b._cache._vec_read)
        # recall's reads work without them
        assert b.search_vector(vec(2), 1)[0][0] == bob.id
        assert b.search_text("tea", 1)[0][0] == bob.id
        assert b._history == {} and b._sources.recs == {} and b._relations.recs == {}

        # each call reads what it needs, and only that
        assert ops(b, alice.id) == [(1, "create"), (2, "update"), (3, "supersede")]
        assert set(b._history) == {alice.id}
        assert b.find_source_by_hash(s1.text_hash) == s1
        assert b.get_source(w["s2"].id) == w["s2"]
        assert [s.id for s in b._sources.recs.values() if s is not None] == [s1.id, w["s2"].id]
        assert [r.id for r in b.relations_for(bob.id)] == [rel.id]
        assert b.relations_for(bob.id)[0].reason == "same team"
        got = b.get(bob.id)
        assert got is not None and np.array_equal(got.embedding, bob.embedding) and got.content == "Bob likes tea"
        assert int(b._cache._vec_pending.sum()) == w["n"] and set(b._cache._vec_read) <= read | {b._cache._row_of[bob.id]}


def test_writes_before_the_first_lazy_read_keep_old_rows_and_order(store) -> None:
    path, w = store
    alice, bob, s1, s2, rel = w["alice"], w["bob"], w["s1"], w["s2"], w["rel"]
    s3 = Source.for_text("Carol runs the lab", T0 + 20)
    carol = fact(3, "Carol runs the lab")
    rel2 = EvolutionRelation(bob.id, carol.id, "derive", created_at=T0 + 30)
    with DuckDBStorageBackend.connect(path) as b:
        # write first: history, sources and relations on disk were never read in this session
        b.revive(alice.id, T0 + 40)
        b.add_source(s3)
        b.add_relations([rel2])
        b.upsert([fact(2, "Bob likes green tea", source_id=s2.id)])
        assert ops(b, alice.id) == [(1, "create"), (2, "update"), (3, "supersede"), (4, "revive")]
        assert ops(b, bob.id) == [(1, "create"), (2, "update")]
        assert [h.snapshot["content"] for h in b.history(bob.id)] == ["Bob likes tea", "Bob likes green tea"]
        assert [s.id for s in b.iter_sources()] == [s1.id, s2.id, s3.id]  # created_at order, old then new
        assert b.find_source_by_hash(s1.text_hash) == s1 and b.find_source_by_hash(s3.text_hash) == s3
        assert [r.id for r in b.relations_for(bob.id)] == [rel.id, rel2.id]
        assert [r.id for r in b.iter_relations()] == [rel.id, rel2.id]

        # a rolled-back write leaves the lazily read rows as they were
        with pytest.raises(StorageError, match="abort"):
            with b.transaction():
                b.supersede(alice.id, T0 + 50)
                b.delete(bob.id, at=T0 + 50)
                raise RuntimeError("abort")
        assert ops(b, alice.id)[-1] == (4, "revive") and len(b.relations_for(bob.id)) == 2

        # forgetting reads what it must change: every snapshot (old ones too) becomes a tombstone,
        # the entity's relations go, its source goes once unreferenced
        assert b.delete(bob.id, at=T0 + 60)
        assert ops(b, bob.id) == [(1, "create"), (2, "update"), (3, "delete")]
        assert all(h.snapshot == tombstone(bob.id) for h in b.history(bob.id))
        assert b.relations_for(alice.id) == [] and b.get_source(s2.id) is None
        every = [(h.entity_id, h.seq) for h in b.iter_history()]
    with DuckDBStorageBackend.connect(path) as b:  # and the disk agrees
        assert [(h.entity_id, h.seq) for h in b.iter_history()] == every
        assert ops(b, alice.id) == [(1, "create"), (2, "update"), (3, "supersede"), (4, "revive")]
        assert b.get_source(s2.id) is None and [s.id for s in b.iter_sources()] == [s1.id, s3.id]
        assert [r.id for r in b.iter_relations()] == []
        # an id forgotten earlier continues its history where it stopped
        b.upsert([fact(2, "Bob is back")])
        assert ops(b, bob.id) == [(1, "create"), (2, "update"), (3, "delete"), (4, "create")]


def test_keyword_index_cache_is_used_caught_up_or_ignored(tmp_path: Path) -> None:
    path = tmp_path / "umi.duckdb"
    terms = Path(str(path) + TERMS_SUFFIX)
    with DuckDBStorageBackend.connect(path) as b:
        b.upsert([fact(i, f"fact {i} about {'tea' if i % 3 else 'coffee'}") for i in range(60)])
        want = b.search_text("tea coffee", 10)
    assert terms.exists()
    with DuckDBStorageBackend.connect(path) as b:
        assert b._terms_dirty is False  # postings came from the cache file, as saved
        assert b.search_text("tea coffee", 10) == want
        shutil.copy(terms, tmp_path / "stale")
        b.upsert([fact(100, "coffee coffee coffee")])
        assert b.delete("e4")
        b.upsert([fact(5, "now about coffee")])
        want = b.search_text("tea coffee", 10)
        assert want[0][0] == "e100"
    shutil.copy(tmp_path / "stale", terms)  # three writes behind: caught up from the database
    with DuckDBStorageBackend.connect(path) as b:
        assert b._terms_dirty is True
        assert b.search_text("tea coffee", 10) == want
    data = bytearray(terms.read_bytes())
    data[len(data) // 2] ^= 0xFF
    terms.write_bytes(bytes(data))  # corrupt: read from the database instead
    with DuckDBStorageBackend.connect(path) as b:
        assert b.search_text("tea coffee", 10) == want
    with DuckDBStorageBackend.connect(path) as b:  # rewritten by that close: current again
        assert b._terms_dirty is False and b.search_text("tea coffee", 10) == want


def test_many_forgets_after_reopen_read_each_kind_in_one_go_past_a_limit(tmp_path: Path, monkeypatch) -> None:
    """A bulk forget asks the database for each entity's history, relations and source only up
    to LAZY_KEY_READS_MAX times per kind; then reads the rest of that kind at once."""
    import umi.storage.cached as cached

    monkeypatch.setattr(cached, "LAZY_KEY_READS_MAX", 20)
    path = tmp_path / "umi.duckdb"
    srcs = [Source.for_text(f"text {i}", T0 + i) for i in range(100)]
    ents = [fact(i, f"fact {i}", source_id=srcs[i].id) for i in range(100)]
    rels = [EvolutionRelation(ents[i].id, ents[i + 1].id, "extend", created_at=T0 + i, id=f"r{i}") for i in range(99)]
    with DuckDBStorageBackend.connect(path) as b:
        for s in srcs:
            b.add_source(s)
        b.upsert(ents)
        b.add_relations(rels)
    with DuckDBStorageBackend.connect(path) as b:
        reads = []
        durable = b._durable
        for name in ("load_history", "load_sources", "load_relations"):
            real = getattr(durable, name)
            monkeypatch.setattr(durable, name, lambda *a, _real=real, _name=name, **k: reads.append(_name) or _real(*a, **k))
        for e in ents[:60]:
            assert b.delete(e.id, at=T0 + 1000)
        assert len(reads) <= 3 * 21  # one read per key up to the limit, then one read of the rest
        assert b._hist_all and b._src_all and b._rel_all
        assert [r.id for r in b.iter_relations()] == [f"r{i}" for i in range(60, 99)]
        assert [s.id for s in b.iter_sources()] == [s.id for s in srcs[60:]]
        assert ops(b, ents[59].id) == [(1, "create"), (2, "delete")] and ops(b, ents[60].id) == [(1, "create")]
    with DuckDBStorageBackend.connect(path) as b:
        assert [r.id for r in b.iter_relations()] == [f"r{i}" for i in range(60, 99)]
        assert len(list(b.iter_sources())) == 40 and b.count() == 40


def test_re_adding_a_stored_relation_or_source_after_reopen_replaces_it(store) -> None:
    """Lazy relations and sources meet plain inserts: a row the session has not read yet is still
    known to be stored, so writing it again replaces it instead of failing on its key."""
    path, s = store
    rel, s1 = s["rel"], s["s1"]
    again = EvolutionRelation(rel.source_id, rel.target_id, "extend", reason="same team, said again",
                              created_at=T0 + 20, id=rel.id)
    with DuckDBStorageBackend.connect(path) as b:
        b.add_relations([again])
        b.add_source(s1)
    with DuckDBStorageBackend.connect(path) as b:
        assert [r.reason for r in b.relations_for(rel.source_id)] == ["same team, said again"]
        assert len(list(b.iter_relations())) == 1
        assert b.get_source(s1.id) == s1 and len(list(b.iter_sources())) == 2



def spy_reads(b: DuckDBStorageBackend, monkeypatch) -> list[str]:
    """The names of the durable store's on-demand reads (history, sources, orphan keys), in order."""
    reads: list[str] = []
    durable = b._durable
    for name in ("load_history", "load_sources", "load_orphans"):
        real = getattr(durable, name)
        monkeypatch.setattr(durable, name, lambda *a, _real=real, _name=name, **k: reads.append(_name) or _real(*a, **k))
    return reads

def test_new_facts_and_texts_after_reopen_are_known_new_without_a_read_per_key(tmp_path: Path, monkeypatch) -> None:
    """Every remember writes facts that have no history yet, from a text that has no source yet.
    After one read of the orphan keys (history of forgotten facts, sources no fact refers to) the
    store knows that without asking DuckDB per key, and the orphans still get their rows read:
    a forgotten fact told again continues its history, a stored lone source is kept."""
    path = tmp_path / "umi.duckdb"
    lone, s1 = Source.for_text("a source with no fact", T0), Source.for_text("Alice joined Acme", T0 + 1)
    with DuckDBStorageBackend.connect(path) as b:
        b.add_source(lone)
        b.add_source(s1)
        b.upsert([fact(1, "Alice works at Acme", source_id=s1.id), fact(2, "Bob likes tea")])
        assert b.delete("e2", at=T0 + 5)
    with DuckDBStorageBackend.connect(path) as b:
        reads = spy_reads(b, monkeypatch)
        news = [Source.for_text(f"new text {i}", T0 + 10 + i) for i in range(20)]
        for i, s in enumerate(news):
            with b.transaction():
                b.upsert([fact(10 + i, f"new fact {i}", source_id=s.id)])
                b.add_source(s)
        assert reads == ["load_orphans"]
        assert ops(b, "e10") == [(1, "create")] and b.get_source(news[0].id) == news[0]
        b.upsert([fact(2, "Bob is back")])  # forgotten before: an orphan, its history is read
        assert ops(b, "e2") == [(1, "create"), (2, "delete"), (3, "create")]
        b.add_source(lone)  # stored, with no fact: read, and kept as the first record
        assert b.get_source(lone.id) == lone and reads.count("load_sources") == 1
        with b.transaction():  # a stored fact and its stored source, told again: both read
            b.upsert([fact(1, "Alice works at Acme as an engineer", source_id=s1.id)])
            b.add_source(s1)
        assert ops(b, "e1") == [(1, "create"), (2, "update")] and reads.count("load_sources") == 2
    with DuckDBStorageBackend.connect(path) as b:  # and the disk agrees
        assert b.count() == 22 and ops(b, "e2") == [(1, "create"), (2, "delete"), (3, "create")]
        assert [s.id for s in b.iter_sources()] == [lone.id, s1.id, *(s.id for s in news)]


def test_a_large_store_reads_keys_one_by_one_until_the_orphan_scan_pays(store, monkeypatch) -> None:
    """The orphan keys cost a scan of history and sources: a store reads them once the point reads
    of new keys would have cost as much (one read per ORPHAN_SCAN_ROWS_PER_READ stored facts)."""
    import umi.storage.cached as cached

    path, s = store
    monkeypatch.setattr(cached, "ORPHAN_SCAN_ROWS_PER_READ", -(-s["n"] // 2))  # worth it after 1 point read
    with DuckDBStorageBackend.connect(path) as b:
        reads = spy_reads(b, monkeypatch)
        for i in range(3):
            b.upsert([fact(1000 + i, f"new fact {i}")])
        assert reads == ["load_history", "load_orphans"]
        assert [ops(b, f"e{1000 + i}") for i in range(3)] == [[(1, "create")]] * 3


def test_metadata_filters_and_name_lookups_after_reopen_match_before(tmp_path: Path) -> None:
    """The metadata codes are read at open by entity rowid on a second connection and the name
    index is made on first use: filters, name lookups and a vector-less row give the answers they
    gave before the close, also after rows were rewritten and removed (rowids out of order)."""
    path = tmp_path / "m.duckdb"
    b = DuckDBStorageBackend.connect(path, dim=8)
    ents = [fact(i, f"note {i}", metadata={"team": i % 3, "src": "chat" if i % 2 else "doc"}) for i in range(40)]
    ents.append(Entity("person", "no vector", "plain text", metadata={"team": 1}, created_at=T0, id="nv"))
    b.upsert(ents)
    b.upsert([fact(i, f"note {i} again", metadata={"team": 7, "k": f"x{i}"}) for i in range(0, 40, 5)])
    b.delete("e3", at=T0 + 100)
    from umi.storage.base import SearchFilters

    def answers(s: DuckDBStorageBackend) -> object:
        out = []
        for meta in ({"team": 1}, {"team": 7}, {"src": "doc"}, {"team": 2, "src": "chat"}, {"k": "x10"}):
            f = SearchFilters(metadata=meta)
            out.append((sorted(e.id for e in s.list(f, limit=100)), s.count(f),
                        [i for i, _ in s.search_vector(vec(1), 5, f)]))
        out.append([e.id for e in s.find_by_name("person 10")] + [e.id for e in s.find_by_name("no vector")])
        out.append(s.get("nv").embedding is None)  # type: ignore[union-attr]
        return out

    before = answers(b)
    b.close()
    with DuckDBStorageBackend.connect(path) as again:
        assert again.index_load_status == "loaded"
        assert answers(again) == before
        again.upsert([fact(50, "new", metadata={"team": 1})])  # the name index is made here
        assert [e.id for e in again.find_by_name("person 50")] == ["e50"]
        assert "e50" in {e.id for e in again.list(SearchFilters(metadata={"team": 1}), limit=100)}


def test_metadata_codes_map_rowids_in_any_order() -> None:
    from umi.storage._duckdb_io import _metadata_codes

    rowids = np.array([7, 2, 9, 4, 0], np.int64)  # cache row i holds DuckDB rowid rowids[i]
    groups = {"meta:team": (np.array([9, 0, 7], np.int64), np.array([1, 2, 1], np.int64), {("i", "1"): 1, ("i", "2"): 2})}
    codes, vals = _metadata_codes(groups, rowids, 5)["meta:team"]
    assert codes.tolist() == [1, 0, 1, 0, 2] and vals == {("i", "1"): 1, ("i", "2"): 2}
    in_order = _metadata_codes(groups, np.array([0, 2, 4, 7, 9], np.int64), 5)["meta:team"][0]
    assert in_order.tolist() == [2, 0, 0, 1, 1]
    with pytest.raises(StorageError):
        _metadata_codes({"meta:x": (np.array([5]), np.array([1]), {})}, rowids, 5)


def test_id_order_keys_match_the_utf8_of_each_id() -> None:
    import random

    import pyarrow as pa

    from umi.storage._hotcache import id_order_keys, id_order_keys_arrow

    def one_by_one(ids: list[str]) -> list[int]:
        return [int.from_bytes(i.encode("utf-8", "surrogatepass")[:8].ljust(8, b"\0"), "big") for i in ids]

    rng = random.Random(3)
    alphabet = ["a", "z", "\0", "é", "日", "🙂", "0"]
    for _ in range(100):
        ids = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 11))) for _ in range(rng.randint(1, 150))]
        assert id_order_keys(ids).tolist() == one_by_one(ids)
        arr = pa.chunked_array([pa.array(ids[:3]), pa.array(ids[3:])]) if len(ids) > 3 else pa.array(ids)
        assert id_order_keys_arrow(arr).tolist() == one_by_one(ids)
        start = rng.randint(0, len(ids) - 1)
        assert id_order_keys_arrow(pa.array(ids).slice(start)).tolist() == one_by_one(ids[start:])
    lone = ["\ud800a"] + [f"id{i}" for i in range(80)]  # not valid UTF-8: the per-id path
    assert id_order_keys(lone).tolist() == one_by_one(lone)


def test_metadata_codes_come_from_the_keyword_index_cache_caught_up_or_checked(tmp_path: Path, monkeypatch,
                                                                                caplog) -> None:
    """With a current keyword index cache the metadata codes are not read from the database (no
    entity_metadata join at open); a cache some writes behind is caught up from the changed rows;
    codes that disagree with the entities (values out of order, a key missing) are refused and
    read from the database. Filters answer as before the close every time."""
    import umi.storage.duckdb as duck
    from umi.storage._termcache import TermCache, load_terms, save_terms
    from umi.storage.base import SearchFilters

    path = tmp_path / "m.duckdb"
    terms = Path(str(path) + TERMS_SUFFIX)
    reads: list[int] = []
    real = duck.load_metadata
    monkeypatch.setattr(duck, "load_metadata", lambda con, rowids: reads.append(1) or real(con, rowids))

    def answers(s: DuckDBStorageBackend) -> object:
        out = []
        for meta in ({"team": 1}, {"team": 2}, {"src": "doc"}, {"team": 0, "src": "chat"}, {"k": "x10"}, {"new": True}):
            f = SearchFilters(metadata=meta)
            out.append((sorted(e.id for e in s.list(f, limit=100)), s.count(f)))
        return out

    with DuckDBStorageBackend.connect(path, dim=8) as b:
        b.upsert([fact(i, f"note {i}", metadata={"team": i % 3, "src": "chat" if i % 2 else "doc"}) for i in range(40)])
        want = answers(b)
    with DuckDBStorageBackend.connect(path) as b:
        assert answers(b) == want and reads == [] and b._terms_dirty is False
        shutil.copy(terms, tmp_path / "stale")
        b.upsert([fact(i, f"note {i} again", metadata={"team": 2, "k": f"x{i}"}) for i in range(0, 40, 5)])
        b.upsert([fact(60, "newer", metadata={"new": True, "team": 1})])
        assert b.delete("e3", at=T0 + 100)
        want = answers(b)
    shutil.copy(tmp_path / "stale", terms)  # writes behind: caught up from the changed rows
    with DuckDBStorageBackend.connect(path) as b:
        assert answers(b) == want and reads == [] and b._terms_dirty is True
    saved = load_terms(str(terms))
    assert saved.meta is not None and set(saved.meta) == {"meta:team", "meta:src", "meta:k", "meta:new"}
    for tamper in ("values out of order", "a key missing"):
        meta = dict(saved.meta)
        if tamper == "a key missing":
            del meta["meta:src"]
        else:
            codes, vals = meta["meta:team"]
            meta["meta:team"] = (codes, vals[1:] + vals[:1])
        save_terms(str(terms), TermCache(saved.generation, list(saved.ids), saved.terms, saved.offsets, saved.rows,
                                         saved.tfs, meta))
        reads.clear()
        with caplog.at_level("WARNING", logger="umi.storage.duckdb"):
            with DuckDBStorageBackend.connect(path) as b:
                assert answers(b) == want and reads == [1], tamper
        assert "metadata codes disagree" in caplog.text
