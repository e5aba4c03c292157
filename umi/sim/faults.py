"""Seeded fault injection for deterministic simulation.

A :class:`FaultInjector` answers ``should_fail(FaultType.X)`` with a sequence that
depends only on the seed and the fault type: each type draws from its own stream,
so consulting one type never shifts another's sequence. Components consult it at
their failure points (the Sim storage backend, the Sim LLM and embedder) and raise
the error that a real failure there would raise.

::

    faults = FaultInjector(seed=7, probabilities={FaultType.STORAGE_WRITE_FAIL: 0.1})
    faults.should_fail(FaultType.STORAGE_WRITE_FAIL)   # False, False, True, ... (fixed per seed)
    faults.fired[FaultType.STORAGE_WRITE_FAIL]         # how many fired
"""

from __future__ import annotations

import enum
import math
import random
import threading
from contextlib import contextmanager
from typing import Iterator, Mapping

from ..errors import InvalidConfigError

__all__ = ["FaultType", "FaultInjector"]


class FaultType(str, enum.Enum):
    """Named failure points. Who consults each one:

    * ``STORAGE_WRITE_FAIL`` — a storage write (upsert, delete, supersede, add_*) raises
      ``StorageError`` before changing anything; a transaction containing it rolls back.
    * ``STORAGE_READ_FAIL`` — a storage read raises ``StorageError``.
    * ``STORAGE_LATENCY`` — a storage call is slow: the Sim backend advances its clock by
      ``latency_ms`` (no real sleeping in simulations).
    * ``LLM_TIMEOUT``, ``LLM_RATE_LIMIT``, ``LLM_INVALID_RESPONSE`` — the Sim LLM raises
      ``ProviderTimeoutError``, ``RateLimitError``, ``InvalidResponseError``.
    * ``EMBEDDING_FAIL`` — the Sim embedder raises ``EmbeddingError``.
    * ``CRASH`` — a crash point: the simulated process stops here. Consulted before and
      after every storage write by :func:`umi.sim.install_crash_points`, which raises
      :class:`umi.sim.SimulatedCrash` (a ``BaseException``: no ``except Exception`` in umi
      can swallow it); :class:`umi.sim.SimWorld` then drops the Memory without closing it
      and opens a new one on what the Sim store holds durably.
    * ``CLOCK_SKEW`` — a clock reading is off by ``clock_skew_ms`` (ahead, then behind, in
      turn). Consulted by :class:`umi.sim.SimClock` on every reading when given ``faults``.
    """

    STORAGE_WRITE_FAIL = "storage_write_fail"
    STORAGE_READ_FAIL = "storage_read_fail"
    STORAGE_LATENCY = "storage_latency"
    LLM_TIMEOUT = "llm_timeout"
    LLM_RATE_LIMIT = "llm_rate_limit"
    LLM_INVALID_RESPONSE = "llm_invalid_response"
    EMBEDDING_FAIL = "embedding_fail"
    CRASH = "crash"
    CLOCK_SKEW = "clock_skew"

    @classmethod
    def parse(cls, value: "FaultType | str") -> "FaultType":
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise TypeError(f"fault type must be a FaultType or str, not {type(value).__name__}")
        key = value.strip()
        for ft in cls:
            if key.lower() == ft.value or key.upper() == ft.name:
                return ft
        allowed = ", ".join(ft.value for ft in cls)
        raise InvalidConfigError(f"unknown fault type {value!r}; expected one of: {allowed}")

    def __str__(self) -> str:
        return self.value


def _check_probability(fault: FaultType, p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"probability of {fault.value} must be a float, not {type(p).__name__}")
    p = float(p)
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise InvalidConfigError(f"probability of {fault.value} must be in [0, 1], got {p!r}")
    return p


class FaultInjector:
    """Decides, deterministically, when each named fault fires.

    ``probabilities`` maps fault types (or their names) to a chance in [0, 1] per
    consultation. ``force(fault, times)`` makes the next ``times`` consultations fire
    regardless of chance; inside ``with injector.suspended():`` nothing fires and no
    randomness is consumed. ``checks`` and ``fired`` count consultations and firings.
    Thread-safe.
    """

    def __init__(self, seed: int = 0, probabilities: Mapping[FaultType | str, float] | None = None, *,
                 latency_ms: int = 50, clock_skew_ms: int = 60_000) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, not {type(seed).__name__}")
        if probabilities is not None and not isinstance(probabilities, Mapping):
            raise TypeError(f"probabilities must be a mapping, not {type(probabilities).__name__}")
        for name, v in (("latency_ms", latency_ms), ("clock_skew_ms", clock_skew_ms)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, not {type(v).__name__}")
            if v < 0:
                raise InvalidConfigError(f"{name} must be >= 0, got {v}")
        self.seed = seed
        self.latency_ms = latency_ms
        self.clock_skew_ms = clock_skew_ms
        self._p: dict[FaultType, float] = {ft: 0.0 for ft in FaultType}
        for k, p in (probabilities or {}).items():
            ft = FaultType.parse(k)
            self._p[ft] = _check_probability(ft, p)
        self._rng = {ft: random.Random(f"umi-faults:{seed}:{ft.value}") for ft in FaultType}
        self._forced: dict[FaultType, int] = {ft: 0 for ft in FaultType}
        self._checks: dict[FaultType, int] = {ft: 0 for ft in FaultType}
        self._fired: dict[FaultType, int] = {ft: 0 for ft in FaultType}
        self._suspended = 0
        self._lock = threading.Lock()

    def should_fail(self, fault: FaultType | str) -> bool:
        """Consult the injector at a failure point: True means 'fail here now'."""
        ft = FaultType.parse(fault)
        with self._lock:
            if self._suspended:
                return False
            self._checks[ft] += 1
            if self._forced[ft] > 0:
                self._forced[ft] -= 1
                hit = True
            else:
                p = self._p[ft]
                hit = p > 0.0 and self._rng[ft].random() < p
            if hit:
                self._fired[ft] += 1
            return hit

    def probability(self, fault: FaultType | str) -> float:
        return self._p[FaultType.parse(fault)]

    def set_probability(self, fault: FaultType | str, p: float) -> None:
        ft = FaultType.parse(fault)
        value = _check_probability(ft, p)
        with self._lock:
            self._p[ft] = value

    def force(self, fault: FaultType | str, times: int = 1) -> None:
        """Make the next ``times`` consultations of ``fault`` fire."""
        ft = FaultType.parse(fault)
        if isinstance(times, bool) or not isinstance(times, int):
            raise TypeError(f"times must be an int, not {type(times).__name__}")
        if times < 0:
            raise InvalidConfigError(f"times must be >= 0, got {times}")
        with self._lock:
            self._forced[ft] = times

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Nothing fires inside (setup and verification code); no randomness is consumed."""
        with self._lock:
            self._suspended += 1
        try:
            yield
        finally:
            with self._lock:
                self._suspended -= 1

    @property
    def checks(self) -> dict[FaultType, int]:
        with self._lock:
            return dict(self._checks)

    @property
    def fired(self) -> dict[FaultType, int]:
        with self._lock:
            return dict(self._fired)

    def reset_counts(self) -> None:
        with self._lock:
            for ft in FaultType:
                self._checks[ft] = 0
                self._fired[ft] = 0

    def __repr__(self) -> str:
        active = {ft.value: p for ft, p in self._p.items() if p > 0}
        return f"FaultInjector(seed={self.seed}, probabilities={active})"
