"""``Memory`` and ``MemoryBuilder``: the three tiers wired together.

The pipelines live in :mod:`umi.pipeline`; this module only chooses the parts,
owns their lifetime, and exposes every operation once, as a coroutine that runs on
the Memory's private loop (see :mod:`umi._loop`). Each blocking ``_sync`` twin is
generated from it by :func:`_sync` — there is no second implementation. Writes are
serialised by one lock; reads run concurrently.

What a Memory shares with its views lives in one :class:`_Engine` (store, providers,
loop, write lock, clock); a :class:`Memory` object is a face over it.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Concatenate, Coroutine, ParamSpec, TypeVar

from .errors import InvalidConfigError, UmiError, ValidationError
from .options import MemoryConfig, RecallOptions, RememberOptions
from .pipeline import recall as _recall
from .pipeline import remember as _remember
from .pipeline.context import PipelineContext
from .providers.base import EmbeddingProvider, LLMProvider
from .storage.base import HistoryRecord, SearchFilters, StorageBackend
from .types import Entity, EvolutionRelation, RememberResult

if TYPE_CHECKING:
    from ._loop import LoopThread
    from .core_memory import CoreMemory
    from .working_memory import WorkingMemory

T = TypeVar("T")
P = ParamSpec("P")

__all__ = ["Memory", "MemoryBuilder"]

SIM_EPOCH_MS = 1_700_000_000_000  # 2023-11-14: where every Sim clock starts


def _check_id(entity_id: object) -> str:
    if not isinstance(entity_id, str):
        raise TypeError(f"entity id must be str, not {type(entity_id).__name__}")
    if not entity_id.strip():
        raise ValidationError("entity id must not be empty")
    return entity_id


def _opts(options: Any, cls: type[T]) -> T:
    if options is None:
        return cls()
    if not isinstance(options, cls):
        raise TypeError(f"options must be {cls.__name__}, not {type(options).__name__}")
    return options


class _Clock:
    """Milliseconds that never repeat: max(clock, last + 1), so every event has its own instant."""

    def __init__(self, source_ms: Callable[[], int]) -> None:
        self._source = source_ms
        self._last = -1
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            t = max(int(self._source()), self._last + 1)
            self._last = t
            return t


class _Engine:
    """The parts one store's Memory and all its views share: store, providers, config, the
    private loop, the write lock and the clock. Closed once, by the Memory that opened it."""

    def __init__(self, config: MemoryConfig, llm: LLMProvider | None, embedder: EmbeddingProvider | None,
                 storage: StorageBackend, clock: Callable[[], float] | None) -> None:
        from ._loop import LoopThread

        self.config = config
        self.llm = llm
        self.embedder = embedder
        self.storage = storage
        self.clock = clock
        seconds = clock if clock is not None else time.time
        exact_ms = getattr(clock, "now_ms", None)  # a SimClock keeps integer ms: no float round trip
        self.now_ms = _Clock(exact_ms if callable(exact_ms) else (lambda: round(seconds() * 1000.0)))
        self.runner: LoopThread = LoopThread()
        self._write_lock: Any = None  # an asyncio.Lock, made on the loop on first use
        self.closed = False

    async def locked(self, coro: Awaitable[T]) -> T:
        """Await ``coro`` holding the write lock (on the loop)."""
        import asyncio

        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:
            return await coro

    def io(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return self.runner.io(fn, *args)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            # Async SDK clients' connections belong to our loop: release them on it, before it stops.
            for p in (self.llm, self.embedder):
                if p is not None:
                    self.runner.run(p.aclose())
        finally:
            self.runner.close()
            self.storage.close()


def _on_loop(fn: Callable[Concatenate["Memory", P], Coroutine[Any, Any, T]]
             ) -> Callable[Concatenate["Memory", P], Coroutine[Any, Any, T]]:
    """Make a verb run on the Memory's loop whichever loop awaits it."""

    @functools.wraps(fn)
    async def verb(self: "Memory", *args: P.args, **kwargs: P.kwargs) -> T:
        self._check_open()
        return await self._engine.runner.arun(fn(self, *args, **kwargs))

    return verb


def _sync(fn: Callable[Concatenate["Memory", P], Coroutine[Any, Any, T]]) -> Callable[Concatenate["Memory", P], T]:
    """The blocking twin of an async verb: the same coroutine, run to completion on the loop."""

    @functools.wraps(fn)
    def twin(self: "Memory", *args: P.args, **kwargs: P.kwargs) -> T:
        self._check_open()  # before the coroutine exists: a closed Memory never leaves one un-awaited
        return self._engine.runner.run(fn(self, *args, **kwargs))

    twin.__name__ = twin.__qualname__ = fn.__name__ + "_sync"
    twin.__doc__ = f"Blocking twin of :meth:`{fn.__name__}` (callable from any thread)."
    return twin


class Memory:
    """Memory for one agent: ``core``, ``working`` and archival (``remember`` / ``recall``).

    ``Memory(path)`` is the embedded default: a DuckDB file, the local offline
    embedder, and rule-based extraction (no LLM is used unless you pass one —
    an API key in the environment is never picked up silently).
    ``Memory.sim(seed)`` is fully deterministic and in memory;
    :class:`MemoryBuilder` and the ``with_*`` class methods choose other parts.
    Every verb is a coroutine (``await memory.remember(...)``) with a blocking
    ``_sync`` twin (``memory.remember_sync(...)``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = "umi.duckdb",
        *,
        config: MemoryConfig | None = None,
        llm: LLMProvider | None = None,
        embedder: EmbeddingProvider | None = None,
        storage: StorageBackend | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        config = config if config is not None else MemoryConfig()
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, not {type(config).__name__}")
        if llm is not None and not isinstance(llm, LLMProvider):
            raise TypeError(f"llm must be an LLMProvider, not {type(llm).__name__}")
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a zero-argument callable returning seconds")
        if embedder is None:
            from .providers.local import LocalEmbeddingProvider

            embedder = LocalEmbeddingProvider()
        elif not isinstance(embedder, EmbeddingProvider):
            raise TypeError(f"embedder must be an EmbeddingProvider, not {type(embedder).__name__}")
        if storage is None:
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"path must be str or PathLike, not {type(path).__name__}")
            from .storage.duckdb import DuckDBStorageBackend

            storage = DuckDBStorageBackend.connect(
                os.fspath(path), dim=embedder.dim, hnsw_threshold=config.hnsw_threshold
            )
        elif not isinstance(storage, StorageBackend):
            raise TypeError(f"storage must be a StorageBackend, not {type(storage).__name__}")
        if storage.dim is not None and storage.dim != embedder.dim:
            raise InvalidConfigError(
                f"the store holds {storage.dim}-d vectors but the embedder makes {embedder.dim}-d ones; "
                "use the embedder the store was built with"
            )
        self._attach(_Engine(config, llm, embedder, storage, clock), owner=True)

    def _attach(self, engine: _Engine, *, owner: bool) -> None:
        from .core_memory import CoreMemory
        from .working_memory import WorkingMemory

        config = engine.config
        self._engine = engine
        self._owner = owner  # only the Memory that opened the engine closes it
        self._closed = False
        self._ctx = PipelineContext(engine.storage, engine.llm, engine.embedder, config, engine.io, engine.now_ms)
        self.core: CoreMemory = CoreMemory(max_bytes=config.core_memory_bytes)
        self.working: WorkingMemory = WorkingMemory(
            max_bytes=config.working_memory_bytes,
            max_entries=config.working_memory_entries,
            default_ttl_secs=config.working_memory_ttl.total_seconds(),
            clock=engine.clock,
        )

    # --- constructors --------------------------------------------------------
    @classmethod
    def sim(cls, seed: int = 42, *, config: MemoryConfig | None = None, faults: Any = None,
            dim: int = 384) -> "Memory":
        """Sim LLM, Sim embedder, Sim storage and a Sim clock: deterministic, in memory, no network."""
        from .providers.sim import SimEmbeddingProvider, SimLLMProvider
        from .sim.clock import SimClock
        from .storage.sim import SimStorageBackend

        return cls(config=config, llm=SimLLMProvider(seed, faults=faults),
                   embedder=SimEmbeddingProvider(seed, dim, faults=faults),
                   storage=SimStorageBackend(seed=seed, faults=faults), clock=SimClock(start_ms=SIM_EPOCH_MS))

    @classmethod
    def with_anthropic(cls, anthropic_key: str | None = None, openai_key: str | None = None,
                       db_path: str | os.PathLike[str] = "umi.duckdb", *,
                       config: MemoryConfig | None = None, **provider_options: Any) -> "Memory":
        """Anthropic for extraction/evolution/rewrites; OpenAI embeddings with a key, else the local embedder."""
        from .providers.anthropic import AnthropicProvider

        llm = AnthropicProvider(api_key=anthropic_key, **provider_options)
        return cls(db_path, config=config, llm=llm, embedder=_embedder_for(openai_key))

    @classmethod
    def with_openai(cls, openai_key: str | None = None, db_path: str | os.PathLike[str] = "umi.duckdb", *,
                    config: MemoryConfig | None = None, **provider_options: Any) -> "Memory":
        """OpenAI for the LLM tasks and for embeddings."""
        from .providers.openai import OpenAIProvider

        llm = OpenAIProvider(api_key=openai_key, **provider_options)
        return cls(db_path, config=config, llm=llm, embedder=_embedder_for(openai_key, openai=True))

    @classmethod
    def with_postgres(cls, postgres_url: str, anthropic_key: str | None = None, openai_key: str | None = None,
                      *, config: MemoryConfig | None = None, **storage_options: Any) -> "Memory":
        """A shared Postgres + pgvector store (fleets of agents); LLM and embedder as keys allow."""
        from .storage.postgres import PostgresStorageBackend

        embedder = _embedder_for(openai_key)
        llm: LLMProvider | None = None
        if anthropic_key is not None:
            from .providers.anthropic import AnthropicProvider

            llm = AnthropicProvider(api_key=anthropic_key)
        storage = PostgresStorageBackend.connect(postgres_url, dim=embedder.dim, **storage_options)
        return cls(config=config, llm=llm, embedder=embedder, storage=storage)

    # --- the parts (shared by every view) ------------------------------------
    @property
    def config(self) -> MemoryConfig:
        return self._engine.config

    @property
    def llm(self) -> LLMProvider | None:
        return self._engine.llm

    @property
    def embedder(self) -> EmbeddingProvider | None:
        return self._engine.embedder

    @property
    def storage(self) -> StorageBackend:
        return self._engine.storage

    @property
    def clock(self) -> Callable[[], float] | None:
        return self._engine.clock

    def _check_open(self) -> None:
        if self._closed or self._engine.closed:
            raise UmiError("this Memory is closed")

    def _locked(self, coro: Awaitable[T]) -> Awaitable[T]:
        return self._engine.locked(coro)

    # --- remember ------------------------------------------------------------
    @_on_loop
    async def remember(self, text: str, options: RememberOptions | None = None) -> RememberResult:
        """Extract facts from ``text``, store them, and link them to the facts they update."""
        opts = _opts(options, RememberOptions)
        text = _remember.validate_text(text, self.config.text_bytes_max)
        return await self._locked(_remember.remember(self._ctx, text, opts))

    remember_sync = _sync(remember)

    # --- recall --------------------------------------------------------------
    @_on_loop
    async def recall(self, query: str, options: RecallOptions | None = None) -> list[Entity]:
        """Current facts relevant to ``query``, best first, each with its fused ``score``."""
        opts = _opts(options, RecallOptions)
        query = _recall.validate_query(query)
        return await _recall.recall(self._ctx, query, opts)

    recall_sync = _sync(recall)

    # --- get / forget / count / history --------------------------------------
    @_on_loop
    async def get(self, entity_id: str) -> Entity | None:
        """The entity with this id, or None."""
        return await self._engine.io(self.storage.get, _check_id(entity_id))

    get_sync = _sync(get)

    @_on_loop
    async def forget(self, entity_id: str) -> bool:
        """Delete an entity from storage and the index. False when nothing had that id."""
        _check_id(entity_id)
        return await self._locked(self._engine.io(self.storage.delete, entity_id, self._engine.now_ms()))

    forget_sync = _sync(forget)

    @_on_loop
    async def count(self, *, include_superseded: bool = True) -> int:
        """Entities stored (superseded facts too, unless ``include_superseded=False``)."""
        return await self._engine.io(self.storage.count, SearchFilters(include_superseded=include_superseded))

    count_sync = _sync(count)

    @_on_loop
    async def history(self, entity_id: str) -> list[HistoryRecord]:
        """Every change to an entity, oldest first."""
        return await self._engine.io(self.storage.history, _check_id(entity_id))

    history_sync = _sync(history)

    @_on_loop
    async def relations(self, entity_id: str) -> list[EvolutionRelation]:
        """Evolution relations where the entity is the older or the newer fact."""
        return await self._engine.io(self.storage.relations_for, _check_id(entity_id))

    relations_sync = _sync(relations)

    # --- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Finish pending work, save the index cache, release providers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owner:
            self._engine.close()

    async def aclose(self) -> None:
        import asyncio

        await asyncio.to_thread(self.close)

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> "Memory":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        llm = self.llm.name if self.llm is not None else "rules"
        emb = self.embedder.name if self.embedder is not None else "none"
        return f"<umi.Memory storage={type(self.storage).__name__} llm={llm} embedder={emb}>"


def _embedder_for(openai_key: str | None, *, openai: bool = False) -> EmbeddingProvider:
    """OpenAI embeddings when a key is given (or ``openai``), else the local offline embedder."""
    if openai or openai_key is not None:
        from .providers.openai import OpenAIEmbeddingProvider

        return OpenAIEmbeddingProvider(api_key=openai_key)
    from .providers.local import LocalEmbeddingProvider

    return LocalEmbeddingProvider()


class MemoryBuilder:
    """``MemoryBuilder().with_llm(...).with_embedder(...).with_storage(...).with_config(...).build()``.

    Unset parts: no LLM (rule extraction), the local embedder, DuckDB at ``./umi.duckdb``.
    Every part is checked by the :class:`Memory` constructor, the one place that builds a Memory.
    """

    def __init__(self) -> None:
        self._parts: dict[str, Any] = {}
        self._path: str | os.PathLike[str] = "umi.duckdb"

    def _with(self, **part: Any) -> "MemoryBuilder":
        self._parts.update(part)
        return self

    def with_llm(self, llm: LLMProvider) -> "MemoryBuilder":
        if not isinstance(llm, LLMProvider):
            raise TypeError(f"llm must be an LLMProvider, not {type(llm).__name__}")
        return self._with(llm=llm)

    def with_embedder(self, embedder: EmbeddingProvider) -> "MemoryBuilder":
        if not isinstance(embedder, EmbeddingProvider):
            raise TypeError(f"embedder must be an EmbeddingProvider, not {type(embedder).__name__}")
        return self._with(embedder=embedder)

    def with_storage(self, storage: StorageBackend) -> "MemoryBuilder":
        if not isinstance(storage, StorageBackend):
            raise TypeError(f"storage must be a StorageBackend, not {type(storage).__name__}")
        return self._with(storage=storage)

    def with_path(self, path: str | os.PathLike[str]) -> "MemoryBuilder":
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be str or PathLike, not {type(path).__name__}")
        self._path = path
        return self

    def with_config(self, config: MemoryConfig) -> "MemoryBuilder":
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, not {type(config).__name__}")
        return self._with(config=config)

    def with_clock(self, clock: Callable[[], float]) -> "MemoryBuilder":
        """Seconds as a float (``time.time`` by default); a ``umi.sim.SimClock`` in tests."""
        if not callable(clock):
            raise TypeError("clock must be a zero-argument callable returning seconds")
        return self._with(clock=clock)

    def build(self) -> Memory:
        return Memory(self._path, **self._parts)
