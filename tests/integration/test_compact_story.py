"""A user's story on the embedded default: forget something that must leave no trace, compact,
and find it gone from every file on disk — with everything else as it was, across a reopen."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pytest

import umi
from umi.cli import main as cli_main
from umi.providers.sim import SimEmbeddingProvider
from umi.storage import duckdb as umi_duckdb

MARK = "xylophonic7731"
SECRET = f"Zelda's door code is {MARK} and she lives in Oslo."


def _marks(directory: Path) -> int:
    return sum(p.read_bytes().count(MARK.encode()) for p in directory.rglob("*") if p.is_file())


def _memory(path: Path) -> umi.Memory:
    return umi.Memory(str(path), embedder=SimEmbeddingProvider(dim=32, seed=3))


def _export(m: umi.Memory) -> list[str]:
    import io

    out = io.StringIO()
    m.export_sync(out)
    return sorted(out.getvalue().splitlines())


def test_forget_then_compact_leaves_no_trace_on_disk_and_keeps_the_rest(tmp_path: Path) -> None:
    db = tmp_path / "agent.duckdb"
    with _memory(db) as m:
        secret = m.remember_sync(SECRET)
        for i in range(20):
            m.remember_sync(f"Person{i} works on project Apollo{i} in Berlin.")
        m.storage.checkpoint()  # what a long-running agent's file looks like: the text is in it
        assert _marks(tmp_path) > 0
        assert m.forget_source_sync(secret.source_id) == len(secret.entities)
        assert all(MARK not in h.content for h in m.recall_sync(MARK))
        assert _marks(tmp_path) > 0  # forgotten from every read, still on disk
        kept = _export(m)
        assert m.compact_sync() is True
        assert _marks(tmp_path) == 0
        assert _export(m) == kept
        # the store goes on as before: reads, writes, the same text told again
        hits = m.recall_sync("Who works on Apollo3?")
        assert hits and "Apollo3" in hits[0].content
        again = m.remember_sync(SECRET)
        assert not again.duplicate and len(again.entities) == len(secret.entities)
        assert m.forget_source_sync(again.source_id) == len(again.entities)
        assert m.compact_sync() is True
        count, kept = m.count_sync(), _export(m)  # (the history now holds the second forget's tombstones)
    assert _marks(tmp_path) == 0  # close saves the caches: no trace there either
    with _memory(db) as m:
        assert m.storage.index_load_status == "loaded"  # the caches saved by compact fit the new file
        assert m.count_sync() == count and _export(m) == kept
        hits = m.recall_sync("Who works on Apollo3?")
        assert hits and "Apollo3" in hits[0].content


def test_a_failed_compact_leaves_the_store_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "agent.duckdb"
    with _memory(db) as m:
        m.remember_sync("Ana sails in Lisbon.")
        before = _export(m)

        def copy_fails(con: object, path: str) -> None:
            Path(path).write_bytes(b"half a file")
            raise duckdb.IOException("disk full")

        monkeypatch.setattr(umi_duckdb, "copy_database", copy_fails)
        with pytest.raises(umi.StorageError, match="disk full.*|unchanged"):
            m.compact_sync()
        assert not Path(str(db) + umi_duckdb.COMPACT_SUFFIX).exists()
        monkeypatch.undo()

        real_replace = os.replace

        def replace_fails(src: str, dst: str) -> None:
            if str(dst) == str(db):
                raise PermissionError("read-only directory")
            real_replace(src, dst)

        monkeypatch.setattr(umi_duckdb.os, "replace", replace_fails)
        with pytest.raises(umi.StorageError, match="unchanged"):
            m.compact_sync()
        monkeypatch.undo()
        assert _export(m) == before
        n = m.count_sync()
        m.remember_sync("Ben rows in Porto.")  # the store takes writes after both failures
        assert m.count_sync() > n
    with _memory(db) as m:
        assert any("Porto" in line for line in _export(m))


def test_a_compact_cut_short_leaves_a_temp_file_the_next_open_removes(tmp_path: Path) -> None:
    db = tmp_path / "agent.duckdb"
    with _memory(db) as m:
        m.remember_sync("Ana sails in Lisbon.")
    stale = Path(str(db) + umi_duckdb.COMPACT_SUFFIX)
    stale.write_bytes(f"a copy with {MARK} cut short by a crash".encode())
    with _memory(db) as m:
        assert not stale.exists()
        assert m.count_sync() >= 1


def test_memory_compact_of_a_store_in_memory_is_false_and_read_only_is_refused(tmp_path: Path) -> None:
    with umi.Memory.sim(seed=1) as m:
        m.remember_sync("Ana sails in Lisbon.")
        assert m.compact_sync() is False
    db = tmp_path / "agent.duckdb"
    with _memory(db) as m:
        m.remember_sync("Ana sails in Lisbon.")
    ro = umi.Memory(str(db), embedder=SimEmbeddingProvider(dim=32, seed=3),
                    storage=umi_duckdb.DuckDBStorageBackend.connect(db, read_only=True))
    with ro:
        with pytest.raises(umi.StorageError, match="read_only"):
            ro.compact_sync()


def test_the_compact_command_rewrites_the_file(tmp_path: Path) -> None:
    import io

    db = tmp_path / "agent.duckdb"
    with umi.Memory(str(db)) as m:  # the command opens the file as umi.Memory(path) does
        r = m.remember_sync(SECRET)
        m.storage.checkpoint()
        m.forget_source_sync(r.source_id)
    assert _marks(tmp_path) > 0
    out = io.StringIO()
    assert cli_main(["compact", "--db", str(db)], out) == 0
    assert out.getvalue().startswith(f"compacted {db}: ")
    assert _marks(tmp_path) == 0
