"""Adversary 10: Ctrl-C (KeyboardInterrupt) while ``Memory.close()`` waits out the grace of the
calls in flight.

Was: the interrupt left ``close()`` half done. The runner was marked closed, but its pending
calls were never failed and its loop never stopped, and the engine's next step (closing the
store once its jobs end) never ran. A second ``close()`` returned at once, so the store stayed
open for the life of the process: the same file could not be opened again in it
(``StorageLockedError``), its index caches were not saved, and a ``remember_sync`` whose call
hung waited without end (nothing was left to fail it).

Now an interrupted grace ends there: close() goes on as after the grace (the pending call gets
``MemoryClosedError``, the loop stops, the store is closed) and then re-raises the interrupt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path
from typing import Any

import pytest

import umi
from umi.errors import MemoryClosedError
from umi.providers.sim import SimEmbeddingProvider


class Hanging(SimEmbeddingProvider):
    """Embeds only once ``release`` is set (a provider that hangs); says when a call entered."""

    def __init__(self) -> None:
        super().__init__(7, 32)
        self.entered, self.release, self.armed = threading.Event(), threading.Event(), False

    def embed(self, texts: Any, *a: Any, **k: Any) -> Any:
        self._wait()
        return super().embed(texts, *a, **k)

    async def aembed(self, texts: Any, *a: Any, **k: Any) -> Any:
        await asyncio.to_thread(self._wait)
        return super().embed(texts, *a, **k)

    def _wait(self) -> None:
        if self.armed:
            self.entered.set()
            assert self.release.wait(30)


def test_ctrl_c_during_close_still_closes_the_store_and_fails_the_hung_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "s.duckdb"
    emb = Hanging()
    m = umi.Memory(db, embedder=emb)
    m._runner.grace_secs = 1.0  # (what the hung provider's thread is waited for, at most)
    try:
        m.remember_sync("Alice works at Acme")
        emb.armed = True
        got: dict[str, BaseException | object] = {}

        def remember() -> None:
            try:
                got["r"] = m.remember_sync("Bob works at Initech")
            except BaseException as exc:  # noqa: BLE001 - what the caller is told
                got["r"] = exc
        caller = threading.Thread(target=remember)
        caller.start()
        assert emb.entered.wait(30)  # the call is in flight, its provider hung

        def interrupted(*a: Any, **k: Any) -> Any:  # Ctrl-C while close() waits out the grace
            raise KeyboardInterrupt
        monkeypatch.setattr(concurrent.futures, "wait", interrupted)
        with pytest.raises(KeyboardInterrupt):
            m.close()
        monkeypatch.undo()
        caller.join(30)
        assert not caller.is_alive()  # was: waited without end
        assert isinstance(got["r"], MemoryClosedError), got["r"]
        assert m.storage._closed  # type: ignore[attr-defined]  # was: open for the life of the process
        m.close()  # a second close() is a no-op
        assert not m._runner._thread.is_alive()
    finally:
        emb.release.set()
    with umi.Memory(db, embedder=SimEmbeddingProvider(7, 32)) as again:  # was: StorageLockedError
        assert [e.content for e in again.storage.list() if "Acme" in e.content]
        assert not [e for e in again.storage.list() if "Initech" in e.content]
