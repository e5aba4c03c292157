"""User stories across the features merged together (round 3): passages, the lazy DuckDB open and
its cache files, plain raw-note commits, inline recall, SearchFilters in RecallOptions, supersession.

Each test is one user's story through the public API on a DuckDB file, closed and reopened between
steps (Sim embedder: deterministic and fast; rule-based extraction).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from long_texts import long_text as _long_text

import umi
from umi import RecallOptions, RememberOptions, SearchFilters
from umi.errors import StorageLockedError
from umi.providers.rerank import Reranker
from umi.storage.duckdb import INDEX_SUFFIX, TERMS_SUFFIX

SECRET = "Finally, the wifi password for the cabin is bluefalcon77."
QUESTION = "What is the wifi password for the cabin?"
NEIGHBOURS = [
    "The cabin sleeps six people.", "Lee booked the cabin for July.", "The office wifi drops every afternoon.",
    "Tom reset his email password yesterday.", "The guest wifi at the library is free.",
    "Anna visited Japan last spring.", "Priya adopted a rescue greyhound.",
]
RAW = RememberOptions().without_extraction()


def long_text(words: int = 3000, end: str = SECRET, seed: int = 7) -> str:
    """``words`` words of project notes (deterministic), then ``end``."""
    return _long_text(end, words, seed)


class Clock:
    """Seconds that advance one per reading: ordered timestamps across reopen."""

    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def open_memory(db: Path, clock: Clock | None = None, **kw: object) -> umi.Memory:
    return umi.Memory(db, embedder=umi.SimEmbeddingProvider(seed=1), clock=clock, **kw)  # type: ignore[arg-type]


def ids(hits: list[umi.Entity]) -> list[str]:
    return [h.id for h in hits]


def contents(hits: list[umi.Entity]) -> list[str]:
    return [h.content for h in hits]


# --- a. a long text's tail detail: remember, reopen, forget, reopen, remember again -------------------
def test_long_text_detail_survives_reopen_and_forget_removes_it_and_its_passages(tmp_path: Path) -> None:
    db = tmp_path / "a.duckdb"
    text = long_text()
    with open_memory(db) as m:
        fact = m.remember_sync(text, RAW).entities[0]
        for s in NEIGHBOURS:
            m.remember_sync(s, RAW)
    assert os.path.exists(str(db) + INDEX_SUFFIX)
    with open_memory(db) as m:  # index cache present: vectors read on demand
        assert fact.id in ids(m.recall_sync(QUESTION, RecallOptions(limit=5)))
        assert m.recall_sync("bluefalcon77", RecallOptions(limit=5))[0].id == fact.id
        assert m.forget_sync(fact.id) == 1
        for q in (QUESTION, "bluefalcon77"):
            hits = m.recall_sync(q, RecallOptions(limit=10, deep_search=True))
            assert fact.id not in ids(hits)
            assert not any("bluefalcon77" in c for c in contents(hits))
    with open_memory(db) as m:
        assert m.get_sync(fact.id) is None
        for q in (QUESTION, "bluefalcon77"):
            hits = m.recall_sync(q, RecallOptions(limit=10, deep_search=True))
            assert not any("bluefalcon77" in c for c in contents(hits)), q
        again = m.remember_sync(text, RAW)
        assert not again.duplicate  # the forgotten source no longer dedups the text
        new_id = again.entities[0].id
        assert new_id in ids(m.recall_sync(QUESTION, RecallOptions(limit=5)))
    with open_memory(db) as m:
        assert new_id in ids(m.recall_sync(QUESTION, RecallOptions(limit=5)))
        assert m.recall_sync("bluefalcon77", RecallOptions(limit=5))[0].id == new_id


# --- b. supersede, reopen, as_of, lazy history, revive -----------------------------------------------
def test_supersede_then_revive_across_reopens(tmp_path: Path) -> None:
    db = tmp_path / "b.duckdb"
    clock = Clock()
    with open_memory(db, clock) as m:
        acme = m.remember_sync("Alice works at Acme.")
        acme_ids = ids(acme.entities)
        assert acme_ids
        t_acme = int(clock.t * 1000)
        globex = m.remember_sync("Alice now works at Globex.")
        assert globex.has_evolutions
    with open_memory(db, clock) as m:
        now = contents(m.recall_sync("Where does Alice work?"))
        assert any("Globex" in c for c in now), now
        assert not any("Acme" in c for c in now), now
        then = contents(m.recall_sync("Where does Alice work?", RecallOptions(as_of=t_acme)))
        assert any("Acme" in c for c in then), then
        assert not any("Globex" in c for c in then), then
        old = [e for e in (m.get_sync(i) for i in acme_ids) if e is not None and "Acme" in e.content]
        assert old and old[0].valid_to is not None
        hist = m.history_sync(old[0].id)  # read lazily after the reopen
        assert len(hist) >= 2, hist
        assert hist[-1].snapshot.get("valid_to") is not None
        m.remember_sync("Alice works at Acme.")  # restated: revived
    with open_memory(db, clock) as m:
        now = contents(m.recall_sync("Where does Alice work?"))
        assert any("Acme" in c for c in now), now
        assert not any("Globex" in c for c in now), now


# --- c. one open per file; cache files lost or corrupt -------------------------------------------------
def test_second_open_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    db = tmp_path / "c1.duckdb"
    m = open_memory(db)
    try:
        m.remember_sync("Bob likes tea.", RAW)
        with pytest.raises(StorageLockedError):
            open_memory(db)
        assert m.count_sync() == 1  # the refused open left the first one working
    finally:
        m.close()
    with open_memory(db) as m2:
        assert m2.count_sync() == 1


def _answers(m: umi.Memory) -> list[list[str]]:
    qs = [QUESTION, "bluefalcon77", "greyhound", "Who booked the cabin?", "Japan"]
    out = [contents(m.recall_sync(q, RecallOptions(limit=5))) for q in qs]
    out += [contents(m.recall_sync(q, RecallOptions(limit=5, use_vector_search=False))) for q in qs]
    return out


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_lost_or_corrupt_cache_files_are_rebuilt_with_the_same_answers(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "c2.duckdb"
    with open_memory(db) as m:
        m.remember_sync(long_text(600), RAW)
        for s in NEIGHBOURS:
            m.remember_sync(s, RAW)
        before = _answers(m)
    with open_memory(db) as m:
        assert _answers(m) == before
    for suffix in (INDEX_SUFFIX, TERMS_SUFFIX):
        path = str(db) + suffix
        assert os.path.exists(path), suffix
        if damage == "delete":
            os.remove(path)
        else:
            with open(path, "r+b") as f:
                f.seek(max(0, os.path.getsize(path) // 2))
                f.write(b"\xde\xad\xbe\xef" * 64)
    with open_memory(db) as m:
        assert _answers(m) == before
        assert m.count_sync() == 1 + len(NEIGHBOURS)
    with open_memory(db) as m:  # and the rebuilt caches are good for the next open
        assert _answers(m) == before


# --- d. filters in RecallOptions, metadata filters, forget(where=...) ---------------------------------
def test_source_and_metadata_filters_and_forget_where_after_reopen(tmp_path: Path) -> None:
    db = tmp_path / "d.duckdb"
    with open_memory(db) as m:
        r1 = m.remember_sync("Carol plays chess on Sundays.", RememberOptions(metadata={"topic": "hobby"}))
        r2 = m.remember_sync("Carol plays the violin in an orchestra.", RememberOptions(metadata={"topic": "music"}))
        r3 = m.remember_sync(long_text(600, end="Carol plays tennis with Dan."), RememberOptions(metadata={"topic": "hobby"}).without_extraction())
    s1, s2, s3 = r1.source_id, r2.source_id, r3.source_id
    assert s1 and s2 and s3 and len({s1, s2, s3}) == 3
    with open_memory(db) as m:
        q = "What does Carol play?"
        only2 = m.recall_sync(q, RecallOptions(filters=SearchFilters(source_id=s2)))
        assert only2 and {h.source_id for h in only2} == {s2}
        assert any("violin" in c for c in contents(only2))
        only3 = m.recall_sync("tennis with Dan", RecallOptions(filters=SearchFilters(source_id=s3)))
        assert ids(only3) == ids(r3.entities)
        hobby = m.recall_sync(q, RecallOptions(metadata={"topic": "hobby"}, limit=20))
        assert hobby and all(h.metadata.get("topic") == "hobby" for h in hobby)
        assert not any("violin" in c for c in contents(hobby))
        assert m.count_sync(SearchFilters(metadata={"topic": "hobby"})) == len(r1.entities) + len(r3.entities)
        n = m.forget_sync(where=SearchFilters(metadata={"topic": "hobby"}))
        assert n == len(r1.entities) + len(r3.entities)
    with open_memory(db) as m:
        assert m.count_sync(SearchFilters(metadata={"topic": "hobby"})) == 0
        hits = contents(m.recall_sync("What does Carol play?", RecallOptions(limit=20, deep_search=True)))
        assert hits and all("violin" in c for c in hits), hits
        assert not contents(m.recall_sync("tennis with Dan", RecallOptions(filters=SearchFilters(source_id=s3))))


# --- e. remember_many: counts, lists and tail details agree after reopen ------------------------------
def test_remember_many_short_and_long_then_count_list_recall_agree(tmp_path: Path) -> None:
    db = tmp_path / "e.duckdb"
    shorts = [f"Note {i}: the locker {i} code is {1000 + i}." for i in range(300)]
    tails = [f"The spare key for garage {w} hides under the {p}." for w, p in
             [("north", "flowerpot"), ("south", "doormat"), ("east", "birdhouse")]]
    longs = [long_text(900, end=t, seed=s) for s, t in enumerate(tails)]
    with open_memory(db) as m:
        rs = m.remember_many_sync(shorts + longs, RAW)
        assert len(rs) == 303 and not any(r.duplicate for r in rs)
        long_ids = [r.entities[0].id for r in rs[300:]]
    with open_memory(db) as m:
        n = m.count_sync(SearchFilters())
        listed = m.storage.list(SearchFilters(), limit=1000)
        assert n == len(listed) == 303
        assert m.count_sync() == 303
        for lid, word in zip(long_ids, ["flowerpot", "doormat", "birdhouse"]):
            assert ids(m.recall_sync(word, RecallOptions(limit=3)))[0] == lid, word
        for lid, w in zip(long_ids, ["north", "south", "east"]):
            assert lid in ids(m.recall_sync(f"Where is the spare key for garage {w}?", RecallOptions(limit=5))), w
        assert contents(m.recall_sync("locker 217 code", RecallOptions(limit=1)))[0] == shorts[217]


# --- f. export → import into a fresh file keeps long texts findable -----------------------------------
def test_export_import_keeps_passages_and_tail_details(tmp_path: Path) -> None:
    src, dst, dump = tmp_path / "f1.duckdb", tmp_path / "f2.duckdb", tmp_path / "dump.jsonl"
    with open_memory(src) as m:
        fact = m.remember_sync(long_text(), RAW).entities[0]
        for s in NEIGHBOURS:
            m.remember_sync(s, RAW)
        assert m.export_sync(dump, embeddings=True) > 0
    for embeddings in (True, False):
        if embeddings is False:
            with open_memory(src) as m:
                m.export_sync(dump, embeddings=False)
            dst = tmp_path / "f3.duckdb"
        with open_memory(dst) as m:
            counts = m.import_sync(dump)
            assert counts["entities"] == 1 + len(NEIGHBOURS)
            assert fact.id in ids(m.recall_sync(QUESTION, RecallOptions(limit=5))), embeddings
        with open_memory(dst) as m:
            assert fact.id in ids(m.recall_sync(QUESTION, RecallOptions(limit=5))), embeddings
            assert m.recall_sync("bluefalcon77", RecallOptions(limit=5))[0].id == fact.id


# --- more seams ----------------------------------------------------------------------------------------
def _copy_caches(db: Path, to: Path) -> None:
    import shutil

    to.mkdir(exist_ok=True)
    for suffix in (INDEX_SUFFIX, TERMS_SUFFIX):
        shutil.copy(str(db) + suffix, to / suffix)


def _put_caches(db: Path, frm: Path) -> None:
    import shutil

    for suffix in (INDEX_SUFFIX, TERMS_SUFFIX):
        shutil.copy(frm / suffix, str(db) + suffix)


def test_stale_caches_from_an_earlier_session_are_caught_up_with_forgets_and_new_long_texts(tmp_path: Path) -> None:
    """A crash-like close: the cache files on disk are those of an earlier session."""
    db = tmp_path / "s.duckdb"
    with open_memory(db) as m:
        first = m.remember_sync(long_text(), RAW).entities[0]
        for s in NEIGHBOURS:
            m.remember_sync(s, RAW)
    _copy_caches(db, tmp_path / "old")
    with open_memory(db) as m:
        assert m.forget_sync(first.id) == 1
        second = m.remember_sync(long_text(800, end="The boat key is taped inside the red toolbox.", seed=3), RAW).entities[0]
        want = _answers(m)
        want_box = ids(m.recall_sync("Where is the boat key?", RecallOptions(limit=3)))
    _put_caches(db, tmp_path / "old")  # caches one session behind the file
    with open_memory(db) as m:
        assert _answers(m) == want
        assert ids(m.recall_sync("Where is the boat key?", RecallOptions(limit=3))) == want_box
        assert want_box[0] == second.id
        assert not any("bluefalcon77" in c for q in want for c in q)


def test_caches_ahead_of_the_file_are_ignored(tmp_path: Path) -> None:
    """The database restored from a backup older than its cache files: the caches must not be trusted."""
    import shutil

    db = tmp_path / "h.duckdb"
    with open_memory(db) as m:
        for s in NEIGHBOURS:
            m.remember_sync(s, RAW)
    shutil.copy(db, tmp_path / "backup.duckdb")
    with open_memory(db) as m:
        m.remember_sync(long_text(), RAW)
        m.remember_sync("The greyhound is called Biscuit.", RAW)
    shutil.copy(tmp_path / "backup.duckdb", db)  # file back one session; caches stay newer
    with open_memory(db) as m:
        assert m.count_sync() == len(NEIGHBOURS)
        for q in (QUESTION, "bluefalcon77", "Biscuit", "greyhound"):
            for vs in (True, False):
                hits = m.recall_sync(q, RecallOptions(limit=10, use_vector_search=vs))
                assert all(m.get_sync(h.id) is not None for h in hits), (q, vs)
                assert not any("bluefalcon77" in c or "Biscuit" in c for c in contents(hits)), (q, vs)
        assert ids(m.recall_sync("greyhound", RecallOptions(limit=1, use_vector_search=False))) == \
            [e.id for e in m.storage.list(SearchFilters(), limit=100) if "greyhound" in e.content]


def test_forget_and_remember_again_in_one_session_then_reopen(tmp_path: Path) -> None:
    db = tmp_path / "g.duckdb"
    text = long_text()
    with open_memory(db) as m:
        for s in NEIGHBOURS:
            m.remember_sync(s, RAW)
        a = m.remember_sync(text, RAW).entities[0]
        assert a.id in ids(m.recall_sync(QUESTION, RecallOptions(limit=5)))
        assert m.forget_source_sync(m.get_sync(a.id).source_id) == 1
        assert a.id not in ids(m.recall_sync(QUESTION, RecallOptions(limit=10, deep_search=True)))
        again = m.remember_sync(text, RAW)
        assert not again.duplicate
        b = again.entities[0]  # ids are derived from the content: the same fact comes back
        assert m.get_sync(b.id) is not None
        hits = ids(m.recall_sync("bluefalcon77", RecallOptions(limit=10)))
        assert hits[0] == b.id and hits.count(b.id) == 1
    with open_memory(db) as m:
        hits = ids(m.recall_sync("bluefalcon77", RecallOptions(limit=10, deep_search=True)))
        assert hits[0] == b.id and hits.count(b.id) == 1
        assert m.count_sync() == len(NEIGHBOURS) + 1
        assert b.id in ids(m.recall_sync(QUESTION, RecallOptions(limit=5)))


def test_updating_a_long_fact_drops_its_old_passages(tmp_path: Path) -> None:
    db = tmp_path / "u.duckdb"
    with open_memory(db) as m:
        for s in NEIGHBOURS:
            m.remember_sync(s, RAW)
        a = m.remember_sync(long_text(), RAW).entities[0]
        r = m.update_sync(a.id, "The cabin has a wood stove.")
        new_ids = ids(r.entities)
        hits = m.recall_sync("bluefalcon77", RecallOptions(limit=10))
        assert not any("bluefalcon77" in c for c in contents(hits))
    with open_memory(db) as m:
        hits = m.recall_sync("bluefalcon77", RecallOptions(limit=10, deep_search=True))
        assert not any("bluefalcon77" in c for c in contents(hits)), contents(hits)
        assert any(i in ids(m.recall_sync("wood stove", RecallOptions(limit=3))) for i in new_ids)
        old = m.recall_sync(QUESTION, RecallOptions(limit=10, include_superseded=True))
        assert all(m.get_sync(h.id) is not None for h in old)


def test_scoped_views_on_one_file_after_reopen(tmp_path: Path) -> None:
    db = tmp_path / "v.duckdb"
    with open_memory(db) as m:
        m.scoped(user_id="ann").remember_sync(long_text(600, end="Ann's locker code is 4411."), RAW)
        m.scoped(user_id="ben").remember_sync(long_text(600, end="Ben's locker code is 9922.", seed=2), RAW)
    with open_memory(db) as m:
        ann, ben = m.scoped(user_id="ann"), m.scoped(user_id="ben")
        a = contents(ann.recall_sync("locker code", RecallOptions(limit=5)))
        b = contents(ben.recall_sync("locker code", RecallOptions(limit=5)))
        assert len(a) == 1 and "4411" in a[0] and len(b) == 1 and "9922" in b[0]
        assert not any("9922" in c for c in contents(ann.recall_sync("9922", RecallOptions(limit=5, deep_search=True))))
        assert ann.forget_scope_sync(user_id="ann") == 1
    with open_memory(db) as m:
        assert m.count_sync() == 1
        assert contents(m.recall_sync("locker code 4411", RecallOptions(limit=5, deep_search=True))) == \
            contents(m.scoped(user_id="ben").recall_sync("locker code", RecallOptions(limit=5)))


def test_a_job_flip_flopping_three_times_across_reopens(tmp_path: Path) -> None:
    """Each restatement revives the older fact and retires the other. The relations are an event
    log: stored in earlier sessions (read lazily after the reopen), each kept once, in time order."""
    db = tmp_path / "ff.duckdb"
    clock = Clock()
    seq = ["Alice works at Acme.", "Alice now works at Globex."] * 3
    for i, text in enumerate(seq):
        with open_memory(db, clock) as m:
            r = m.remember_sync(text)
            assert i < 2 or r.evolutions, i  # a restatement records why the other fact was retired
            now = contents(m.recall_sync("Where does Alice work?"))
            want, gone = ("Acme", "Globex") if i % 2 == 0 else ("Globex", "Acme")
            assert any(want in c for c in now) and not any(gone in c for c in now), (i, now)
            facts = m.storage.list(SearchFilters(include_superseded=True), limit=100)
            assert len(facts) == (2 if i == 0 else 4)  # the same statements come back; no copies
            assert m.count_sync(include_superseded=False) == sum(1 for e in facts if e.valid_to is None) == 2
    with open_memory(db, clock) as m:
        for e in m.storage.list(SearchFilters(include_superseded=True), limit=100):
            rels = m.relations_sync(e.id)
            assert len({x.id for x in rels}) == len(rels)
            assert [x.created_at for x in rels] == sorted(x.created_at for x in rels)
            hist = m.history_sync(e.id)
            assert [h.at for h in hist] == sorted(h.at for h in hist)


def test_dedup_and_forget_by_source_across_reopens(tmp_path: Path) -> None:
    db = tmp_path / "dd.duckdb"
    lt = long_text(800)
    with open_memory(db) as m:
        rs = m.remember_many_sync(["Bob likes tea.", "Bob likes tea.", lt, lt], RAW)
        assert [r.duplicate for r in rs] == [False, True, False, True]
        assert m.count_sync() == 2
    with open_memory(db) as m:  # sources are read lazily: the dedup must still see them
        rs = m.remember_many_sync(["Bob likes tea.", lt, "Bob likes coffee."], RAW)
        assert [r.duplicate for r in rs] == [True, True, False]
        assert m.remember_sync(lt, RAW).duplicate
        sid = rs[0].source_id
        assert sid and m.forget_sync(where=SearchFilters(source_id=sid)) == 1
        assert m.count_sync() == 2
    with open_memory(db) as m:
        assert "Bob likes tea." not in contents(m.recall_sync("Bob tea", RecallOptions(limit=3)))
        assert not m.remember_sync("Bob likes tea.", RAW).duplicate
        assert m.count_sync() == 3
    with open_memory(db) as m:
        assert contents(m.recall_sync("Bob tea", RecallOptions(limit=1))) == ["Bob likes tea."]


def test_cache_files_of_a_diverged_copy_are_not_trusted(tmp_path: Path) -> None:
    """A database copied, then both copies changed by as many commits: the first copy's cache
    files put beside the second are at the same generation, yet describe other facts."""
    import shutil

    one, two = tmp_path / "one.duckdb", tmp_path / "two.duckdb"
    with open_memory(one) as m:
        for s in NEIGHBOURS[:4]:
            m.remember_sync(s, RAW)
    shutil.copy(one, two)
    for db, new, old in ((one, "Zed sails a blue catamaran.", "wifi drops"),
                         (two, "Quinn grows purple tomatoes.", "email password")):
        with open_memory(db) as m:
            m.remember_sync(new, RAW)
            [gone] = [e for e in m.storage.list(SearchFilters(), limit=10) if old in e.content]
            assert m.forget_sync(gone.id) == 1
    qs = ["catamaran", "tomatoes", "wifi drops", "email password", "Who booked the cabin?"]

    def answers(m: umi.Memory) -> list[list[str]]:
        return [contents(m.recall_sync(q, RecallOptions(limit=3, use_vector_search=vs))) for q in qs for vs in (True, False)]

    with open_memory(two) as m:
        want = answers(m)
    assert not any("catamaran" in c for a in want for c in a)
    for suffix in (INDEX_SUFFIX, TERMS_SUFFIX):
        shutil.copy(str(one) + suffix, str(two) + suffix)
    with open_memory(two) as m:
        assert answers(m) == want


class HeadReranker(Reranker):
    """Scores the query's words found in a passage's first 200 words — as LocalReranker reads a
    passage only up to its ``max_tokens``."""

    name = "head-words"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def score(self, query: str, passages: list[str]) -> np.ndarray:  # type: ignore[override]
        def words(s: str) -> set[str]:
            return {w.strip("?.,!").casefold() for w in s.split()[:200]}

        self.seen.extend(passages)
        q = words(query)
        return np.asarray([len(q & words(p)) for p in passages], np.float32)


def test_a_reranker_judges_a_long_fact_by_the_passage_that_matched(tmp_path: Path) -> None:
    """With a reranker, the tail detail of a long text is still found first after a reopen: the
    reranker is shown the passage nearest the question, not the text's opening."""
    db = tmp_path / "r.duckdb"
    with open_memory(db) as m:
        fact = m.remember_sync(long_text(), RAW).entities[0]
        for s in NEIGHBOURS:
            m.remember_sync(s, RAW)
        plain = ids(m.recall_sync("cabin wifi password bluefalcon77", RecallOptions(limit=3)))
    assert fact.id in plain
    rr = HeadReranker()
    with open_memory(db, config=umi.MemoryConfig(reranker=rr)) as m:
        got = m.recall_sync("cabin wifi password bluefalcon77", RecallOptions(limit=3))
        assert rr.seen, "the reranker was not asked"
        assert ids(got)[0] == fact.id, contents(got)
        assert got[0].content == long_text()  # the fact itself comes back, whole
        assert any("bluefalcon77" in p and len(p.split()) <= 220 for p in rr.seen)


def test_a_bad_text_in_a_batch_stores_none_of_it(tmp_path: Path) -> None:
    db = tmp_path / "bad.duckdb"
    cfg = umi.MemoryConfig(text_bytes_max=20_000)
    batch = ["Bob likes tea.", long_text(800), "Mia fixes clocks."]
    with open_memory(db, config=cfg) as m:
        with pytest.raises(umi.EmptyTextError):
            m.remember_many_sync([*batch[:2], "  ", batch[2]], RAW)
        with pytest.raises(umi.TextTooLongError) as err:
            m.remember_many_sync([*batch[:2], "x" * 20_001, batch[2]], RAW)
        assert err.value.limit == 20_000
        assert m.count_sync() == 0
    with open_memory(db, config=cfg) as m:
        assert m.count_sync() == 0
        assert [r.duplicate for r in m.remember_many_sync(batch, RAW)] == [False, False, False]


def test_another_process_holding_the_file_gets_storage_locked(tmp_path: Path) -> None:
    import subprocess
    import sys

    db = tmp_path / "lock.duckdb"
    with open_memory(db) as m:
        m.remember_sync("Bob likes tea.", RAW)
    child = ("import sys, umi\n"
             f"m = umi.Memory({str(db)!r}, embedder=umi.SimEmbeddingProvider(seed=1))\n"
             "print(m.count_sync(), flush=True)\n"
             "sys.stdin.readline()\n"
             "m.close()\n")
    from child_process import child_env

    p = subprocess.Popen([sys.executable, "-c", child], cwd=tmp_path, env=child_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "1"
        with pytest.raises(StorageLockedError) as err:
            open_memory(db)
        assert err.value.path == str(db)
    finally:
        p.communicate("\n", timeout=60)
    assert p.returncode == 0
    with open_memory(db) as m:  # released: this process opens it and sees the same fact
        assert contents(m.recall_sync("tea", RecallOptions(limit=1))) == ["Bob likes tea."]


def test_a_group_chat_across_sessions_files_each_speakers_news_under_them(tmp_path: Path) -> None:
    """Speaker filing and supersession by the nearest candidate, with the store reopened between
    turns (candidates come from a lazily opened store)."""
    db = tmp_path / "chat.duckdb"
    clock = Clock()
    turns = ["Alice: I work at Initech.", "Bob: I now work at Acme.", "Tom: I work at Harbor Bank as a risk analyst.",
             "Tom: I went hiking on Saturday.", "Tom: The weather was lovely.",
             "Alice: I now work at Globex.",
             "Tom: I handed in my notice at Harbor Bank; from Monday I'm a firmware engineer with Asterisk Robotics."]
    for t in turns:
        with open_memory(db, clock) as m:
            m.remember_sync(t)
    with open_memory(db, clock) as m:
        def cur(text: str) -> bool:
            hits = m.recall_sync(text, RecallOptions(limit=50, include_superseded=True))
            return any(e.content == text and e.valid_to is None for e in hits)

        assert not cur("Alice: I work at Initech.")
        assert cur("Bob: I now work at Acme.")
        assert not cur("Tom: I work at Harbor Bank as a risk analyst.")
        assert cur("Tom: I went hiking on Saturday.")
        assert m.recall_sync("Where does Alice work?", RecallOptions(limit=1))[0].content == "Alice: I now work at Globex."
        assert m.recall_sync("Where does Bob work?", RecallOptions(limit=1))[0].content == "Bob: I now work at Acme."
        assert "Asterisk Robotics" in m.recall_sync("Harbor Bank", RecallOptions(limit=1))[0].content


def test_export_after_a_lazy_reopen_is_the_same_and_reimport_restores_a_forgotten_long_fact(tmp_path: Path) -> None:
    import io

    db, dump = tmp_path / "x.duckdb", tmp_path / "x.jsonl"
    clock = Clock()
    with open_memory(db, clock) as m:
        m.remember_sync("Alice works at Acme.")
        m.remember_sync("Alice now works at Globex.")
        fact = m.remember_sync(long_text(), RAW).entities[0]
        before = io.StringIO()
        m.export_sync(before, embeddings=True)
        m.export_sync(dump)
        n = m.count_sync()
    with open_memory(db, clock) as m:  # history, sources and relations not read yet: export reads them
        after = io.StringIO()
        m.export_sync(after, embeddings=True)
        assert after.getvalue() == before.getvalue()
        assert m.forget_sync(fact.id) == 1
        assert m.count_sync() == n - 1
        counts = m.import_sync(dump)
        assert counts["entities"] == n and m.count_sync() == n
    with open_memory(db, clock) as m:
        assert m.recall_sync("bluefalcon77", RecallOptions(limit=1))[0].id == fact.id
        assert fact.id in ids(m.recall_sync(QUESTION, RecallOptions(limit=5)))
