"""Backups (stop 21): an export carries the core blocks, and import refuses keys the format does
not define."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import umi
from umi.pipeline import transfer

RAW = umi.RememberOptions().without_extraction()


def open_memory(db: Path, **kw: Any) -> umi.Memory:
    return umi.Memory(db, embedder=umi.SimEmbeddingProvider(seed=1), **kw)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def core_state(m: umi.Memory, **scope: Any) -> list[tuple[str, str, float]]:
    return m.scoped(**scope).core.blocks() if scope else m.core.blocks()


def facts(m: umi.Memory) -> list[tuple[str, str, Any]]:
    return sorted((e.id, e.content, e.scope) for e in m.storage.iter_all())


# --- 1. core memory in a backup -----------------------------------------------------------------

def test_story_core_blocks_and_facts_survive_export_to_a_fresh_store_and_a_reopen(tmp_path: Path) -> None:
    src, dst, backup = tmp_path / "a.duckdb", tmp_path / "b.duckdb", tmp_path / "backup.jsonl"
    with open_memory(src) as m:
        m.core.set_block("system", "Answer briefly.", importance=0.8)
        alice = m.scoped(user_id="alice", agent_id="bot")
        alice.core.set_block("notes", "likes tea")
        alice.core.set_block("human", "Alice, a beekeeper.", importance=0.9)
        alice.core.set_block("notes", "likes green tea")  # replaced: keeps its place
        m.scoped(user_id="bob").core.set_block("human", "Bob & <co>")
        alice.remember_sync("Alice keeps bees in Lyon.")
        m.scoped(user_id="bob").remember_sync("Bob works at Acme Corp.", RAW)
        before = {"": core_state(m), "alice": core_state(m, user_id="alice", agent_id="bot"),
                  "bob": core_state(m, user_id="bob")}
        before_facts = facts(m)
        m.export_sync(backup)
    assert transfer.FORMAT_VERSION == 3 and lines(backup)[0]["version"] == 3
    core = [r for r in lines(backup) if r["kind"] == "core"]
    assert {(json.dumps(r["scope"], sort_keys=True), r["label"]) for r in core} == {
        ("null", "system"), (json.dumps({"agent_id": "bot", "session_id": None, "user_id": "alice"}, sort_keys=True),
                             "human"),
        (json.dumps({"agent_id": "bot", "session_id": None, "user_id": "alice"}, sort_keys=True), "notes"),
        (json.dumps({"agent_id": None, "session_id": None, "user_id": "bob"}, sort_keys=True), "human")}
    with open_memory(dst) as m:
        loaded = m.scoped(user_id="alice", agent_id="bot").core  # loaded before the import: it sees it too
        counts = m.import_sync(backup)
        assert counts["core"] == 4
        assert loaded.blocks() == before["alice"]
    with open_memory(dst) as m:
        assert core_state(m) == before[""]
        assert core_state(m, user_id="alice", agent_id="bot") == before["alice"]
        assert core_state(m, user_id="bob") == before["bob"]
        assert facts(m) == before_facts
        assert [h.content for h in m.scoped(user_id="alice").recall_sync("Who keeps bees?")][:1] == [
            "Alice keeps bees in Lyon."]


def test_a_scoped_view_exports_only_the_core_blocks_of_its_scope(tmp_path: Path) -> None:
    backup = tmp_path / "alice.jsonl"
    with open_memory(tmp_path / "a.duckdb") as m:
        m.core.set_block("system", "global")
        m.scoped(user_id="alice", agent_id="bot").core.set_block("notes", "alice's")
        m.scoped(user_id="bob", agent_id="bot").core.set_block("notes", "bob's")
        m.scoped(user_id="alice").export_sync(backup)
    core = [r for r in lines(backup) if r["kind"] == "core"]
    assert [(r["scope"]["user_id"], r["label"], r["content"]) for r in core] == [("alice", "notes", "alice's")]
    with open_memory(tmp_path / "b.duckdb") as m:
        with pytest.raises(umi.ValidationError, match="outside this view's scope"):
            m.scoped(user_id="carol").import_sync(backup)
        assert m.scoped(user_id="alice", agent_id="bot").core.labels() == []
        m.scoped(user_id="alice").import_sync(backup)
        assert m.scoped(user_id="alice", agent_id="bot").core.get_block("notes") == "alice's"


V2 = [
    {"kind": "header", "format": "umi-export", "version": 2, "embedder": None, "dim": None, "scope": None},
    {"kind": "source", "id": "src-1", "text_hash": "a4d3d90e9375772118ae883cf7fc859585aa05d8120255877891afc4d9dc5647", "text": "Alice keeps bees.", "created_at": 1000,
     "metadata": {}, "scope": None},
    {"kind": "entity", "id": "ent-1", "entity_type": "person", "name": "Alice", "content": "Alice keeps bees.",
     "metadata": {}, "importance": 0.5, "confidence": 1.0, "created_at": 1000, "updated_at": 1000,
     "event_time": None, "valid_from": None, "valid_to": None, "source_id": "src-1", "scope": None},
    {"kind": "history", "entity_id": "ent-1", "seq": 1, "op": "create", "at": 1000,
     "snapshot": {"content": "Alice keeps bees."}, "scope": None},
]


def test_a_version_2_file_still_imports(tmp_path: Path) -> None:
    path = tmp_path / "v2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in V2), encoding="utf-8")
    with open_memory(tmp_path / "a.duckdb") as m:
        counts = m.import_sync(path)
        assert (counts["entities"], counts["sources"], counts["history"], counts["core"]) == (1, 1, 1, 0)
        assert m.get_sync("ent-1").content == "Alice keeps bees."
        assert m.core.labels() == []


def test_a_core_block_over_the_budget_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    config = umi.MemoryConfig(core_memory_bytes=1024)
    path = tmp_path / "big.jsonl"
    with open_memory(tmp_path / "a.duckdb") as m:  # the default budget (32 KiB)
        m.core.set_block("notes", "n" * 600)
        m.core.set_block("persona", "p" * 600)
        m.remember_sync("Alice keeps bees in Lyon.", RAW)
        m.export_sync(path)
    with open_memory(tmp_path / "b.duckdb", config=config) as m:
        m.core.set_block("human", "kept")
        with pytest.raises(umi.CoreMemoryFullError, match="max_bytes=1024|1024") as info:
            m.import_sync(path)
        assert info.value.limit == 1024 and info.value.over_by > 0
        assert m.count_sync() == 0 and m.core.blocks() == [("human", "kept", 0.5)]
    with open_memory(tmp_path / "b.duckdb", config=config) as m:
        assert m.count_sync() == 0 and m.core.blocks() == [("human", "kept", 0.5)]


@pytest.mark.parametrize("record, match", [
    ({"kind": "core", "scope": None, "label": "bad label!", "content": "x", "importance": 0.5}, "label"),
    ({"kind": "core", "scope": None, "label": "notes", "content": 3, "importance": 0.5}, "content"),
    # adversary pass: was refused later, naming no file or line ("content is not encodable as UTF-8")
    ({"kind": "core", "scope": None, "label": "notes", "content": "a\ud800b", "importance": 0.5},
     r"'content'.*lone surrogate"),
    ({"kind": "core", "scope": {"user_id": "a", "agent_id": None, "session_id": "s"}, "label": "notes",
      "content": "x", "importance": 0.5}, "session"),
])
def test_a_bad_core_record_names_its_line_and_nothing_is_written(tmp_path: Path, record: dict[str, Any],
                                                                  match: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = {"kind": "core", "scope": None, "label": "persona", "content": "fine", "importance": 0.5}
    path.write_text(json.dumps(V2[0] | {"version": 3}) + "\n" + json.dumps(good) + "\n" + json.dumps(record) + "\n",
                    encoding="utf-8")
    with open_memory(tmp_path / "a.duckdb") as m:
        with pytest.raises(umi.ValidationError, match=rf"bad.jsonl:3: .*{match}"):
            m.import_sync(path)
        assert m.core.labels() == []


def test_a_failing_write_half_way_through_the_import_leaves_core_and_facts_as_they_were(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "backup.jsonl"
    with open_memory(tmp_path / "a.duckdb") as m:
        m.core.set_block("notes", "from the backup")
        m.core.set_block("persona", "careful")
        m.remember_sync("Alice keeps bees in Lyon.", RAW)
        m.export_sync(path)
    with open_memory(tmp_path / "b.duckdb") as m:
        m.core.set_block("notes", "mine")
        store = type(m.storage)
        real = store.set_core_block
        calls = []

        def failing(self: Any, *a: Any, **kw: Any) -> Any:
            calls.append(a)
            if len(calls) == 2:
                raise umi.StorageError("disk on fire")
            return real(self, *a, **kw)

        monkeypatch.setattr(store, "set_core_block", failing)
        with pytest.raises(umi.StorageError, match="disk on fire"):
            m.import_sync(path)
        monkeypatch.undo()
        assert len(calls) == 2  # the first block was written, in the transaction that rolled back
        assert m.count_sync() == 0 and m.core.blocks() == [("notes", "mine", 0.5)]
    with open_memory(tmp_path / "b.duckdb") as m:
        assert m.count_sync() == 0 and m.core.blocks() == [("notes", "mine", 0.5)]


# --- 2. keys the format does not define ------------------------------------------------------------

@pytest.mark.parametrize("record, key, kind", [
    ({"text": "Alice keeps bees.", "metdata": {"a": 1}}, "metdata", "text"),
    ({"kind": "text", "text": "Alice keeps bees.", "event_tme": 5}, "event_tme", "text"),
    ({"kind": "core", "scope": None, "label": "notes", "content": "x", "importance": 0.5, "limit": 9}, "limit",
     "core"),
    (V2[1] | {"extra": 1}, "extra", "source"),
    (V2[2] | {"embeding": [0.1]}, "embeding", "entity"),
    (V2[3] | {"when": 1}, "when", "history"),
    (V2[0] | {"verison": 3}, "verison", "header"),
])
def test_a_record_with_a_key_the_format_does_not_define_is_refused_naming_key_line_and_allowed(
        tmp_path: Path, record: dict[str, Any], key: str, kind: str) -> None:
    path = tmp_path / "in.jsonl"
    first = {"text": "Bob works at Acme Corp."}
    path.write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with open_memory(tmp_path / "a.duckdb") as m:
        with pytest.raises(umi.ValidationError) as info:
            m.import_sync(path)
        msg = str(info.value)
        assert "in.jsonl:2:" in msg and repr(key) in msg and f"a {kind} record" in msg
        for allowed in sorted(transfer.KEYS[kind]):
            assert repr(allowed) in msg.partition("allowed")[2]
        assert m.count_sync() == 0 and m.core.labels() == []


def test_every_key_an_export_writes_is_one_the_format_defines_and_it_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "all.jsonl"
    with open_memory(tmp_path / "a.duckdb") as m:
        m.core.set_block("notes", "n")
        m.remember_sync("Alice works at Acme Corp.")
        m.remember_sync("Alice now works at Initech.")
        m.remember_sync("Alice keeps bees in Lyon. " * 40, umi.RememberOptions(metadata={"k": "v"}, event_time=5))
        for embeddings in (False, True):
            m.export_sync(path, embeddings=embeddings)
            recs = lines(path)
            assert {r["kind"] for r in recs} == {"header", "source", "entity", "relation", "history", "core"}
            for r in recs:
                assert set(r) <= transfer.KEYS[r["kind"]], r["kind"]
            with open_memory(tmp_path / f"b{embeddings}.duckdb") as other:
                other.import_sync(path)
                assert facts(other) == facts(m) and other.core.blocks() == m.core.blocks()



def test_import_into_a_scope_whose_stored_blocks_outgrew_the_budget_is_refused_whole(tmp_path: Path) -> None:
    """A store written under a larger core budget, opened with a smaller one: importing a block of
    a scope no view has opened names that scope and the budget (as opening it would), and writes
    nothing — it was a bare CoreMemoryFullError with no scope and no line."""
    db, backup = tmp_path / "m.duckdb", tmp_path / "backup.jsonl"
    with open_memory(db, config=umi.MemoryConfig(core_memory_bytes=8192)) as m:
        m.scoped(user_id="bea").core.set_block("human", "x" * 3000)
        m.scoped(user_id="bea").core.set_block("persona", "kind")
        m.remember_sync("A fact to export.", umi.RememberOptions(extract_entities=False))
        m.export_sync(backup)
    with open_memory(db, config=umi.MemoryConfig(core_memory_bytes=2048)) as m:
        before = facts(m)
        with pytest.raises(umi.InvalidConfigError, match="core_memory_bytes=2048.*nothing was imported"):
            m.import_sync(backup)
        assert facts(m) == before
    with open_memory(db, config=umi.MemoryConfig(core_memory_bytes=8192)) as m:
        assert [b[0] for b in core_state(m, user_id="bea")] == ["persona", "human"]
