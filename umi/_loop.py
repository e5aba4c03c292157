"""One private event loop per Memory, on its own thread.

Every pipeline is written once, as a coroutine, and always runs on this loop:
``await memory.remember(...)`` hops onto it from the caller's loop, and
``memory.remember_sync(...)`` blocks the calling thread until it is done. So async
SDK clients stay bound to one loop, one ``asyncio.Lock`` serialises writes from
every caller, and the ``_sync`` twins work from any thread — including a thread
of another running event loop.

No caller is ever left blocked:

* **close.** :meth:`LoopThread.close` refuses new calls at once, lets the calls in
  flight finish for ``grace_secs``, then fails every one still pending with
  :class:`MemoryClosedError` (and cancels its task on the loop) before stopping the
  loop. A thread that was inside ``remember_sync`` when another thread closed the
  Memory gets that error, never a hang.
* **fork.** The loop thread does not exist in a child made by ``os.fork()``. Every
  call on a runner inherited across a fork — ``close()`` excepted, which only marks it
  closed — raises :class:`ForkedProcessError` at once; open a new ``Memory`` in the
  child (or use ``multiprocessing`` with the ``spawn`` start method).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from .errors import ForkedProcessError, LoopReentryError, MemoryClosedError, UmiError

T = TypeVar("T")

# MemoryClosedError / ForkedProcessError live in umi.errors (exported as umi.*); re-exported here
__all__ = ["LoopThread", "MemoryClosedError", "ForkedProcessError", "CLOSE_GRACE_SECS"]

#: how long close() lets calls in flight finish before failing them
CLOSE_GRACE_SECS = 5.0


_RUNNERS: "weakref.WeakSet[LoopThread]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for runner in list(_RUNNERS):
        runner._forked = True


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


class LoopThread:
    def __init__(self, name: str = "umi-loop", io_workers: int = 4,
                 grace_secs: float = CLOSE_GRACE_SECS) -> None:
        self.loop = asyncio.new_event_loop()
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=io_workers, thread_name_prefix=name + "-io")
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._closed = False
        self._forked = False
        self._pid = os.getpid()
        self.grace_secs = grace_secs
        self._thread.start()
        self._ready.wait()
        _RUNNERS.add(self)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    @property
    def forked(self) -> bool:
        """True in a child made by ``os.fork()`` of the process that made this runner."""
        return self._forked

    def _check_open(self) -> None:
        if self._forked:
            raise ForkedProcessError(
                f"this Memory was opened in process {self._pid} and this is process {os.getpid()} "
                "(a child made by os.fork()); its event loop thread does not exist here. "
                "Open a new Memory in this process")
        if self._closed:
            raise MemoryClosedError("this Memory is closed")

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; its future is failed by close() if still pending."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            try:
                self._check_open()
            except UmiError:
                coro.close()
                raise
            self._pending.add(fut)
        fut.add_done_callback(self._forget)

        ended = False  # the coroutine has ended: nothing is left to cancel

        async def runner() -> None:
            nonlocal ended
            try:
                result = await coro
            except asyncio.CancelledError as exc:
                ended = True
                _settle(fut, exc=exc)
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, whatever it is
                # Re-raising SystemExit/KeyboardInterrupt here would kill the loop thread and
                # hang every other caller: the caller's thread gets it instead.
                ended = True
                _settle(fut, exc=exc)
            else:
                ended = True
                _settle(fut, result=result)

        def start() -> None:
            if fut.done():  # failed by close() before it could start
                coro.close()
                return
            task = self.loop.create_task(runner())
            # failed by close() while running: cancel the task (not when it settled the future
            # itself: that would wake the loop once more per call for nothing)
            fut.add_done_callback(lambda f: self.loop.call_soon_threadsafe(task.cancel)
                                  if not ended and not task.done() and not self.loop.is_closed() else None)

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError as exc:  # the loop was closed under us
            _settle(fut, exc=MemoryClosedError("this Memory is closed"))
            coro.close()
            raise MemoryClosedError("this Memory is closed") from exc
        return fut

    def _forget(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(fut)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and block until it finishes (or the runner closes)."""
        try:
            self.check_off_loop("a _sync method", "; await the async method")
        except LoopReentryError:
            coro.close()
            raise
        return self._submit(coro).result()

    def check_off_loop(self, what: str, hint: str = "") -> None:
        """:class:`~umi.LoopReentryError` when called on the loop's own thread (a progress callback, say), where
        blocking on the loop would wait for itself. Callers check before they change any state."""
        if threading.current_thread() is self._thread:
            raise LoopReentryError(f"{what} was called from inside umi's own loop{hint}")

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the loop from any other loop (or directly when already on it)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - arun is always awaited
            running = None
        if running is self.loop:
            self._check_open()
            return await coro
        return await asyncio.wrap_future(self._submit(coro))

    def io(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run blocking ``fn(*args)`` (storage, embedding) in the I/O pool, from the loop.

        A thread cannot be stopped, so a coroutine cancelled while awaiting a job that has started
        unwinds only once the job has ended: a write lock it holds stays held until its commit is
        done, and the next writer sees that commit (it used to release the lock at once and let the
        next writer read and commit beside the cancelled one). A job not started yet is dropped."""
        return _to_end(self._io.submit(fn, *args))

    def close(self) -> None:
        """Refuse new calls, let calls in flight finish for ``grace_secs``, fail the rest
        with :class:`MemoryClosedError`, stop the loop. Idempotent; from any thread."""
        self.check_off_loop("close()")  # refused before it marks anything closed
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
        if self._forked:  # nothing of the loop exists in this process
            return
        if pending:
            concurrent.futures.wait(pending, timeout=self.grace_secs)
        for fut in pending:
            _settle(fut, exc=MemoryClosedError(
                f"this Memory was closed while the call was running (it had {self.grace_secs:g} s to finish)"))

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=self.grace_secs)
            # asyncio.to_thread's workers (the default executor) would outlive the loop
            await asyncio.wait_for(self.loop.shutdown_default_executor(), timeout=self.grace_secs + 1)

        try:
            asyncio.run_coroutine_threadsafe(cancel_rest(), self.loop).result(timeout=self.grace_secs + 1)
        except (concurrent.futures.TimeoutError, asyncio.TimeoutError, RuntimeError):  # pragma: no cover
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self._io.shutdown(wait=True)
        if not self._thread.is_alive():
            self.loop.close()


async def _to_end(job: concurrent.futures.Future[T]) -> T:
    """Await ``job``; when cancelled, cancel it if it has not started, else wait for it to end
    (cancelled again meanwhile: still wait), then re-raise the cancellation."""
    fut = asyncio.wrap_future(job)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if not job.cancel():  # running or done: nothing stops it, so its caller waits for it
            while not fut.done():
                try:
                    await asyncio.wait([fut])
                except asyncio.CancelledError:
                    continue
        raise


def _settle(fut: concurrent.futures.Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    """Complete ``fut`` unless it already is (close() and the task may race: first wins)."""
    try:
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
    except concurrent.futures.InvalidStateError:
        pass
