"""User story (stop 23, trust): an agent server's working memories do not pile up.

Every view (``memory.scoped(session_id=...)``) gets its scope's working memory from the engine,
which kept each one in a dict for ever: a server opening a view per request for many sessions
grew without bound. Now a scope's working memory is dropped when it holds nothing (every entry
expired, deleted or cleared) and nothing holds it (no view, no caller's reference); a later view
of that scope gets a new, empty one, which is all the dropped one was. A working memory that
holds an entry, or that a live view or a caller holds, is never dropped.
"""

from __future__ import annotations

import gc

import umi
from umi.storage.sim import SimStorageBackend


class _Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        return self.t


def _memory(clock: _Clock | None = None) -> umi.Memory:
    return umi.Memory._from_parts(storage=SimStorageBackend(), llm=None, embedder=None, clock=clock)


def _requests(m: umi.Memory, n: int, prefix: str = "s") -> None:
    """A server answering ``n`` requests, each of its own session, each through a view it drops."""
    for i in range(n):
        view = m.scoped(session_id=f"{prefix}{i}")
        view.working.get("cart")  # looked at, nothing kept


def test_working_memories_of_finished_sessions_are_dropped() -> None:
    with _memory() as m:
        _requests(m, 2_000)
        gc.collect()
        assert len(m._engine._workings) <= 200  # was: 2,001 (one per session ever seen, and the root's)


def test_a_session_holding_an_entry_keeps_it_while_thousands_come_and_go() -> None:
    clock = _Clock()
    with _memory(clock) as m:
        m.scoped(session_id="alice").working.set("cart", b"tea", ttl_secs=60)  # the view is dropped at once
        _requests(m, 2_000)
        assert m.scoped(session_id="alice").working.get("cart") == b"tea"
        clock.t += 61  # the entry expires: then nothing of the session is left to keep
        _requests(m, 2_000, prefix="t")
        gc.collect()
        assert len(m._engine._workings) <= 200
        assert m.scoped(session_id="alice").working.get("cart") is None


def test_a_working_memory_held_by_a_view_or_a_caller_is_never_split() -> None:
    """An empty working memory that a live view, or a caller's own reference, holds stays the
    scope's: what is written through it later is seen by every later view of the scope."""
    with _memory() as m:
        live = m.scoped(session_id="bob")
        held = m.scoped(session_id="carol").working  # the view is gone, its working memory held
        _requests(m, 2_000)
        live.working.set("step", b"2")
        held.set("step", b"5")
        _requests(m, 2_000, prefix="t")
        assert m.scoped(session_id="bob").working is live.working
        assert m.scoped(session_id="carol").working is held
        assert m.scoped(session_id="bob").working.get("step") == b"2"
        assert m.scoped(session_id="carol").working.get("step") == b"5"


def test_a_cleared_working_memory_is_dropped_once_no_view_holds_it() -> None:
    with _memory() as m:
        view = m.scoped(session_id="dave")
        view.working.set("k", b"v")
        view.working.clear()
        del view
        _requests(m, 2_000)
        gc.collect()
        assert umi.Scope(session_id="dave") not in m._engine._workings
