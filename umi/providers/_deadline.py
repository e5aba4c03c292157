"""A whole-request deadline under the SDK clients.

The SDKs' ``timeout`` bounds each socket operation (the connect, each read), not the request: a
server that sends its answer a few bytes at a time, each read within the timeout, holds a call for
as long as it likes (a 500-byte answer at 0.2 s a byte took 100 s with ``timeout=1``). The
client's event hooks here wrap each response's body stream, which stops reading once
``timeout_secs`` have passed since the request was sent, with the library's ``ReadTimeout``: the
SDK reports it as its timeout error, and the retry loop as :class:`umi.ProviderTimeoutError`.

The stream also stops reading a body past :data:`MAX_RESPONSE_BYTES` with :class:`ResponseTooLargeError`
(Anthropic's SDK wraps it as a connection error, OpenAI's lets it through; the retry loop reports
either as an unusable response, not retried): the SDKs read a whole body into memory, however
large, before parsing it.

The SDK's HTTP library (``httpx``, or ``httpx2`` in newer SDKs) is found from the SDK's own client
class, so the wrappers always match what the SDK uses.
"""

from __future__ import annotations

import functools
import importlib
import time
from types import ModuleType
from typing import Any

__all__ = ["MAX_RESPONSE_BYTES", "ResponseTooLargeError", "http_clients"]

#: Largest answer body read (bytes). The largest real one is an embeddings batch: 2048 inputs of
#: 3072 dimensions is ≈ 34 MB as base64 and ≈ 140 MB as JSON floats.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024


class ResponseTooLargeError(Exception):
    """A response body longer than :data:`MAX_RESPONSE_BYTES` (read no further)."""


def http_clients(sdk: ModuleType, timeout_secs: float) -> tuple[Any, Any]:
    """(sync, async) factories of the SDK's default HTTP client with the deadline and the byte limit.

    They are event hooks (public HTTP-library API), so the SDK's own transports stay: its socket
    keep-alive options, its connection limits and the proxies taken from the environment."""
    http = _http_library(sdk)
    body, async_body = _streams(http)
    max_bytes = MAX_RESPONSE_BYTES

    def start(request: Any) -> None:
        request.extensions[_DEADLINE] = time.monotonic() + timeout_secs

    def limits(response: Any) -> _Limits:
        deadline = response.request.extensions.get(_DEADLINE, time.monotonic() + timeout_secs)
        return _Limits(http, deadline, timeout_secs, max_bytes, response.request)

    def on_response(response: Any) -> None:
        response.stream = body(response.stream, limits(response))

    async def astart(request: Any) -> None:
        start(request)

    async def aon_response(response: Any) -> None:
        response.stream = async_body(response.stream, limits(response))

    def sync() -> Any:
        return sdk.DefaultHttpxClient(event_hooks={"request": [start], "response": [on_response]})

    def async_() -> Any:
        return sdk.DefaultAsyncHttpxClient(event_hooks={"request": [astart], "response": [aon_response]})

    return sync, async_


_DEADLINE = "umi.deadline"  # request extension: time.monotonic() by which the answer must be read


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
