"""Providers: LLMs that answer in JSON and embedders (see :mod:`umi.providers.base`).

SDK-backed providers import their SDK on first use, never at ``import umi``.
"""

from .anthropic import AnthropicProvider
from .local import LocalEmbeddingProvider
from .openai import OpenAIEmbeddingProvider, OpenAIProvider

__all__ = ["AnthropicProvider", "LocalEmbeddingProvider", "OpenAIEmbeddingProvider", "OpenAIProvider"]
