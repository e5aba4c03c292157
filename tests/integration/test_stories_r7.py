"""User stories, round 7 (adversarial): the Memory lifecycle on a DuckDB file, closed and reopened
between steps — cancellation, concurrency, failing providers, scopes, core and working memory.

Sim embedder (deterministic, fast) and rule-based extraction unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import gc
import io
import random
import json
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest

import umi
from umi.providers.base import LLMProvider, LLMResult
from umi import RecallOptions

ACME = "Alice works at Acme Corp."
INITECH = "Alice now works at Initech."  # "now": the rules read it as an update of Acme
WHERE = "Where does Alice work?"
RAW = umi.RememberOptions().without_extraction()


def open_memory(db: Path, **kw: Any) -> umi.Memory:
    return umi.Memory(db, embedder=umi.SimEmbeddingProvider(seed=1), **kw)


def current(m: umi.Memory, query: str = WHERE) -> list[str]:
    return [h.content for h in m.recall_sync(query, RecallOptions(limit=10))]


class Gate:
    """Stops the first call of a store method in its I/O thread until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.left = threading.Event()  # the held call has returned from the store method
        self.calls = 0

    def wrap(self, method: Any) -> Any:
        gate = self

        def gated(store: Any, *args: Any, **kwargs: Any) -> Any:
            out = method(store, *args, **kwargs)
            gate.calls += 1
            if gate.calls == 1:
                gate.entered.set()
                gate.release.wait(30)
                gate.left.set()
            return out

        return gated

    def on_reads_of(self, m: umi.Memory, monkeypatch: pytest.MonkeyPatch) -> "Gate":
        """Gate ``m``'s store's ``find_by_name`` (remember's read plan calls it)."""
        store_cls = type(m.storage)
        monkeypatch.setattr(store_cls, "find_by_name", self.wrap(store_cls.find_by_name))
        return self

    async def remember_held(self, m: umi.Memory, text: str) -> "asyncio.Future[Any]":
        """``m.remember(text)`` started and stopped inside its read plan, in an I/O thread,
        holding the write lock."""
        call = asyncio.ensure_future(m.remember(text))
        assert await asyncio.to_thread(self.entered.wait, 30)
        return call


@pytest.fixture
def held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[umi.Memory, Gate]]:
    """A Memory on a DuckDB file (``tmp_path / "held.duckdb"``) whose first store read of a name
    stops in its I/O thread until released (:class:`Gate`)."""
    m = open_memory(tmp_path / "held.duckdb")
    try:
        yield m, Gate().on_reads_of(m, monkeypatch)
    finally:
        m.close()


# --- a cancelled write keeps the write lock until its I/O thread has finished -----------------------
def test_a_write_after_a_cancelled_remember_waits_for_the_cancelled_write_and_sees_it(
        held: tuple[umi.Memory, Gate], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, gate = held

    async def story() -> None:
        first = await gate.remember_held(m, ACME)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.ensure_future(m.remember(INITECH))
        await asyncio.wait([second], timeout=1.0)  # the chance to overtake the cancelled write
        gate.release.set()
        await second

    asyncio.run(story())
    monkeypatch.undo()
    # the cancelled write's thread ran on and committed; the next write came after it, as if in
    # order: Initech updates Acme (was: both current, Acme written after Initech without a look)
    assert current(m) == [INITECH]
    assert m.count_sync(include_superseded=False) == 2 and m.count_sync() == 4
    m.close()
    with open_memory(tmp_path / "held.duckdb") as m:
        assert current(m) == [INITECH]
        assert m.remember_sync("Bob likes tea.").entity_count == 1  # the next call works


# --- a model's malformed answer degrades to a note; the user's text is never lost ----------------------
class AnsweringLLM(LLMProvider):
    """Answers extraction with ``entities`` (or one fact of the text about Alice), evolution with
    an update of every candidate for ``reason``."""

    name = "answering"

    def __init__(self, entities: list[dict[str, Any]] | None = None, reason: str = "moved on") -> None:
        self.entities = entities
        self.reason = reason

    def complete_json(self, system: str, prompt: str, schema: Any, *, task: Any) -> Any:
        if task == "extract_entities":
            text = prompt.split("<text>")[-1].split("</text>")[0].strip()
            return LLMResult({"entities": self.entities if self.entities is not None else
                              [{"name": "Alice", "entity_type": "person", "content": text}]})
        if task == "classify_evolution":
            olds = json.loads(prompt.split("<older_facts>")[-1].split("</older_facts>")[0])
            return LLMResult({"relations": [{"candidate_id": c["id"], "evolution_type": "update",
                                             "reason": self.reason, "confidence": 0.9} for c in olds]})
        return LLMResult({"queries": []})


@pytest.mark.parametrize("entity", [
    {"name": "Al\ud800ice", "entity_type": "person", "content": "Alice works at Acme."},  # was UnicodeEncodeError
    {"name": "Alice", "entity_type": "person", "content": "Alice \udfff works at Acme."},  # was ValidationError
    {"name": "Alice", "entity_type": "person", "content": "Acme " * 30_000},  # over the content limit: same
], ids=["surrogate-name", "surrogate-content", "content-too-long"])
def test_an_extraction_answer_that_cannot_be_stored_keeps_the_text_as_a_note(tmp_path: Path,
                                                                             entity: dict[str, Any]) -> None:
    db = tmp_path / "llm.duckdb"
    with open_memory(db, llm=AnsweringLLM([entity])) as m:
        r = m.remember_sync(ACME)
        assert [e.content for e in r.entities] == [ACME]
        assert r.entities[0].entity_type is umi.EntityType.NOTE
        assert any("extraction failed" in w and "InvalidResponseError" in w for w in r.warnings)
    with open_memory(db) as m:
        assert current(m, "Acme") == [ACME]


def test_an_evolution_answer_whose_reason_cannot_be_stored_keeps_both_facts_without_a_relation(
        tmp_path: Path) -> None:
    db = tmp_path / "reason.duckdb"
    with open_memory(db, llm=AnsweringLLM()) as m:
        m.remember_sync(ACME)
        assert m.remember_sync(INITECH).evolutions[0].reason == "moved on"  # the stub works
    with open_memory(tmp_path / "bad.duckdb", llm=AnsweringLLM(reason="moved \ud800 on")) as m:
        m.remember_sync(ACME)
        r = m.remember_sync(INITECH)  # was ValidationError (EvolutionRelation.reason) and INITECH was lost
        assert [e.content for e in r.entities] == [INITECH] and r.evolutions == []
        assert any("evolution detection failed" in w and "InvalidResponseError" in w for w in r.warnings)
    with open_memory(tmp_path / "bad.duckdb") as m:
        assert sorted(current(m)) == sorted([ACME, INITECH])


# --- an id that no record can have is refused by every verb alike ---------------------------------------
@pytest.mark.parametrize("verb", ["get_sync", "forget_sync", "history_sync", "relations_sync",
                                  "forget_source_sync"])
@pytest.mark.parametrize("bad_id", ["a\x00b", "fact-\ud800"], ids=["nul", "lone-surrogate"])
def test_an_id_holding_nul_or_a_lone_surrogate_is_a_validation_error_on_a_reopened_store(
        tmp_path: Path, verb: str, bad_id: str) -> None:
    db = tmp_path / "ids.duckdb"
    with open_memory(db) as m:
        m.remember_sync(ACME)
    with open_memory(db) as m:  # reopened: relations are read from the file on demand
        with pytest.raises(umi.ValidationError, match="entity_id|source_id"):  # was a StorageError from DuckDB
            getattr(m, verb)(bad_id)
        assert current(m) == [ACME]


# --- scopes: forget_scope is all or nothing ------------------------------------------------------------
def test_a_forget_scope_whose_core_step_fails_forgets_nothing(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "scope.duckdb"
    with open_memory(db) as m:
        for user in ("alice", "bob"):  # two users with the same fact
            view = m.scoped(user_id=user, agent_id="helper")
            view.remember_sync(ACME)
            view.core.set_block("human", f"{user} prefers short answers")
    with open_memory(db) as m:
        def disk_full(*_: Any) -> int:
            raise umi.StorageError("disk full (injected)")

        monkeypatch.setattr(type(m.storage), "forget_core", disk_full)
        with pytest.raises(umi.StorageError, match="disk full"):
            m.forget_scope_sync(user_id="alice")
        monkeypatch.undo()
        alice = m.scoped(user_id="alice", agent_id="helper")
        assert current(alice) == [ACME] and alice.count_sync() == 2  # was: her facts gone, her core kept
        assert alice.core.get_block("human") == "alice prefers short answers"
    with open_memory(db) as m:
        alice, bob = m.scoped(user_id="alice", agent_id="helper"), m.scoped(user_id="bob", agent_id="helper")
        assert current(alice) == [ACME] and alice.core.get_block("human") == "alice prefers short answers"
        assert m.forget_scope_sync(user_id="alice") == 2
        assert current(alice) == [] and alice.core.labels() == [] and alice.core_history_sync() == []
        assert current(bob) == [ACME] and bob.core.get_block("human") == "bob prefers short answers"
    with open_memory(db) as m:
        assert m.scoped(user_id="alice", agent_id="helper").core.labels() == []
        assert current(m.scoped(user_id="bob")) == [ACME] and m.count_sync() == 2


def test_a_call_cancelled_while_it_waits_for_the_write_lock_leaves_no_unawaited_coroutine(
        held: tuple[umi.Memory, Gate], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, gate = held

    async def story() -> None:
        holder = await gate.remember_held(m, ACME)
        waiters = [asyncio.ensure_future(c) for c in (m.compact(), m.forget(where=umi.SearchFilters()),
                                                      m.export(str(tmp_path / "out.jsonl")))]
        await asyncio.sleep(0.2)  # let them reach the lock
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        gate.release.set()
        await holder

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        asyncio.run(story())
        gc.collect()
    assert [str(w.message) for w in seen if "never awaited" in str(w.message)] == []
    monkeypatch.undo()
    assert current(m) == [ACME] and m.count_sync() == 2


# --- as_of at the end of time ----------------------------------------------------------------------------
@pytest.mark.parametrize("as_of", [2**63 - 1, 2**63, 10**20], ids=["int64-max", "past-int64", "far"])
def test_a_filter_as_of_the_end_of_time_counts_the_current_facts(tmp_path: Path, as_of: int) -> None:
    db = tmp_path / "end.duckdb"
    with open_memory(db) as m:
        m.remember_sync(ACME)
        m.remember_sync(INITECH)
        assert m.count_sync(include_superseded=False) == 2
        # the cache's mask read an unset valid_to (kept as int64 max) as ending at that instant: 0
        assert m.count_sync(umi.SearchFilters(as_of=as_of)) == 2
        assert m.forget_sync(where=umi.SearchFilters(as_of=as_of)) == 2
        assert current(m) == [ACME] and m.count_sync() == 2  # what only Initech superseded is current again


# --- stories that hold (regression guards for the promises above) ----------------------------------------
def test_story_remember_supersede_restate_forget_remember_again_compact_reopen(tmp_path: Path) -> None:
    db = tmp_path / "life.duckdb"
    with open_memory(db) as m:
        acme = m.remember_sync(ACME).entities
    with open_memory(db) as m:
        initech = m.remember_sync(INITECH).entities
        assert current(m) == [INITECH] and m.count_sync() == 4 and m.count_sync(include_superseded=False) == 2
    with open_memory(db) as m:  # restating revives Acme and retires Initech
        assert sorted(e.id for e in m.remember_sync(ACME).entities) == sorted(e.id for e in acme)
        assert current(m) == [ACME]
        assert [h.op for h in m.history_sync(acme[0].id)] == ["create", "supersede", "revive"]
    with open_memory(db) as m:
        assert m.forget_sync(acme[0].id) is True  # the statement: both facets
        assert all(m.get_sync(e.id) is None for e in acme)
        assert current(m) == [INITECH]  # what only Acme had retired is current again
        assert all(h.snapshot == {"id": acme[0].id, "forgotten": True} for h in m.history_sync(acme[0].id))
        out = io.StringIO()
        m.export_sync(out)
        assert "Acme" not in out.getvalue()
    with open_memory(db) as m:  # told again after forget: a new fact, with a new history
        again = m.remember_sync(ACME)
        assert not again.duplicate and again.entity_count == 2
        assert [h.op for h in m.history_sync(acme[0].id)][-1] == "create"
        assert m.forget_source_sync(again.source_id) == 2 and m.forget_sync(initech[0].id) is True
        assert m.compact_sync() is True
    with open_memory(db) as m:
        assert m.count_sync() == 0 and current(m) == []
    for f in tmp_path.iterdir():
        data = f.read_bytes()
        assert b"Acme" not in data and b"Initech" not in data, f.name


def test_story_two_users_same_fact_forget_one_scope_export_import_the_other(tmp_path: Path) -> None:
    db = tmp_path / "users.duckdb"
    with open_memory(db) as m:
        for user in ("alice", "bob"):
            view = m.scoped(user_id=user)
            view.remember_sync(ACME)
            view.remember_sync(INITECH)
            view.core.set_block("human", f"{user}'s notes")
    backup = tmp_path / "bob.jsonl"
    with open_memory(db) as m:
        assert m.forget_scope_sync(user_id="alice") == 4
        alice, bob = m.scoped(user_id="alice"), m.scoped(user_id="bob")
        assert current(alice) == [] and alice.count_sync() == 0 and alice.core.labels() == []
        assert current(bob) == [INITECH] and bob.count_sync() == 4 and bob.core.get_block("human") == "bob's notes"
        assert bob.export_sync(backup) > 0
        with pytest.raises(umi.InvalidScopeError):
            alice.forget_scope_sync(user_id="bob")  # a view never reaches out of its scope
    with open_memory(db) as m:
        assert m.forget_scope_sync(user_id="bob") == 4 and m.count_sync() == 0
        with pytest.raises(umi.ValidationError, match="outside this view's scope"):
            m.scoped(user_id="carol").import_sync(backup)  # bob's records do not go into carol's scope
        assert m.count_sync() == 0
        counts = m.scoped(user_id="bob").import_sync(backup)
        assert counts["entities"] == 4 and counts["relations"] == 2
    with open_memory(db) as m:
        bob = m.scoped(user_id="bob")
        assert current(bob) == [INITECH] and bob.count_sync() == 4
        assert current(m.scoped(user_id="alice")) == []


def test_story_core_blocks_edited_by_two_memories_in_turn_keep_budget_and_order_across_restarts(
        tmp_path: Path) -> None:
    db = tmp_path / "core.duckdb"
    config = umi.MemoryConfig(core_memory_bytes=1024)
    with open_memory(db, agent_id="bot", config=config) as m:
        m.core.set_block("notes", "first")
        m.core.set_block("persona", "A careful assistant.")
    with open_memory(db, agent_id="bot", config=config) as m:
        assert m.core.labels() == ["persona", "notes"]
        m.core.set_block("notes", "second", importance=0.9)  # replaced: keeps its place
        m.core.set_block("extra", "x")
        with pytest.raises(umi.CoreMemoryFullError) as info:
            m.core.set_block("notes", "y" * 1024)
        assert info.value.over_by > 0 and "max_bytes=1024" in str(info.value)
        assert m.core.get_block("notes") == "second"  # as it was
        rendered = m.core.render()
    with open_memory(db, agent_id="bot", config=config) as m:
        assert m.core.render() == rendered and m.core.labels() == ["persona", "notes", "extra"]
        assert m.core.get_importance("notes") == pytest.approx(0.9)
        assert m.scoped(user_id="u1").core.labels() == []  # another core scope
        assert [r.content for r in m.core_history_sync("notes")] == ["first", "second"]
    with open_memory(db, agent_id="other", config=config) as m:
        assert m.core.labels() == []


def test_story_working_memory_entries_expire_by_ttl_on_a_seeded_clock_under_the_byte_budget() -> None:
    config = umi.MemoryConfig(working_memory_bytes=1024, working_memory_ttl=60)
    m = umi.Memory.sim(seed=7, config=config)
    try:
        wm, clock = m.working, m.clock
        wm.set("session", b"abc")
        wm.set("draft", b"x" * 900, ttl_secs=5)
        with pytest.raises(umi.WorkingMemoryFullError) as info:
            wm.set("more", b"y" * 200)
        assert info.value.limit == 1024 and wm.get("session") == b"abc"
        clock.advance(5_000)  # the draft expires: its space is reclaimed before the write
        assert wm.get("draft") is None
        wm.set("more", b"y" * 200)
        assert sorted(wm.keys()) == ["more", "session"] and wm.used_bytes == len("more") + 200 + len("session") + 3
        clock.advance(55_000)  # the default TTL (60 s) of the first entry ends
        assert wm.get("session") is None and wm.get("more") == b"y" * 200
        clock.advance(5_000)
        assert wm.get("more") is None and len(wm) == 0 and wm.used_bytes == 0
        assert m.scoped(user_id="u").working is not wm  # one per view scope
    finally:
        m.close()


def test_story_interleaved_async_calls_on_one_subject_match_a_plain_model(tmp_path: Path) -> None:
    db = tmp_path / "gather.duckdb"
    texts = [f"Zebra note {i} for the Kestrel project." for i in range(12)]
    rng = random.Random(11)
    with open_memory(db) as m:
        async def story() -> set[str]:
            model: set[str] = set()
            for _ in range(6):
                batch = [(rng.choice(["remember", "forget", "recall"]), rng.choice(texts)) for _ in range(10)]
                known = {t: e for t, e in ((h.content, h.id) for h in await m.recall("Zebra", RecallOptions(limit=50)))}

                async def one(op: str, text: str) -> None:
                    if op == "remember":
                        await m.remember(text, RAW)
                    elif op == "forget" and text in known:
                        await m.forget(known[text])
                    else:
                        await m.recall(text)

                await asyncio.gather(*(one(op, t) for op, t in batch))
                # the model: a text is stored when a remember of it ran, unless only forgets of it ran
                for op, t in batch:
                    if op == "remember":
                        model.add(t)
                for op, t in batch:
                    if op == "forget" and t in known and not any(o == "remember" and x == t for o, x in batch):
                        model.discard(t)
                stored = {h.content for h in await m.recall("Zebra", RecallOptions(limit=50))}
                racing = {t for op, t in batch if op == "remember"} & {t for op, t in batch if op == "forget"}
                assert stored - racing == model - racing
                model = (model - racing) | (stored & racing)  # a remember and a forget of one text: either order
            return model

        model = asyncio.run(story())
        assert m.count_sync() == len(model)
    with open_memory(db) as m:
        assert {h.content for h in m.recall_sync("Zebra", RecallOptions(limit=50))} == model


def test_story_close_while_other_threads_call_ends_every_call_and_loses_no_acknowledged_fact(
        tmp_path: Path) -> None:
    db = tmp_path / "close.duckdb"
    m = open_memory(db)
    acked: list[str] = []
    outcomes: list[str] = []
    started = threading.Barrier(5)

    def worker(w: int) -> None:
        started.wait(30)
        for i in range(10_000):
            try:
                if w == 0:
                    m.recall_sync("Kestrel")
                else:
                    r = m.remember_sync(f"Worker {w} note {i} about Kestrel.", RAW)
                    acked.extend(e.id for e in r.entities)
            except umi.MemoryClosedError:
                outcomes.append("closed")
                return
            except umi.OutcomeUnknownError:  # its storage job outlived close()'s grace (5 s): rare
                outcomes.append("unknown")
                return
        outcomes.append("finished")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    started.wait(30)
    while len(acked) < 8 and all(t.is_alive() for t in threads):
        threading.Event().wait(0.01)
    m.close()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and len(outcomes) == 4
    with open_memory(db) as m2:
        assert all(m2.get_sync(i) is not None for i in acked) and m2.count_sync() >= len(acked) >= 8


# --- import checks every line before it writes anything ------------------------------------------------
@pytest.mark.parametrize("text_line", [{"text": "   "}, {"text": "Acme " * 30_000}, {"text": "Bob \ud800 likes tea."},
                                       {"text": "Bob likes tea and cake."}],
                         ids=["empty", "too-long", "lone-surrogate", "over-the-config-limit"])
def test_an_import_whose_text_line_cannot_be_remembered_imports_nothing(tmp_path: Path,
                                                                        text_line: dict[str, str]) -> None:
    with open_memory(tmp_path / "from.duckdb") as m:
        m.remember_sync(ACME)
        backup = io.StringIO()
        m.export_sync(backup)
    lines = [*backup.getvalue().splitlines(), json.dumps(text_line)]
    config = umi.MemoryConfig(text_bytes_max=20) if "cake" in text_line["text"] else None
    with open_memory(tmp_path / "to.duckdb", config=config) as m:
        with pytest.raises(umi.ValidationError, match=f"<input>:{len(lines)}: text to remember"):
            m.import_sync(lines)  # was: the records imported, then the text refused
        assert m.count_sync() == 0 and current(m) == []
        assert m.import_sync(lines[:-1])["entities"] == 2  # the same records alone go in
