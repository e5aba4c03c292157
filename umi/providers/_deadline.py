"""A whole-request deadline under the SDK clients.

The SDKs' ``timeout`` bounds each socket operation (the connect, each read), not the request: a
server that sends its answer a few bytes at a time, each read within the timeout, holds a call for
as long as it likes (a 500-byte answer at 0.2 s a byte took 100 s with ``timeout=1``; headers at
one byte at a time, 8.5 s). So ``timeout`` bounds the whole exchange, headers included:

* async calls: each attempt is awaited under :func:`within`, which cancels it past the timeout
  (the connect, the wait for a pooled connection, the request, the headers and the body alike)
  and raises the SDK's ``APITimeoutError`` for the request it sent (:class:`DeadlineExceeded`
  if it had sent none);
* sync calls cannot be cancelled, so the request hook sets the request's deadline for the calling
  thread (a context variable) and a ``trace`` extension (public httpcore API) bounds each
  connection's network stream as it is opened: every read and write of a request waits at most
  until its deadline, then raises the library's ``ReadTimeout`` / ``WriteTimeout``;
* and the event hooks wrap each response's body stream, which stops reading once the deadline
  has passed (with ``ReadTimeout``).

The SDK reports ``ReadTimeout`` as its timeout error; the retry loop reports that (and
:class:`DeadlineExceeded`) as :class:`umi.ProviderTimeoutError`.

The stream also stops reading a body past :data:`MAX_RESPONSE_BYTES` with :class:`ResponseTooLargeError`
(Anthropic's SDK wraps it as a connection error, OpenAI's lets it through; the retry loop reports
either as an unusable response, not retried): the SDKs read a whole body into memory, however
large, before parsing it.

The SDK's HTTP library (``httpx``, or ``httpx2`` in newer SDKs) is found from the SDK's own client
class, so the wrappers always match what the SDK uses.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import time
from types import ModuleType
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")

__all__ = ["MAX_RESPONSE_BYTES", "DeadlineExceeded", "ResponseTooLargeError", "http_clients", "within"]

#: Largest answer body read (bytes). The largest real one is an embeddings batch: 2048 inputs of
#: 3072 dimensions is ≈ 34 MB as base64 and ≈ 140 MB as JSON floats.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024


class ResponseTooLargeError(Exception):
    """A response body longer than :data:`MAX_RESPONSE_BYTES` (read no further)."""


class DeadlineExceeded(Exception):
    """An async attempt that had sent no request when its timeout passed (it was cancelled)."""


#: the requests the async attempt awaited under :func:`within` sent so far (its request hook adds them)
_sent: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("umi_sent", default=None)


async def within(sdk: ModuleType, timeout_secs: float, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()`` (one attempt through an async client of :func:`http_clients`), cancelled
    once ``timeout_secs`` have passed: then the SDK's ``APITimeoutError`` for the last request it
    sent, as the SDK raises for its own timeouts (:class:`DeadlineExceeded` if it sent none)."""
    sent: list[Any] = []
    token = _sent.set(sent)  # the context wait_for's task copies: the hook appends to this list
    try:
        return await asyncio.wait_for(call(), timeout_secs)
    except asyncio.TimeoutError as exc:  # (TimeoutError itself from 3.11 on)
        if not sent:
            raise DeadlineExceeded(f"no request sent within the {timeout_secs:g} s timeout") from exc
        raise sdk.APITimeoutError(request=sent[-1]) from exc
    finally:
        _sent.reset(token)


def http_clients(sdk: ModuleType, timeout_secs: float) -> tuple[Any, Any]:
    """(sync, async) factories of the SDK's default HTTP client with the deadline and the byte limit.

    They are event hooks (public HTTP-library API), so the SDK's own transports stay: its socket
    keep-alive options, its connection limits and the proxies taken from the environment."""
    http = _http_library(sdk)
    body, async_body = _streams(http)
    max_bytes = MAX_RESPONSE_BYTES

    def start(request: Any) -> None:
        request.extensions[_DEADLINE] = time.monotonic() + timeout_secs

    def sync_start(request: Any) -> None:
        start(request)
        _current_deadline.set((request.extensions[_DEADLINE], timeout_secs))
        request.extensions["trace"] = _bounding_tracer(request.extensions.get("trace"))

    def limits(response: Any) -> _Limits:
        deadline = response.request.extensions.get(_DEADLINE, time.monotonic() + timeout_secs)
        return _Limits(http, deadline, timeout_secs, max_bytes, response.request)

    def on_response(response: Any) -> None:
        response.stream = body(response.stream, limits(response))

    async def astart(request: Any) -> None:
        start(request)
        sent = _sent.get()
        if sent is not None:
            sent.append(request)

    async def aon_response(response: Any) -> None:
        response.stream = async_body(response.stream, limits(response))

    def sync() -> Any:
        return sdk.DefaultHttpxClient(event_hooks={"request": [sync_start], "response": [on_response]})

    def async_() -> Any:
        return sdk.DefaultAsyncHttpxClient(event_hooks={"request": [astart], "response": [aon_response]})

    return sync, async_


_DEADLINE = "umi.deadline"  # request extension: time.monotonic() by which the answer must be read

#: (deadline, timeout_secs) of the sync request this thread sends now, for its bounded streams
_current_deadline: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "umi_deadline", default=None)

#: httpcore trace events whose ``return_value`` is a new network stream (a TCP connection, the TLS
#: over it, a proxy tunnel's TLS), named ``<module>.<name>.complete``
_NEW_STREAM_EVENTS = (".connect_tcp.complete", ".connect_unix_socket.complete", ".start_tls.complete")


def _bounding_tracer(inner: Callable[[str, dict[str, Any]], None] | None) -> Callable[[str, dict[str, Any]], None]:
    """A sync ``trace`` extension that bounds every network stream opened for the request (then
    passes the event on to ``inner``, a trace extension that was there already)."""

    def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith(_NEW_STREAM_EVENTS):
            stream = info.get("return_value")
            if stream is not None:
                _bound(stream)
        if inner is not None:
            inner(event, info)

    return trace


def _bound(stream: Any) -> None:
    """Make a sync network stream wait in each read and write at most until the deadline of the
    request the thread sends (the connection is reused by later requests: each has its own)."""
    if getattr(stream, "_umi_bounded", False):
        return
    core = importlib.import_module(type(stream).__module__.partition(".")[0])  # httpcore or httpcore2
    read, write = stream.read, stream.write

    def left(timeout: float | None, error: type[Exception]) -> float | None:
        current = _current_deadline.get()
        if current is None:
            return timeout
        deadline, timeout_secs = current
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise error(f"the answer took longer than the {timeout_secs:g} s timeout")
        return remaining if timeout is None else min(timeout, remaining)

    def bounded_read(max_bytes: int, timeout: float | None = None) -> bytes:
        return read(max_bytes, left(timeout, core.ReadTimeout))

    def bounded_write(buffer: bytes, timeout: float | None = None) -> None:
        write(buffer, left(timeout, core.WriteTimeout))

    stream.read, stream.write = bounded_read, bounded_write
    stream._umi_bounded = True


class _Limits:
    """One request's deadline and byte budget, checked after every chunk of its body."""

    def __init__(self, http: ModuleType, deadline: float, timeout_secs: float, max_bytes: int,
                 request: Any) -> None:
        self.http, self.deadline, self.timeout_secs, self.max_bytes = http, deadline, timeout_secs, max_bytes
        self.request = request
        self.seen = 0

    def check(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        if self.seen > self.max_bytes:
            raise ResponseTooLargeError(f"the response body is larger than {self.max_bytes} bytes (read no further)")
        if time.monotonic() > self.deadline:
            raise self.http.ReadTimeout(f"the answer took longer than the {self.timeout_secs:g} s timeout",
                                        request=self.request)


def _http_library(sdk: ModuleType) -> ModuleType:
    base = next(c for c in sdk.DefaultHttpxClient.__mro__ if c.__name__ == "Client")
    return importlib.import_module(base.__module__.partition(".")[0])


@functools.cache
def _streams(http: ModuleType) -> tuple[type, type]:
    """Body streams over one HTTP library's (its base classes) that check :class:`_Limits`."""

    class Body(http.SyncByteStream):  # type: ignore[name-defined]
        def __init__(self, inner: Any, limits: _Limits) -> None:
            self._inner, self._limits = inner, limits

        def __iter__(self) -> Any:
            for chunk in self._inner:
                self._limits.check(chunk)
                yield chunk

        def close(self) -> None:
            self._inner.close()

    class AsyncBody(http.AsyncByteStream):  # type: ignore[name-defined]
        def __init__(self, inner: Any, limits: _Limits) -> None:
            self._inner, self._limits = inner, limits

        async def __aiter__(self) -> Any:
            async for chunk in self._inner:
                self._limits.check(chunk)
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    return Body, AsyncBody
