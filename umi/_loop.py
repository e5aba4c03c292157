"""One private event loop per Memory, on its own thread.

Every pipeline is written once, as a coroutine, and always runs on this loop:
``await memory.remember(...)`` hops onto it from the caller's loop, and
``memory.remember_sync(...)`` blocks the calling thread until it is done. So async
SDK clients stay bound to one loop, one ``asyncio.Lock`` serialises writes from
every caller, and the ``_sync`` twins work from any thread — including a thread
of another running event loop.

No caller is ever left blocked, and none is told less than the truth:

* **close.** :meth:`LoopThread.close` refuses new calls at once and lets the calls in
  flight finish for ``grace_secs``. Then each call still pending is failed — and its task
  cancelled — with

  - :class:`OutcomeUnknownError` when one of its storage jobs (``io``) had started and not
    yet handed its result back: a thread cannot be stopped, so that job runs on and may
    commit. The job's caller is not told "closed" as if nothing happened.
  - :class:`MemoryClosedError` otherwise (waiting for the write lock, a provider, or between
    jobs): no job of it is running, and none starts after this point (an I/O job not started
    by then never runs). When a job of it had ended, the message says that what it committed
    stays (a call that writes in steps: remember_many's chunks, an import).

  Every wait of close() has an end: with a storage job that never ends it returns after
  about ``2 * grace_secs + 1`` seconds (the calls' grace, then their tasks' grace to unwind),
  more only if the loop itself is stuck (:data:`LOOP_WAIT_SECS` per wait on it). A storage job
  still running when close() returns is left to end on its thread; :meth:`LoopThread.after_io`
  runs what must wait for it (closing the store) when it does. A core-memory write runs on its
  caller's thread as a job too (:meth:`LoopThread.job`): begun before close(), it ends and the
  store is closed after it; else it is refused with :class:`MemoryClosedError`.
* **fork.** The loop thread does not exist in a child made by ``os.fork()``. Every
  call on a runner inherited across a fork — ``close()`` excepted, which only marks it
  closed — raises :class:`ForkedProcessError` at once; open a new ``Memory`` in the
  child (or use ``multiprocessing`` with the ``spawn`` start method).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import threading
import time
import weakref
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from .errors import ForkedProcessError, LoopReentryError, MemoryClosedError, OutcomeUnknownError, UmiError

T = TypeVar("T")

# MemoryClosedError / ForkedProcessError live in umi.errors (exported as umi.*); re-exported here
__all__ = ["LoopThread", "MemoryClosedError", "OutcomeUnknownError", "ForkedProcessError", "CLOSE_GRACE_SECS"]

#: how long close() lets calls in flight finish before failing them
CLOSE_GRACE_SECS = 5.0

#: how long close() waits for the loop itself (its own callbacks, the thread's end), beyond the grace
LOOP_WAIT_SECS = 10.0


class _Call:
    """One call submitted to the loop: how many of its storage jobs have started and not yet
    handed their result back to it, and how many have."""

    __slots__ = ("running", "ended")

    def __init__(self) -> None:
        self.running = 0
        self.ended = 0


_CALL: "contextvars.ContextVar[_Call | None]" = contextvars.ContextVar("umi_call", default=None)


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
        self._pending: dict[concurrent.futures.Future[Any], _Call] = {}
        self._closed = False
        self._stopping = False  # close() has failed the pending calls: no I/O job starts any more
        self._jobs = 0  # I/O jobs running on their threads
        self._no_jobs = threading.Condition(self._lock)  # notified when _jobs drops to 0
        self._idle: list[Callable[[], object]] = []  # after_io callbacks waiting for them
        self._forked = False
        self._pid = os.getpid()
        self.grace_secs = grace_secs
        self._thread.start()
        self._ready.wait()
        _RUNNERS.add(self)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:  # stopped (by close): the thread closes its own loop, whatever close() got to
            self.loop.close()

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
        call = _Call()
        with self._lock:
            try:
                self._check_open()
            except UmiError:
                coro.close()
                raise
            self._pending[fut] = call
        fut.add_done_callback(self._forget)

        ended = False  # the coroutine has ended: nothing is left to cancel

        async def runner() -> None:
            nonlocal ended
            _CALL.set(call)  # this task's context (and its child tasks'): io() counts its jobs here
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
            self._pending.pop(fut, None)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block until it finishes (or the runner closes; or
        ``timeout`` seconds pass: ``concurrent.futures.TimeoutError``, the call runs on)."""
        try:
            self.check_off_loop("a _sync method", "; await the async method")
        except LoopReentryError:
            coro.close()
            raise
        return self._submit(coro).result(timeout)

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
            if not self.in_call():
                self._check_open()
            return await coro
        return await asyncio.wrap_future(self._submit(coro))

    def io(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run blocking ``fn(*args)`` (storage, embedding) in the I/O pool, from the loop.

        A thread cannot be stopped, so a coroutine cancelled while awaiting a job that has started
        unwinds only once the job has ended: a write lock it holds stays held until its commit is
        done, and the next writer sees that commit (it used to release the lock at once and let the
        next writer read and commit beside the cancelled one). A job not started yet is dropped.

        While the job runs, and until its result is back in the calling coroutine, the call counts
        it (:class:`_Call`): close() tells such a call :class:`OutcomeUnknownError`. Once close()
        has failed the pending calls, a job not started yet never starts."""
        call = _CALL.get()
        started = False

        def job() -> T:
            nonlocal started
            with self._lock:
                if self._stopping:
                    raise MemoryClosedError("this Memory is closed")
                started = True
                self._jobs += 1
                if call is not None:
                    call.running += 1
            try:
                return fn(*args)
            finally:
                self._job_ended()

        async def handed_back() -> T:
            try:
                return await _to_end(self._io.submit(job))
            finally:
                if started and call is not None:
                    with self._lock:
                        call.running -= 1
                        call.ended += 1

        return handed_back()

    def job(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn(*args)`` (a core-memory write) on the calling thread as a storage job:
        :class:`MemoryClosedError` once close() has begun, and nothing runs; else it runs to its end
        and the store, closed by :meth:`after_io`, is closed after it (never under it)."""
        with self._lock:
            self._check_open()
            self._jobs += 1
        try:
            return fn(*args)
        finally:
            self._job_ended()

    def _job_ended(self) -> None:
        with self._lock:
            self._jobs -= 1
            idle = self._idle if self._jobs == 0 else []
            if idle:
                self._idle = []
            if self._jobs == 0:
                self._no_jobs.notify_all()
        for cb in idle:
            _quietly(cb)

    def in_call(self) -> bool:
        """On the loop, inside a call submitted to it: what it calls (an import remembering its
        texts) is part of that call, with its grace, refused by close() only as the call is."""
        return _CALL.get() is not None and threading.current_thread() is self._thread

    def after_io(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` now if no I/O job is running, else on the thread of the last one to end
        (close() may return while a storage job it could not stop still runs; the store is closed
        after it). Errors of ``fn`` are swallowed: nobody is left to hear them."""
        with self._lock:
            if self._jobs:
                self._idle.append(fn)
                return
        fn()

    def close(self) -> None:
        """Refuse new calls, let calls in flight finish for ``grace_secs``, then fail the rest:
        :class:`OutcomeUnknownError` for a call whose storage job is running (it may commit),
        :class:`MemoryClosedError` for any other; stop the loop. Every wait is bounded (the
        grace, then at most ``grace_secs + 1`` and :data:`LOOP_WAIT_SECS` for the loop); a
        storage job still running is left to end on its own thread (:meth:`after_io`). A Ctrl-C
        (any exception) while it waits out the grace ends the grace there: the rest runs as after
        it, then the exception is raised. Idempotent; from any thread."""
        self.check_off_loop("close()")  # refused before it marks anything closed
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
        if self._forked:  # nothing of the loop exists in this process
            return
        deadline = time.monotonic() + self.grace_secs
        interrupted: BaseException | None = None
        try:
            if pending:
                concurrent.futures.wait(pending, timeout=self.grace_secs)
            with self._lock:  # and the storage jobs not on the loop (core writes on their callers' threads)
                self._no_jobs.wait_for(lambda: self._jobs == 0, timeout=max(0.0, deadline - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - Ctrl-C: the grace ends here, the shutdown still runs
            # (else the calls in flight were never failed, the loop never stopped, and a second
            # close() returned at once: this runner is marked closed already)
            interrupted = exc
        # Decided on the loop, between two steps of the calls' coroutines: a job's result is
        # either still out (unknown) or already returned into a coroutine that then ran on.
        decided: concurrent.futures.Future[None] = concurrent.futures.Future()

        def decide() -> None:
            self._fail_pending()
            decided.set_result(None)

        try:
            self.loop.call_soon_threadsafe(decide)
            decided.result(timeout=LOOP_WAIT_SECS)
        except (concurrent.futures.TimeoutError, RuntimeError):  # pragma: no cover - a loop stuck in a callback
            self._fail_pending()

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:  # a task waiting for a running storage job ends with it: not waited for beyond this
                _, stuck = await asyncio.wait(tasks, timeout=self.grace_secs)
                for t in stuck:  # its call was told OutcomeUnknownError; the loop closes under it on purpose
                    t._log_destroy_pending = False  # type: ignore[attr-defined]
            # asyncio.to_thread's workers (the default executor) would outlive the loop
            await asyncio.wait_for(self.loop.shutdown_default_executor(), timeout=self.grace_secs + 1)

        try:
            asyncio.run_coroutine_threadsafe(cancel_rest(), self.loop).result(timeout=self.grace_secs + 1)
        except (concurrent.futures.TimeoutError, asyncio.TimeoutError, RuntimeError):  # pragma: no cover
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=LOOP_WAIT_SECS)
        # jobs not started are dropped; a running one cannot be stopped and is not waited for
        self._io.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():
            self.loop.close()
        if interrupted is not None:
            raise interrupted

    def _fail_pending(self) -> None:
        """Fail every call still pending (see :meth:`close`); from here on no I/O job starts."""
        with self._lock:
            self._stopping = True
            failed = [(fut, call.running > 0, call.ended > 0) for fut, call in self._pending.items() if not fut.done()]
        for fut, running, ended in failed:
            if running:
                _settle(fut, exc=OutcomeUnknownError(
                    f"this Memory was closed while the call's storage job was running; it did not end within "
                    f"the close grace of {self.grace_secs:g} s and cannot be stopped, so the call's outcome is "
                    "unknown: it may have committed (look with get/recall, or remember again: a text told "
                    "again is not stored twice)", grace_secs=self.grace_secs))
            else:
                stays = ("; what it committed before stays (a call that writes in steps, as remember_many's "
                         "chunks or an import, may have written some of them)") if ended else ""
                _settle(fut, exc=MemoryClosedError(
                    f"this Memory was closed while the call was running (it had {self.grace_secs:g} s to finish; "
                    f"no storage job of it was running, and none runs after this{stays})"))


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


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - an after_io callback on a job's thread: nobody to tell
        pass
