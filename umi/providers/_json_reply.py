"""JSON out of a model's text: a bare object, a fenced code block, or an object inside prose.

Used when a model answers in text instead of through the structured channel
(Anthropic without the tool call, OpenAI-compatible servers without strict mode).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ._schema import SchemaViolation, short_repr, validate_json

__all__ = ["JSON_TEXT_CHARS_MAX", "iter_json_objects", "parse_json_reply"]

#: Longest model text searched for a JSON object (characters).
JSON_TEXT_CHARS_MAX = 1_000_000
#: At most this many ``{`` positions are tried when digging JSON out of prose.
_JSON_START_TRIES = 64

_FENCE = re.compile(r"```[ \t]*(?:json|JSON|json5)?[ \t]*\r?\n?(.*?)```", re.DOTALL)


def iter_json_objects(text: str) -> Iterator[dict[str, Any]]:
    """Candidate JSON objects in a model's text, most likely first.

    The whole text; then each fenced code block; then objects that start at a
    ``{`` inside prose ("Sure! Here is the JSON: {...} Let me know..."). Only
    objects (dicts) are yielded; non-finite numbers (``NaN``) are refused.
    """
    if not isinstance(text, str):
        return
    text = text[:JSON_TEXT_CHARS_MAX]
    seen: set[str] = set()

    def attempt(chunk: str) -> dict[str, Any] | None:
        chunk = chunk.strip()
        if not chunk or chunk in seen:
            return None
        seen.add(chunk)
        try:
            obj = json.loads(chunk, parse_constant=_refuse_constant)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    whole = attempt(text)
    if whole is not None:
        yield whole
        return
    for m in _FENCE.finditer(text):
        obj = attempt(m.group(1))
        if obj is not None:
            yield obj
    decoder = json.JSONDecoder(parse_constant=_refuse_constant)
    start = text.find("{")
    tries = 0
    while start != -1 and tries < _JSON_START_TRIES:
        tries += 1
        try:
            obj, end = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            key = text[start:end]
            if key not in seen:
                seen.add(key)
                yield obj
        start = text.find("{", end)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_reply(text: str, schema: Mapping[str, Any],
                     prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The first JSON object in ``text`` that matches ``schema`` (after ``prepare``, when given).

    Raises :class:`SchemaViolation` (of the first candidate) when objects were found
    but none matched, and :class:`ValueError` when there was no JSON object at all.
    """
    first_error: SchemaViolation | None = None
    for obj in iter_json_objects(text):
        if prepare is not None:
            obj = prepare(obj)
        try:
            validate_json(obj, schema)
        except SchemaViolation as exc:
            first_error = first_error or exc
            continue
        return obj
    if first_error is not None:
        raise first_error
    raise ValueError(f"no JSON object found in the model's text ({short_repr(text, 120)})")

