"""``SimStorageBackend``: the whole storage contract in memory, with fault injection.

Deterministic: no wall clock (``delete(at=None)`` stamps the backend's
:class:`~umi.sim.SimClock`), no unordered iteration in results, seeded randomness
only. Entities live in the same :class:`~umi.storage._hotcache.EntityCache` that
serves the DuckDB backend's reads, with a :class:`umi.index.VectorIndex` for vectors.

Faults (a :class:`~umi.sim.FaultInjector`, consulted once per call):

* ``STORAGE_WRITE_FAIL`` — the write raises :class:`~umi.StorageError`. Batch writes
  fail part-way through (at a seeded position), so the rollback path is exercised:
  nothing of the call (or of the enclosing transaction) stays behind.
* ``STORAGE_READ_FAIL`` — the read raises :class:`~umi.StorageError`.
* ``STORAGE_LATENCY`` — the call advances the backend's clock by
  ``faults.latency_ms`` (simulated time; nothing sleeps).

Thread-safe: one re-entrant lock guards every call; a transaction holds it until it
ends, so other threads never see uncommitted state.
"""

from __future__ import annotations

from typing import Any

from ..errors import StorageError
from ..index import HNSW_THRESHOLD
from ..sim.clock import SimClock
from ..sim.faults import FaultInjector, FaultType
from ..sim.rng import SimRng
from ._common import check_int
from .cached import CachedStore, MemoryDurable

__all__ = ["SimStorageBackend"]


class SimStorageBackend(CachedStore):
    """In-memory storage for deterministic tests; passes the same contract as DuckDB."""

    supports_concurrent_writers = False
    supports_multiple_processes = False
    durable = False

    def __init__(self, seed: int = 0, faults: FaultInjector | None = None, *, clock: SimClock | None = None,
                 dim: int | None = None, hnsw_threshold: int = HNSW_THRESHOLD) -> None:
        check_int(seed, "seed", -(2**63), 2**63 - 1)
        if faults is not None and not isinstance(faults, FaultInjector):
            raise TypeError(f"faults must be a FaultInjector or None, not {type(faults).__name__}")
        if clock is not None and not callable(getattr(clock, "now_ms", None)):
            raise TypeError("clock must have a now_ms() method (a umi.sim.SimClock)")
        check_int(dim, "dim", 1, 65_536, optional=True)
        check_int(hnsw_threshold, "hnsw_threshold", 0)
        self.seed = seed
        self.faults = faults
        self.clock = clock if clock is not None else SimClock()
        self._rng = SimRng(seed).fork("sim-storage")
        self._hnsw_threshold = hnsw_threshold

        def make_index(d: int) -> Any:
            from ..index import VectorIndex

            return VectorIndex(d, hnsw_threshold=hnsw_threshold, seed=seed)

        self._init_state(MemoryDurable(), dim, make_index)
        self._open_cache(self._durable.load(dim))
        self._closed = False

    # --- faults and time -------------------------------------------------------------------
    def _now(self) -> int:
        return self.clock.now_ms()

    def _latency(self) -> None:
        f = self.faults
        if f is not None and f.should_fail(FaultType.STORAGE_LATENCY):
            self.clock.advance(f.latency_ms)

    def _fault_read(self, op: str) -> None:
        self._latency()
        if self.faults is not None and self.faults.should_fail(FaultType.STORAGE_READ_FAIL):
            raise StorageError(f"injected storage read failure in {op}()")

    def _write_fault_at(self, n_items: int) -> int | None:
        """Where (item position) this write fails, or None. Consults the injector once."""
        self._latency()
        if self.faults is None or not self.faults.should_fail(FaultType.STORAGE_WRITE_FAIL):
            return None
        return self._rng.randint(0, max(n_items - 1, 0))

    def __repr__(self) -> str:
        return (f"SimStorageBackend(seed={self.seed}, entities={len(self._cache)}, dim={self.dim}, "
                f"generation={self._generation})")
