"""``Memory`` and ``MemoryBuilder``: the three tiers wired together.

The pipelines live in :mod:`umi.pipeline`; this module only chooses the parts,
owns their lifetime, and exposes every operation once, as a coroutine that runs on
the Memory's private loop (see :mod:`umi._loop`). Each blocking ``_sync`` twin is
generated from it by :func:`_sync` — there is no second implementation. Writes are
serialised by one lock; reads run concurrently.

What a Memory shares with its views lives in one :class:`~umi._engine.Engine` (store, providers,
loop, write lock, clock, the core memories); a :class:`Memory` object is a face over it
with a :class:`~umi.Scope`. ``memory.scoped(user_id=...)`` makes another face over the
same engine: cheap, and closing it leaves the store open.

Scopes. A record's unset component means "not owned at that level". A view sees the
records whose components equal every component the view sets (unset in the view: any);
``Memory(path)`` without a scope sees every scope. Writes through a view are stamped with
its scope; exact-duplicate texts are per exact scope; evolution compares facts of one
``user_id`` (a user's agent- and session-level facts do see each other). Core memory
belongs to ``Scope(user_id, agent_id)`` and is stored; working memory is a per-process
session cache, one per view scope, never stored.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Concatenate, Coroutine, Iterable, ParamSpec, TypeVar

from ._engine import Engine, check_embedder
from .errors import (InvalidConfigError, InvalidScopeError, MemoryClosedError, TransferFileError, UmiError,
                     ValidationError)
from .options import MemoryConfig, RecallOptions, RememberOptions
from .pipeline import forget as _forget
from .pipeline import recall as _recall
from .pipeline import remember as _remember
from .pipeline import transfer as _transfer
from .pipeline import update as _update
from .pipeline.context import PipelineContext
from .pipeline.recall import RecallResult
from .providers.base import EmbeddingProvider, LLMProvider
from .storage.base import HistoryRecord, SearchFilters, StorageBackend
from .types import CoreHistoryRecord, Entity, EvolutionRelation, RememberResult, Scope

if TYPE_CHECKING:
    from ._loop import LoopThread
    from .core_memory import PersistentCoreMemory
    from .working_memory import WorkingMemory

T = TypeVar("T")
P = ParamSpec("P")

__all__ = ["Memory", "MemoryBuilder"]

#: texts per chunk of ``remember_many`` (one embedding batch and one transaction each)
REMEMBER_MANY_CHUNK = 128
REMEMBER_MANY_CHUNK_MAX = 10_000
_KEEP: Any = object()  # "this scope component was not given"
_SCOPE_PARTS = ("user_id", "agent_id", "session_id")


def _check_id(entity_id: object) -> str:
    if not isinstance(entity_id, str):
        raise TypeError(f"entity id must be str, not {type(entity_id).__name__}")
    if not entity_id.strip():
        raise ValidationError("entity id must not be empty")
    return entity_id


def _shifted(progress: Callable[[int, int], object], base: int, total: int, done: int, _of: int) -> None:
    progress(base + done, total)


def _text_options(rec: Any) -> tuple[Any, Any]:
    """The options of one ``{"text": ...}`` import line, comparable: (metadata items, event_time)."""
    meta = rec.get("metadata")
    return (tuple(sorted(meta.items())) if isinstance(meta, dict) else meta, rec.get("event_time"))


def narrow_scope(view: Scope, asked: Scope | None) -> Scope | None:
    """The scope a view may reach when a caller asks for ``asked``: each part the view sets
    stays, ``asked`` may set the parts the view leaves open; asking for another value of a part
    the view sets raises InvalidScopeError. None when nothing is set (every scope)."""
    parts = {}
    for name in _SCOPE_PARTS:
        mine, theirs = getattr(view, name), None if asked is None else getattr(asked, name)
        if mine is not None and theirs is not None and mine != theirs:
            raise InvalidScopeError(f"{name}={theirs!r} is outside this view's scope ({name}={mine!r})",
                                    component=name, value=theirs)
        parts[name] = mine if mine is not None else theirs
    scope = Scope(**parts)
    return None if scope.is_unset else scope


def _opts(options: Any, cls: type[T]) -> T:
    if options is None:
        return cls()
    if not isinstance(options, cls):
        raise TypeError(f"options must be {cls.__name__}, not {type(options).__name__}")
    return options


def _on_loop(fn: Callable[Concatenate["Memory", P], Coroutine[Any, Any, T]]
             ) -> Callable[Concatenate["Memory", P], Coroutine[Any, Any, T]]:
    """Make a verb run on the Memory's loop whichever loop awaits it."""

    @functools.wraps(fn)
    async def verb(self: "Memory", *args: P.args, **kwargs: P.kwargs) -> T:
        runner = self._engine.runner
        if not runner.in_call():  # a call a call in flight makes is part of it (LoopThread.in_call)
            self._check_open()
        return await runner.arun(fn(self, *args, **kwargs))

    return verb


def _sync(fn: Callable[Concatenate["Memory", P], Coroutine[Any, Any, T]]) -> Callable[Concatenate["Memory", P], T]:
    """The blocking twin of an async verb: the same coroutine, run to completion on the loop."""

    @functools.wraps(fn)
    def twin(self: "Memory", *args: P.args, **kwargs: P.kwargs) -> T:
        self._check_open()  # before the coroutine exists: a closed Memory never leaves one un-awaited
        return self._engine.runner.run(fn(self, *args, **kwargs))

    twin.__name__ = twin.__qualname__ = fn.__name__.rstrip("_") + "_sync"
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
        user_id: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        config: MemoryConfig | None = None,
        llm: LLMProvider | None = None,
        embedder: EmbeddingProvider | None = None,
        storage: StorageBackend | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        scope = Scope(user_id, agent_id, session_id)  # validated before anything is opened
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
        opened = storage is None
        if storage is None:
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"path must be str or PathLike, not {type(path).__name__}")
            if os.fspath(path) in ("", b""):  # DuckDB would open an in-memory database: lost at close
                raise ValidationError("the database path is empty; give a file path, or ':memory:' "
                                      "for an in-memory store (nothing kept after close)")
            from .storage.duckdb import DuckDBStorageBackend

            storage = DuckDBStorageBackend.connect(
                os.fspath(path), dim=embedder.dim, hnsw_threshold=config.hnsw_threshold
            )
        elif not isinstance(storage, StorageBackend):
            raise TypeError(f"storage must be a StorageBackend, not {type(storage).__name__}")
        try:
            check_embedder(storage, embedder)
        except BaseException:
            if opened:  # a store the caller passed stays theirs until a Memory is made of it
                storage.close()
            raise
        self._open(Engine(config, llm, embedder, storage, clock), scope)

    def _open(self, engine: Engine, scope: Scope) -> None:
        try:
            self._attach(engine, scope, owner=True)
        except BaseException:
            engine.close()
            raise

    @classmethod
    def _from_parts(cls, *, storage: StorageBackend, llm: LLMProvider | None, embedder: EmbeddingProvider | None,
                    config: MemoryConfig | None = None, clock: Callable[[], float] | None = None,
                    **scope: str | None) -> "Memory":
        """For tests: a Memory of exactly these parts (``embedder=None``: no vectors at all), without
        the constructor's defaults. Users have ``Memory(...)``, ``Memory.sim()`` and the builder."""
        if embedder is not None:
            check_embedder(storage, embedder)
        self = cls.__new__(cls)
        self._open(Engine(config or MemoryConfig(), llm, embedder, storage, clock), Scope(**scope))
        return self

    @property
    def _now_ms(self) -> Callable[[], int]:  # the engine's clock, for tests and sibling modules
        return self._engine.now_ms

    @property
    def _runner(self) -> "LoopThread":
        return self._engine.runner

    def _attach(self, engine: Engine, scope: Scope, *, owner: bool) -> None:
        self._engine = engine
        self._owner = owner  # only the Memory that opened the engine closes it
        self._closed = False
        self._scope = scope
        self._ctx = PipelineContext(engine.storage, engine.llm, engine.embedder, engine.config, engine.io,
                                    engine.now_ms, write_lock=engine.write_lock,
                                    scope=scope,
                                    in_write=engine.record_embedder_in_tx)
        #: this view's core memory: the blocks of ``Scope(user_id, agent_id)``, stored (see the module doc)
        self.core: PersistentCoreMemory = engine.core_for(scope.core)
        #: this view's working memory: a session cache in this process, never stored
        self.working: WorkingMemory = engine.working_for(scope)

    @property
    def scope(self) -> Scope:
        """Whose memory this is: what every read is limited to and every write is stamped with."""
        return self._scope

    def scoped(self, *, user_id: str | None = _KEEP, agent_id: str | None = _KEEP,
               session_id: str | None = _KEEP) -> "Memory":
        """A view of this memory for one user / agent / session: it shares this Memory's store,
        loop and providers (cheap to make), reads only what its scope sees and stamps its scope on
        what it writes. A view can narrow its scope, never leave it (InvalidScopeError). Closing a
        view does not close the store; closing the Memory that opened the store closes its views."""
        self._check_open()
        given = {"user_id": user_id, "agent_id": agent_id, "session_id": session_id}
        parts = {}
        for name, value in given.items():
            mine = getattr(self.scope, name)
            if value is _KEEP or value == mine:
                parts[name] = mine
            elif mine is not None:
                raise InvalidScopeError(f"this view has {name}={mine!r}; a view of it cannot have "
                                        f"{name}={value!r} (make views from the unscoped Memory)",
                                        component=name, value=value)
            else:
                parts[name] = value
        view = Memory.__new__(Memory)
        view._attach(self._engine, Scope(**parts), owner=False)
        return view

    # --- constructors --------------------------------------------------------
    @classmethod
    def sim(cls, seed: int = 42, *, config: MemoryConfig | None = None, faults: Any = None,
            dim: int = 384, user_id: str | None = None, agent_id: str | None = None,
            session_id: str | None = None) -> "Memory":
        """Sim LLM, Sim embedder, Sim storage and a Sim clock (from ``umi.sim.SIM_EPOCH_MS``):
        deterministic, in memory, no network. ``faults`` (a ``umi.sim.FaultInjector``) reaches all
        four, so every ``FaultType`` fires here — ``CLOCK_SKEW`` in the clock's readings."""
        from .providers.sim import SimEmbeddingProvider, SimLLMProvider
        from .sim.clock import SimClock
        from .storage.sim import SimStorageBackend

        return cls(user_id=user_id, agent_id=agent_id, session_id=session_id,
                   config=config, llm=SimLLMProvider(seed, faults=faults),
                   embedder=SimEmbeddingProvider(seed, dim, faults=faults),
                   storage=SimStorageBackend(seed=seed, faults=faults), clock=SimClock(faults=faults))

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
            raise MemoryClosedError("this Memory is closed")

    def _io(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return self._engine.io(fn, *args)

    def _sees(self, scope: Scope) -> bool:
        return self._scope.contains(scope)

    def _visible(self, entity: Entity | None) -> Entity | None:
        return entity if entity is not None and self._sees(entity.scope) else None

    def _filters(self, filters: SearchFilters) -> SearchFilters:
        """``filters`` kept inside this view: a filter's scope may narrow the view, never leave it."""
        scope = narrow_scope(self._scope, filters.scope)
        return filters if scope == filters.scope else dataclasses.replace(filters, scope=scope)

    # --- remember ------------------------------------------------------------
    @_on_loop
    async def remember(self, text: str, options: RememberOptions | None = None) -> RememberResult:
        """Extract facts from ``text``, store them in this view's scope, and link them to the facts
        of the same user they update."""
        opts = _opts(options, RememberOptions)
        text = _remember.validate_text(text, self.config.text_bytes_max)
        return await _remember.remember(self._ctx, text, opts)  # locks around read plan → commit only

    remember_sync = _sync(remember)

    @_on_loop
    async def remember_many(self, texts: Iterable[str], options: RememberOptions | None = None, *,
                            progress: Callable[[int, int], object] | None = None,
                            chunk_size: int = REMEMBER_MANY_CHUNK) -> list[RememberResult]:
        """Remember many texts: a result per text, in order — what remembering them one by one gives.

        Texts go in chunks of ``chunk_size`` (1-10,000): one embedding batch and one transaction
        per chunk, so a failure loses at most the chunk in flight and the chunks before it stay.
        Every text is validated before anything is stored. ``progress(done, total)`` is called
        after each chunk commits (on umi's loop thread: keep it quick). Evolution is decided text
        after text inside the chunk's transaction, so with an LLM classifier the store waits for
        its answers: use small chunks there; with rules (the embedded default) it costs nothing."""
        opts = _opts(options, RememberOptions)
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of str (e.g. a list), not a single str")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int, not {type(chunk_size).__name__}")
        if not 1 <= chunk_size <= REMEMBER_MANY_CHUNK_MAX:
            raise InvalidConfigError(f"chunk_size must be in [1, {REMEMBER_MANY_CHUNK_MAX}], got {chunk_size}")
        if progress is not None and not callable(progress):
            raise TypeError("progress must be a callable progress(done, total)")
        todo: list[str] = []
        for i, text in enumerate(texts):
            try:
                todo.append(_remember.validate_text(text, self.config.text_bytes_max))
            except (UmiError, TypeError) as exc:
                exc.add_note(f"texts[{i}]; nothing was stored")
                raise
        results: list[RememberResult] = []
        for start in range(0, len(todo), chunk_size):
            results += await _remember.remember_many(self._ctx, todo[start : start + chunk_size], opts)
            if progress is not None:
                progress(len(results), len(todo))
        return results

    remember_many_sync = _sync(remember_many)

    @_on_loop
    async def update(self, entity_id: str, content: str) -> RememberResult:
        """Correct a fact: ``content`` supersedes the current fact ``entity_id`` (kept, with an
        ``update`` relation and history), re-embedded, in the old fact's scope. Raises
        ValidationError when this view sees no such fact or it was superseded already."""
        content = _remember.validate_text(content, self.config.text_bytes_max)
        return await _update.update(self._ctx, _check_id(entity_id), content)

    update_sync = _sync(update)

    # --- recall --------------------------------------------------------------
    @_on_loop
    async def recall(self, query: str, options: RecallOptions | None = None) -> RecallResult:
        """Current statements of this view's scope relevant to ``query``, best first, each once with
        its fused ``score`` and the names it ``mentions``; ``result.warnings`` says how the recall
        degraded, if it did."""
        opts = _opts(options, RecallOptions)
        query = _recall.validate_query(query)
        return await _recall.recall(self._ctx, query, opts)

    recall_sync = _sync(recall)

    # --- reads ---------------------------------------------------------------
    @_on_loop
    async def get(self, entity_id: str) -> Entity | None:
        """The entity with this id, or None (also when it belongs to a scope this view cannot see)."""
        return self._visible(await self._io(self.storage.get, _check_id(entity_id)))

    get_sync = _sync(get)

    @_on_loop
    async def count(self, where: SearchFilters | None = None, *, include_superseded: bool = True) -> int:
        """Entities in this view's scope (superseded facts too, unless ``include_superseded=False``);
        with ``where``, those the filters match (the filters say whether superseded ones count)."""
        if where is None:
            where = SearchFilters(include_superseded=include_superseded)
        elif not isinstance(where, SearchFilters):
            raise TypeError(f"where must be a SearchFilters, not {type(where).__name__}")
        return await self._io(self.storage.count, self._filters(where))

    count_sync = _sync(count)

    @_on_loop
    async def history(self, entity_id: str) -> list[HistoryRecord]:
        """Every change to an entity of this view's scope, oldest first ([] for another scope's).
        A forgotten fact's records are tombstones filed under no scope (they keep the id's
        numbering): only an unscoped view sees them, so a scoped view gets [] for its own
        forgotten fact too."""
        records = await self._io(self.storage.history, _check_id(entity_id))
        return [h for h in records if self._sees(h.scope)]

    history_sync = _sync(history)

    @_on_loop
    async def relations(self, entity_id: str) -> list[EvolutionRelation]:
        """Evolution relations of this view's scope where the entity is the older or the newer fact."""
        rels = await self._io(self.storage.relations_for, _check_id(entity_id))
        return [r for r in rels if self._sees(r.scope)]

    relations_sync = _sync(relations)

    @_on_loop
    async def core_history(self, label: str | None = None) -> list[CoreHistoryRecord]:
        """Every stored change to this view's core blocks (or to block ``label``), oldest first."""
        if label is not None and not isinstance(label, str):
            raise TypeError(f"label must be str or None, not {type(label).__name__}")
        return await self._io(self.storage.core_history, self._scope.core, label)

    core_history_sync = _sync(core_history)

    # --- forget --------------------------------------------------------------
    async def _forget_ids(self, find: Callable[[PipelineContext], list[str]], source_id: str | None = None) -> int:
        """Find ids and forget them (the chain rule of :mod:`umi.pipeline.forget`), under the write lock."""
        ctx = self._ctx
        return await self._engine.locked_io(
            lambda: _forget.forget_ids(ctx, find(ctx), self._engine.now_ms(), source_id=source_id))

    @_on_loop
    async def forget(self, entity_id: str | None = None, *, where: SearchFilters | None = None) -> int:
        """``forget(entity_id)``: forget a fact of this view's scope — with the other facets of its
        statement — everywhere it is stored: True, or False when the view sees nothing with that
        id. ``forget(where=filters)``: forget every fact of this view the filters match
        (superseded ones only with ``include_superseded=True``), in one transaction; returns how
        many.

        What a forgotten fact had superseded stays superseded while a current fact that stays
        still replaces it (linked to the next such fact by a new superseding relation when its
        chain ran through the forgotten one); else it is revived if it was the current one just
        before the forgotten one (Acme → Initech, Acme restated, Acme corrected to Globex:
        forgetting Acme leaves Globex the one current fact; forgetting Globex then revives
        Initech). ``forget_source`` and ``forget_scope`` follow the same rule
        (:mod:`umi.pipeline.forget`)."""
        if (entity_id is None) == (where is None):
            raise TypeError("forget() takes an entity id or where=SearchFilters(...), not both or neither")
        if where is not None:
            if not isinstance(where, SearchFilters):
                raise TypeError(f"where must be a SearchFilters, not {type(where).__name__}")
            filters = self._filters(where)
            return await self._forget_ids(lambda ctx: _forget.filter_ids(ctx, filters))
        eid = _check_id(entity_id)
        return await self._forget_ids(lambda ctx: _forget.statement_ids(ctx, eid)) > 0

    forget_sync = _sync(forget)

    @_on_loop
    async def forget_source(self, source_id: str) -> int:
        """Forget everything one remembered text produced (``RememberResult.source_id``) in this
        view's scope, and the text itself. Returns how many facts were forgotten."""
        sid = _check_id(source_id)
        return await self._forget_ids(lambda ctx: _forget.source_ids(ctx, sid), source_id=sid)

    forget_source_sync = _sync(forget_source)

    @_on_loop
    async def forget_scope(self, *, user_id: str | None = None, agent_id: str | None = None,
                           session_id: str | None = None) -> int:
        """Forget every fact (superseded too) of one scope inside this view — e.g.
        ``memory.forget_scope(user_id="alice")`` — and, when the scope names no session, every core
        block and core history record of the core scopes it contains (``user_id="alice"``: each of
        alice's agents too), in the store and in this process's core memories, and the scope's
        stored texts that no fact comes from. The working memories of this process's views inside
        the scope (``session_id="s1"``: that session's; ``user_id="alice"``: each of alice's) are
        cleared too, once the store has committed. What stays is the forgotten facts' tombstones,
        filed under no scope. Returns how many facts were forgotten. Another scope's records are
        never touched; an unscoped Memory must name a scope."""
        target = narrow_scope(self._scope, Scope(user_id, agent_id, session_id))
        if target is None:
            raise InvalidScopeError("forget_scope() needs a scope: pass user_id, agent_id or session_id "
                                    "(this Memory is unscoped, and this call never forgets every scope)")
        as_target = dataclasses.replace(self._ctx, scope=target)  # a view of exactly that scope forgets
        return await self._engine.locked_io(self._engine.forget_scope, target,
                                            lambda: _forget.forget_scope(as_target, self._engine.now_ms()))

    forget_scope_sync = _sync(forget_scope)

    @_on_loop
    async def compact(self) -> bool:
        """Rewrite the store's files so that the text of forgotten facts is gone from disk, not
        only from every read: DuckDB keeps a deleted row's bytes in the database file, LanceDB
        in older table versions and Postgres in dead tuples until they are rewritten. Run it after
        a forget that must leave no trace (time grows with the store's size; other calls wait).
        Store-wide, whatever this view's scope. False when the store keeps nothing on disk."""
        storage = self._ctx.storage
        return await self._engine.locked_io(storage.compact)

    compact_sync = _sync(compact)

    # --- export / import -----------------------------------------------------
    @_on_loop
    async def export(self, out: Any, *, embeddings: bool = False) -> int:
        """Write everything this view sees — sources, facts (superseded too), relations, history, and
        the core blocks of every core scope it sees (a scoped view: those of its ``Scope(user_id,
        agent_id)`` and inside it) — as JSONL to a path or a text file; vectors only with
        ``embeddings=True``. Returns lines written."""
        if not isinstance(out, (str, os.PathLike)) and not callable(getattr(out, "writelines", None)):
            raise TypeError(f"out must be a path or a text file, not {type(out).__name__}")
        ctx = self._ctx
        records = await self._engine.locked_io(lambda: _transfer.export_records(ctx, embeddings=embeddings))
        if isinstance(out, (str, os.PathLike)):
            def write() -> None:
                try:
                    _transfer.write_file(os.fspath(out), records)  # a failure leaves what was there
                except OSError as exc:
                    raise TransferFileError(exc.errno, f"cannot write the export: {exc.strerror or exc}",
                                            os.fspath(out)) from exc
            await self._io(write)
        else:
            out.writelines(_transfer.dumps(r) + "\n" for r in records)
        return len(records)

    export_sync = _sync(export)

    @_on_loop
    async def import_(self, src: Any, *, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
        """Import what :meth:`export` wrote (or JSONL texts to remember). Records go in all-or-nothing:
        every line is checked first (a key the format does not define is a ValidationError; core
        blocks that would not fit ``core_memory_bytes`` a CoreMemoryFullError), facts without vectors
        are embedded (``progress(done, total)``), then one transaction writes them, core blocks
        included (each ``set`` over a stored block of its label; this process's core memories
        show them at once). Text lines are then remembered with :meth:`remember_many`
        (``progress`` again), chunk by chunk: a rerun skips the texts already there."""
        if isinstance(src, (bytes, bytearray, memoryview)) or not (
                isinstance(src, (str, os.PathLike)) or hasattr(src, "__iter__")):
            raise TypeError(f"src must be a path or an iterable of JSONL lines (str), not {type(src).__name__}")
        ctx = self._ctx
        if isinstance(src, (str, os.PathLike)):
            def read() -> _transfer.ImportPlan:
                try:
                    with open(src, encoding="utf-8") as f:
                        return _transfer.parse_lines(f, os.fspath(src), self.config.text_bytes_max)
                except OSError as exc:
                    raise TransferFileError(exc.errno, f"cannot read the import file: {exc.strerror or exc}",
                                            os.fspath(src)) from exc
                except UnicodeDecodeError as exc:
                    raise ValidationError(f"the import file {os.fspath(src)!r} is not UTF-8 text (byte "
                                          f"{exc.start}: {exc.reason}); nothing was imported") from exc
            plan = await self._io(read)
        else:
            name = getattr(src, "name", None)  # a file opened by its descriptor (stdin) is named by an int
            plan = _transfer.parse_lines(src, name if isinstance(name, str) else "<input>",
                                         self.config.text_bytes_max)
        await self._io(_transfer.check_consistent, plan, ctx)
        embedded = await _transfer.embed_missing(ctx, plan, progress)
        if plan.records:
            engine = self._engine
            await engine.locked_io(engine.restore_cores, {c.scope for c in plan.core},
                                   functools.partial(_transfer.restore, ctx, plan))
        counts = {"sources": len(plan.sources), "entities": len(plan.entities), "relations": len(plan.relations),
                  "history": len(plan.history), "core": len(plan.core), "embedded": embedded, "remembered": 0,
                  "duplicates": 0}
        texts = [rec for _, rec in plan.texts]
        done = 0
        for (metadata, event_time), group in itertools.groupby(texts, key=_text_options):  # runs of one options
            opts = RememberOptions(metadata=None if metadata is None else dict(metadata), event_time=event_time)
            step: Callable[[int, int], None] | None = None
            if progress is not None:
                step = functools.partial(_shifted, progress, done, len(texts))
            rs = await self.remember_many([rec["text"] for rec in group], opts, progress=step)
            done += len(rs)
            for r in rs:
                counts["duplicates" if r.duplicate else "remembered"] += 1
        return counts

    import_sync = _sync(import_)

    # --- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Finish pending work, save the index cache, release providers. Idempotent.

        Bounded: the calls in flight (from other threads or tasks) get a grace (5 s) to finish.
        Then a call is failed with :class:`~umi.MemoryClosedError` when none of its storage jobs
        was running (a single write did not commit), or with :class:`~umi.OutcomeUnknownError`
        when one was: a storage job cannot be stopped, so it may commit after close() returns,
        and the store is closed once it ends. With a storage job that never ends, close() returns
        after about twice the grace and a second (the calls' grace, then the grace their tasks get
        to unwind), plus up to a grace for each provider's release."""
        if self._closed:
            return
        if self._owner:
            self._engine.close()  # refused on umi's own loop (RuntimeError): then this Memory stays open
        self._closed = True

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
        scope = "" if self.scope.is_unset else " " + " ".join(
            f"{k}={v}" for k, v in self.scope.to_dict().items() if v is not None)
        return f"<umi.Memory storage={type(self.storage).__name__} llm={llm} embedder={emb}{scope}>"


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

    def with_scope(self, *, user_id: str | None = None, agent_id: str | None = None,
                   session_id: str | None = None) -> "MemoryBuilder":
        """Whose memory the built Memory is (see :meth:`Memory.scoped`)."""
        Scope(user_id, agent_id, session_id)  # validate now, where the mistake is
        return self._with(user_id=user_id, agent_id=agent_id, session_id=session_id)

    def with_clock(self, clock: Callable[[], float]) -> "MemoryBuilder":
        """Seconds as a float (``time.time`` by default); a ``umi.sim.SimClock`` in tests."""
        if not callable(clock):
            raise TypeError("clock must be a zero-argument callable returning seconds")
        return self._with(clock=clock)

    def build(self) -> Memory:
        return Memory(self._path, **self._parts)
