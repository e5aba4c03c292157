"""A validator for the JSON-schema subset umi's task schemas use.

A model's answer is checked here before any pipeline sees it (the APIs do not
guarantee a tool input or a "strict" answer matches its schema). A schema that uses a
keyword this validator does not check is refused up front (:func:`check_schema`), so
no schema *looks* enforced when it is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidConfigError

__all__ = ["SchemaViolation", "check_schema", "validate_json"]


_SUPPORTED_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "enum", "items", "additionalProperties",
        "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
        "description", "title",  # annotations: accepted, not checked
    }
)
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


class SchemaViolation(ValueError):
    """A value did not match a schema; ``path`` says where (``$.entities[2].name``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


def check_schema(schema: Any, path: str = "$") -> None:
    """Raise :class:`InvalidConfigError` when ``schema`` uses a keyword :func:`validate_json` does not check.

    Refusing unknown keywords keeps a schema from *looking* enforced when it is not.
    """
    if not isinstance(schema, Mapping):
        raise InvalidConfigError(f"schema at {path} must be a JSON-schema object (dict), not {type(schema).__name__}")
    unknown = set(schema) - _SUPPORTED_KEYWORDS
    if unknown:
        raise InvalidConfigError(
            f"schema at {path} uses {sorted(unknown)}; supported keywords are {sorted(_SUPPORTED_KEYWORDS)}"
        )
    types = schema.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if t not in _TYPES:
            raise InvalidConfigError(f"schema at {path} has unknown type {t!r}; expected one of {sorted(_TYPES)}")
    for name, sub in (schema.get("properties") or {}).items():
        check_schema(sub, f"{path}.{name}")
    if "items" in schema:
        check_schema(schema["items"], f"{path}[]")
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        check_schema(extra, f"{path}.*")


def _type_ok(value: Any, t: str) -> bool:
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        return isinstance(value, list)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "null":
        return value is None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if t == "integer":
        return isinstance(value, int) or value.is_integer()
    return True  # number


def validate_json(value: Any, schema: Mapping[str, Any], path: str = "$") -> None:
    """Raise :class:`SchemaViolation` at the first place ``value`` breaks ``schema``.

    Covers type (one or a list), properties, required, enum, items,
    additionalProperties (bool or schema), minimum/maximum, minLength/maxLength,
    minItems/maxItems. Numbers must be finite; ``true`` is not a number.
    """
    types = schema.get("type")
    if types is not None:
        allowed = types if isinstance(types, list) else [types]
        if not any(_type_ok(value, t) for t in allowed):
            raise SchemaViolation(path, f"expected {' or '.join(allowed)}, got {_describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SchemaViolation(path, f"expected a finite number, got {value!r}")
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        raise SchemaViolation(path, f"{short_repr(value)} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaViolation(path, f"{value!r} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaViolation(path, f"{value!r} is above the maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise SchemaViolation(path, f"string of {len(value)} characters is shorter than minLength {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaViolation(path, f"string of {len(value)} characters is longer than maxLength {schema['maxLength']}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            raise SchemaViolation(path, f"{len(value)} items, fewer than minItems {schema['minItems']}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise SchemaViolation(path, f"{len(value)} items, more than maxItems {schema['maxItems']}")
        if "items" in schema:
            for i, item in enumerate(value):
                validate_json(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        props: Mapping[str, Any] = schema.get("properties") or {}
        for name in schema.get("required") or ():
            if name not in value:
                raise SchemaViolation(path, f"missing required property {name!r}")
        extra = schema.get("additionalProperties", True)
        for name in sorted(value):  # sorted: the first violation reported is the same every run
            sub = value[name]
            if name in props:
                validate_json(sub, props[name], f"{path}.{name}")
            elif extra is False:
                raise SchemaViolation(path, f"unexpected property {name!r} (allowed: {sorted(props)})")
            elif isinstance(extra, Mapping):
                validate_json(sub, extra, f"{path}.{name}")


def _describe(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
             int: "integer", float: "number"}
    return f"{names.get(type(value), type(value).__name__)} {short_repr(value)}"


def short_repr(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."

