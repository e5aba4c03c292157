"""Provider protocols: an LLM that answers in JSON, and an embedder.

Each has a blocking method and an async twin. Real providers (Anthropic, OpenAI,
local) and the seeded Sim providers implement the same protocol.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from ..types import Usage

__all__ = ["LLMProvider", "EmbeddingProvider", "LLMResult", "EmbedKind", "Task"]

#: What an LLM call is for. Real providers use it as the tool / schema name;
#: the Sim provider dispatches on it.
Task = Literal["extract_entities", "rewrite_query", "classify_evolution"]
EmbedKind = Literal["passage", "query"]


@dataclass
class LLMResult:
    """Parsed JSON that matched the requested schema, and what the call cost."""

    data: dict[str, Any]
    usage: Usage = field(default_factory=Usage)


class LLMProvider(abc.ABC):
    """``complete_json(system, prompt, schema, task=...)`` -> :class:`LLMResult`.

    Must return data that validates against ``schema`` or raise
    :class:`umi.InvalidResponseError`; transport failures raise
    :class:`umi.ProviderError` subclasses after the provider's own retries.
    """

    name: str = "llm"

    @abc.abstractmethod
    def complete_json(self, system: str, prompt: str, schema: Mapping[str, Any], *, task: Task) -> LLMResult: ...

    async def acomplete_json(self, system: str, prompt: str, schema: Mapping[str, Any], *, task: Task) -> LLMResult:
        """Default: run the blocking call in a worker thread. SDK-backed providers override this."""
        return await asyncio.to_thread(self.complete_json, system, prompt, schema, task=task)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and connections."""

    async def aclose(self) -> None:
        """Release async clients too: await it on the loop the async calls ran on, before that loop closes."""
        self.close()


class EmbeddingProvider(abc.ABC):
    """``embed(texts, kind=...)`` -> float32 array (n, dim), rows L2-normalised.

    ``kind`` is ``"passage"`` for stored texts and ``"query"`` for search queries
    (models like e5 prefix them differently). Failures raise :class:`umi.EmbeddingError`.
    """

    name: str = "embedder"
    dim: int

    @abc.abstractmethod
    def embed(self, texts: Sequence[str], *, kind: EmbedKind = "passage") -> np.ndarray: ...

    async def aembed(self, texts: Sequence[str], *, kind: EmbedKind = "passage") -> np.ndarray:
        return await asyncio.to_thread(self.embed, texts, kind=kind)

    def close(self) -> None:  # noqa: B027
        """Release clients and models."""

    async def aclose(self) -> None:
        """Release async clients too: await it on the loop the async calls ran on, before that loop closes."""
        self.close()


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in float32; zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (x / norms).astype(np.float32, copy=False)
