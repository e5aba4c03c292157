"""Two pieces of search work at once: one on the calling thread, one on a helper thread.

A hybrid search walks the HNSW graph (hnswlib releases the GIL) and scores BM25 postings (a
numba kernel compiled ``nogil``); neither needs the other, so :func:`beside` runs the keyword
side on one shared helper thread while the caller walks the graph. The caller holds the
store's lock throughout, so the helper reads arrays no writer can change, and ``beside``
returns only once the helper is done with them — also when the caller's side raises.

It is never slower than doing both in turn by more than a hand-off: when the helper has not
started the side work by the time the caller's is done (a busy machine, a forked child, an
interpreter shutting down), the caller takes it back and runs it itself. On a machine with no
idle core (1-minute load average within half a core of the cores this process may use, read at
most once a second) both run here in turn: a thread woken there waits for a core, and the caller
with it (measured on a 2-core box at load 6: 0.87 ms in turn, 1.17 ms overlapped, at 100k).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

__all__ = ["Background", "beside"]

S = TypeVar("S")
M = TypeVar("M")

_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_idle_core = (-2.0, True)  # (when read, a core was idle then)


def _core_idle() -> bool:
    """Is a core idle for the helper? (no load average on this platform: assume so)"""
    global _idle_core
    now = time.monotonic()
    if now - _idle_core[0] >= 1.0:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
        _idle_core = (now, _cores > 1 and load < _cores - 0.5)
    return _idle_core[1]


def _submit(fn: Callable[[], S]) -> Future[S] | None:
    global _pool, _pool_pid
    try:
        with _pool_lock:
            if _pool is None or _pool_pid != os.getpid():  # a forked child has no helper thread
                _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="umi-search")
                _pool_pid = os.getpid()
            return _pool.submit(fn)
    except RuntimeError:  # the interpreter is shutting down: no new threads
        return None


def beside(side: Callable[[], S], main: Callable[[], M]) -> tuple[S, M]:
    """``(side(), main())``, with ``side`` run on the helper thread while ``main`` runs here."""
    fut = _submit(side) if _core_idle() else None
    if fut is None:
        return side(), main()
    try:
        got = main()
    except BaseException:
        if not fut.cancel():
            fut.exception()  # wait: the helper still reads what the caller's lock protects
        raise
    if fut.cancel():  # not started yet: cheaper to do it here than to wait for the helper
        return side(), got
    return fut.result(), got


class Background:
    """``fn()`` started on a thread of its own at once (work that must not wait for the shared
    helper: a store's open reads files and a second query while it loads rows). :meth:`result`
    waits and returns what ``fn`` returned or raises what it raised; :meth:`join` only waits
    (an open that fails must leave no thread behind reading its files)."""

    __slots__ = ("_thread", "_out")

    def __init__(self, fn: Callable[[], object], name: str) -> None:
        self._out: list[object] = [None, None]
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self._out[0] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised by result() in the waiting thread
            self._out[1] = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def result(self) -> object:
        self._thread.join()
        if self._out[1] is not None:
            raise self._out[1]  # type: ignore[misc]
        return self._out[0]
