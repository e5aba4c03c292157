"""Providers: LLMs that answer in JSON and embedders (see :mod:`umi.providers.base`).

SDK-backed providers import their SDK on first use, never at ``import umi``.
"""

from .local import LocalEmbeddingProvider

__all__ = ["LocalEmbeddingProvider"]
