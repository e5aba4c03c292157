"""umi — memory for LLM agents, as an embedded Python library.

``import umi`` loads only the error tree and the compiled arenas (CoreMemory,
WorkingMemory). Every other public name resolves on first use through
:func:`__getattr__` (PEP 562), so numpy, DuckDB, pyarrow and numba load when the
archival memory is first touched, not at import.
"""

from importlib import import_module as _import_module

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .core_memory import CoreMemory
from .working_memory import WorkingMemory

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; type checkers read True
if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
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
del TYPE_CHECKING

# public name -> module that defines it (relative to this package)
_LAZY = {
    "Memory": ".memory",
    "MemoryBuilder": ".memory",
    "MemoryConfig": ".options",
    "RecallOptions": ".options",
    "RememberOptions": ".options",
    "RecallResult": ".pipeline.recall",
    "AnthropicProvider": ".providers.anthropic",
    "LocalEmbeddingProvider": ".providers.local",
    "OpenAIEmbeddingProvider": ".providers.openai",
    "OpenAIProvider": ".providers.openai",
    "SimEmbeddingProvider": ".providers.sim",
    "SimLLMProvider": ".providers.sim",
    "SearchFilters": ".storage.base",
    "StorageBackend": ".storage.base",
    "DuckDBStorageBackend": ".storage.duckdb",
    "LanceStorageBackend": ".storage.lance",
    "PostgresStorageBackend": ".storage.postgres",
    "SimStorageBackend": ".storage.sim",
    "Entity": ".types",
    "EntityType": ".types",
    "EvolutionRelation": ".types",
    "EvolutionType": ".types",
    "RememberResult": ".types",
    "Scope": ".types",
    "Usage": ".types",
}


def __getattr__(name: str) -> object:
    if name == "__version__":  # importlib.metadata alone costs more than the rest of `import umi`
        from importlib.metadata import PackageNotFoundError, version

        try:
            value: object = version("umi")
        except PackageNotFoundError:  # running from a source tree that was never installed
            value = "0.0.0+unknown"
    else:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})

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
