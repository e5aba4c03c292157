"""A seeded random source for simulations: one seed, two faces (stdlib and numpy)."""

from __future__ import annotations

import random
from typing import Any, MutableSequence, Sequence, TypeVar

import numpy as _np

__all__ = ["SimRng"]

T = TypeVar("T")


class SimRng:
    """Deterministic randomness. ``SimRng(seed).fork("name")`` gives an independent stream
    whose sequence depends only on the seed and the name (not on how the parent was used)."""

    __slots__ = ("seed", "_py", "_np")

    def __init__(self, seed: int | str = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, str)):
            raise TypeError(f"seed must be an int or str, not {type(seed).__name__}")
        self.seed = seed
        self._py = random.Random(f"umi-sim:{seed}")
        self._np = _np.random.default_rng(self._py.getrandbits(128))

    def fork(self, name: str) -> "SimRng":
        if not isinstance(name, str):
            raise TypeError(f"name must be str, not {type(name).__name__}")
        return SimRng(f"{self.seed}/{name}")

    @property
    def py(self) -> random.Random:
        return self._py

    @property
    def np(self) -> _np.random.Generator:
        return self._np

    def random(self) -> float:
        return self._py.random()

    def randint(self, lo: int, hi: int) -> int:
        """Uniform int in [lo, hi] (both inclusive)."""
        return self._py.randint(lo, hi)

    def uniform(self, lo: float, hi: float) -> float:
        return self._py.uniform(lo, hi)

    def choice(self, seq: Sequence[T]) -> T:
        return self._py.choice(seq)

    def shuffle(self, seq: MutableSequence[Any]) -> None:
        self._py.shuffle(seq)

    def sample(self, seq: Sequence[T], k: int) -> list[T]:
        return self._py.sample(seq, k)

    def bernoulli(self, p: float) -> bool:
        return self._py.random() < p

    def normal(self, size: int | tuple[int, ...], dtype: Any = _np.float32) -> _np.ndarray:
        return self._np.standard_normal(size).astype(dtype)

    def unit_vectors(self, n: int, dim: int) -> _np.ndarray:
        """``n`` random L2-normalised float32 vectors of ``dim``."""
        v = self._np.standard_normal((n, dim)).astype(_np.float32)
        v /= _np.linalg.norm(v, axis=1, keepdims=True)
        return v

    def __repr__(self) -> str:
        return f"SimRng(seed={self.seed!r})"
