"""What a pipeline run needs: the parts a Memory was built from, and how to call them.

Pipelines never do I/O themselves; they ``await ctx.io(fn, ...)`` for storage and
blocking providers, and ``await ctx.ask(...)`` / ``await ctx.embed(...)`` for providers.

Provider failures are mapped here, once: whatever an LLM raises leaves :meth:`ask` as a
:class:`umi.ProviderError` (its own ``ProviderError`` subclasses unchanged, anything else
— a raw ``ConnectionError`` from a custom provider, a bug — wrapped and chained), and
whatever an embedder raises leaves :meth:`embed` as an :class:`umi.EmbeddingError` (or a
``ProviderError`` it raised itself). The pipelines then degrade as documented.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import numpy as np

from .._validate import check_vector_norm
from ..errors import EmbeddingError, InvalidResponseError, InvalidScopeError, ProviderError
from ..options import MemoryConfig
from ..providers.base import EmbeddingProvider, EmbedKind, LLMProvider, LLMResult, Task
from ..storage.base import SearchFilters, Source, StorageBackend
from ..types import UNSET_SCOPE, Entity, Scope, Usage
from . import schemas

T = TypeVar("T")

__all__ = ["PipelineContext", "WriteLock", "provider_failure", "narrow_scope"]


class WriteLock:
    """The one write lock of a store, shared by every view of it.

    An ``asyncio.Lock`` made on first use (on the Memory's loop, where every pipeline runs).
    Writers hold it only from their read plan to their commit, never across a provider call.
    """

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def __aenter__(self) -> None:
        await self.lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()


@dataclass
class PipelineContext:
    storage: StorageBackend
    llm: LLMProvider | None
    embedder: EmbeddingProvider | None
    config: MemoryConfig
    io: Callable[..., Awaitable[Any]]
    now_ms: Callable[[], int]
    write_lock: WriteLock = field(default_factory=WriteLock)
    #: the view's scope: what the pipeline writes is stamped with it, what it reads stays in it
    scope: Scope = UNSET_SCOPE
    #: called first inside every write transaction of a pipeline (the engine records the
    #: embedder's identity there, so a write that fails leaves no trace of it either)
    in_write: Callable[[], None] | None = None

    async def read(self, fn: Callable[..., Any], *args: Any, sources: Sequence[str] = ()) -> Any:
        """A read-only ``fn(*args)`` over the store (recall's one read hop, remember's duplicate
        check: ``sources``, the source ids ``fn`` reads). When the store serves those reads from
        process memory and no other thread holds it right now, ``fn`` runs at once on the loop (no
        thread hop: a fraction of a millisecond); otherwise on an I/O thread, as :attr:`io` does,
        so the loop never waits for a writer's commit or a database read."""
        inline = getattr(self.storage, "inline_read_lock", None)
        lock = (inline(sources) if sources else inline()) if inline is not None else None
        if lock is not None and lock.acquire(blocking=False):
            try:
                return fn(*args)
            finally:
                lock.release()
        return await self.io(fn, *args)

    def begin_write(self) -> None:
        """Call first inside a pipeline's write transaction."""
        if self.in_write is not None:
            self.in_write()

    def __post_init__(self) -> None:
        if self.scope is None:  # None and the unset scope both mean the unscoped (admin) view
            self.scope = UNSET_SCOPE

    # --- scope rules, in one place for every pipeline -------------------------------------
    def within(self, filters: SearchFilters) -> SearchFilters:
        """``filters`` kept inside this view's scope (a filter scope may narrow it, not leave it)."""
        scope = narrow_scope(self.scope, filters.scope)
        return filters if scope == filters.scope else dataclasses.replace(filters, scope=scope)

    def sees(self, scope: Scope) -> bool:
        """Whether a record of ``scope`` is visible to this view."""
        return self.scope.contains(scope)

    def filters(self, **kw: Any) -> SearchFilters:
        """Search filters seen through this view (the caller's other filters in ``kw``)."""
        return self.within(SearchFilters(**kw))

    def user_filters(self, **kw: Any) -> SearchFilters:
        """Filters over every fact of the view's user (any agent or session of it); with no user_id
        the filter cannot say "user unset", so callers also check :meth:`same_user`."""
        if self.scope.user_id is not None:
            kw["scope"] = Scope(user_id=self.scope.user_id)
        return SearchFilters(**kw)

    def same_user(self, e: Entity) -> bool:
        """Evolution and dedup compare facts of one user only (agent/session facets included)."""
        return e.scope.user_id == self.scope.user_id

    def source_for(self, text: str, at: int, metadata: Any) -> Source:
        return Source.for_text(text, at, metadata, scope=self.scope)

    async def ask(self, task: Task, prompt: str, usage: Usage) -> dict[str, Any]:
        """One structured LLM call; adds its usage. Raises ProviderError subclasses."""
        assert self.llm is not None
        try:
            result: LLMResult = await self.llm.acomplete_json(
                schemas.SYSTEMS[task], prompt, schemas.SCHEMAS[task], task=task
            )
        except ProviderError:
            raise
        except Exception as exc:  # a custom provider's ConnectionError, a bug: degrade, never escape raw
            name = getattr(self.llm, "name", type(self.llm).__name__)
            raise ProviderError(f"LLM provider {name!r} failed on {task}: {type(exc).__name__}: {exc}",
                                provider=str(name)) from exc
        if not isinstance(result, LLMResult) or not isinstance(result.data, dict):
            raise InvalidResponseError(f"LLM provider answered {task} with {type(result).__name__}, "
                                       "not an LLMResult holding a dict")
        usage.add(result.usage)
        return result.data

    async def embed(self, texts: list[str], kind: EmbedKind) -> np.ndarray:
        """Embed in batches of ``config.embedding_batch_size``; checks shape and finiteness."""
        assert self.embedder is not None
        if not texts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        bs = self.config.embedding_batch_size
        parts = []
        for i in range(0, len(texts), bs):
            chunk = texts[i : i + bs]
            try:
                vecs = await self.embedder.aembed(chunk, kind=kind)
                vecs = np.asarray(vecs, dtype=np.float32)
            except (EmbeddingError, ProviderError):
                raise
            except Exception as exc:  # a provider bug must not lose the memory: report as EmbeddingError
                raise EmbeddingError(f"embedding provider {self.embedder.name!r} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
            if vecs.shape != (len(chunk), self.embedder.dim) or not np.all(np.isfinite(vecs)):
                raise EmbeddingError(
                    f"embedding provider {self.embedder.name!r} returned shape {vecs.shape}, "
                    f"expected ({len(chunk)}, {self.embedder.dim}) finite values"
                )
            check_vector_norm(vecs, f"embedding provider {self.embedder.name!r}: a vector",
                              EmbeddingError)
            parts.append(vecs)
        return np.concatenate(parts, axis=0)


def narrow_scope(view: Scope, asked: Scope | None) -> Scope | None:
    """The scope a view may search when a caller asks for ``asked`` (None: the view's own).

    Each component the view sets stays; ``asked`` may set the components the view leaves
    open. Asking for another value of a component the view sets raises InvalidScopeError.
    None when the result is unset (every scope: no scope condition at all)."""
    if asked is None or asked.is_unset:
        return None if view.is_unset else view
    parts = {}
    for f in (fld.name for fld in dataclasses.fields(Scope)):
        mine, theirs = getattr(view, f), getattr(asked, f)
        if mine is not None and theirs is not None and mine != theirs:
            raise InvalidScopeError(f"{f}={theirs!r} is outside this view's scope ({f}={mine!r})",
                                    component=f, value=theirs)
        parts[f] = mine if mine is not None else theirs
    return Scope(**parts)


def provider_failure(exc: BaseException) -> str:
    """A one-line description of a provider failure for a result's warnings."""
    if isinstance(exc, ProviderError) and exc.status is not None:
        return f"{type(exc).__name__} (status {exc.status}): {exc}"
    return f"{type(exc).__name__}: {exc}"
