"""What a pipeline run needs: the parts a Memory was built from, and how to call them.

Pipelines never do I/O themselves; they ``await ctx.io(fn, ...)`` for storage and
blocking providers, and ``await ctx.llm.acomplete_json(...)`` for LLM calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import numpy as np

from ..errors import EmbeddingError, ProviderError, UmiError
from ..options import MemoryConfig
from ..providers.base import EmbeddingProvider, EmbedKind, LLMProvider, LLMResult, Task
from ..storage.base import StorageBackend
from ..types import Usage
from . import schemas

T = TypeVar("T")

__all__ = ["PipelineContext"]


@dataclass
class PipelineContext:
    storage: StorageBackend
    llm: LLMProvider | None
    embedder: EmbeddingProvider | None
    config: MemoryConfig
    io: Callable[..., Awaitable[Any]]
    now_ms: Callable[[], int]

    async def ask(self, task: Task, prompt: str, usage: Usage) -> dict[str, Any]:
        """One structured LLM call; adds its usage. Raises ProviderError subclasses."""
        assert self.llm is not None
        result: LLMResult = await self.llm.acomplete_json(
            schemas.SYSTEMS[task], prompt, schemas.SCHEMAS[task], task=task
        )
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
            except UmiError:
                raise
            except Exception as exc:  # a provider bug must not lose the memory: report as EmbeddingError
                raise EmbeddingError(f"embedding provider {self.embedder.name!r} failed: {exc}") from exc
            vecs = np.asarray(vecs, dtype=np.float32)
            if vecs.shape != (len(chunk), self.embedder.dim) or not np.all(np.isfinite(vecs)):
                raise EmbeddingError(
                    f"embedding provider {self.embedder.name!r} returned shape {vecs.shape}, "
                    f"expected ({len(chunk)}, {self.embedder.dim}) finite values"
                )
            parts.append(vecs)
        return np.concatenate(parts, axis=0)


def provider_failure(exc: BaseException) -> str:
    """A one-line description of a provider failure for a result's warnings."""
    if isinstance(exc, ProviderError) and exc.status is not None:
        return f"{type(exc).__name__} (status {exc.status}): {exc}"
    return f"{type(exc).__name__}: {exc}"
