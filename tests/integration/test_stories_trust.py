"""User stories, stop 21 (trust): the Memory tells the truth after forget, after close, and when
an option is wrong.

* Forgetting a fact that was itself replaced keeps the chain: what it had superseded stays
  superseded (was: revived beside the fact that replaced it — two current facts).
* close() returns though a storage job hangs, and a call whose job was running is told that its
  outcome is unknown (was: close() waited for the job forever, and the call was told
  MemoryClosedError as if nothing happened).
* A NaN metadata value is named as such (was: the error spoke of filters).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

import umi
from umi import RecallOptions
from umi.storage.sim import SimStorageBackend
from test_stories_r7 import ACME, INITECH, WHERE, Gate, held, open_memory  # noqa: F401 - held: a fixture

GLOBEX = "Alice works at Globex."


def current(m: umi.Memory) -> list[str]:
    return sorted(h.content for h in m.recall_sync(WHERE, RecallOptions(limit=10)))


def sim_memory() -> umi.Memory:
    return umi.Memory._from_parts(storage=SimStorageBackend(seed=1), llm=None, embedder=umi.SimEmbeddingProvider(seed=1))


# --- 1. forget keeps one current fact ----------------------------------------------------------------
@pytest.mark.parametrize("store", ["duckdb", "sim"])
@pytest.mark.parametrize("how", ["update", "remember"])
def test_forgetting_a_restated_fact_that_was_corrected_since_leaves_one_current_fact(
        tmp_path: Path, store: str, how: str) -> None:
    m = open_memory(tmp_path / "f.duckdb") if store == "duckdb" else sim_memory()
    with m:
        acme = m.remember_sync(ACME).entities
        initech = m.remember_sync(INITECH).entities
        m.remember_sync(ACME)  # restated: Acme current again, Initech retired
        assert current(m) == [ACME]
        if how == "update":
            globex = m.update_sync(acme[0].id, GLOBEX).entities
        else:
            globex = m.remember_sync("Alice now works at Globex.").entities
        assert len(current(m)) == 1
        g = current(m)[0]
        assert m.forget_sync(acme[0].id) is True
        # was: Initech revived (only Acme had retired it) beside Globex, two current facts
        assert current(m) == [g]
        assert m.count_sync(include_superseded=False) == len(globex)
        # the chain is kept: Initech -> Globex, a superseding relation
        rels = m.relations_sync(initech[0].id)
        assert any(r.source_id == initech[0].id and r.target_id in {e.id for e in globex}
                   and r.evolution_type.supersedes for r in rels), rels
        assert [h.op for h in m.history_sync(initech[0].id)] == ["create", "supersede"]  # never revived
        # forgetting Globex now: Initech is current again
        assert m.forget_sync(globex[0].id) is True
        assert current(m) == [INITECH]
        # and telling Acme again is an ordinary new fact: as in a memory that only ever heard Initech
        again = m.remember_sync(ACME)
        with sim_memory() as fresh:
            fresh.remember_sync(INITECH)
            fresh.remember_sync(ACME)
            assert again.entity_count == 2 and not again.duplicate and current(m) == current(fresh)
            assert m.count_sync(include_superseded=False) == fresh.count_sync(include_superseded=False)


@pytest.mark.parametrize("how", ["forget_source", "forget_where"])
def test_forget_source_and_forget_where_follow_the_same_chain_rule(tmp_path: Path, how: str) -> None:
    with open_memory(tmp_path / "s.duckdb") as m:
        acme = m.remember_sync(ACME)
        initech = m.remember_sync(INITECH).entities
        m.remember_sync(ACME)
        m.remember_sync("Alice now works at Globex.")
        assert acme.source_id is not None
        if how == "forget_source":
            assert m.forget_source_sync(acme.source_id) == 2
        else:
            where = umi.SearchFilters(source_id=acme.source_id, include_superseded=True)
            assert m.forget_sync(where=where) == 2
        assert current(m) == ["Alice now works at Globex."]
        assert m.get_sync(initech[0].id).valid_to is not None


def _current_id(m: umi.Memory, text: str) -> str:
    return next(h.id for h in m.recall_sync(WHERE, RecallOptions(limit=10)) if h.content == text)


def test_forgetting_the_current_fact_brings_back_the_one_current_just_before_it_and_only_it() -> None:
    """Found by the state machine (tests/unit/test_forget_chain_model.py). Was: both the
    correction of Acme (retired when Initech was told) and the correction of Initech (retired when
    Initech was told again) came back."""
    with sim_memory() as m:
        m.remember_sync("Alice now works at Acme.")
        m.update_sync(_current_id(m, "Alice now works at Acme."), "Alice works at Acme now, corrected.")
        m.remember_sync(INITECH)
        m.update_sync(_current_id(m, INITECH), "Alice works at Initech now, corrected.")
        m.remember_sync(INITECH)  # told again: the correction is retired
        assert current(m) == [INITECH]
        assert m.forget_sync(_current_id(m, INITECH)) is True
        assert current(m) == ["Alice works at Initech now, corrected."]


def test_a_relation_left_from_an_earlier_turn_does_not_keep_the_fact_before_superseded() -> None:
    """Found by the state machine. Was: no current fact at all (Globex kept superseded by its old
    relation to its first correction, itself superseded)."""
    with sim_memory() as m:
        m.remember_sync(GLOBEX)
        m.update_sync(_current_id(m, GLOBEX), "Alice works at Acme now, corrected.")
        m.remember_sync(GLOBEX)  # told again: the correction is retired
        m.update_sync(_current_id(m, GLOBEX), "Alice works at Initech now, corrected.")
        assert m.forget_sync(_current_id(m, "Alice works at Initech now, corrected.")) is True
        assert current(m) == [GLOBEX]


# --- 2. close() is bounded, and a call whose storage job runs on is told so ---------------------------
def test_close_returns_though_a_storage_job_hangs_and_tells_its_call_the_outcome_is_unknown(
        held: tuple[umi.Memory, Gate], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m, gate = held
    m._runner.grace_secs = 0.05
    store_cls = type(m.storage)
    store_closed = threading.Event()
    close_store = store_cls.close

    def closing(store: Any) -> None:
        close_store(store)
        store_closed.set()

    monkeypatch.setattr(store_cls, "close", closing)
    outcome: list[object] = []

    def caller() -> None:
        try:
            outcome.append(m.remember_sync(ACME))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    assert gate.entered.wait(30)  # the remember's plan-and-commit job is running, held
    m.close()  # was: waited for the job without end (here: until the gate's 30 s safety ran out)
    assert not gate.left.is_set() and not store_closed.is_set()  # returned; the store stays open under the job
    t.join(30)
    [err] = outcome
    # was: MemoryClosedError, as if nothing had happened, though the job ran on and committed
    assert isinstance(err, umi.OutcomeUnknownError) and not isinstance(err, umi.MemoryClosedError), err
    assert isinstance(err, umi.UmiError) and err.grace_secs == 0.05
    assert "may have committed" in str(err) and "0.05 s" in str(err)
    with pytest.raises(umi.MemoryClosedError):
        m.remember_sync(INITECH)
    gate.release.set()  # the job ends, commits, and the store is closed after it
    assert store_closed.wait(30)
    monkeypatch.undo()
    with open_memory(tmp_path / "held.duckdb") as again:
        assert current(again) == [ACME]  # the outcome the call could not be told: committed


# --- 3. a wrong metadata value is named as such ------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_a_non_finite_metadata_value_is_named_as_metadata_and_its_key(bad: float) -> None:
    with pytest.raises(umi.InvalidMetadataError) as caught:
        umi.RememberOptions(metadata={"ok": 1.5, "score": bad})
    msg = str(caught.value)
    assert "RememberOptions.metadata['score']" in msg and "finite" in msg and "filter" not in msg  # was: a filter error
    assert type(caught.value).__name__ == "InvalidMetadataError"
    # the same rule, other callers: the builder, an entity, and a filter (which says filter)
    with pytest.raises(umi.InvalidMetadataError, match=r"RememberOptions\.metadata\['score'\]"):
        umi.RememberOptions().with_metadata({"score": bad})
    with pytest.raises(umi.InvalidMetadataError, match=r"metadata\['score'\] must be finite"):
        umi.Entity(entity_type="person", name="Alice", content="Alice works at Acme", metadata={"score": bad})
    with pytest.raises(umi.InvalidFilterError, match=r"metadata filter\['score'\] must be finite") as f:
        umi.SearchFilters(metadata={"score": bad})
    assert not isinstance(f.value, umi.InvalidMetadataError)
    # still what it was before it had a type of its own
    assert issubclass(umi.InvalidMetadataError, umi.InvalidFilterError)
    assert issubclass(umi.InvalidMetadataError, umi.ValidationError) and umi.errors.InvalidMetadataError is umi.InvalidMetadataError


# --- adversary (stop 21): forgetting several facts of one chain at once --------------------------------
@pytest.mark.parametrize("store", ["duckdb", "sim"])
def test_forgetting_every_other_fact_of_a_chain_at_once_leaves_one_current_fact(tmp_path: Path, store: str) -> None:
    """Acme, Initech, Globex, Umbrella told in turn (each replacing the last); forget(where=...)
    of Initech and Umbrella in one call: Globex, current just before Umbrella, is the one current
    fact (Acme stays superseded, re-linked to Globex). Was: Acme revived too (its chain ran
    through Globex, superseded until this call revives it): two current facts; with 200 facts,
    every other one forgotten, 100 current facts."""
    m = open_memory(tmp_path / "c.duckdb") if store == "duckdb" else sim_memory()
    with m:
        told = [m.remember_sync(f"Alice now works at {c}.", umi.RememberOptions(metadata={"odd": i % 2 == 1}))
                for i, c in enumerate(["Acme", "Initech", "Globex", "Umbrella"])]
        assert m.forget_sync(where=umi.SearchFilters(metadata={"odd": True}, include_superseded=True)) == 4
        assert current(m) == ["Alice now works at Globex."]
        acme = told[0].entities[0].id
        assert m.get_sync(acme).valid_to is not None
        globex = {e.id for e in told[2].entities}
        assert any(r.source_id == acme and r.target_id in globex and r.evolution_type.supersedes
                   for r in m.relations_sync(acme))
        # and the chain is whole: forgetting Globex now brings back Acme
        assert m.forget_sync(told[2].entities[0].id) is True
        assert current(m) == ["Alice now works at Acme."]
