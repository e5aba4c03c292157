"""A whole-request deadline under the SDK clients.

The SDKs' ``timeout`` bounds each socket operation (the connect, each read), not the request: a
server that sends its answer a few bytes at a time, each read within the timeout, holds a call for
as long as it likes (a 500-byte answer at 0.2 s a byte took 100 s with ``timeout=1``). The
transports here wrap the HTTP library's own and stop reading the body once ``timeout_secs`` have
passed since the request was handed to them, with the library's ``ReadTimeout``: the SDK reports
it as its timeout error, and the retry loop as :class:`umi.ProviderTimeoutError`.

The SDK's HTTP library (``httpx``, or ``httpx2`` in newer SDKs) is found from the SDK's own client
class, so the wrappers always match what the SDK uses.
"""

from __future__ import annotations

import functools
import importlib
import time
from types import ModuleType
from typing import Any

__all__ = ["http_clients"]


def http_clients(sdk: ModuleType, timeout_secs: float) -> tuple[Any, Any]:
    """(sync, async) factories of the SDK's default HTTP client over deadline-bound transports."""
    http = _http_library(sdk)
    sync_transport, async_transport = _transports(http)
    limits = sdk.DEFAULT_CONNECTION_LIMITS

    def sync() -> Any:
        return sdk.DefaultHttpxClient(transport=sync_transport(http.HTTPTransport(limits=limits), timeout_secs))

    def async_() -> Any:
        return sdk.DefaultAsyncHttpxClient(
            transport=async_transport(http.AsyncHTTPTransport(limits=limits), timeout_secs))

    return sync, async_


def _http_library(sdk: ModuleType) -> ModuleType:
    base = next(c for c in sdk.DefaultHttpxClient.__mro__ if c.__name__ == "Client")
    return importlib.import_module(base.__module__.partition(".")[0])


@functools.cache
def _transports(http: ModuleType) -> tuple[type, type]:
    """The deadline transports over one HTTP library (its stream and transport base classes)."""

    def check(deadline: float, timeout_secs: float, request: Any) -> None:
        if time.monotonic() > deadline:
            raise http.ReadTimeout(f"the answer took longer than the {timeout_secs:g} s timeout", request=request)

    class Body(http.SyncByteStream):  # type: ignore[misc,name-defined]
        def __init__(self, inner: Any, deadline: float, timeout_secs: float, request: Any) -> None:
            self._inner, self._deadline, self._timeout, self._request = inner, deadline, timeout_secs, request

        def __iter__(self) -> Any:
            for chunk in self._inner:
                check(self._deadline, self._timeout, self._request)
                yield chunk

        def close(self) -> None:
            self._inner.close()

    class AsyncBody(http.AsyncByteStream):  # type: ignore[misc,name-defined]
        def __init__(self, inner: Any, deadline: float, timeout_secs: float, request: Any) -> None:
            self._inner, self._deadline, self._timeout, self._request = inner, deadline, timeout_secs, request

        async def __aiter__(self) -> Any:
            async for chunk in self._inner:
                check(self._deadline, self._timeout, self._request)
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    class Transport(http.BaseTransport):  # type: ignore[misc,name-defined]
        def __init__(self, inner: Any, timeout_secs: float) -> None:
            self._inner, self._timeout = inner, timeout_secs

        def handle_request(self, request: Any) -> Any:
            deadline = time.monotonic() + self._timeout
            r = self._inner.handle_request(request)
            return http.Response(r.status_code, headers=r.headers, extensions=r.extensions,
                                 stream=Body(r.stream, deadline, self._timeout, request))

        def close(self) -> None:
            self._inner.close()

    class AsyncTransport(http.AsyncBaseTransport):  # type: ignore[misc,name-defined]
        def __init__(self, inner: Any, timeout_secs: float) -> None:
            self._inner, self._timeout = inner, timeout_secs

        async def handle_async_request(self, request: Any) -> Any:
            deadline = time.monotonic() + self._timeout
            r = await self._inner.handle_async_request(request)
            return http.Response(r.status_code, headers=r.headers, extensions=r.extensions,
                                 stream=AsyncBody(r.stream, deadline, self._timeout, request))

        async def aclose(self) -> None:
            await self._inner.aclose()

    return Transport, AsyncTransport
