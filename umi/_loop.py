"""One private event loop per Memory, on its own thread.

Every pipeline is written once, as a coroutine, and always runs on this loop:
``await memory.remember(...)`` hops onto it from the caller's loop, and
``memory.remember_sync(...)`` blocks the calling thread until it is done. So async
SDK clients stay bound to one loop, one ``asyncio.Lock`` serialises writes from
every caller, and the ``_sync`` twins work from any thread — including a thread
of another running event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

T = TypeVar("T")

__all__ = ["LoopThread"]


class LoopThread:
    def __init__(self, name: str = "umi-loop", io_workers: int = 4) -> None:
        self.loop = asyncio.new_event_loop()
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=io_workers, thread_name_prefix=name + "-io")
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        self._closed = False

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def _check_open(self) -> None:
        if self._closed:
            from .errors import UmiError

            raise UmiError("this Memory is closed")

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block until it finishes."""
        self._check_open()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a _sync method was called from inside umi's own loop; await the async method")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the loop from any other loop (or directly when already on it)."""
        self._check_open()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - arun is always awaited
            running = None
        if running is self.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def io(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run blocking ``fn(*args)`` (storage, embedding) in the I/O pool, from the loop."""
        return self.loop.run_in_executor(self._io, fn, *args)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self._io.shutdown(wait=True)
        self.loop.close()
