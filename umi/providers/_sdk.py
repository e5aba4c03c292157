"""What the SDK-backed providers (Anthropic, OpenAI) share: one client holder, one set of settings.

:class:`SDKClients` holds one provider's clients of one official SDK: a sync client
made on first use, one async client per event loop (:class:`LoopClients`), and the
:class:`~umi.providers._retry.RetryPolicy` every call goes through. The SDK is
imported when a provider is constructed (it costs over a second), never at
``import umi``; the SDK clients run with ``max_retries=0`` because retries are umi's
own (see :mod:`umi.providers._retry`).

:class:`SDKProvider` is the part of each provider class that is not about its API:
the settings every one takes (model, base_url, timeout, max_retries,
max_retry_wait), checked one way, the holder, ``retry``, ``close``/``aclose``, and
how an unusable answer is reported.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from ..errors import InvalidResponseError, ProviderNotInstalledError
from ._checks import check_base_url, check_max_retries, check_model, check_timeout, check_wait, resolve_api_key
from ._deadline import http_clients, within
from ._retry import RetryPolicy, acall_with_retries, call_with_retries
from .base import LLMProvider, LLMResult, Task

T = TypeVar("T")
log = logging.getLogger("umi.providers")

__all__ = [
    "LoopClients",
    "SDKClients",
    "SDKLLMProvider",
    "SDKProvider",
    "Vendor",
    "import_sdk",
    "not_an_api_object",
    "request_note",
    "token_count",
]


@dataclass(frozen=True)
class Vendor:
    """One official SDK, as :class:`SDKClients` needs to know it."""

    name: str  # the provider name errors carry, e.g. "anthropic"
    module: str  # the SDK's import name, which is also umi's extra for it
    client: str  # the sync client class in that module, e.g. "Anthropic"
    async_client: str  # e.g. "AsyncAnthropic"
    key_env: str  # the environment variable the API key is read from


def import_sdk(module: str, extra: str) -> ModuleType:
    """Import an optional SDK, or raise :class:`ProviderNotInstalledError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ProviderNotInstalledError(
            f"the {module!r} package is not installed; install it with: pip install \"umi[{extra}]\"",
            extra=extra,
        ) from exc


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


class SDKClients:
    """One provider's clients of one SDK, and the retries every call through them gets.

    ``call(request)`` / ``await acall(request)`` run ``request(client)`` with the sync
    client or the running loop's async client, retrying as ``policy`` says and raising
    a :class:`umi.ProviderError` for the final failure. ``close()`` leaves the holder
    usable: new clients are made on the next call.
    """

    def __init__(self, vendor: Vendor, api_key: object, *, base_url: str | None, timeout_secs: float,
                 policy: RetryPolicy) -> None:
        self.vendor = vendor
        self.sdk = import_sdk(vendor.module, vendor.module)
        key = resolve_api_key(api_key, env=vendor.key_env, provider=vendor.name)
        self.timeout_secs = timeout_secs
        self.policy = policy
        self._options = {"api_key": key, "base_url": base_url, "timeout": timeout_secs, "max_retries": 0}
        # the SDKs' timeout bounds each read, not the answer: a whole-request deadline under them
        self._http_client, self._async_http_client = http_clients(self.sdk, timeout_secs)
        self._client: Any = None
        self._lock = threading.Lock()
        self._aclients = LoopClients(lambda: getattr(self.sdk, vendor.async_client)(
            **self._options, http_client=self._async_http_client()))

    def sync(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = getattr(self.sdk, self.vendor.client)(**self._options, http_client=self._http_client())
            return self._client

    def call(self, request: Callable[[Any], T]) -> T:
        client = self.sync()
        return call_with_retries(lambda: request(client), policy=self.policy, sdk=self.sdk,
                                 provider=self.vendor.name, timeout_secs=self.timeout_secs,
                                 key_env=self.vendor.key_env)

    async def acall(self, request: Callable[[Any], Awaitable[T]]) -> T:
        client = self._aclients.get()
        timeout = self.timeout_secs  # bounds each attempt's whole exchange (see umi.providers._deadline)
        return await acall_with_retries(lambda: within(self.sdk, timeout, lambda: request(client)), policy=self.policy,
                                        sdk=self.sdk, provider=self.vendor.name, timeout_secs=timeout,
                                        key_env=self.vendor.key_env)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        self._aclients.close_all()

    async def aclose(self) -> None:
        await self._aclients.aclose_current()
        self.close()


class SDKProvider:
    """The settings, clients and closing every SDK-backed provider shares (a mixin before its protocol).

    A provider's ``__init__`` calls :meth:`_check_settings` first, its own checks next,
    and :meth:`_connect` last (importing the SDK and finding the key), so a bad
    argument is reported before a missing SDK or key.
    """

    name: str
    model: str
    base_url: str | None
    timeout: float
    max_retries: int
    _clients: SDKClients

    def _check_settings(self, model: object, base_url: object, timeout: object, max_retries: object,
                        max_retry_wait: object) -> float:
        """Check and set the shared settings; return ``max_retry_wait`` in seconds, for :meth:`_connect`."""
        self.model = check_model(model)
        self.base_url = check_base_url(base_url)
        self.timeout = check_timeout(timeout)
        self.max_retries = check_max_retries(max_retries)
        return check_wait(max_retry_wait, "max_retry_wait")

    def _connect(self, vendor: Vendor, api_key: object, max_wait_secs: float) -> None:
        policy = RetryPolicy(max_retries=self.max_retries, max_wait_secs=max_wait_secs)
        self._clients = SDKClients(vendor, api_key, base_url=self.base_url, timeout_secs=self.timeout, policy=policy)

    @property
    def retry(self) -> RetryPolicy:
        """How failed calls are retried (its ``sleep``/``asleep`` can be swapped in tests)."""
        return self._clients.policy

    @retry.setter
    def retry(self, policy: RetryPolicy) -> None:
        self._clients.policy = policy

    def close(self) -> None:
        """Close the HTTP clients. The provider stays usable: new clients are made on the next call."""
        self._clients.close()

    async def aclose(self) -> None:
        """Close the async client of the running loop, then everything else (await it before the loop closes)."""
        await self._clients.aclose()

    def _base_url_note(self) -> str:
        """``, base_url='…'`` for a ``repr``, when one was given."""
        return f", base_url={self.base_url!r}" if self.base_url else ""

    def _invalid_answer(self, resp: Any, *, cut_at: int | None) -> Callable[[str], InvalidResponseError]:
        """A maker of the error for an unusable answer ``resp``: it names the request id and, when
        the answer was cut off at ``max_tokens`` (``cut_at``), says so."""
        request_id, where = request_note(resp)
        cut = f"; the answer was cut off at max_tokens={cut_at}, raise max_tokens" if cut_at is not None else ""

        def invalid(msg: str) -> InvalidResponseError:
            return InvalidResponseError(f"{self.name}: {msg}{cut}{where}", request_id=request_id, provider=self.name)

        return invalid


class SDKLLMProvider(SDKProvider, LLMProvider):
    """``complete_json`` and its async twin, once for every SDK-backed LLM.

    A vendor's class supplies three steps: :meth:`_request` (check the inputs, build
    the keyword arguments), :meth:`_send` (the SDK method that takes them) and
    :meth:`_result` (read the answer, or raise :class:`umi.InvalidResponseError`).
    """

    max_tokens: int

    @abc.abstractmethod
    def _request(self, system: str, prompt: str, schema: Mapping[str, Any], task: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _send(self, client: Any, request: dict[str, Any]) -> Any: ...

    @abc.abstractmethod
    def _result(self, resp: Any, schema: Mapping[str, Any], task: str) -> LLMResult: ...

    def complete_json(self, system: str, prompt: str, schema: Mapping[str, Any], *, task: Task) -> LLMResult:
        request = self._request(system, prompt, schema, task)
        resp = self._clients.call(lambda client: self._send(client, request))
        return self._answer(resp, schema, task)

    async def acomplete_json(self, system: str, prompt: str, schema: Mapping[str, Any], *, task: Task) -> LLMResult:
        request = self._request(system, prompt, schema, task)
        resp = await self._clients.acall(lambda client: self._send(client, request))
        return self._answer(resp, schema, task)

    def _answer(self, resp: Any, schema: Mapping[str, Any], task: str) -> LLMResult:
        what = not_an_api_object(resp)
        if what is not None:
            raise self._invalid_answer(resp, cut_at=None)(what)
        return self._result(resp, schema, task)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model!r}{self._base_url_note()}, timeout={self.timeout:g}, "
                f"max_retries={self.max_retries})")


def not_an_api_object(resp: Any) -> str | None:
    """What a 2xx answer was when its body was no JSON object (the SDKs hand back a JSON string,
    array or null, or the text of a non-JSON content type, as it is), else None."""
    if resp is None or isinstance(resp, (str, bytes, list, int, float)):
        shown = repr(resp)
        return f"the answer is not an API object: got {type(resp).__name__} {shown[:80]}{'...' if len(shown) > 80 else ''}"
    return None


def request_note(resp: Any) -> tuple[str | None, str]:
    """The request id of an SDK answer, and the `` (request id …)`` an error message about it ends with."""
    request_id = getattr(resp, "_request_id", None)
    return request_id, f" (request id {request_id})" if request_id else ""


def token_count(usage: Any, name: str) -> int:
    """A token count from an SDK usage object: a positive int, else 0 (missing, null, or not a count)."""
    v = getattr(usage, name, None)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0
