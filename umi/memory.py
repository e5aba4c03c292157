"""``Memory`` and ``MemoryBuilder``: the three tiers wired together.

The pipelines live in :mod:`umi.pipeline`; this module only chooses the parts,
owns their lifetime, and gives every operation an async method and a blocking
``_sync`` twin over the same coroutine (see :mod:`umi._loop`). Writes
(``remember``, ``forget``) are serialised by one lock; reads run concurrently.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar, overload

from .errors import InvalidConfigError, UmiError, ValidationError
from .options import MemoryConfig, RecallOptions, RememberOptions
from .pipeline import forget as _forget
from .pipeline import recall as _recall
from .pipeline import remember as _remember
from .pipeline import transfer as _transfer
from .pipeline.recall import RecallResult
from .pipeline.context import PipelineContext
from .providers.base import EmbeddingProvider, LLMProvider
from .storage.base import HistoryRecord, SearchFilters, StorageBackend
from .types import Entity, EvolutionRelation, RememberResult

if TYPE_CHECKING:
    from .core_memory import CoreMemory
    from .working_memory import WorkingMemory

T = TypeVar("T")

__all__ = ["Memory", "MemoryBuilder"]

SIM_EPOCH_MS = 1_700_000_000_000  # 2023-11-14: where every Sim clock starts


def _check_id(entity_id: object) -> str:
    if not isinstance(entity_id, str):
        raise TypeError(f"entity id must be str, not {type(entity_id).__name__}")
    if not entity_id.strip():
        raise ValidationError("entity id must not be empty")
    return entity_id


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


class Memory:
    """Memory for one agent: ``core``, ``working`` and archival (``remember`` / ``recall``).

    ``Memory(path)`` is the embedded default: a DuckDB file, the local offline
    embedder, and rule-based extraction (no LLM is used unless you pass one —
    an API key in the environment is never picked up silently).
    ``Memory.sim(seed)`` is fully deterministic and in memory.
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
        self._init(config, llm, embedder, storage, clock)

    def _init(self, config: MemoryConfig, llm: LLMProvider | None, embedder: EmbeddingProvider | None,
              storage: StorageBackend, clock: Callable[[], float] | None) -> None:
        from ._loop import LoopThread
        from .core_memory import CoreMemory
        from .working_memory import WorkingMemory

        self.config = config
        self.llm = llm
        self.embedder = embedder
        self.storage = storage
        self.clock = clock
        seconds = clock if clock is not None else time.time
        exact_ms = getattr(clock, "now_ms", None)  # a SimClock keeps integer ms: no float round trip
        self._now_ms = _Clock(exact_ms if callable(exact_ms) else (lambda: round(seconds() * 1000.0)))
        self.core: CoreMemory = CoreMemory(max_bytes=config.core_memory_bytes)
        self.working: WorkingMemory = WorkingMemory(
            max_bytes=config.working_memory_bytes,
            max_entries=config.working_memory_entries,
            default_ttl_secs=config.working_memory_ttl.total_seconds(),
            clock=clock,
        )
        self._runner = LoopThread()
        self._ctx = PipelineContext(storage, llm, embedder, config, self._runner.io, self._now_ms)
        self._closed = False

    # --- constructors --------------------------------------------------------
    @classmethod
    def _from_parts(cls, *, storage: StorageBackend, llm: LLMProvider | None,
                    embedder: EmbeddingProvider | None, config: MemoryConfig | None = None,
                    clock: Callable[[], float] | None = None) -> "Memory":
        self = cls.__new__(cls)
        if embedder is not None and storage.dim is not None and storage.dim != embedder.dim:
            raise InvalidConfigError(
                f"the store holds {storage.dim}-d vectors but the embedder makes {embedder.dim}-d ones"
            )
        self._init(config or MemoryConfig(), llm, embedder, storage, clock)
        return self

    @classmethod
    def sim(cls, seed: int = 42, *, config: MemoryConfig | None = None, faults: Any = None,
            dim: int = 384) -> "Memory":
        """Sim LLM, Sim embedder, Sim storage and a Sim clock: deterministic, in memory, no network."""
        from .providers.sim import SimEmbeddingProvider, SimLLMProvider
        from .sim.clock import SimClock
        from .storage.sim import SimStorageBackend

        clock = SimClock(start_ms=SIM_EPOCH_MS)
        mem = cls._from_parts(
            storage=SimStorageBackend(seed=seed, faults=faults),
            llm=SimLLMProvider(seed, faults=faults),
            embedder=SimEmbeddingProvider(seed, dim, faults=faults),
            config=config,
            clock=clock,
        )
        return mem

    @classmethod
    def with_anthropic(cls, anthropic_key: str | None = None, openai_key: str | None = None,
                       db_path: str | os.PathLike[str] = "umi.duckdb", *,
                       config: MemoryConfig | None = None, **provider_options: Any) -> "Memory":
        """Anthropic for extraction/evolution/rewrites; OpenAI embeddings with a key, else the local embedder."""
        from .providers.anthropic import AnthropicProvider

        llm = AnthropicProvider(api_key=anthropic_key, **provider_options)
        embedder: EmbeddingProvider
        if openai_key is not None:
            from .providers.openai import OpenAIEmbeddingProvider

            embedder = OpenAIEmbeddingProvider(api_key=openai_key)
        else:
            from .providers.local import LocalEmbeddingProvider

            embedder = LocalEmbeddingProvider()
        return cls(db_path, config=config, llm=llm, embedder=embedder)

    @classmethod
    def with_openai(cls, openai_key: str | None = None, db_path: str | os.PathLike[str] = "umi.duckdb", *,
                    config: MemoryConfig | None = None, **provider_options: Any) -> "Memory":
        """OpenAI for the LLM tasks and for embeddings."""
        from .providers.openai import OpenAIEmbeddingProvider, OpenAIProvider

        llm = OpenAIProvider(api_key=openai_key, **provider_options)
        return cls(db_path, config=config, llm=llm, embedder=OpenAIEmbeddingProvider(api_key=openai_key))

    @classmethod
    def with_postgres(cls, postgres_url: str, anthropic_key: str | None = None, openai_key: str | None = None,
                      *, config: MemoryConfig | None = None, **storage_options: Any) -> "Memory":
        """A shared Postgres + pgvector store (fleets of agents); LLM and embedder as keys allow."""
        from .storage.postgres import PostgresStorageBackend

        embedder: EmbeddingProvider
        if openai_key is not None:
            from .providers.openai import OpenAIEmbeddingProvider

            embedder = OpenAIEmbeddingProvider(api_key=openai_key)
        else:
            from .providers.local import LocalEmbeddingProvider

            embedder = LocalEmbeddingProvider()
        llm: LLMProvider | None = None
        if anthropic_key is not None:
            from .providers.anthropic import AnthropicProvider

            llm = AnthropicProvider(api_key=anthropic_key)
        storage = PostgresStorageBackend.connect(postgres_url, dim=embedder.dim, **storage_options)
        return cls(config=config, llm=llm, embedder=embedder, storage=storage)

    # --- plumbing ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise UmiError("this Memory is closed")

    async def _locked(self, coro: Awaitable[T]) -> T:
        """Await ``coro`` under the store's write lock (shared with the pipelines). Pass a coroutine
        that has not started: an ``io(...)`` future would already be running before the lock."""
        async with self._ctx.write_lock:
            return await coro

    # --- remember ------------------------------------------------------------
    async def _remember(self, text: str, options: RememberOptions | None) -> RememberResult:
        opts = _opts(options, RememberOptions)
        text = _remember.validate_text(text, self.config.text_bytes_max)
        return await _remember.remember(self._ctx, text, opts)  # locks around read plan → commit only

    async def remember(self, text: str, options: RememberOptions | None = None) -> RememberResult:
        """Extract facts from ``text``, store them, and link them to the facts they update."""
        self._check_open()
        return await self._runner.arun(self._remember(text, options))

    def remember_sync(self, text: str, options: RememberOptions | None = None) -> RememberResult:
        self._check_open()
        return self._runner.run(self._remember(text, options))

    # --- recall --------------------------------------------------------------
    async def _recall(self, query: str, options: RecallOptions | None) -> RecallResult:
        opts = _opts(options, RecallOptions)
        query = _recall.validate_query(query)
        return await _recall.recall(self._ctx, query, opts)

    async def recall(self, query: str, options: RecallOptions | None = None) -> RecallResult:
        """Current statements relevant to ``query``, best first, each once with its fused ``score``
        and the names it ``mentions``; ``result.warnings`` says how the recall degraded, if it did."""
        self._check_open()
        return await self._runner.arun(self._recall(query, options))

    def recall_sync(self, query: str, options: RecallOptions | None = None) -> RecallResult:
        self._check_open()
        return self._runner.run(self._recall(query, options))

    # --- get / forget / count / history --------------------------------------
    async def _get(self, entity_id: str) -> Entity | None:
        return await self._ctx.io(self.storage.get, _check_id(entity_id))

    async def get(self, entity_id: str) -> Entity | None:
        self._check_open()
        return await self._runner.arun(self._get(entity_id))

    def get_sync(self, entity_id: str) -> Entity | None:
        self._check_open()
        return self._runner.run(self._get(entity_id))

    async def _forget(self, entity_id: str | None, where: SearchFilters | None) -> Any:
        ctx = self._ctx
        if where is not None:
            if entity_id is not None:
                raise TypeError("forget takes an entity id or where=, not both")
            if not isinstance(where, SearchFilters):
                raise TypeError(f"where must be a SearchFilters, not {type(where).__name__}")
            async with ctx.write_lock:
                return await ctx.io(lambda: _forget.forget_ids(ctx, _forget.filter_ids(ctx, where), self._now_ms()))
        eid = _check_id(entity_id)
        async with ctx.write_lock:  # issue 14: the read and the delete both inside the lock
            return await ctx.io(lambda: _forget.forget_ids(ctx, _forget.statement_ids(ctx, eid), self._now_ms())) > 0

    @overload
    async def forget(self, entity_id: str) -> bool: ...
    @overload
    async def forget(self, *, where: SearchFilters) -> int: ...

    async def forget(self, entity_id: str | None = None, *, where: SearchFilters | None = None) -> Any:
        """Forget a fact — with the other facets of its statement — everywhere it is stored, and
        revive what only it had superseded: True, or False when nothing had that id. With
        ``where=SearchFilters(...)``, forget every fact the filters match and return how many."""
        self._check_open()
        return await self._runner.arun(self._forget(entity_id, where))

    @overload
    def forget_sync(self, entity_id: str) -> bool: ...
    @overload
    def forget_sync(self, *, where: SearchFilters) -> int: ...

    def forget_sync(self, entity_id: str | None = None, *, where: SearchFilters | None = None) -> Any:
        self._check_open()
        return self._runner.run(self._forget(entity_id, where))

    async def _forget_source(self, source_id: str) -> int:
        sid = _check_id(source_id)
        ctx = self._ctx
        async with ctx.write_lock:
            return await ctx.io(lambda: _forget.forget_ids(ctx, _forget.source_ids(ctx, sid), self._now_ms(),
                                                           source_id=sid))

    async def forget_source(self, source_id: str) -> int:
        """Forget everything one remembered text produced (``RememberResult.source_id``), and the
        text itself. Returns how many facts were forgotten."""
        self._check_open()
        return await self._runner.arun(self._forget_source(source_id))

    def forget_source_sync(self, source_id: str) -> int:
        self._check_open()
        return self._runner.run(self._forget_source(source_id))

    # --- export / import -----------------------------------------------------
    async def _export(self, out: Any, embeddings: bool) -> int:
        ctx = self._ctx
        async with ctx.write_lock:  # one consistent state
            records = await ctx.io(lambda: _transfer.export_records(ctx, embeddings=embeddings))
        if isinstance(out, (str, os.PathLike)):
            def write() -> None:
                with open(out, "w", encoding="utf-8") as f:
                    f.writelines(_transfer.dumps(r) + "\n" for r in records)
            await ctx.io(write)
        else:
            out.writelines(_transfer.dumps(r) + "\n" for r in records)
        return len(records)

    async def export(self, out: Any, *, embeddings: bool = False) -> int:
        """Write everything this view sees — sources, facts (superseded too), relations, history —
        as JSONL to a path or a text file; vectors only with ``embeddings=True``. Returns lines written."""
        self._check_open()
        return await self._runner.arun(self._export(out, embeddings))

    def export_sync(self, out: Any, *, embeddings: bool = False) -> int:
        self._check_open()
        return self._runner.run(self._export(out, embeddings))

    async def _import(self, src: Any, progress: Callable[[int, int], None] | None) -> dict[str, int]:
        ctx = self._ctx
        if isinstance(src, (str, os.PathLike)):
            def read() -> _transfer.ImportPlan:
                with open(src, encoding="utf-8") as f:
                    return _transfer.parse_lines(f, os.fspath(src))
            plan = await ctx.io(read)
        else:
            plan = _transfer.parse_lines(src, getattr(src, "name", "<input>"))
        await ctx.io(_transfer.check_consistent, plan, ctx)
        embedded = await _transfer.embed_missing(ctx, plan, progress)
        if plan.records:
            async with ctx.write_lock:
                await ctx.io(_transfer.restore, ctx, plan)
        counts = {"sources": len(plan.sources), "entities": len(plan.entities), "relations": len(plan.relations),
                  "history": len(plan.history), "embedded": embedded, "remembered": 0, "duplicates": 0}
        for i, (_, rec) in enumerate(plan.texts, start=1):  # resumable, not atomic: a rerun skips what is there
            opts = RememberOptions(metadata=rec.get("metadata"), event_time=rec.get("event_time"))
            r = await self._remember(rec["text"], opts)
            counts["duplicates" if r.duplicate else "remembered"] += 1
            if progress is not None:
                progress(i, len(plan.texts))
        return counts

    async def import_(self, src: Any, *, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
        """Import what :meth:`export` wrote (or JSONL texts to remember). Records go in all-or-nothing:
        every line is checked first, facts without vectors are embedded (``progress(done, total)``),
        then one transaction writes them. Returns counts by kind."""
        self._check_open()
        return await self._runner.arun(self._import(src, progress))

    def import_sync(self, src: Any, *, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
        self._check_open()
        return self._runner.run(self._import(src, progress))

    async def _count(self, include_superseded: bool) -> int:
        return await self._ctx.io(self.storage.count, SearchFilters(include_superseded=include_superseded))

    async def count(self, *, include_superseded: bool = True) -> int:
        """Entities stored (superseded facts too, unless ``include_superseded=False``)."""
        self._check_open()
        return await self._runner.arun(self._count(include_superseded))

    def count_sync(self, *, include_superseded: bool = True) -> int:
        self._check_open()
        return self._runner.run(self._count(include_superseded))

    async def _history(self, entity_id: str) -> list[HistoryRecord]:
        return await self._ctx.io(self.storage.history, _check_id(entity_id))

    async def history(self, entity_id: str) -> list[HistoryRecord]:
        """Every change to an entity, oldest first."""
        self._check_open()
        return await self._runner.arun(self._history(entity_id))

    def history_sync(self, entity_id: str) -> list[HistoryRecord]:
        self._check_open()
        return self._runner.run(self._history(entity_id))

    async def _relations(self, entity_id: str) -> list[EvolutionRelation]:
        return await self._ctx.io(self.storage.relations_for, _check_id(entity_id))

    async def relations(self, entity_id: str) -> list[EvolutionRelation]:
        """Evolution relations where the entity is the older or the newer fact."""
        self._check_open()
        return await self._runner.arun(self._relations(entity_id))

    def relations_sync(self, entity_id: str) -> list[EvolutionRelation]:
        self._check_open()
        return self._runner.run(self._relations(entity_id))

    # --- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Finish pending work, save the index cache, release providers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            # Async SDK clients' connections belong to our loop: release them on it, before it stops.
            for p in (self.llm, self.embedder):
                if p is not None:
                    self._runner.run(p.aclose())
        finally:
            self._runner.close()
            self.storage.close()

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


def _opts(options: Any, cls: type[T]) -> T:
    if options is None:
        return cls()
    if not isinstance(options, cls):
        raise TypeError(f"options must be {cls.__name__}, not {type(options).__name__}")
    return options


class MemoryBuilder:
    """``MemoryBuilder().with_llm(...).with_embedder(...).with_storage(...).with_config(...).build()``.

    Unset parts: no LLM (rule extraction), the local embedder, DuckDB at ``./umi.duckdb``.
    """

    def __init__(self) -> None:
        self._llm: LLMProvider | None = None
        self._embedder: EmbeddingProvider | None = None
        self._storage: StorageBackend | None = None
        self._config: MemoryConfig | None = None
        self._clock: Callable[[], float] | None = None
        self._path: str | os.PathLike[str] = "umi.duckdb"

    def with_llm(self, llm: LLMProvider) -> "MemoryBuilder":
        if not isinstance(llm, LLMProvider):
            raise TypeError(f"llm must be an LLMProvider, not {type(llm).__name__}")
        self._llm = llm
        return self

    def with_embedder(self, embedder: EmbeddingProvider) -> "MemoryBuilder":
        if not isinstance(embedder, EmbeddingProvider):
            raise TypeError(f"embedder must be an EmbeddingProvider, not {type(embedder).__name__}")
        self._embedder = embedder
        return self

    def with_storage(self, storage: StorageBackend) -> "MemoryBuilder":
        if not isinstance(storage, StorageBackend):
            raise TypeError(f"storage must be a StorageBackend, not {type(storage).__name__}")
        self._storage = storage
        return self

    def with_path(self, path: str | os.PathLike[str]) -> "MemoryBuilder":
        self._path = path
        return self

    def with_config(self, config: MemoryConfig) -> "MemoryBuilder":
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, not {type(config).__name__}")
        self._config = config
        return self

    def with_clock(self, clock: Callable[[], float]) -> "MemoryBuilder":
        """Seconds as a float (``time.time`` by default); a ``umi.sim.SimClock`` in tests."""
        if not callable(clock):
            raise TypeError("clock must be a zero-argument callable returning seconds")
        self._clock = clock
        return self

    def build(self) -> Memory:
        return Memory(self._path, config=self._config, llm=self._llm, embedder=self._embedder,
                      storage=self._storage, clock=self._clock)
