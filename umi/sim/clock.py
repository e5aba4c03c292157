"""A simulated clock: time moves only when a test moves it."""

from __future__ import annotations

from typing import Any

__all__ = ["SimClock", "SIM_EPOCH_MS"]

#: where a Sim clock starts by default (2023-11-14T22:13:20Z)
SIM_EPOCH_MS = 1_700_000_000_000


def _check_ms(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int of milliseconds, not {type(value).__name__}")
    return value


class SimClock:
    """Integer milliseconds that only change through :meth:`advance` or :meth:`jump`.

    ``clock()`` returns seconds as a float, so a ``SimClock`` can stand in for
    ``time.monotonic`` / ``time.time`` (e.g. as the WorkingMemory clock);
    :meth:`now_ms` returns the integer milliseconds that archival memory stamps.

    With a ``faults`` injector, every reading consults ``FaultType.CLOCK_SKEW``: when it
    fires, that one reading is off by ``faults.clock_skew_ms`` — ahead and behind in turn
    (the first skew is ahead) — while the clock itself does not move. So code under test
    meets readings that jump forward and back, deterministically per seed. ``skews``
    counts the skewed readings.
    """

    __slots__ = ("_ms", "_faults", "skews")

    def __init__(self, start_ms: int = SIM_EPOCH_MS, *, faults: Any = None) -> None:
        start_ms = _check_ms(start_ms, "start_ms")
        if start_ms < 0:
            from ..errors import InvalidConfigError

            raise InvalidConfigError(f"start_ms must be >= 0, got {start_ms}")
        if faults is not None and not callable(getattr(faults, "should_fail", None)):
            raise TypeError(f"faults must be a FaultInjector or None, not {type(faults).__name__}")
        self._ms = start_ms
        self._faults = faults
        self.skews = 0

    def _reading(self) -> int:
        f = self._faults
        if f is None or not f.should_fail("clock_skew"):
            return self._ms
        self.skews += 1
        skew = f.clock_skew_ms if self.skews % 2 == 1 else -f.clock_skew_ms
        return max(0, self._ms + skew)

    def now_ms(self) -> int:
        return self._reading()

    def true_ms(self) -> int:
        """The clock's own time, never skewed (for tests and the simulation driver)."""
        return self._ms

    def __call__(self) -> float:
        return self._reading() / 1000.0

    def advance(self, ms: int) -> int:
        """Move forward by ``ms`` (>= 0); returns the new time in ms."""
        ms = _check_ms(ms, "ms")
        if ms < 0:
            from ..errors import ValidationError

            raise ValidationError(f"advance() moves forward only; got {ms} ms (use jump() for skew)")
        self._ms += ms
        return self._ms

    def jump(self, delta_ms: int) -> int:
        """Move by ``delta_ms`` in either direction (a clock skew); never below 0."""
        delta_ms = _check_ms(delta_ms, "delta_ms")
        if self._ms + delta_ms < 0:
            from ..errors import ValidationError

            raise ValidationError(f"jump({delta_ms}) would move the clock before 0 (it is at {self._ms} ms)")
        self._ms += delta_ms
        return self._ms

    def __repr__(self) -> str:
        return f"SimClock(now_ms={self._ms}, skews={self.skews})"
