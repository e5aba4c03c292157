"""User story (stop 23, trust): forget_scope on a reopened store reads only what it needs.

``forget_scope`` drops the scope's stored texts that no fact comes from. On a reopened DuckDB
store (sources read on demand) it listed them with ``iter_sources(scope)``, which reads every
source of every scope into the cache first (60k sources: 1.35 s), to keep a handful. It now asks
the store for the scope's lone sources (``StorageBackend.lone_source_ids``: one durable query on
a lazily read store). Counted here: the source rows read from the durable store, and the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import umi
from umi.storage.base import SearchFilters, Source
from umi.storage.duckdb import DuckDBStorageBackend
from umi.storage.sim import SimStorageBackend
from umi.types import Entity, Scope

T0 = 1_700_000_000_000
BOB_FACTS = 300
ALICE = Scope(user_id="alice")
BOB = Scope(user_id="bob")


def _fill(store: Any) -> dict[str, str]:
    """Bob: many facts, each from its own text, and a text no fact comes from. Alice: three facts
    from two texts, and two texts no fact comes from. Returns names -> source ids."""
    rng = np.random.default_rng(5)
    ids: dict[str, str] = {}
    ents = []
    for i in range(BOB_FACTS):
        src = Source.for_text(f"Bob's note {i}.", T0 + i, scope=BOB)
        store.add_source(src)
        ents.append(Entity("person", "Bob", f"Bob's note {i}.", embedding=rng.standard_normal(8).astype(np.float32),
                           created_at=T0 + i, source_id=src.id, scope=BOB))
    for name, scope in (("bob lone", BOB), ("alice lone 1", ALICE), ("alice lone 2", ALICE),
                        ("alice told 1", ALICE), ("alice told 2", ALICE)):
        src = Source.for_text(f"{name}: a text.", T0 + 1_000 + len(ids), scope=scope)
        store.add_source(src)
        ids[name] = src.id
    for i, told in enumerate(("alice told 1", "alice told 1", "alice told 2")):
        ents.append(Entity("person", "Alice", f"Alice fact {i}.", embedding=rng.standard_normal(8).astype(np.float32),
                           created_at=T0 + 2_000 + i, source_id=ids[told], scope=ALICE))
    store.upsert(ents)
    return ids


def _left(store: Any) -> tuple[list[str], int, list[str]]:
    every = SearchFilters(include_superseded=True)
    return (sorted(s.id for s in store.iter_sources()), store.count(every),
            sorted({e.scope.user_id or "" for e in store.list(every, limit=1000)}))


class _Counting:
    """Counts the source rows the durable store returns (load_sources, lone sources)."""

    def __init__(self, durable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        self.every = 0  # reads of every source
        for name in ("load_sources", "load_lone_sources"):
            real = getattr(durable, name, None)
            if real is not None:
                monkeypatch.setattr(durable, name, self._wrap(real, name))

    def _wrap(self, real: Any, name: str) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            got = real(*args, **kwargs)
            self.rows += len(got)
            self.every += name == "load_sources" and not any(args) and not any(kwargs.values())
            return got
        return counted


def test_forget_scope_of_a_reopened_store_reads_only_the_scopes_lone_sources(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Alice asks to be forgotten on a store Bob shares (300 texts of his). Her facts, her two
    texts with facts and her two texts without go; Bob's 301 texts stay. The source rows read
    from the file are hers, not every one (was: all 305, then a scan per text)."""
    path = tmp_path / "s.duckdb"
    with DuckDBStorageBackend.connect(path) as store:
        ids = _fill(store)
    store = DuckDBStorageBackend.connect(path)  # reopened: sources are read on demand
    reads = _Counting(store._durable, monkeypatch)
    m = umi.Memory._from_parts(storage=store, llm=None, embedder=None)
    with m:
        assert m.forget_scope_sync(user_id="alice") == 3
        assert reads.every == 0  # was: 1 (iter_sources read every source of every scope)
        assert reads.rows <= 4  # her texts (was: 305)
    with DuckDBStorageBackend.connect(path) as again:
        sources, n, users = _left(again)
    assert n == BOB_FACTS and users == ["bob"]
    assert ids["bob lone"] in sources and len(sources) == BOB_FACTS + 1
    assert not {ids[k] for k in ids if k.startswith("alice")} & set(sources)


@pytest.mark.parametrize("kind", ["fresh duckdb", "reopened duckdb", "sim"])
def test_lone_source_ids_agree_with_a_scan_inside_a_transaction_too(tmp_path: Path, kind: str) -> None:
    """lone_source_ids(scope) is what a scan of iter_sources(scope) for texts with no fact finds:
    before any change, and inside a transaction that changed what the file holds (a fact moved
    away from its text, a text added, one dropped)."""
    if kind == "sim":
        store: Any = SimStorageBackend()
        ids = _fill(store)
    else:
        path = tmp_path / "s.duckdb"
        store = DuckDBStorageBackend.connect(path)
        ids = _fill(store)
        if kind == "reopened duckdb":
            store.close()
            store = DuckDBStorageBackend.connect(path)

    def scan(scope: Scope | None) -> list[str]:
        return sorted(s.id for s in store.iter_sources(scope) if not store.entity_ids_for_source(s.id))

    try:
        for scope in (ALICE, BOB, None):
            assert store.lone_source_ids(scope) == sorted(
                ids[k] for k in ids if "lone" in k and (scope is None or k.startswith(scope.user_id or "")))
        with store.transaction():
            moved = store.get_many(store.entity_ids_for_source(ids["alice told 2"]))[0]
            moved.source_id = ids["alice told 1"]
            store.upsert([moved])  # "alice told 2" has no fact now
            store.delete_source(ids["alice lone 1"])
            store.add_source(Source.for_text("alice new: a text.", T0 + 5_000, scope=ALICE))
            for scope in (ALICE, BOB, None):
                assert store.lone_source_ids(scope) == scan(scope)
            assert ids["alice told 2"] in store.lone_source_ids(ALICE)
    finally:
        store.close()
