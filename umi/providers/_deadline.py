"""A whole-request deadline under the SDK clients.

The SDKs' ``timeout`` bounds each socket operation (the connect, each read), not the request: a
server that sends its answer a few bytes at a time, each read within the timeout, holds a call for
as long as it likes (a 500-byte answer at 0.2 s a byte took 100 s with ``timeout=1``). The
transports here wrap the HTTP library's own and stop reading the body once ``timeout_secs`` have
passed since the request was handed to them, with the library's ``ReadTimeout``: the SDK reports
it as its timeout error, and the retry loop as :class:`umi.ProviderTimeoutError`.

They also stop reading a body past :data:`MAX_RESPONSE_BYTES` with :class:`ResponseTooLargeError`
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
    """(sync, async) factories of the SDK's default HTTP client over deadline-bound transports."""
    http = _http_library(sdk)
    sync_transport, async_transport = _transports(http)
    limits = sdk.DEFAULT_CONNECTION_LIMITS
    max_bytes = MAX_RESPONSE_BYTES

    def sync() -> Any:
        return sdk.DefaultHttpxClient(
            transport=sync_transport(http.HTTPTransport(limits=limits), timeout_secs, max_bytes))

    def async_() -> Any:
        return sdk.DefaultAsyncHttpxClient(
            transport=async_transport(http.AsyncHTTPTransport(limits=limits), timeout_secs, max_bytes))

    return sync, async_


def _http_library(sdk: ModuleType) -> ModuleType:
    base = next(c for c in sdk.DefaultHttpxClient.__mro__ if c.__name__ == "Client")
    return importlib.import_module(base.__module__.partition(".")[0])


@functools.cache
def _transports(http: ModuleType) -> tuple[type, type]:
    """The deadline transports over one HTTP library (its stream and transport base classes)."""

    class Limits:
        """One request's deadline and byte budget, checked after every chunk of its body."""

        def __init__(self, timeout_secs: float, max_bytes: int, request: Any) -> None:
            self.deadline = time.monotonic() + timeout_secs
            self.timeout_secs, self.max_bytes, self.request = timeout_secs, max_bytes, request
            self.seen = 0

        def check(self, chunk: bytes) -> None:
            self.seen += len(chunk)
            if self.seen > self.max_bytes:
                raise ResponseTooLargeError(f"the response body is larger than {self.max_bytes} bytes "
                                            "(read no further)")
            if time.monotonic() > self.deadline:
                raise http.ReadTimeout(f"the answer took longer than the {self.timeout_secs:g} s timeout",
                                       request=self.request)

    class Body(http.SyncByteStream):  # type: ignore[name-defined]
        def __init__(self, inner: Any, limits: Limits) -> None:
            self._inner, self._limits = inner, limits

        def __iter__(self) -> Any:
            for chunk in self._inner:
                self._limits.check(chunk)
                yield chunk

        def close(self) -> None:
            self._inner.close()

    class AsyncBody(http.AsyncByteStream):  # type: ignore[name-defined]
        def __init__(self, inner: Any, limits: Limits) -> None:
            self._inner, self._limits = inner, limits

        async def __aiter__(self) -> Any:
            async for chunk in self._inner:
                self._limits.check(chunk)
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    class Transport(http.BaseTransport):  # type: ignore[name-defined]
        def __init__(self, inner: Any, timeout_secs: float, max_bytes: int) -> None:
            self._inner, self._timeout, self._max_bytes = inner, timeout_secs, max_bytes

        def handle_request(self, request: Any) -> Any:
            limits = Limits(self._timeout, self._max_bytes, request)
            r = self._inner.handle_request(request)
            return http.Response(r.status_code, headers=r.headers, extensions=r.extensions,
                                 stream=Body(r.stream, limits))

        def close(self) -> None:
            self._inner.close()

    class AsyncTransport(http.AsyncBaseTransport):  # type: ignore[name-defined]
        def __init__(self, inner: Any, timeout_secs: float, max_bytes: int) -> None:
            self._inner, self._timeout, self._max_bytes = inner, timeout_secs, max_bytes

        async def handle_async_request(self, request: Any) -> Any:
            limits = Limits(self._timeout, self._max_bytes, request)
            r = await self._inner.handle_async_request(request)
            return http.Response(r.status_code, headers=r.headers, extensions=r.extensions,
                                 stream=AsyncBody(r.stream, limits))

        async def aclose(self) -> None:
            await self._inner.aclose()

    return Transport, AsyncTransport
