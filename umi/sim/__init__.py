"""Deterministic simulation: a clock that moves only when told, seeded randomness,
and named, seeded fault injection."""

from .clock import SIM_EPOCH_MS, SimClock
from .faults import FaultInjector, FaultType
from .rng import SimRng

__all__ = ["SimClock", "SimRng", "FaultInjector", "FaultType", "SIM_EPOCH_MS"]
