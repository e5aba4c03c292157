"""A simulated world: one durable Sim store that outlives the processes opened on it.

:class:`SimWorld` holds what survives a crash — the Sim store (its committed state), the
clock and the fault injector — and opens :class:`umi.Memory` objects on it, each one a
simulated process. Three ways a process ends:

* ``world.close(memory)`` — a clean close: ``Memory.close()`` runs (providers released,
  pending calls finished), and the store stays, as a file stays when a process exits;
* ``world.crash(memory)`` — what :class:`SimulatedCrash` means: the Memory is dropped
  *without* ``close()``: nothing of it runs again (its loop stops, no provider is closed,
  no index is saved). Whatever transaction was in flight has already rolled back, because
  the crash unwound through it;
* ``world.open()`` afterwards — a new process on the durable state: the vector index is
  rebuilt from the stored rows (a restart loses the cache, never a memory).

Crash points come from :func:`install_crash_points`: every storage write (and every
transaction commit) consults ``FaultType.CRASH`` just before and just after it runs. A
crash before is a write that never happened (or a transaction that rolls back); a crash
after is a write that is durable but was never acknowledged to the caller.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .clock import SIM_EPOCH_MS, SimClock
from .faults import FaultInjector, FaultType

__all__ = ["SimulatedCrash", "install_crash_points", "SimWorld", "CRASH_POINT_METHODS"]

#: storage methods that write (and the index-cache save); each gets a crash point before and
#: after (those the store has)
CRASH_POINT_METHODS = (
    "upsert", "delete", "supersede", "add_source", "add_relations", "revive", "delete_source",
    "restore", "set_core_block", "remove_core_block", "clear_core_blocks", "forget_core", "set_meta", "save_index",
)


class SimulatedCrash(BaseException):
    """The simulated process died at a crash point. A ``BaseException``, like ``SystemExit``:
    no ``except Exception`` on the way up may swallow it."""

    def __init__(self, point: str) -> None:
        super().__init__(f"simulated crash at {point}")
        self.point = point


def install_crash_points(store: Any, faults: FaultInjector | None) -> list[str]:
    """Wrap ``store``'s write methods and ``transaction()`` with crash points (per instance;
    the class is untouched). Returns the names of the points installed."""
    if faults is None:
        return []

    def point(where: str) -> None:
        if faults.should_fail(FaultType.CRASH):
            raise SimulatedCrash(where)

    def with_points(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            point(f"before {name}")
            out = fn(*args, **kwargs)
            point(f"after {name}")
            return out

        return wrapped

    names = []
    for name in CRASH_POINT_METHODS:
        fn = getattr(store, name, None)
        if fn is None or not callable(fn):
            continue
        setattr(store, name, with_points(name, fn))
        names += [f"before {name}", f"after {name}"]

    real_transaction = store.transaction

    @contextmanager
    def transaction() -> Iterator[None]:
        with real_transaction():
            yield
            point("before commit")
        point("after commit")

    store.transaction = transaction
    return names + ["before commit", "after commit"]


class SimWorld:
    """The durable part of a simulation; see the module docstring.

    ``SimWorld(seed, faults)`` makes the clock (which consults ``CLOCK_SKEW``), the Sim store
    (``STORAGE_*`` faults, crash points) and opens Memories with the Sim LLM and embedder
    (``LLM_*`` and ``EMBEDDING_FAIL`` faults). Same seed and faults, same world.
    """

    def __init__(self, seed: int, faults: FaultInjector | None = None, *, dim: int = 64,
                 config: Any = None, with_llm: bool = True) -> None:
        from ..storage.sim import SimStorageBackend

        self.seed = seed
        self.faults = faults
        self.dim = dim
        self.config = config
        self.with_llm = with_llm
        self.clock = SimClock(start_ms=SIM_EPOCH_MS, faults=faults)
        self.store = SimStorageBackend(seed=seed, faults=faults, clock=self.clock, dim=dim)
        self.crash_points = install_crash_points(self.store, faults)
        self._close_store = self.store.close
        # A process closing its handle does not close the medium: Memory.close() calls
        # storage.close(); the world closes the store once, in shutdown().
        self.store.close = lambda: None  # type: ignore[method-assign]
        self.opened = 0
        self.crashed = 0
        self.closed = 0

    def open(self) -> Any:
        """A new process on the durable state (its vector index rebuilt from the rows)."""
        from ..memory import MemoryBuilder
        from ..providers.sim import SimEmbeddingProvider, SimLLMProvider

        self._rebuild_index()
        b = MemoryBuilder().with_storage(self.store).with_clock(self.clock)
        b = b.with_embedder(SimEmbeddingProvider(self.seed, self.dim, faults=self.faults))
        if self.with_llm:
            b = b.with_llm(SimLLMProvider(self.seed, faults=self.faults))
        if self.config is not None:
            b = b.with_config(self.config)
        self.opened += 1
        return b.build()

    def _rebuild_index(self) -> None:
        cache = getattr(self.store, "_cache", None)
        rebuild = getattr(cache, "rebuild_index", None)
        if rebuild is None:
            return
        with self.store._lock:
            if getattr(self.store, "_depth", 0):  # pragma: no cover - a crash always unwinds it
                raise RuntimeError("a transaction is still open on the Sim store after a crash")
            rebuild()

    def crash(self, memory: Any) -> None:
        """Drop ``memory`` as a killed process would be: no close(), nothing of it runs again."""
        memory._closed = True
        runner = getattr(memory, "_runner", None)
        if runner is not None:
            runner.grace_secs = 0.0
            runner.close()  # the process's threads die with it; the store is not touched
        self.crashed += 1

    def close(self, memory: Any) -> None:
        """A clean close of one process; the durable store stays."""
        memory.close()
        self.closed += 1

    def shutdown(self) -> None:
        self._close_store()

    def __enter__(self) -> "SimWorld":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
