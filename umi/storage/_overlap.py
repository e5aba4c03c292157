"""Two pieces of search work at once: one on the calling thread, one on a helper thread.

A hybrid search walks the HNSW graph (hnswlib releases the GIL) and scores BM25 postings (a
numba kernel compiled ``nogil``); neither needs the other, so :func:`beside` runs the keyword
side on one shared helper thread while the caller walks the graph. The caller holds the
store's lock throughout, so the helper reads arrays no writer can change, and ``beside``
returns only once the helper is done with them — also when the caller's side raises.

It is never slower than doing both in turn by more than a hand-off: when the helper has not
started the side work by the time the caller's is done (a busy machine, a forked child, an
interpreter shutting down), the caller takes it back and runs it itself.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

__all__ = ["beside"]

S = TypeVar("S")
M = TypeVar("M")

_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


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
    fut = _submit(side)
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
