"""OpenAI providers through the official ``openai`` SDK: an LLM and an embedder.

``OpenAIProvider`` asks for structured output with ``response_format`` =
``json_schema`` and ``strict: true``. Strict mode accepts a subset of JSON Schema:
every object must list all its properties as required and close itself with
``additionalProperties: false``, and string lengths are not supported. So the
schema sent is a strict rewrite of the task schema (optional properties become
required-but-nullable; ``minLength``/``maxLength`` are dropped), and the answer is
validated here against the *original* schema, after removing the nulls the rewrite
allowed. ``strict=False`` sends the schema as is, for OpenAI-compatible servers
without strict support; JSON wrapped in prose or code fences is still understood.

``OpenAIEmbeddingProvider`` chunks batches itself (by count and by characters,
under the API's per-request limits), asks for base64 float32 vectors, puts them
back in input order by their ``index``, checks each has the expected dimension
and only finite, non-zero values, and L2-normalises them.

Prompt caching is automatic on OpenAI for long prompt prefixes; umi keeps the
system prompt first and fixed per task so it can apply. Clients, settings and retries
are shared with the Anthropic provider (see :mod:`umi.providers._sdk`).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import EmbeddingError, InvalidConfigError, ValidationError
from ..types import Usage
from ._checks import check_call_args, check_positive_int
from ._json_reply import parse_json_reply
from ._retry import DEFAULT_MAX_RETRY_WAIT_SECS
from ._schema import SchemaViolation
from ._sdk import SDKLLMProvider, SDKProvider, Vendor, not_an_api_object, request_note, token_count
from .base import EmbeddingProvider, EmbedKind, LLMResult, normalize_rows

__all__ = [
    "DEFAULT_OPENAI_EMBEDDING_MODEL",
    "DEFAULT_OPENAI_MODEL",
    "OpenAIEmbeddingProvider",
    "OpenAIProvider",
    "strict_schema",
]

#: Cheap, fast, and supports strict structured outputs; pass ``model=`` for another.
DEFAULT_OPENAI_MODEL = "gpt-4.1-mini"
DEFAULT_OPENAI_EMBEDDING_MODEL = "text-embedding-3-small"
OPENAI_MAX_TOKENS_LIMIT = 128_000
#: Native output sizes of OpenAI's embedding models.
OPENAI_EMBEDDING_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
#: The API takes at most 2048 inputs per request.
EMBEDDING_BATCH_MAX = 2048
#: Characters per embeddings request: the API caps a request at 300k tokens, and a
#: token is at least one character, so this stays under it for any text.
EMBEDDING_BATCH_CHARS_MAX = 250_000
_OPENAI = Vendor(name="openai", module="openai", client="OpenAI", async_client="AsyncOpenAI", key_env="OPENAI_API_KEY")
_STRICT_DROPPED = frozenset({"minLength", "maxLength"})


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    s = dict(schema)
    t = s.get("type")
    if isinstance(t, list):
        s["type"] = t if "null" in t else [*t, "null"]
    elif t is not None:
        s["type"] = [t, "null"]
    if "enum" in s and None not in s["enum"]:
        s["enum"] = [*s["enum"], None]
    return s


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Rewrite a task schema for OpenAI's strict mode (see the module docstring)."""
    s: dict[str, Any] = {k: v for k, v in schema.items() if k not in _STRICT_DROPPED}
    if "properties" in schema:
        required = set(schema.get("required") or ())
        props: dict[str, Any] = {}
        for name, sub in schema["properties"].items():
            strict_sub = strict_schema(sub)
            props[name] = strict_sub if name in required else _nullable(strict_sub)
        s["properties"] = props
        s["required"] = list(schema["properties"])
        s["additionalProperties"] = False
    elif schema.get("type") == "object":
        s["additionalProperties"] = False
        s.setdefault("properties", {})
        s["required"] = []
    if "items" in schema:
        s["items"] = strict_schema(schema["items"])
    return s


def _drop_optional_nulls(value: Any, schema: Mapping[str, Any]) -> Any:
    """Undo :func:`_nullable`: remove ``null`` optional properties the strict schema made the model emit."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        out = {}
        for k, v in value.items():
            if v is None and k in props and k not in required:
                continue
            out[k] = _drop_optional_nulls(v, props[k]) if k in props else v
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_drop_optional_nulls(v, schema["items"]) for v in value]
    return value


class OpenAIProvider(SDKLLMProvider):
    """An :class:`~umi.providers.base.LLMProvider` backed by OpenAI chat completions.

    ``api_key=None`` reads ``OPENAI_API_KEY``; ``base_url=None`` lets the SDK read
    ``OPENAI_BASE_URL`` (else the public API). Retries, timeouts and errors follow the
    same policy as :class:`umi.AnthropicProvider`. ``max_tokens`` is sent as
    ``max_completion_tokens`` (which reasoning models require).
    """

    name = "openai"

    def __init__(
        self,
        api_key: str | None = None,
        *,
        model: str = DEFAULT_OPENAI_MODEL,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        max_tokens: int = 4096,
        max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT_SECS,
        strict: bool = True,
    ) -> None:
        wait = self._check_settings(model, base_url, timeout, max_retries, max_retry_wait)
        self.max_tokens = check_positive_int(max_tokens, "max_tokens", 1, OPENAI_MAX_TOKENS_LIMIT)
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, not {type(strict).__name__}")
        self.strict = strict
        self._connect(_OPENAI, api_key, wait)

    # --- the three steps of SDKLLMProvider.complete_json ----------------------
    def _request(self, system: str, prompt: str, schema: Mapping[str, Any], task: str) -> dict[str, Any]:
        check_call_args(system, prompt, schema, task)
        sent = strict_schema(schema) if self.strict else json.loads(json.dumps(schema))
        messages = [{"role": "user", "content": prompt}]
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        return {
            "model": self.model,
            "messages": messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": task, "schema": sent, "strict": self.strict},
            },
            "max_completion_tokens": self.max_tokens,
            "timeout": self.timeout,
        }

    def _send(self, client: Any, request: dict[str, Any]) -> Any:
        return client.chat.completions.create(**request)

    def _result(self, resp: Any, schema: Mapping[str, Any], task: str) -> LLMResult:
        choices = getattr(resp, "choices", None) or []
        finish = getattr(choices[0], "finish_reason", None) if choices else None
        invalid = self._invalid_answer(resp, cut_at=self.max_tokens if finish == "length" else None)

        if not choices:
            raise invalid("the response has no choices")
        message = getattr(choices[0], "message", None)
        refusal = getattr(message, "refusal", None)
        if refusal:
            raise invalid(f"the model refused the {task} task: {refusal}")
        if finish == "content_filter":
            raise invalid(f"the {task} answer was withheld by the content filter")
        content = getattr(message, "content", None)
        if not isinstance(content, str) or not content.strip():
            raise invalid(f"the {task} answer is empty (finish_reason={finish})")
        try:
            data = parse_json_reply(content, schema, prepare=lambda o: _drop_optional_nulls(o, schema))
        except SchemaViolation as exc:
            raise invalid(f"the {task} answer does not match its schema: {exc}") from exc
        except ValueError as exc:
            raise invalid(f"the {task} answer holds no JSON object: {exc}") from exc
        return LLMResult(data=data, usage=_chat_usage(getattr(resp, "usage", None)))


def _chat_usage(u: Any) -> Usage:
    """OpenAI counts cached tokens inside ``prompt_tokens``; umi's ``input_tokens`` are the uncached rest."""
    details = getattr(u, "prompt_tokens_details", None)
    cached = token_count(details, "cached_tokens")
    written = token_count(details, "cache_write_tokens")
    return Usage(
        input_tokens=max(token_count(u, "prompt_tokens") - cached - written, 0),
        output_tokens=token_count(u, "completion_tokens"),
        cache_read_input_tokens=cached,
        cache_creation_input_tokens=written,
        calls=1,
    )


class OpenAIEmbeddingProvider(SDKProvider, EmbeddingProvider):
    """An :class:`~umi.providers.base.EmbeddingProvider` backed by OpenAI embeddings.

    ``dim`` is known at construction: ``dimensions`` when given, else the model's
    native size (1536 for ``text-embedding-3-small``). ``dimensions`` is sent to the
    API (to shorten vectors) only for ``text-embedding-3-*`` models; for any other
    model it declares the size to expect, and is required when the model is not one
    of OpenAI's. ``batch_size`` inputs (at most 2048) go in one request. ``kind`` is
    accepted for the protocol; OpenAI embeds queries and passages alike.

    Transport failures raise :class:`umi.ProviderError` subclasses (with status and
    request id, after the retries); unusable vectors raise :class:`umi.EmbeddingError`.
    ``usage`` adds up the tokens and requests spent.
    """

    name = "openai-embeddings"

    def __init__(
        self,
        api_key: str | None = None,
        *,
        model: str = DEFAULT_OPENAI_EMBEDDING_MODEL,
        dimensions: int | None = None,
        batch_size: int = 256,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT_SECS,
    ) -> None:
        wait = self._check_settings(model, base_url, timeout, max_retries, max_retry_wait)
        self.batch_size = check_positive_int(batch_size, "batch_size", 1, EMBEDDING_BATCH_MAX)
        native = OPENAI_EMBEDDING_DIMS.get(self.model)
        self._send_dimensions = False
        if dimensions is None:
            if native is None:
                raise InvalidConfigError(
                    f"the size of {self.model!r} embeddings is not known; pass dimensions= "
                    f"(known models: {sorted(OPENAI_EMBEDDING_DIMS)})"
                )
            self.dim = native
        else:
            self.dim = check_positive_int(dimensions, "dimensions", 1, native or 65_536)
            if self.model.startswith("text-embedding-3-"):
                self._send_dimensions = self.dim != native
            elif native is not None and self.dim != native:
                raise InvalidConfigError(
                    f"{self.model!r} makes {native}-d vectors and cannot shorten them; got dimensions={dimensions}"
                )
        self._connect(_OPENAI, api_key, wait)
        self.usage = Usage()
        self._usage_lock = threading.Lock()

    # --- the protocol --------------------------------------------------------
    def embed(self, texts: Sequence[str], *, kind: EmbedKind = "passage") -> np.ndarray:
        parts = []
        for chunk in self._plan(texts, kind):
            request = self._request(chunk)
            resp = self._clients.call(lambda client: client.embeddings.create(**request))  # noqa: B023 - called now
            parts.append(self._decode(resp, len(chunk)))
        return self._finish(parts)

    async def aembed(self, texts: Sequence[str], *, kind: EmbedKind = "passage") -> np.ndarray:
        parts = []
        for chunk in self._plan(texts, kind):
            request = self._request(chunk)
            resp = await self._clients.acall(lambda client: client.embeddings.create(**request))  # noqa: B023 - called now
            parts.append(self._decode(resp, len(chunk)))
        return self._finish(parts)

    def __repr__(self) -> str:
        return (f"OpenAIEmbeddingProvider(model={self.model!r}, dim={self.dim}{self._base_url_note()}, "
                f"batch_size={self.batch_size})")

    # --- one logic for both faces -------------------------------------------
    def _plan(self, texts: Sequence[str], kind: object) -> list[list[str]]:
        """Check the inputs; split them into requests of at most batch_size inputs and the char budget."""
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a sequence of str, not {type(texts).__name__}")
        if kind not in ("passage", "query"):
            raise ValidationError(f"kind must be 'passage' or 'query', got {kind!r}")
        chunks: list[list[str]] = []
        current: list[str] = []
        chars = 0
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, not {type(t).__name__}")
            if not t.strip():
                raise ValidationError(f"texts[{i}] is empty; the embeddings API refuses empty input")
            if len(t) > EMBEDDING_BATCH_CHARS_MAX:
                raise ValidationError(
                    f"texts[{i}] is {len(t)} characters; one input may be at most {EMBEDDING_BATCH_CHARS_MAX}"
                )
            if current and (len(current) == self.batch_size or chars + len(t) > EMBEDDING_BATCH_CHARS_MAX):
                chunks.append(current)
                current, chars = [], 0
            current.append(t)
            chars += len(t)
        if current:
            chunks.append(current)
        return chunks

    def _request(self, chunk: list[str]) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "input": chunk,
            "encoding_format": "base64",
            "timeout": self.timeout,
        }
        if self._send_dimensions:
            request["dimensions"] = self.dim
        return request

    def _decode(self, resp: Any, n: int) -> np.ndarray:
        _, where = request_note(resp)

        def bad(msg: str) -> EmbeddingError:
            return EmbeddingError(f"openai embeddings ({self.model}): {msg}{where}")

        what = not_an_api_object(resp)
        if what is not None:
            raise bad(what)
        data = getattr(resp, "data", None)
        if not isinstance(data, list) or len(data) != n:
            got = len(data) if isinstance(data, list) else type(data).__name__
            raise bad(f"asked for {n} vectors, got {got}")
        out = np.empty((n, self.dim), dtype=np.float32)
        seen = np.zeros(n, dtype=bool)
        for item in data:
            idx = getattr(item, "index", None)
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n or seen[idx]:
                raise bad(f"vector index {idx!r} is out of range [0, {n}) or repeated")
            raw = getattr(item, "embedding", None)
            try:
                if isinstance(raw, str):
                    buf = base64.b64decode(raw, validate=True)
                    if len(buf) % 4:
                        raise ValueError(f"{len(buf)} bytes is not a whole number of float32 values")
                    vec = np.frombuffer(buf, dtype="<f4")
                else:
                    vec = np.asarray(raw, dtype=np.float32)
            except (ValueError, TypeError, binascii.Error) as exc:
                raise bad(f"vector {idx} could not be decoded: {exc}") from exc
            if vec.ndim != 1 or vec.shape[0] != self.dim:
                raise bad(f"vector {idx} has {vec.size} dimensions, expected {self.dim}")
            if not np.all(np.isfinite(vec)):
                raise bad(f"vector {idx} holds NaN or infinite values")
            if not np.any(vec):
                raise bad(f"vector {idx} is all zeros")
            out[idx] = vec
            seen[idx] = True
        u = getattr(resp, "usage", None)
        with self._usage_lock:
            self.usage.add(Usage(input_tokens=token_count(u, "prompt_tokens"), calls=1))
        return out

    def _finish(self, parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return normalize_rows(np.concatenate(parts, axis=0))
