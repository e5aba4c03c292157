"""Deterministic simulation: a clock that moves only when told, seeded randomness,
named, seeded fault injection, and a world whose processes can crash."""

from .clock import SIM_EPOCH_MS, SimClock
from .faults import FaultInjector, FaultType
from .rng import SimRng
from .world import SimulatedCrash, SimWorld, install_crash_points

__all__ = ["SimClock", "SimRng", "FaultInjector", "FaultType", "SIM_EPOCH_MS", "SimWorld", "SimulatedCrash",
           "install_crash_points"]
