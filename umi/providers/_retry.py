"""Retries and error mapping for the SDK-backed providers.

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
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

from ..errors import InvalidResponseError, ProviderError, ProviderTimeoutError, RateLimitError
from ._deadline import DeadlineExceeded, ResponseTooLargeError

T = TypeVar("T")

__all__ = [
    "DEFAULT_MAX_RETRY_WAIT_SECS",
    "Failure",
    "RetryPolicy",
    "acall_with_retries",
    "call_with_retries",
    "classify_failure",
    "failure_to_error",
    "parse_retry_after",
]

#: Longest single wait between attempts, whatever ``retry-after`` asks for (seconds).
DEFAULT_MAX_RETRY_WAIT_SECS = 30.0


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
    if isinstance(exc, (sdk.APITimeoutError, DeadlineExceeded)):
        return Failure("timeout", True, detail="request timed out")
    if isinstance(exc, ResponseTooLargeError):  # from under the SDK: OpenAI's lets it through as it is
        return Failure("response", False, detail=str(exc))
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
        if isinstance(cause, ResponseTooLargeError):  # Anthropic's SDK calls it a connection error
            return Failure("response", False, detail=str(cause))
        return Failure("connection", True, detail=f"connection failed: {cause or exc}")
    if isinstance(exc, sdk.APIResponseValidationError):
        return Failure("response", False, status=getattr(exc, "status_code", None), detail=str(exc))
    if isinstance(exc, json.JSONDecodeError):  # a 2xx whose body is not JSON: the SDKs let this through
        return Failure("response", False, detail=f"the response body is not JSON ({exc})")
    # ... nor do they catch the body's other decoding failures (json.loads on the raw bytes)
    if isinstance(exc, UnicodeDecodeError):
        return Failure("response", False, detail=f"the response body is not UTF-8 JSON (byte {exc.start}: {exc.reason})")
    if isinstance(exc, RecursionError):
        return Failure("response", False, detail="the response body is JSON nested too deeply to read")
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
            policy.sleep(_wait_before_retry(exc, attempt, policy=policy, sdk=sdk, provider=provider,
                                            timeout_secs=timeout_secs, key_env=key_env))


async def acall_with_retries(call: Callable[[], Awaitable[T]], *, policy: RetryPolicy, sdk: ModuleType,
                             provider: str, timeout_secs: float, key_env: str) -> T:
    """The async twin of :func:`call_with_retries` (waits with ``policy.asleep``)."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except Exception as exc:
            await policy.asleep(_wait_before_retry(exc, attempt, policy=policy, sdk=sdk, provider=provider,
                                                   timeout_secs=timeout_secs, key_env=key_env))


def _wait_before_retry(exc: Exception, attempt: int, *, policy: RetryPolicy, sdk: ModuleType, provider: str,
                       timeout_secs: float, key_env: str) -> float:
    """The one retry decision of both loops: how long to wait before attempt ``attempt + 1``.

    Raises ``exc`` itself when it is not an SDK failure, and the final
    :class:`umi.ProviderError` (chained to ``exc``) when it is not retryable or the
    retries are spent.
    """
    f = classify_failure(exc, sdk)
    if f is None:
        raise exc
    if not f.retryable or attempt > policy.max_retries:
        raise failure_to_error(f, provider=provider, attempts=attempt, timeout_secs=timeout_secs,
                               key_env=key_env) from exc
    return policy.delay(attempt - 1, f.retry_after)
