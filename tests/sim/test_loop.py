"""The loop runner never leaves a caller blocked: close() racing a call, and os.fork().

Issue 14 reproducers: ``close()`` while another thread was inside a call left that caller
blocked forever (the loop stopped without failing pending futures); after ``os.fork()``
every call in the child blocked forever.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import numpy as np
import pytest

import umi
from umi._loop import ForkedProcessError, LoopThread, MemoryClosedError
from umi.providers.sim import SimEmbeddingProvider


class _Gate(SimEmbeddingProvider):
    """A Sim embedder that blocks inside ``aembed`` until released: a call in flight."""

    def __init__(self) -> None:
        super().__init__(7, 32)
        self.entered = threading.Event()
        self.release = asyncio.Event  # made on the loop, below
        self.block = False

    async def aembed(self, texts, *, kind="passage"):  # type: ignore[override]
        if self.block:
            self.entered.set()
            await asyncio.sleep(3600)  # far longer than any test: only cancellation ends it
        return self.embed(texts, kind=kind)


def _memory(embedder: SimEmbeddingProvider) -> umi.Memory:
    from umi.providers.sim import SimLLMProvider
    from umi.sim import SimClock
    from umi.storage.sim import SimStorageBackend

    m = umi.Memory._from_parts(storage=SimStorageBackend(seed=1), llm=SimLLMProvider(1), embedder=embedder,
                               clock=SimClock())
    m._runner.grace_secs = 0.2
    return m


def test_close_racing_a_call_fails_it_with_a_typed_error_instead_of_hanging() -> None:
    gate = _Gate()
    memory = _memory(gate)
    memory.remember_sync("Alice works at Acme")  # acknowledged before the race
    gate.block = True
    outcome: list[BaseException | object] = []

    def caller() -> None:
        try:
            outcome.append(memory.remember_sync("Bob lives in Berlin"))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    assert gate.entered.wait(10)
    started = time.monotonic()
    memory.close()
    t.join(10)
    assert not t.is_alive(), "the caller is still blocked after close()"
    assert time.monotonic() - started < 5
    assert len(outcome) == 1 and isinstance(outcome[0], MemoryClosedError), outcome
    assert isinstance(outcome[0], umi.UmiError)
    with pytest.raises(umi.UmiError):
        memory.remember_sync("after close")


def test_close_lets_a_call_in_flight_finish_within_the_grace() -> None:
    runner = LoopThread(grace_secs=5.0)

    async def slow() -> int:
        await asyncio.sleep(0.2)
        return 42

    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(runner.run(slow())))
    t.start()
    time.sleep(0.05)
    runner.close()
    t.join(5)
    assert got == [42]


def test_async_callers_are_failed_too() -> None:
    runner = LoopThread(grace_secs=0.1)

    async def forever() -> None:
        await asyncio.sleep(3600)

    async def main() -> BaseException | None:
        task = asyncio.ensure_future(runner.arun(forever()))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(runner.close)
        try:
            await asyncio.wait_for(task, 5)
        except BaseException as exc:  # noqa: BLE001
            return exc
        return None

    err = asyncio.run(main())
    assert isinstance(err, MemoryClosedError)


def test_many_threads_racing_close_all_return() -> None:
    for round_ in range(20):
        runner = LoopThread(grace_secs=0.05)

        async def work(i: int) -> int:
            await asyncio.sleep(0.001 * (i % 5))
            return i

        results: list[object] = []

        def caller(i: int) -> None:
            try:
                results.append(runner.run(work(i)))
            except MemoryClosedError as exc:
                results.append(exc)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.001 * (round_ % 4))
        runner.close()
        for t in threads:
            t.join(5)
            assert not t.is_alive()
        assert len(results) == 8
        assert all(isinstance(r, (int, MemoryClosedError)) for r in results)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+ warns about fork with threads
def test_a_call_in_a_forked_child_raises_forked_process_error_at_once() -> None:
    memory = _memory(SimEmbeddingProvider(7, 32))
    memory.remember_sync("Alice works at Acme")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            started = time.monotonic()
            try:
                memory.recall_sync("Alice")
                msg = "no error"
            except ForkedProcessError as exc:
                msg = f"ok {time.monotonic() - started:.3f} {exc}"
            except BaseException as exc:  # noqa: BLE001
                msg = f"wrong {type(exc).__name__}: {exc}"
            try:
                memory._runner.close()  # close() in the child only marks it closed
            except BaseException as exc:  # noqa: BLE001
                msg += f" | close raised {type(exc).__name__}"
            os.write(w, msg.encode()[:4000])
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    deadline = time.monotonic() + 20
    chunks = []
    while True:
        data = os.read(r, 4096)
        if not data:
            break
        chunks.append(data)
        assert time.monotonic() < deadline
    os.close(r)
    _, status = os.waitpid(pid, 0)
    msg = b"".join(chunks).decode()
    assert os.WEXITSTATUS(status) == 0
    assert msg.startswith("ok "), msg
    assert "| close raised" not in msg
    assert "os.fork" in msg
    # the parent is unaffected
    assert memory.recall_sync("Alice")
    memory.close()


def test_errors_are_umi_errors() -> None:
    assert issubclass(MemoryClosedError, umi.UmiError) and issubclass(ForkedProcessError, umi.UmiError)


def test_a_sync_call_wakes_the_loop_once() -> None:
    """A call that settles its own future leaves nothing to cancel: one wake-up of the loop per
    call (a second one per call, to cancel a finished task, cost every sync recall a self-pipe write)."""
    runner = LoopThread()
    try:
        calls = []
        real = runner.loop.call_soon_threadsafe

        def counting(*args):  # type: ignore[no-untyped-def]
            calls.append(args)
            return real(*args)

        runner.loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        async def value(x: int) -> int:
            return x

        async def boom() -> None:
            raise ValueError("boom")

        assert [runner.run(value(i)) for i in range(10)] == list(range(10))
        with pytest.raises(ValueError):
            runner.run(boom())
        time.sleep(0.05)  # a late callback would have been scheduled by now
        assert len(calls) == 11
    finally:
        runner.close()


# --- close() is bounded; a call whose storage job runs on is told its outcome is unknown --------------
def test_close_does_not_wait_for_a_hung_io_job_and_runs_after_io_when_it_ends() -> None:
    runner = LoopThread(io_workers=1, grace_secs=0.05)
    entered, release, ended = threading.Event(), threading.Event(), threading.Event()
    queued_ran: list[bool] = []

    def hung() -> str:
        entered.set()
        release.wait(30)
        ended.set()
        return "committed"

    async def write() -> str:
        return await runner.io(hung)

    async def queued() -> None:  # its job waits for the one I/O worker
        await runner.io(lambda: queued_ran.append(True))

    out: list[object] = []

    def call(coro) -> None:  # type: ignore[no-untyped-def]
        try:
            out.append(runner.run(coro))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            out.append(exc)

    threads = [threading.Thread(target=call, args=(write(),))]
    threads[0].start()
    assert entered.wait(30)
    threads.append(threading.Thread(target=call, args=(queued(),)))
    threads[1].start()
    while len(runner._pending) < 2:  # both calls submitted
        threading.Event().wait(0.001)
    runner.close()  # was: waited for the hung job (here: until its 30 s safety)
    assert not ended.is_set()
    closed_after: list[bool] = []
    runner.after_io(lambda: closed_after.append(ended.is_set()))
    assert closed_after == []  # the job still runs: after_io waits for it
    for t in threads:
        t.join(30)
    unknown = [e for e in out if isinstance(e, umi.OutcomeUnknownError)]
    closed = [e for e in out if type(e) is MemoryClosedError]
    assert len(unknown) == 1 and len(closed) == 1, out  # the queued job never started: closed
    release.set()
    assert ended.wait(30)
    while not closed_after:  # the last job's thread runs the callback as it ends
        threading.Event().wait(0.001)
    assert closed_after == [True] and queued_ran == []  # a job not started by then never runs
    ran: list[int] = []
    runner.after_io(lambda: ran.append(1))  # no job running: at once
    assert ran == [1]


def test_close_bounds_a_provider_aclose_that_hangs() -> None:
    release, ended = threading.Event(), threading.Event()

    def hang() -> None:
        release.wait(30)
        ended.set()

    class Hanging(SimEmbeddingProvider):
        async def aclose(self) -> None:
            await asyncio.to_thread(hang)

    m = _memory(Hanging(7, 32))
    m.remember_sync("Alice works at Acme")
    m.close()  # was: waited for aclose without end (here: until its 30 s safety)
    assert not ended.is_set()
    release.set()
    with pytest.raises(MemoryClosedError):
        m.remember_sync("Bob lives in Berlin")


def test_close_from_a_second_thread_returns_once_the_store_is_closed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Adversary pass (stop 21). Thread 1 closes the Memory (here: releasing its provider);
    thread 2 closes it too, then opens the same DuckDB file again. Was: the second close()
    returned at once, the store still open under the first, and the open failed with
    StorageLockedError ("already open in this process"). The order is forced: the first close
    is let go only once the second is waiting for it."""
    entered, release = threading.Event(), threading.Event()

    class SlowClose(SimEmbeddingProvider):
        async def aclose(self) -> None:
            entered.set()
            await asyncio.to_thread(release.wait, 30)

    class Waited(threading.Event):
        """The engine's "first close() is done" event: says when a close() starts waiting on it."""

        def __init__(self) -> None:
            super().__init__()
            self.waiting = threading.Event()

        def wait(self, timeout: float | None = None) -> bool:
            self.waiting.set()
            return super().wait(timeout)

    db = tmp_path / "two.duckdb"
    m = umi.Memory(db, embedder=SlowClose(7, 32))
    m._runner.grace_secs = 30  # aclose's bound: the test releases it
    done = m._engine._close_done = Waited()
    m.remember_sync("Alice works at Acme")
    first = threading.Thread(target=m.close)
    first.start()
    assert entered.wait(30)  # the first close() is releasing the provider

    def releaser() -> None:
        if done.waiting.wait(30):  # the second close() waits for the first: now let the first go on
            release.set()

    r = threading.Thread(target=releaser)
    r.start()
    m.close()  # the second close (was: returned at once, without waiting)
    assert done.waiting.is_set() and release.is_set()
    with umi.Memory(db, embedder=SimEmbeddingProvider(7, 32)) as again:  # was: StorageLockedError
        assert again.count_sync() >= 1
    release.set()
    first.join(30)
    r.join(30)
    assert not first.is_alive()
