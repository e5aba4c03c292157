"""Working memory: a session key-value store with TTLs and a byte budget.

The engine is the compiled class in :mod:`umi._native._arena`; this module adds
only what is not on the hot path (``repr``, iteration), without overriding a
compiled method, so ``get``/``set`` cost what the compiled code costs.

Limits: keys are ``str`` of 1-256 UTF-8 bytes, values ``bytes`` of at most
64 KiB, TTLs more than 0 and at most 7 days. ``used_bytes`` is the sum of UTF-8
key bytes and value bytes of the entries stored, bounded by ``max_bytes``
(default 1 MiB, accepted 1 KiB-1 GiB); ``max_entries`` bounds their number.

Time: ``clock`` is a zero-argument callable returning seconds (a fake one in
tests; by default the C monotonic clock, with no Python call). Each operation
reads it once and first removes the entries that have expired (expiry at or
before now), so an expired value is never returned and a write that does not
fit has already had the expired space reclaimed. Then ``on_full="error"``
raises :class:`umi.WorkingMemoryFullError` (``.over_by``, ``.limit``, ``.key``)
and changes nothing, while ``on_full="evict_lru"`` evicts least-recently-used
entries until the write fits (``set``, ``get``, ``touch`` and ``incr`` count as
use). ``keys()`` lists live keys least recently used first.
"""

from __future__ import annotations

from collections.abc import Iterator

from ._native._arena import (
    WORKING_MEMORY_KEY_BYTES_MAX,
    WORKING_MEMORY_MAX_BYTES_MAX,
    WORKING_MEMORY_MAX_BYTES_MIN,
    WORKING_MEMORY_MAX_ENTRIES_MAX,
    WORKING_MEMORY_TTL_SECS_MAX,
    WORKING_MEMORY_VALUE_BYTES_MAX,
)
from ._native._arena import WorkingMemory as _CompiledWorkingMemory

__all__ = [
    "WORKING_MEMORY_KEY_BYTES_MAX",
    "WORKING_MEMORY_MAX_BYTES_MAX",
    "WORKING_MEMORY_MAX_BYTES_MIN",
    "WORKING_MEMORY_MAX_ENTRIES_MAX",
    "WORKING_MEMORY_TTL_SECS_MAX",
    "WORKING_MEMORY_VALUE_BYTES_MAX",
    "WorkingMemory",
]


class WorkingMemory(_CompiledWorkingMemory):
    """A session key-value store with per-entry TTLs, a byte budget and an entry cap.

    >>> wm = WorkingMemory(clock=lambda: 0.0)
    >>> wm.set("session_id", b"abc123")
    >>> wm.get("session_id")
    b'abc123'
    """

    __slots__ = ()

    def __iter__(self) -> Iterator[str]:
        """Live keys, least recently used first (a snapshot)."""
        return iter(self.keys())

    def __repr__(self) -> str:
        return (
            f"WorkingMemory(entries={len(self)}, used_bytes={self.used_bytes}, "
            f"max_bytes={self.max_bytes}, max_entries={self.max_entries}, "
            f"on_full={self.on_full!r})"
        )
