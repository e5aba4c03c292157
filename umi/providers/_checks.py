"""Argument checks of the providers: settings at construction, inputs of ``complete_json``.

Each check returns the value (normalised) or raises: a wrong type as :class:`TypeError`,
a value out of range as :class:`umi.InvalidConfigError` naming the range.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

from ..errors import InvalidConfigError, ProviderError, ValidationError
from ._schema import check_schema

__all__ = [
    "MAX_RETRIES_LIMIT",
    "check_base_url",
    "check_call_args",
    "check_max_retries",
    "check_model",
    "check_positive_int",
    "check_timeout",
    "check_wait",
    "resolve_api_key",
]

#: Upper bound on ``max_retries``: past this a caller wants a queue, not retries.
MAX_RETRIES_LIMIT = 10

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


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
