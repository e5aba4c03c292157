"""The umi exception tree.

Every error umi raises on purpose is a :class:`UmiError`. Messages say what was
wrong and what the limit is; lower-level exceptions are chained with
``raise ... from exc``. Wrong *types* (an int where ``bytes`` is expected) raise
the builtin :class:`TypeError`, as Python does.

::

    UmiError
    ├── ValidationError                (also a ValueError)
    │   ├── EmptyTextError
    │   ├── TextTooLongError           .limit, .actual
    │   ├── EmptyQueryError
    │   ├── InvalidLimitError          .limit, .actual
    │   ├── InvalidLabelError          .label
    │   ├── InvalidKeyError            .key
    │   ├── ValueTooLargeError         .limit, .actual
    │   ├── InvalidTTLError            .limit, .actual
    │   ├── InvalidImportanceError     .actual
    │   ├── InvalidConfidenceError     .actual
    │   ├── InvalidEntityTypeError     .actual
    │   ├── InvalidEvolutionTypeError  .actual
    │   ├── InvalidFilterError
    │   │   └── InvalidMetadataError
    │   ├── InvalidScopeError          .component, .value
    │   ├── InvalidConfigError
    │   └── NotAnIntegerError          .key
    ├── CapacityError
    │   ├── CoreMemoryFullError        .over_by, .limit
    │   └── WorkingMemoryFullError     .over_by, .limit, .key
    ├── StorageError
    │   ├── StorageLockedError         .path
    │   ├── SchemaVersionError         .found, .supported
    │   ├── IndexCacheError            .path
    │   └── BackendNotInstalledError   .extra
    ├── EmbeddingError
    ├── ProviderError                  .status, .request_id, .provider
    │   ├── ProviderTimeoutError
    │   ├── RateLimitError
    │   ├── InvalidResponseError
    │   └── ProviderNotInstalledError  .extra
    ├── MemoryClosedError
    ├── OutcomeUnknownError            .grace_secs
    ├── ForkedProcessError
    ├── LoopReentryError           (also a RuntimeError)
    └── TransferFileError          (also an OSError)
"""

from __future__ import annotations

__all__ = [
    "UmiError",
    "ValidationError",
    "EmptyTextError",
    "TextTooLongError",
    "EmptyQueryError",
    "InvalidLimitError",
    "InvalidLabelError",
    "InvalidKeyError",
    "ValueTooLargeError",
    "InvalidTTLError",
    "InvalidImportanceError",
    "InvalidConfidenceError",
    "InvalidEntityTypeError",
    "InvalidEvolutionTypeError",
    "InvalidFilterError",
    "InvalidMetadataError",
    "InvalidScopeError",
    "InvalidConfigError",
    "NotAnIntegerError",
    "CapacityError",
    "CoreMemoryFullError",
    "WorkingMemoryFullError",
    "StorageError",
    "StorageLockedError",
    "SchemaVersionError",
    "IndexCacheError",
    "BackendNotInstalledError",
    "EmbeddingError",
    "ProviderError",
    "ProviderTimeoutError",
    "RateLimitError",
    "InvalidResponseError",
    "ProviderNotInstalledError",
    "MemoryClosedError",
    "OutcomeUnknownError",
    "ForkedProcessError",
    "LoopReentryError",
    "TransferFileError",
]


class UmiError(Exception):
    """Root of every error umi raises on purpose."""


# --- validation -------------------------------------------------------------


class ValidationError(UmiError, ValueError):
    """An argument was out of range or malformed. Nothing was changed."""


class EmptyTextError(ValidationError):
    """Text to remember was empty or only whitespace."""


class TextTooLongError(ValidationError):
    def __init__(self, message: str, *, limit: int, actual: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.actual = actual


class EmptyQueryError(ValidationError):
    """A recall query was empty or only whitespace."""


class InvalidLimitError(ValidationError):
    def __init__(self, message: str, *, limit: tuple[int, int] | int, actual: object) -> None:
        super().__init__(message)
        self.limit = limit
        self.actual = actual


class InvalidLabelError(ValidationError):
    def __init__(self, message: str, *, label: object = None) -> None:
        super().__init__(message)
        self.label = label


class InvalidKeyError(ValidationError):
    def __init__(self, message: str, *, key: object = None) -> None:
        super().__init__(message)
        self.key = key


class ValueTooLargeError(ValidationError):
    def __init__(self, message: str, *, limit: int, actual: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.actual = actual


class InvalidTTLError(ValidationError):
    def __init__(self, message: str, *, limit: float, actual: object) -> None:
        super().__init__(message)
        self.limit = limit
        self.actual = actual


class InvalidImportanceError(ValidationError):
    def __init__(self, message: str, *, actual: object = None) -> None:
        super().__init__(message)
        self.actual = actual


class InvalidConfidenceError(ValidationError):
    def __init__(self, message: str, *, actual: object = None) -> None:
        super().__init__(message)
        self.actual = actual


class InvalidEntityTypeError(ValidationError):
    def __init__(self, message: str, *, actual: object = None) -> None:
        super().__init__(message)
        self.actual = actual


class InvalidEvolutionTypeError(ValidationError):
    def __init__(self, message: str, *, actual: object = None) -> None:
        super().__init__(message)
        self.actual = actual


class InvalidFilterError(ValidationError):
    """A search filter was malformed (e.g. a non-scalar metadata value)."""


class InvalidMetadataError(InvalidFilterError):
    """A metadata mapping to store — ``RememberOptions(metadata=...)``, an entity's or a source's —
    was malformed: a key that is empty, too long or holds forbidden characters, a value that is
    not a scalar or not finite (NaN, inf), or too many keys or bytes. The message names the
    mapping and the key. The same rule as a metadata *filter*'s (which raises
    :class:`InvalidFilterError`); also an ``InvalidFilterError``, which it was before it had a type
    of its own."""


class InvalidScopeError(ValidationError):
    """A scope component (``user_id``, ``agent_id``, ``session_id``) was malformed:
    each set value is 1..128 characters of ``[A-Za-z0-9_.:@+-]``."""

    def __init__(self, message: str, *, component: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.component = component
        self.value = value


class InvalidConfigError(ValidationError):
    """A configuration value was out of range."""


class NotAnIntegerError(ValidationError):
    """``WorkingMemory.incr`` met a value that is not a signed 64-bit ASCII decimal
    integer, or its result would leave that range."""

    def __init__(self, message: str, *, key: object = None) -> None:
        super().__init__(message)
        self.key = key


# --- capacity ---------------------------------------------------------------


class CapacityError(UmiError):
    """A bounded memory tier is full. Nothing was changed."""


class CoreMemoryFullError(CapacityError):
    def __init__(self, message: str, *, over_by: int, limit: int) -> None:
        super().__init__(message)
        self.over_by = over_by
        self.limit = limit


class WorkingMemoryFullError(CapacityError):
    def __init__(self, message: str, *, over_by: int, limit: int, key: str | None = None) -> None:
        super().__init__(message)
        self.over_by = over_by
        self.limit = limit
        self.key = key


# --- storage / providers ----------------------------------------------------


class StorageError(UmiError):
    """The storage backend failed. A failed write leaves nothing half-written."""


class StorageLockedError(StorageError):
    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class SchemaVersionError(StorageError):
    def __init__(self, message: str, *, found: int, supported: int) -> None:
        super().__init__(message)
        self.found = found
        self.supported = supported


class BackendNotInstalledError(StorageError):
    """A storage backend's optional dependencies are missing; ``.extra`` names the pip extra."""

    def __init__(self, message: str, *, extra: str) -> None:
        super().__init__(message)
        self.extra = extra


class IndexCacheError(StorageError):
    """A saved vector index is missing, truncated, corrupt or for another dimension.

    The index is a cache of the store: the caller rebuilds it from the store.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class EmbeddingError(UmiError):
    """An embedding provider failed or returned unusable vectors."""


class ProviderError(UmiError):
    """An LLM or embedding provider call failed after its retries."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        request_id: str | None = None,
        provider: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id
        self.provider = provider


class ProviderTimeoutError(ProviderError):
    """The provider did not answer within the timeout."""


class RateLimitError(ProviderError):
    """Rate-limited (429) or overloaded (529) past ``max_retries``."""


class InvalidResponseError(ProviderError):
    """The provider answered, but not with output matching the requested schema."""


class ProviderNotInstalledError(ProviderError):
    def __init__(self, message: str, *, extra: str) -> None:
        super().__init__(message)
        self.extra = extra


# --- lifetime of a Memory -----------------------------------------------------------


class MemoryClosedError(UmiError):
    """The Memory was closed before (or while) this call ran; nothing more will run on it. A call
    failed with it while running had no storage job running then (it was waiting for the write
    lock, a provider, or between two jobs), so a single write (``remember``, ``update``,
    ``forget``) did not commit; a call of many writes (``remember_many``, ``import_``) keeps what
    it had committed before, as when it fails. Compare :class:`OutcomeUnknownError`."""


class OutcomeUnknownError(UmiError):
    """``close()`` ended this call while one of its storage jobs was still running, after the
    calls in flight had the close grace (``.grace_secs``) to finish. A thread cannot be stopped:
    the job runs on and **may have committed** (the store is closed once it ends). Not a
    :class:`MemoryClosedError`, which promises no job of the call was running: look at the store
    (``get`` / ``recall`` after reopening) before retrying a write that is not idempotent
    (``remember`` of the same text is: a text told again is not stored twice)."""

    def __init__(self, message: str, *, grace_secs: float | None = None) -> None:
        super().__init__(message)
        self.grace_secs = grace_secs


class ForkedProcessError(UmiError):
    """This Memory was opened in another process: after ``os.fork()`` its loop thread does
    not exist in the child. Open a new Memory in the child process (or use ``multiprocessing``
    with the ``spawn`` start method)."""


class LoopReentryError(UmiError, RuntimeError):
    """A blocking call (a ``_sync`` method, ``close()``) was made on umi's own loop thread — from
    a ``progress`` callback, say — where it would wait for itself. Nothing was changed: await the
    async method instead, or make the call after the one in flight returns. (Also a
    ``RuntimeError``, which it was before it had a type of its own.)"""


class TransferFileError(UmiError, OSError):
    """``export`` could not write its file, or ``import_`` could not read one (missing, a
    directory, no permission, disk full). Nothing was imported; an export that fails leaves the
    file that was at its path as it was (a new one is removed). (Also an ``OSError`` with the failure's ``errno`` and the path as ``filename``, which
    it was before it had a type of its own.)"""
