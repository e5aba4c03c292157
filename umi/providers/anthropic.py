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
at ``import umi``; its clients are made on first use. Clients, settings and retries
are shared with the OpenAI providers (see :mod:`umi.providers._sdk`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..types import Usage
from ._checks import check_call_args, check_positive_int
from ._json_reply import parse_json_reply
from ._retry import DEFAULT_MAX_RETRY_WAIT_SECS
from ._schema import SchemaViolation, validate_json
from ._sdk import SDKLLMProvider, Vendor, token_count
from .base import LLMResult

__all__ = ["DEFAULT_ANTHROPIC_MODEL", "AnthropicProvider"]

#: Fast and cheap, and good at extraction; pass ``model=`` for another.
DEFAULT_ANTHROPIC_MODEL = "claude-haiku-4-5"
ANTHROPIC_MAX_TOKENS_LIMIT = 128_000
_ANTHROPIC = Vendor(name="anthropic", module="anthropic", client="Anthropic", async_client="AsyncAnthropic",
                    key_env="ANTHROPIC_API_KEY")
_EPHEMERAL = {"type": "ephemeral"}


class AnthropicProvider(SDKLLMProvider):
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
        max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT_SECS,
    ) -> None:
        wait = self._check_settings(model, base_url, timeout, max_retries, max_retry_wait)
        self.max_tokens = check_positive_int(max_tokens, "max_tokens", 1, ANTHROPIC_MAX_TOKENS_LIMIT)
        self._connect(_ANTHROPIC, api_key, wait)

    # --- the three steps of SDKLLMProvider.complete_json ----------------------
    def _request(self, system: str, prompt: str, schema: Mapping[str, Any], task: str) -> dict[str, Any]:
        check_call_args(system, prompt, schema, task)
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

    def _send(self, client: Any, request: dict[str, Any]) -> Any:
        return client.messages.create(**request)

    def _result(self, message: Any, schema: Mapping[str, Any], task: str) -> LLMResult:
        stop = getattr(message, "stop_reason", None)
        blocks = getattr(message, "content", None) or []
        invalid = self._invalid_answer(message, cut_at=self.max_tokens if stop == "max_tokens" else None)

        calls = [b for b in blocks if getattr(b, "type", None) == "tool_use" and getattr(b, "name", None) == task]
        if calls:
            data = getattr(calls[0], "input", None)
            if not isinstance(data, dict):
                raise invalid(f"the {task} tool was called with {type(data).__name__} input, not an object")
            try:
                validate_json(data, schema)
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
                data = parse_json_reply(text, schema)
            except SchemaViolation as exc:
                raise invalid(f"the JSON in the text answer does not match the {task} schema: {exc}") from exc
            except ValueError as exc:
                raise invalid(f"answered in text without a JSON object for {task}: {exc}") from exc
        return LLMResult(data=data, usage=_usage(getattr(message, "usage", None)))


def _usage(u: Any) -> Usage:
    return Usage(
        input_tokens=token_count(u, "input_tokens"),
        output_tokens=token_count(u, "output_tokens"),
        cache_read_input_tokens=token_count(u, "cache_read_input_tokens"),
        cache_creation_input_tokens=token_count(u, "cache_creation_input_tokens"),
        calls=1,
    )
