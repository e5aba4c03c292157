"""What every view of one store shares: the :class:`Engine` (store, providers, private loop,
write lock, clock, the core and working memories of each scope), the store's core blocks of
one scope as a :class:`~umi.core_memory.PersistentCoreMemory` writes them, and the embedder
identity a store records. :mod:`umi.memory` puts the public faces on it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Collection, Coroutine, Iterator, TypeVar

from ._validate import TIME_MS_MAX, TIME_MS_MIN, check_real
from .errors import CoreMemoryFullError, InvalidConfigError, LoopReentryError, MemoryClosedError
from .options import MemoryConfig
from .pipeline.context import WriteLock
from .providers.base import EmbeddingProvider, LLMProvider
from .storage.base import META_EMBEDDER, StorageBackend
from .types import Scope
from .working_memory import WorkingMemory

if TYPE_CHECKING:
    from ._loop import LoopThread
    from .core_memory import PersistentCoreMemory

T = TypeVar("T")

#: the engine's working memories are swept once there are this many (then at twice what a sweep kept)
WORKINGS_SWEEP_MIN = 64


__all__ = ["Engine", "embedder_identity", "check_embedder"]


class _HeldWorkingMemory(WorkingMemory):
    """A :class:`~umi.WorkingMemory` the engine can hold weakly (the compiled class takes no weak
    reference): how it sees whether anything else holds it."""

    __slots__ = ("__weakref__",)


def _holds_nothing(wm: WorkingMemory) -> bool:
    wm.expire()  # an entry past its TTL is nothing held
    return len(wm) == 0


def embedder_identity(embedder: EmbeddingProvider) -> str:
    """``name|model|dim``: what a store records of the embedder its vectors came from. ``model``
    is the provider's ``model`` attribute, or ``seed=N`` for a seeded one (the Sim embedder)."""
    model = getattr(embedder, "model", None)
    if model is None and getattr(embedder, "seed", None) is not None:
        model = f"seed={embedder.seed}"  # type: ignore[attr-defined]
    return f"{embedder.name}|{model or ''}|{embedder.dim}"


def check_embedder(storage: StorageBackend, embedder: EmbeddingProvider) -> None:
    if storage.dim is not None and storage.dim != embedder.dim:
        raise InvalidConfigError(
            f"the store holds {storage.dim}-d vectors but the embedder makes {embedder.dim}-d ones; "
            "use the embedder the store was built with"
        )
    stored = storage.get_meta(META_EMBEDDER)
    mine = embedder_identity(embedder)
    if stored is not None and stored != mine:
        raise InvalidConfigError(
            f"the store was written with the embedder {stored!r} (name|model|dim) but this Memory's is "
            f"{mine!r}; vectors of different models cannot be compared: open the store with its embedder"
        )


def user_clock_ms(clock: Callable[[], float]) -> Callable[[], int]:
    """A user's ``clock()`` (seconds) read as integer ms, each reading checked: a number (else
    TypeError), finite and inside the times umi stores (else InvalidConfigError), so a NaN or
    an overflowing reading fails the call with a umi error before it writes anything."""
    lo, hi = TIME_MS_MIN / 1000.0, TIME_MS_MAX / 1000.0

    def read() -> int:
        return round(check_real(clock(), "clock()", lo, hi) * 1000.0)

    return read


class Clock:
    """Milliseconds that never repeat: max(clock, last + 1), so every event has its own instant."""

    def __init__(self, source_ms: Callable[[], int]) -> None:
        self._source = source_ms
        self._last = -1
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            t = max(int(self._source()), self._last + 1)
            self._last = t
            return t


class Engine:
    """The parts one store's Memory and all its views share: store, providers, config, the
    private loop, the write lock and the clock. Closed once, by the Memory that opened it."""

    def __init__(self, config: MemoryConfig, llm: LLMProvider | None, embedder: EmbeddingProvider | None,
                 storage: StorageBackend, clock: Callable[[], float] | None) -> None:
        from ._loop import LoopThread

        self.config = config
        self.llm = llm
        self.embedder = embedder
        self.storage = storage
        self.clock = clock
        exact_ms = getattr(clock, "now_ms", None)  # a SimClock keeps integer ms: no float round trip
        if callable(exact_ms):
            self.now_ms = Clock(exact_ms)
        elif clock is None:
            self.now_ms = Clock(lambda: round(time.time() * 1000.0))
        else:
            self.now_ms = Clock(user_clock_ms(clock))
        self.runner: LoopThread = LoopThread()
        self.write_lock = WriteLock()  # one per store: every view's pipelines share it
        self._parts_lock = threading.Lock()
        # A scope's core memory is one object while anything holds it (a view, a caller), and is
        # dropped after: its blocks are in the store, so a later view loads them again. A server
        # naming many scopes does not keep one arena per scope it ever saw.
        self._cores: weakref.WeakValueDictionary[Scope, PersistentCoreMemory] = weakref.WeakValueDictionary()
        # A scope's working memory is dropped once it holds nothing and nothing holds it (see
        # working_for); the dict is swept when it has doubled since the last sweep.
        self._workings: dict[Scope, WorkingMemory] = {}
        self._workings_sweep_at = WORKINGS_SWEEP_MIN
        self._embedder_recorded = embedder is None
        self.closed = False
        self._close_lock = threading.Lock()
        self._close_done = threading.Event()  # set once the first close() has returned

    async def locked(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` holding the store's write lock (on the loop)."""
        try:
            async with self.write_lock:
                return await coro
        finally:
            coro.close()  # cancelled while waiting for the lock, it never started: no "never awaited" warning

    def record_embedder_in_tx(self) -> None:
        """Inside the caller's write transaction: record the embedder's identity if the store has
        none yet. It commits (or rolls back) with that write: a failed first write leaves the store
        exactly as it was. The engine stops checking once it sees the identity stored."""
        if not self._embedder_recorded:
            if self.storage.get_meta(META_EMBEDDER) is None:
                assert self.embedder is not None
                self.storage.set_meta(META_EMBEDDER, embedder_identity(self.embedder))
            else:
                self._embedder_recorded = True

    def check_open(self) -> None:
        if self.closed:
            raise MemoryClosedError("this Memory is closed")

    def core_for(self, scope: Scope) -> "PersistentCoreMemory":
        """The core memory of ``Scope(user_id, agent_id)``: one object per scope while anything
        holds it, loaded from the store on first use (and again once nothing held it)."""
        from .core_memory import PersistentCoreMemory

        with self._parts_lock:
            core = self._cores.get(scope)
            if core is None:
                core = PersistentCoreMemory(max_bytes=self.config.core_memory_bytes)
                try:
                    core._bind(StoredBlocks(self, scope))
                except CoreMemoryFullError as exc:
                    raise InvalidConfigError(
                        f"the stored core blocks of {scope} do not fit core_memory_bytes="
                        f"{self.config.core_memory_bytes}: {exc}") from exc
                self._cores[scope] = core
            return core

    def forget_scope(self, scope: Scope, forget_facts: Callable[[], int]) -> int:
        """``forget_facts()`` and, when ``scope`` names no session, the stored core blocks and core
        history of every core scope it sees (:meth:`~umi.storage.base.StorageBackend.forget_core`),
        in one transaction: a failure forgets nothing. Then the in-process arenas of those scopes'
        core memories are emptied, and the working memories of the view scopes ``scope`` contains
        (its sessions: ``user_id="alice"`` covers each of alice's) are cleared, so nothing of them
        stays here either. Returns what ``forget_facts`` returned. Call it in a storage job
        (``io``) holding the write lock: a call in flight when close() begins has the grace to end,
        and the job is not started after it."""
        view = scope.core
        with self._cores_held(lambda sc: scope.session_id is None and view.contains(sc)) as hit:
            with self.storage.transaction():
                n = forget_facts()
                if scope.session_id is None:
                    self.storage.forget_core(view)
            for core in hit:  # only once the store has committed
                core._forgotten()
        with self._parts_lock:
            workings = [wm for sc, wm in self._workings.items() if scope.contains(sc)]
        for wm in workings:
            wm.clear()
        return n

    def restore_cores(self, scopes: Collection[Scope], write: Callable[[], T]) -> T:
        """``write()`` (an import: one transaction, which writes the stored core blocks of the core
        scopes ``scopes``) with no block write of those scopes' loaded core memories running
        meanwhile; once it returned (committed), they read their blocks again. Call it holding
        the write lock, in a storage job (as :meth:`forget_scope`)."""
        with self._cores_held(lambda sc: sc in scopes) as hit:
            out = write()
            for core in hit:
                core._restored()
        return out

    @contextlib.contextmanager
    def _cores_held(self, match: Callable[[Scope], bool]) -> Iterator[list["PersistentCoreMemory"]]:
        """The loaded core memories of the core scopes ``match`` accepts, each holding its write
        lock (in scope order), and no core of a matching scope loaded meanwhile."""
        with self._parts_lock:
            hit = sorted(((sc, c) for sc, c in list(self._cores.items()) if match(sc)),
                         key=lambda p: (p[0].user_id or "", p[0].agent_id or ""))
            with contextlib.ExitStack() as held:  # no block write of theirs runs meanwhile
                for _, core in hit:
                    held.enter_context(core._write_lock)
                yield [core for _, core in hit]

    def working_for(self, scope: Scope) -> "WorkingMemory":
        """The working memory of a view scope: in this process only, one per scope.

        It is kept while it holds an entry or while anything holds it (a view, a caller's
        reference); one that holds nothing (its entries expired, deleted or cleared) and that
        nothing holds is dropped — a later view of the scope gets a new, empty one, which is all
        the dropped one was. So a server opening a view per request for many sessions keeps the
        working memories of the sessions with entries or views, not of every session it saw
        (the engine's dict holds at most about twice those, or ``WORKINGS_SWEEP_MIN``)."""
        with self._parts_lock:
            wm = self._workings.get(scope)
            if wm is None:
                if len(self._workings) >= self._workings_sweep_at:
                    self._drop_idle_workings()
                    self._workings_sweep_at = max(WORKINGS_SWEEP_MIN, 2 * len(self._workings))
                cfg = self.config
                wm = _HeldWorkingMemory(max_bytes=cfg.working_memory_bytes, max_entries=cfg.working_memory_entries,
                                        default_ttl_secs=cfg.working_memory_ttl.total_seconds(), clock=self.clock)
                self._workings[scope] = wm
            return wm

    def _drop_idle_workings(self) -> None:
        """Drop the working memories that hold nothing and that nothing but this dict holds (under
        ``_parts_lock``). One still held (its weak reference alive once the dict let go) is in use
        and is put back: the same object stays the scope's, whatever is written through it later."""
        idle = [sc for sc, wm in self._workings.items() if _holds_nothing(wm)]
        refs = [(sc, weakref.ref(self._workings.pop(sc))) for sc in idle]  # no other reference of ours left
        for sc, ref in refs:
            held = ref()
            if held is not None:
                self._workings[sc] = held

    def io(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return self.runner.io(fn, *args)

    async def locked_io(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on an I/O thread, started only once the write lock is held."""

        async def call() -> T:
            return await self.io(fn, *args)

        return await self.locked(call())

    def close(self) -> None:
        """Release the providers on the loop, stop the loop, close the store. In a child made by
        ``os.fork()`` only marks the engine closed: the loop does not exist there, and the providers'
        connections and the store belong to the parent (closing an inherited connection or file
        from the child would close or checkpoint it under the parent).

        Bounded: each provider's ``aclose`` gets the runner's ``grace_secs``, the calls in flight
        get it too (:meth:`~umi._loop.LoopThread.close`). A storage job that does not end in time
        cannot be stopped: its call is failed with :class:`~umi.OutcomeUnknownError`, and the store
        is closed when that job ends (never under it). A close() from another thread meanwhile
        returns once this one has (the store closed, a hung job's aside)."""
        if not self.closed:
            self.runner.check_off_loop("close()")  # refused before it marks anything closed
        with self._close_lock:
            first, self.closed = not self.closed, True
        if not first:  # another thread's close() runs: return once it is done (it is bounded)
            if not self.runner.forked:
                with contextlib.suppress(LoopReentryError):  # on the loop it would wait for itself
                    self.runner.check_off_loop("close()")
                    self._close_done.wait()
            return
        if self.runner.forked:
            self.runner.close()  # marks it closed; nothing of the loop exists in this process
            return
        try:
            # Async SDK clients' connections belong to our loop: release them on it, before it stops.
            for p in (self.llm, self.embedder):
                if p is not None:
                    try:
                        self.runner.run(p.aclose(), timeout=self.runner.grace_secs)
                    except concurrent.futures.TimeoutError:
                        pass  # still pending: the runner's close cancels it
        finally:
            try:
                self.runner.close()  # (re-raises a Ctrl-C that cut its grace short, once it is done)
            finally:
                try:
                    self.runner.after_io(self.storage.close)
                finally:
                    self._close_done.set()


class StoredBlocks:
    """The store's core blocks of one scope, as a :class:`~umi.core_memory.PersistentCoreMemory`
    writes them: each call is one transaction of the store (called from the caller's thread;
    the store's own lock orders it with the other writers)."""

    def __init__(self, engine: Engine, scope: Scope) -> None:
        self._engine = engine
        self._scope = scope

    def load(self) -> list[tuple[str, str, float]]:
        return self._job(self.stored)

    def stored(self) -> list[tuple[str, str, float]]:
        """The stored blocks, read with no check: inside a storage job already running (an import's)."""
        blocks = sorted(self._engine.storage.core_blocks(self._scope), key=lambda b: b.position)
        return [(b.name, b.content, b.importance) for b in blocks]

    def set(self, label: str, content: str, importance: float) -> None:
        storage = self._engine.storage
        self._job(lambda: storage.set_core_block(self._scope, label, content, importance, self._engine.now_ms()))

    def remove(self, label: str) -> bool:
        storage = self._engine.storage
        return self._job(lambda: storage.remove_core_block(self._scope, label, self._engine.now_ms()))

    def clear(self) -> int:
        storage = self._engine.storage
        return self._job(lambda: storage.clear_core_blocks(self._scope, self._engine.now_ms()))

    def _job(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the caller's thread as a storage job of the loop (:meth:`LoopThread.job`):
        refused once close() has begun, else the store is closed after it, never under it."""
        self._engine.check_open()
        return self._engine.runner.job(fn)
