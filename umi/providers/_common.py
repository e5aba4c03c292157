"""What the SDK-backed providers share: schema checks, JSON recovery, retries, error mapping.

Nothing here imports an SDK. The providers hand in the SDK module, and errors are
recognised by the classes that module exports (both official SDKs share one shape:
``APIStatusError`` with ``status_code``/``request_id``/``response``, ``APITimeoutError``
under ``APIConnectionError``).

Retries are done here rather than by the SDKs (whose clients are built with
``max_retries=0``) so that: the wait a server asks for in ``retry-after`` is honoured
but capped (the SDKs accept up to ~50 days), the same policy covers both providers,
the final error is a :class:`umi.ProviderError` that says how many attempts were made,
and tests can swap the sleep functions instead of sleeping.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

from ..errors import (
    InvalidConfigError,
    InvalidResponseError,
    ProviderError,
    ProviderNotInstalledError,
    ProviderTimeoutError,
    RateLimitError,
    ValidationError,
)

T = TypeVar("T")
log = logging.getLogger("umi.providers")

__all__ = [
    "Failure",
    "LoopClients",
    "RetryPolicy",
    "SchemaViolation",
    "acall_with_retries",
    "call_with_retries",
    "check_call_args",
    "check_max_retries",
    "check_model",
    "check_positive_int",
    "check_schema",
    "check_timeout",
    "classify_failure",
    "failure_to_error",
    "import_sdk",
    "iter_json_objects",
    "parse_json_reply",
    "parse_retry_after",
    "resolve_api_key",
    "validate_json",
]

#: Upper bound on ``max_retries``: past this a caller wants a queue, not retries.
MAX_RETRIES_LIMIT = 10
#: Longest single wait between attempts, whatever ``retry-after`` asks for (seconds).
DEFAULT_MAX_RETRY_WAIT_SECS = 30.0
#: Longest model text searched for a JSON object (characters).
JSON_TEXT_CHARS_MAX = 1_000_000
#: At most this many ``{`` positions are tried when digging JSON out of prose.
_JSON_START_TRIES = 64

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# --- a validator for the JSON-schema subset umi's task schemas use -----------

_SUPPORTED_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "enum", "items", "additionalProperties",
        "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
        "description", "title",  # annotations: accepted, not checked
    }
)
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


class SchemaViolation(ValueError):
    """A value did not match a schema; ``path`` says where (``$.entities[2].name``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def check_schema(schema: Any, path: str = "$") -> None:
    """Raise :class:`InvalidConfigError` when ``schema`` uses a keyword :func:`validate_json` does not check.

    Refusing unknown keywords keeps a schema from *looking* enforced when it is not.
    """
    if not isinstance(schema, Mapping):
        raise InvalidConfigError(f"schema at {path} must be a JSON-schema object (dict), not {type(schema).__name__}")
    unknown = set(schema) - _SUPPORTED_KEYWORDS
    if unknown:
        raise InvalidConfigError(
            f"schema at {path} uses {sorted(unknown)}; supported keywords are {sorted(_SUPPORTED_KEYWORDS)}"
        )
    types = schema.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if t not in _TYPES:
            raise InvalidConfigError(f"schema at {path} has unknown type {t!r}; expected one of {sorted(_TYPES)}")
    for name, sub in (schema.get("properties") or {}).items():
        check_schema(sub, f"{path}.{name}")
    if "items" in schema:
        check_schema(schema["items"], f"{path}[]")
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        check_schema(extra, f"{path}.*")


def _type_ok(value: Any, t: str) -> bool:
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        return isinstance(value, list)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "null":
        return value is None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if t == "integer":
        return isinstance(value, int) or value.is_integer()
    return True  # number


def validate_json(value: Any, schema: Mapping[str, Any], path: str = "$") -> None:
    """Raise :class:`SchemaViolation` at the first place ``value`` breaks ``schema``.

    Covers type (one or a list), properties, required, enum, items,
    additionalProperties (bool or schema), minimum/maximum, minLength/maxLength,
    minItems/maxItems. Numbers must be finite; ``true`` is not a number.
    """
    types = schema.get("type")
    if types is not None:
        allowed = types if isinstance(types, list) else [types]
        if not any(_type_ok(value, t) for t in allowed):
            raise SchemaViolation(path, f"expected {' or '.join(allowed)}, got {_describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SchemaViolation(path, f"expected a finite number, got {value!r}")
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        raise SchemaViolation(path, f"{_short(value)} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaViolation(path, f"{value!r} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaViolation(path, f"{value!r} is above the maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise SchemaViolation(path, f"string of {len(value)} characters is shorter than minLength {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaViolation(path, f"string of {len(value)} characters is longer than maxLength {schema['maxLength']}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            raise SchemaViolation(path, f"{len(value)} items, fewer than minItems {schema['minItems']}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise SchemaViolation(path, f"{len(value)} items, more than maxItems {schema['maxItems']}")
        if "items" in schema:
            for i, item in enumerate(value):
                validate_json(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        props: Mapping[str, Any] = schema.get("properties") or {}
        for name in schema.get("required") or ():
            if name not in value:
                raise SchemaViolation(path, f"missing required property {name!r}")
        extra = schema.get("additionalProperties", True)
        for name in sorted(value):  # sorted: the first violation reported is the same every run
            sub = value[name]
            if name in props:
                validate_json(sub, props[name], f"{path}.{name}")
            elif extra is False:
                raise SchemaViolation(path, f"unexpected property {name!r} (allowed: {sorted(props)})")
            elif isinstance(extra, Mapping):
                validate_json(sub, extra, f"{path}.{name}")


def _describe(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
             int: "integer", float: "number"}
    return f"{names.get(type(value), type(value).__name__)} {_short(value)}"


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


# --- JSON out of model text ---------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|json5)?[ \t]*\r?\n?(.*?)```", re.DOTALL)


def iter_json_objects(text: str) -> Iterator[dict[str, Any]]:
    """Candidate JSON objects in a model's text, most likely first.

    The whole text; then each fenced code block; then objects that start at a
    ``{`` inside prose ("Sure! Here is the JSON: {...} Let me know..."). Only
    objects (dicts) are yielded; non-finite numbers (``NaN``) are refused.
    """
    if not isinstance(text, str):
        return
    text = text[:JSON_TEXT_CHARS_MAX]
    seen: set[str] = set()

    def attempt(chunk: str) -> dict[str, Any] | None:
        chunk = chunk.strip()
        if not chunk or chunk in seen:
            return None
        seen.add(chunk)
        try:
            obj = json.loads(chunk, parse_constant=_refuse_constant)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    whole = attempt(text)
    if whole is not None:
        yield whole
        return
    for m in _FENCE.finditer(text):
        obj = attempt(m.group(1))
        if obj is not None:
            yield obj
    decoder = json.JSONDecoder(parse_constant=_refuse_constant)
    start = text.find("{")
    tries = 0
    while start != -1 and tries < _JSON_START_TRIES:
        tries += 1
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            key = text[start:end]
            if key not in seen:
                seen.add(key)
                yield obj
        start = text.find("{", end)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_reply(text: str, schema: Mapping[str, Any],
                     prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The first JSON object in ``text`` that matches ``schema`` (after ``prepare``, when given).

    Raises :class:`SchemaViolation` (of the first candidate) when objects were found
    but none matched, and :class:`ValueError` when there was no JSON object at all.
    """
    first_error: SchemaViolation | None = None
    for obj in iter_json_objects(text):
        if prepare is not None:
            obj = prepare(obj)
        try:
            validate_json(obj, schema)
        except SchemaViolation as exc:
            first_error = first_error or exc
            continue
        return obj
    if first_error is not None:
        raise first_error
    raise ValueError(f"no JSON object found in the model's text ({_short(text, 120)})")


# --- retries ------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """How failed calls are retried: up to ``max_retries`` more attempts.

    The wait before retry *n* (0-based) is what the server asked for in
    ``retry-after-ms``/``retry-after`` (capped at ``max_wait_secs``), else
    exponential backoff ``base_delay_secs * 2**n`` capped at ``max_delay_secs``,
    with up to 25 % jitter taken off so clients do not retry in lockstep.
    ``sleep``/``asleep`` are swappable so tests need not wait.
    """

    max_retries: int = 2
    base_delay_secs: float = 0.5
    max_delay_secs: float = 8.0
    max_wait_secs: float = DEFAULT_MAX_RETRY_WAIT_SECS
    sleep: Callable[[float], None] = time.sleep
    asleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, retry_index: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_wait_secs)
        backoff = min(self.base_delay_secs * 2.0 ** min(retry_index, 30), self.max_delay_secs)
        return min(backoff * (1.0 - 0.25 * self.rng.random()), self.max_wait_secs)


def parse_retry_after(headers: Any, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds a response asks the client to wait: ``retry-after-ms``, ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    get = headers.get
    ms = get("retry-after-ms")
    if ms is not None:
        try:
            v = float(ms) / 1000.0
            if math.isfinite(v):
                return max(v, 0.0)
        except ValueError:
            pass
    ra = get("retry-after")
    if ra is None:
        return None
    try:
        v = float(ra)
        return max(v, 0.0) if math.isfinite(v) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - now(), 0.0)


@dataclass
class Failure:
    """One failed attempt, as the retry loop sees it."""

    kind: str  # "timeout" | "connection" | "status" | "response"
    retryable: bool
    status: int | None = None
    request_id: str | None = None
    retry_after: float | None = None
    detail: str = ""
    error_type: str | None = None  # the API's error.type, e.g. "overloaded_error"


_RETRY_STATUSES = frozenset({408, 409, 429})


def classify_failure(exc: BaseException, sdk: ModuleType) -> Failure | None:
    """What an exception from an SDK call means, or None when it is not a transport/API failure."""
    if isinstance(exc, sdk.APITimeoutError):
        return Failure("timeout", True, detail="request timed out")
    if isinstance(exc, sdk.APIStatusError):
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        status = int(exc.status_code)
        body = getattr(exc, "body", None)
        err = body.get("error") if isinstance(body, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        etype = err.get("type") if isinstance(err, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        should = headers.get("x-should-retry") if headers is not None else None
        if should == "true":
            retryable = True
        elif should == "false" or code == "insufficient_quota":  # OpenAI's 429 for an exhausted budget
            retryable = False
        else:
            retryable = status in _RETRY_STATUSES or status >= 500
        return Failure(
            "status",
            retryable,
            status=status,
            request_id=getattr(exc, "request_id", None),
            retry_after=parse_retry_after(headers),
            detail=str(message) if message else str(exc),
            error_type=str(etype) if etype else None,
        )
    if isinstance(exc, sdk.APIConnectionError):
        cause = exc.__cause__
        return Failure("connection", True, detail=f"connection failed: {cause or exc}")
    if isinstance(exc, sdk.APIResponseValidationError):
        return Failure("response", False, status=getattr(exc, "status_code", None), detail=str(exc))
    if isinstance(exc, json.JSONDecodeError):  # a 2xx whose body is not JSON: the SDKs let this through
        return Failure("response", False, detail=f"the response body is not JSON ({exc})")
    return None


def failure_to_error(f: Failure, *, provider: str, attempts: int, timeout_secs: float,
                     key_env: str) -> ProviderError:
    """The :class:`umi.ProviderError` subclass for a final failure."""
    tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
    rid = f" (request id {f.request_id})" if f.request_id else ""
    kw: dict[str, Any] = {"status": f.status, "request_id": f.request_id, "provider": provider}
    if f.kind == "timeout":
        return ProviderTimeoutError(f"{provider}: no answer within the {timeout_secs:g} s timeout, {tries}", **kw)
    if f.kind == "connection":
        return ProviderError(f"{provider}: {f.detail}, {tries}", **kw)
    if f.kind == "response":
        return InvalidResponseError(f"{provider}: unusable response: {f.detail}{rid}", **kw)
    kind = f" {f.error_type}" if f.error_type else ""
    if f.status in (401, 403):
        return ProviderError(
            f"{provider} rejected the API key ({f.status}{kind}: {f.detail}){rid}; check the key you passed "
            f"as api_key=, or {key_env}",
            **kw,
        )
    if f.status in (429, 529):
        what = "overloaded" if f.status == 529 else "rate-limited"
        return RateLimitError(f"{provider}: {what} ({f.status}{kind}: {f.detail}), {tries}{rid}", **kw)
    return ProviderError(f"{provider}: HTTP {f.status}{kind}: {f.detail}, {tries}{rid}", **kw)


def call_with_retries(call: Callable[[], T], *, policy: RetryPolicy, sdk: ModuleType, provider: str,
                      timeout_secs: float, key_env: str) -> T:
    """Run ``call()``; retry what :func:`classify_failure` says is retryable; raise a ProviderError."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:
            f = classify_failure(exc, sdk)
            if f is None:
                raise
            if not f.retryable or attempt > policy.max_retries:
                raise failure_to_error(f, provider=provider, attempts=attempt, timeout_secs=timeout_secs,
                                       key_env=key_env) from exc
            policy.sleep(policy.delay(attempt - 1, f.retry_after))


async def acall_with_retries(call: Callable[[], Awaitable[T]], *, policy: RetryPolicy, sdk: ModuleType,
                             provider: str, timeout_secs: float, key_env: str) -> T:
    """The async twin of :func:`call_with_retries` (waits with ``policy.asleep``)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            f = classify_failure(exc, sdk)
            if f is None:
                raise
            if not f.retryable or attempt > policy.max_retries:
                raise failure_to_error(f, provider=provider, attempts=attempt, timeout_secs=timeout_secs,
                                       key_env=key_env) from exc
            await policy.asleep(policy.delay(attempt - 1, f.retry_after))


# --- construction helpers -------------------------------------------------------


def import_sdk(module: str, extra: str) -> ModuleType:
    """Import an optional SDK, or raise :class:`ProviderNotInstalledError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ProviderNotInstalledError(
            f"the {module!r} package is not installed; install it with: pip install \"umi[{extra}]\"",
            extra=extra,
        ) from exc


def resolve_api_key(api_key: object, *, env: str, provider: str) -> str:
    if api_key is not None and not isinstance(api_key, str):
        raise TypeError(f"api_key must be a str or None, not {type(api_key).__name__}")
    key = api_key if api_key is not None else os.environ.get(env)
    if key is None or not key.strip():
        where = "was empty" if api_key is not None else f"was not given and {env} is not set"
        raise ProviderError(
            f"no {provider} API key: api_key {where}. Pass api_key=\"...\" or set the {env} "
            "environment variable (export " + env + "=...)",
            provider=provider,
        )
    return key.strip()


def check_model(model: object) -> str:
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, not {type(model).__name__}")
    if not model.strip() or len(model) > 256:
        raise InvalidConfigError(f"model must be a non-empty name of at most 256 characters, got {model!r}")
    return model.strip()


def check_timeout(timeout: object, *, limit: float = 3600.0) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    t = float(timeout)
    if not (0.0 < t <= limit) or math.isnan(t):
        raise InvalidConfigError(f"timeout must be in (0, {limit:g}] seconds, got {timeout!r}")
    return t


def check_max_retries(max_retries: object) -> int:
    return check_positive_int(max_retries, "max_retries", 0, MAX_RETRIES_LIMIT)


def check_positive_int(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidConfigError(f"{what} must be in [{lo}, {hi}], got {value}")
    return value


def check_wait(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    v = float(value)
    if not (0.0 <= v <= 3600.0) or math.isnan(v):
        raise InvalidConfigError(f"{what} must be in [0, 3600] seconds, got {value!r}")
    return v


def check_base_url(base_url: object) -> str | None:
    if base_url is None:
        return None
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a str or None, not {type(base_url).__name__}")
    if not re.match(r"^https?://[^\s/]+", base_url):
        raise InvalidConfigError(f"base_url must be an http(s) URL, got {base_url!r}")
    return base_url


def check_call_args(system: object, prompt: object, schema: object, task: object) -> None:
    """Input checks shared by every ``complete_json``: types, a usable task name, a supported schema."""
    if not isinstance(system, str):
        raise TypeError(f"system must be a str, not {type(system).__name__}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
    if not prompt.strip():
        raise ValidationError("prompt must not be empty")
    if not isinstance(task, str):
        raise TypeError(f"task must be a str, not {type(task).__name__}")
    if not _NAME.match(task):
        raise ValidationError(f"task must match [a-zA-Z0-9_-]{{1,64}} (it names the tool/schema), got {task!r}")
    if not isinstance(schema, Mapping):
        raise TypeError(f"schema must be a dict (a JSON schema), not {type(schema).__name__}")
    if schema.get("type") != "object":
        raise InvalidConfigError(f"schema for {task!r} must be of type 'object', got {schema.get('type')!r}")
    check_schema(schema)


class LoopClients:
    """One SDK async client per event loop.

    An async HTTP connection pool belongs to the loop it was made on; a client
    reused from another loop fails or leaks. Clients of loops that have closed are
    dropped (they cannot be closed any more), so await ``aclose()`` on a loop
    before closing it.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, Any]] = {}
        self._closing: set[asyncio.Task[Any]] = set()
        self._lock = threading.Lock()

    def get(self) -> Any:
        loop = asyncio.get_running_loop()
        with self._lock:
            for key, (lp, _) in list(self._clients.items()):
                if lp.is_closed():
                    del self._clients[key]
            entry = self._clients.get(id(loop))
            if entry is None or entry[0] is not loop:
                entry = (loop, self._factory())
                self._clients[id(loop)] = entry
            return entry[1]

    async def aclose_current(self) -> None:
        """Close the client of the running loop (the one ``aclose()`` is awaited on)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._clients.pop(id(loop), None)
        if entry is not None and entry[0] is loop:
            await entry[1].close()

    def close_all(self, timeout_secs: float = 5.0) -> None:
        """Close every client whose loop can still run its ``close()``; drop the rest."""
        with self._lock:
            entries = list(self._clients.values())
            self._clients.clear()
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, client in entries:
            if loop.is_closed():
                continue
            if loop.is_running():
                if loop is current:  # cannot block our own loop: close soon, keeping the task alive
                    task = loop.create_task(client.close())
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
                    continue
                try:
                    asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout_secs)
                except Exception as exc:  # noqa: BLE001 - closing is best effort; the loop may be stopping
                    log.debug("could not close an async client on its loop: %r", exc)
            else:
                try:
                    loop.run_until_complete(client.close())
                except RuntimeError as exc:  # another loop runs in this thread; the client is dropped
                    log.debug("could not close an async client on its loop: %r", exc)
