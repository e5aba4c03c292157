"""``AnthropicProvider``: umi's LLM tasks on Claude, through the official ``anthropic`` SDK.

Structured output is a forced tool call: each task is one tool whose
``input_schema`` is the task's JSON schema, and ``tool_choice`` names it, so the
model must answer by calling it. The tool input is checked against the schema
here (the API does not guarantee it). A model that answers in text instead is
still understood when the text holds a matching JSON object (bare, fenced, or
wrapped in prose); anything else is an :class:`umi.InvalidResponseError`.

The fixed system prompt and the tool definition carry ``cache_control:
ephemeral`` breakpoints: umi sends the same ones on every call of a task, so
once the prefix reaches the model's minimum cacheable length, repeat calls read
it from the cache (see ``Usage.cache_read_input_tokens``).

The SDK is imported when a provider is constructed (it costs over a second), never
at ``import umi``; its clients are made on first use. Retries are umi's own (see
:mod:`umi.providers._common`): the SDK clients run with ``max_retries=0``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidResponseError
from ..types import Usage
from . import _common
from ._common import RetryPolicy, SchemaViolation
from .base import LLMProvider, LLMResult, Task

__all__ = ["DEFAULT_ANTHROPIC_MODEL", "AnthropicProvider"]

#: Fast and cheap, and good at extraction; pass ``model=`` for another.
DEFAULT_ANTHROPIC_MODEL = "claude-haiku-4-5"
ANTHROPIC_MAX_TOKENS_LIMIT = 128_000
_KEY_ENV = "ANTHROPIC_API_KEY"
_EPHEMERAL = {"type": "ephemeral"}


class AnthropicProvider(LLMProvider):
    """An :class:`~umi.providers.base.LLMProvider` backed by the Anthropic Messages API.

    ``api_key=None`` reads ``ANTHROPIC_API_KEY``; ``base_url=None`` lets the SDK read
    ``ANTHROPIC_BASE_URL`` (else the public API). ``timeout`` is per attempt, in
    seconds. Rate limits (429), overload (529), 408/409 and 5xx answers, timeouts
    and connection failures are retried up to ``max_retries`` times, waiting what
    ``retry-after`` asks (at most ``max_retry_wait`` seconds) or backing off
    exponentially. ``max_tokens`` bounds each answer.
    """

    name = "anthropic"

    def __init__(
        self,
        api_key: str | None = None,
        *,
        model: str = DEFAULT_ANTHROPIC_MODEL,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        max_tokens: int = 4096,
        max_retry_wait: float = _common.DEFAULT_MAX_RETRY_WAIT_SECS,
    ) -> None:
        self.model = _common.check_model(model)
        self.base_url = _common.check_base_url(base_url)
        self.timeout = _common.check_timeout(timeout)
        self.max_retries = _common.check_max_retries(max_retries)
        self.max_tokens = _common.check_positive_int(max_tokens, "max_tokens", 1, ANTHROPIC_MAX_TOKENS_LIMIT)
        wait = _common.check_wait(max_retry_wait, "max_retry_wait")
        self._sdk = _common.import_sdk("anthropic", "anthropic")
        self._api_key = _common.resolve_api_key(api_key, env=_KEY_ENV, provider="anthropic")
        self.retry = RetryPolicy(max_retries=self.max_retries, max_wait_secs=wait)
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._aclients = _common.LoopClients(self._new_async_client)

    # --- clients -------------------------------------------------------------
    def _client_options(self) -> dict[str, Any]:
        return {"api_key": self._api_key, "base_url": self.base_url, "timeout": self.timeout, "max_retries": 0}

    def _sync_client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = self._sdk.Anthropic(**self._client_options())
            return self._client

    def _new_async_client(self) -> Any:
        return self._sdk.AsyncAnthropic(**self._client_options())

    # --- the protocol --------------------------------------------------------
    def complete_json(self, system: str, prompt: str, schema: Mapping[str, Any], *, task: Task) -> LLMResult:
        request = self._request(system, prompt, schema, task)
        client = self._sync_client()
        message = _common.call_with_retries(
            lambda: client.messages.create(**request),
            policy=self.retry, sdk=self._sdk, provider=self.name, timeout_secs=self.timeout, key_env=_KEY_ENV,
        )
        return self._result(message, schema, task)

    async def acomplete_json(self, system: str, prompt: str, schema: Mapping[str, Any], *, task: Task) -> LLMResult:
        request = self._request(system, prompt, schema, task)
        client = self._aclients.get()
        message = await _common.acall_with_retries(
            lambda: client.messages.create(**request),
            policy=self.retry, sdk=self._sdk, provider=self.name, timeout_secs=self.timeout, key_env=_KEY_ENV,
        )
        return self._result(message, schema, task)

    def close(self) -> None:
        """Close the HTTP clients. The provider stays usable: new clients are made on the next call."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        self._aclients.close_all()

    async def aclose(self) -> None:
        """Close the async client of the running loop, then everything else (await it before the loop closes)."""
        await self._aclients.aclose_current()
        self.close()

    def __repr__(self) -> str:
        where = f", base_url={self.base_url!r}" if self.base_url else ""
        return f"AnthropicProvider(model={self.model!r}{where}, timeout={self.timeout:g}, max_retries={self.max_retries})"

    # --- one logic for both faces -------------------------------------------
    def _request(self, system: str, prompt: str, schema: Mapping[str, Any], task: str) -> dict[str, Any]:
        _common.check_call_args(system, prompt, schema, task)
        tool = {
            "name": task,
            "description": f"Record the result of the {task.replace('_', ' ')} task. "
            "Always answer by calling this tool with arguments that match its schema.",
            "input_schema": json.loads(json.dumps(schema)),  # a plain, private copy
            "cache_control": dict(_EPHEMERAL),
        }
        request: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": prompt}],
            "tools": [tool],
            "tool_choice": {"type": "tool", "name": task},
            "timeout": self.timeout,
        }
        if system.strip():  # the API refuses empty text blocks
            request["system"] = [{"type": "text", "text": system, "cache_control": dict(_EPHEMERAL)}]
        return request

    def _result(self, message: Any, schema: Mapping[str, Any], task: str) -> LLMResult:
        request_id = getattr(message, "_request_id", None)
        stop = getattr(message, "stop_reason", None)
        blocks = getattr(message, "content", None) or []
        where = f" (request id {request_id})" if request_id else ""
        cut = (
            f"; the answer was cut off at max_tokens={self.max_tokens}, raise max_tokens"
            if stop == "max_tokens" else ""
        )

        def invalid(msg: str) -> InvalidResponseError:
            return InvalidResponseError(f"anthropic: {msg}{cut}{where}", request_id=request_id, provider=self.name)

        calls = [b for b in blocks if getattr(b, "type", None) == "tool_use" and getattr(b, "name", None) == task]
        if calls:
            data = getattr(calls[0], "input", None)
            if not isinstance(data, dict):
                raise invalid(f"the {task} tool was called with {type(data).__name__} input, not an object")
            try:
                _common.validate_json(data, schema)
            except SchemaViolation as exc:
                raise invalid(f"the {task} tool input does not match its schema: {exc}") from exc
        else:
            if stop == "refusal":
                raise invalid(f"the model declined the {task} task (stop_reason=refusal)")
            text = "".join(getattr(b, "text", "") or "" for b in blocks if getattr(b, "type", None) == "text")
            if not text.strip():
                kinds = sorted({str(getattr(b, "type", "?")) for b in blocks}) or ["nothing"]
                raise invalid(f"no {task} tool call and no text in the answer (got {', '.join(kinds)}; "
                              f"stop_reason={stop})")
            try:
                data = _common.parse_json_reply(text, schema)
            except SchemaViolation as exc:
                raise invalid(f"the JSON in the text answer does not match the {task} schema: {exc}") from exc
            except ValueError as exc:
                raise invalid(f"answered in text without a JSON object for {task}: {exc}") from exc
        return LLMResult(data=data, usage=_usage(getattr(message, "usage", None)))


def _usage(u: Any) -> Usage:
    def n(name: str) -> int:
        v = getattr(u, name, None)
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    return Usage(
        input_tokens=n("input_tokens"),
        output_tokens=n("output_tokens"),
        cache_read_input_tokens=n("cache_read_input_tokens"),
        cache_creation_input_tokens=n("cache_creation_input_tokens"),
        calls=1,
    )
