"""User stories, round 7 (adversarial): the Memory lifecycle on a DuckDB file, closed and reopened
between steps — cancellation, concurrency, failing providers, scopes, core and working memory.

Sim embedder (deterministic, fast) and rule-based extraction unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

import umi
from umi import RecallOptions

ACME = "Alice works at Acme Corp."
INITECH = "Alice now works at Initech."  # "now": the rules read it as an update of Acme
WHERE = "Where does Alice work?"


def open_memory(db: Path, **kw: Any) -> umi.Memory:
    return umi.Memory(db, embedder=umi.SimEmbeddingProvider(seed=1), **kw)


def current(m: umi.Memory, query: str = WHERE) -> list[str]:
    return [h.content for h in m.recall_sync(query, RecallOptions(limit=10))]


class Gate:
    """Stops the first call of a store method in its I/O thread until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def wrap(self, method: Any) -> Any:
        gate = self

        def gated(store: Any, *args: Any, **kwargs: Any) -> Any:
            out = method(store, *args, **kwargs)
            gate.calls += 1
            if gate.calls == 1:
                gate.entered.set()
                gate.release.wait(30)
            return out

        return gated


# --- a cancelled write keeps the write lock until its I/O thread has finished -----------------------
def test_a_write_after_a_cancelled_remember_waits_for_the_cancelled_write_and_sees_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "cancel.duckdb"
    with open_memory(db) as m:
        gate = Gate()
        store_cls = type(m.storage)
        monkeypatch.setattr(store_cls, "find_by_name", gate.wrap(store_cls.find_by_name))

        async def story() -> None:
            first = asyncio.ensure_future(m.remember(ACME))  # stops inside its read plan, in a thread
            assert await asyncio.to_thread(gate.entered.wait, 30)
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
    with open_memory(db) as m:
        assert current(m) == [INITECH]
        assert m.remember_sync("Bob likes tea.").entity_count == 1  # the next call works
