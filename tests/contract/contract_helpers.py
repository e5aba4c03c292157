"""Plain helpers of the storage contract suite (fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np

from umi.types import Entity

T0 = 1_700_000_000_000


def vec(*xs: float) -> np.ndarray:
    return np.asarray(xs, dtype=np.float32)


def ent(name: str, content: str, *, etype: str = "person", t: int = 0, emb: np.ndarray | None = None,
        meta: dict | None = None, event_time: int | None = None, **kw: object) -> Entity:
    """An entity created at ``T0 + t`` ms."""
    return Entity(etype, name, content, metadata=dict(meta or {}), embedding=emb, created_at=T0 + t,
                  event_time=event_time, **kw)  # type: ignore[arg-type]
