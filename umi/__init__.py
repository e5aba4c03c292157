"""umi — memory for LLM agents, as an embedded Python library."""

from importlib.metadata import PackageNotFoundError as _PNF
from importlib.metadata import version as _version

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .core_memory import CoreMemory
from .working_memory import WorkingMemory
from .memory import Memory, MemoryBuilder
from .options import MemoryConfig, RecallOptions, RememberOptions
from .pipeline.recall import RecallResult
from .providers.anthropic import AnthropicProvider
from .providers.local import LocalEmbeddingProvider
from .providers.openai import OpenAIEmbeddingProvider, OpenAIProvider
from .providers.sim import SimEmbeddingProvider, SimLLMProvider
from .storage.base import SearchFilters, StorageBackend
from .storage.duckdb import DuckDBStorageBackend
from .storage.lance import LanceStorageBackend
from .storage.postgres import PostgresStorageBackend
from .storage.sim import SimStorageBackend
from .types import Entity, EntityType, EvolutionRelation, EvolutionType, RememberResult, Scope, Usage

try:
    __version__ = _version("umi")
except _PNF:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    *_errors_all,
    "CoreMemory",
    "WorkingMemory",
    "Entity",
    "EntityType",
    "EvolutionRelation",
    "EvolutionType",
    "RememberResult",
    "Scope",
    "Usage",
    "Memory",
    "MemoryBuilder",
    "SimLLMProvider",
    "SimEmbeddingProvider",
    "LocalEmbeddingProvider",
    "AnthropicProvider",
    "OpenAIProvider",
    "OpenAIEmbeddingProvider",
    "MemoryConfig",
    "RememberOptions",
    "RecallOptions",
    "RecallResult",
    "StorageBackend",
    "SearchFilters",
    "DuckDBStorageBackend",
    "SimStorageBackend",
    "PostgresStorageBackend",
    "LanceStorageBackend",
]
