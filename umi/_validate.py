"""Every public limit as a named constant, and the checks that hold them at the boundary.

One rule in one place: the options, the value types, the arenas' Python faces and the
CLI call these functions; nothing below the boundary re-checks. Each check either
returns the value (normalised: an ``int``, a finite ``float``, a ``str`` that encodes as
UTF-8) or raises — a wrong *type* as :class:`TypeError`, a value out of range as the
:class:`~umi.ValidationError` subclass the caller names — with the limit in the message.

What the checks reject, everywhere:

* ``bool`` where a number is expected (``True`` is an ``int`` to Python, never to umi);
* a ``float`` where an integer is expected (``recall_limit=5.5`` fails here, not later);
* NaN, ±inf, and integers too large for a float, where a real number is expected
  (never an ``OverflowError`` or a bare ``ValueError``);
* ``str`` holding a lone surrogate (``"\\ud800"``): it cannot be stored as UTF-8, so it
  is refused at the door instead of as a ``UnicodeEncodeError`` deep inside.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .errors import InvalidConfigError, TextTooLongError, UmiError, ValidationError

__all__ = [
    "TEXT_BYTES_MAX",
    "QUERY_BYTES_MAX",
    "RECALL_LIMIT_MIN",
    "RECALL_LIMIT_MAX",
    "ENTITY_NAME_BYTES_MAX",
    "ENTITY_CONTENT_BYTES_MAX",
    "METADATA_KEYS_MAX",
    "METADATA_KEY_BYTES_MAX",
    "METADATA_VALUE_BYTES_MAX",
    "METADATA_BYTES_MAX",
    "CORE_MEMORY_MAX_BYTES_MIN",
    "CORE_MEMORY_MAX_BYTES_MAX",
    "CORE_MEMORY_LABEL_BYTES_MAX",
    "CORE_MEMORY_TOKENS_MAX",
    "WORKING_MEMORY_MAX_BYTES_MIN",
    "WORKING_MEMORY_MAX_BYTES_MAX",
    "WORKING_MEMORY_MAX_ENTRIES_MAX",
    "WORKING_MEMORY_KEY_BYTES_MAX",
    "WORKING_MEMORY_VALUE_BYTES_MAX",
    "WORKING_MEMORY_TTL_SECS_MAX",
    "TIME_MS_MIN",
    "TIME_MS_MAX",
    "check_bool",
    "check_int",
    "check_real",
    "check_text",
    "check_input_text",
    "check_ttl_secs",
    "utf8_len",
    "check_metadata_limits",
    "VECTOR_NORM_MAX",
    "check_vector_norm",
]

# --- archival memory ----------------------------------------------------------------
#: UTF-8 bytes of one text given to ``remember`` (``MemoryConfig.text_bytes_max`` lowers it)
TEXT_BYTES_MAX = 100_000
#: UTF-8 bytes of one recall query
QUERY_BYTES_MAX = 10_000
RECALL_LIMIT_MIN = 1
RECALL_LIMIT_MAX = 100
ENTITY_NAME_BYTES_MAX = 512
ENTITY_CONTENT_BYTES_MAX = 100_000
#: keys in one metadata mapping
METADATA_KEYS_MAX = 64
#: UTF-8 bytes of one metadata key
METADATA_KEY_BYTES_MAX = 128
#: UTF-8 bytes of one metadata string value (a number counts as its decimal text)
METADATA_VALUE_BYTES_MAX = 8 * 1024
#: UTF-8 bytes of all keys and values of one metadata mapping together
METADATA_BYTES_MAX = 64 * 1024
#: times are integer milliseconds since the epoch in [TIME_MS_MIN, TIME_MS_MAX]
TIME_MS_MIN = -(2**62)
TIME_MS_MAX = 2**62
#: the largest L2 norm of a vector umi stores or embeds (an entity's, a passage's, a provider's
#: answer). Cosine similarity ignores length, so no embedder comes near it; under it the float32
#: dot product of two such vectors (a squared norm among them) stays finite (float32's maximum is
#: 3.4e38), so no float32 arithmetic over stored vectors overflows.
VECTOR_NORM_MAX = 1e19

# --- core memory ----------------------------------------------------------------------
CORE_MEMORY_MAX_BYTES_MIN = 1024
CORE_MEMORY_MAX_BYTES_MAX = 16 * 1024 * 1024
CORE_MEMORY_LABEL_BYTES_MAX = 64
#: the largest token count a tokenizer may report for one block (what 64 bits can count)
CORE_MEMORY_TOKENS_MAX = 2**64 - 1

# --- working memory -------------------------------------------------------------------
WORKING_MEMORY_MAX_BYTES_MIN = 1024
WORKING_MEMORY_MAX_BYTES_MAX = 1 << 30
WORKING_MEMORY_MAX_ENTRIES_MAX = 100_000_000
WORKING_MEMORY_KEY_BYTES_MAX = 256
WORKING_MEMORY_VALUE_BYTES_MAX = 64 * 1024
WORKING_MEMORY_TTL_SECS_MAX = 7 * 24 * 3600.0

def check_vector_norm(vectors: Any, what: str, error: type[UmiError] = ValidationError) -> None:
    """Raise ``error`` naming the first vector (a 1-d vector, or rows of a 2-d matrix) of finite
    values whose L2 norm is over :data:`VECTOR_NORM_MAX` (computed in float64: no overflow)."""
    import numpy as np

    v64 = np.asarray(vectors, np.float64)
    if v64.ndim == 1:  # one vector (an Entity's, on every write): a dot product, ~4 us at 384-d
        square = float(v64 @ v64)
        if not square > VECTOR_NORM_MAX * VECTOR_NORM_MAX:
            return
        squares = np.array([square])
    else:
        squares = np.einsum("ij,ij->i", v64, v64)
    over = np.flatnonzero(squares > VECTOR_NORM_MAX * VECTOR_NORM_MAX)
    if over.size:
        row = "" if v64.ndim == 1 else f" (row {int(over[0])})"
        raise error(f"{what} must have an L2 norm of at most {VECTOR_NORM_MAX:g}{row}, got "
                    f"{float(np.sqrt(squares[over[0]])):.4g}: its float32 square would overflow")


def _type_name(value: object) -> str:
    return type(value).__name__


def check_bool(value: object, what: str, *, optional: bool = False) -> None:
    """A switch: a ``bool`` (or None when ``optional``); a truthy ``"no"`` is a TypeError, never on."""
    if not isinstance(value, bool) and not (optional and value is None):
        raise TypeError(f"{what} must be a bool{' or None' if optional else ''}, not {_type_name(value)}")


def check_int(value: object, what: str, lo: int, hi: int,
              error: type[ValidationError] = InvalidConfigError) -> int:
    """``value`` as an int in [lo, hi]: TypeError for a non-int (bool and float included)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {_type_name(value)} ({value!r})")
    if not lo <= value <= hi:
        got = str(value) if value.bit_length() <= 128 else f"an integer of {value.bit_length()} bits"
        raise error(f"{what} must be an integer in [{lo}, {hi}], got {got}")
    return int(value)


def check_real(value: object, what: str, lo: float, hi: float,
               error: type[ValidationError] = InvalidConfigError, *,
               lo_open: bool = False) -> float:
    """``value`` as a finite float in [lo, hi] (or (lo, hi] with ``lo_open``).

    TypeError for a non-number (bool included); ``error`` for NaN, ±inf, an int too
    large for a float, or a value out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, not {_type_name(value)}")
    if isinstance(value, int):
        if not -(2**1023) < value < 2**1023:  # beyond any float: out of every range umi has
            raise error(f"{what} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got an integer of "
                        f"{value.bit_length()} bits")
        x = float(value)
    else:
        x = float(value)
    if math.isnan(x) or math.isinf(x):
        raise error(f"{what} must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {x!r}")
    if not ((lo < x) if lo_open else (lo <= x)) or not x <= hi:
        raise error(f"{what} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}")
    return x


def check_ttl_secs(value: object, what: str = "ttl_secs",
                   error: type[ValidationError] = InvalidConfigError) -> float:
    """A TTL: finite seconds in (0, 7 days]."""
    return check_real(value, what, 0.0, WORKING_MEMORY_TTL_SECS_MAX, error, lo_open=True)


def utf8_len(value: str, what: str, error: type[ValidationError] = ValidationError) -> int:
    """UTF-8 byte length of ``value``; ``error`` when it holds a lone surrogate."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        bad = value[exc.start:exc.end]
        raise error(f"{what} is not valid Unicode text: it holds a lone surrogate "
                    f"{bad.encode('utf-8', 'backslashreplace').decode('ascii')} at index {exc.start}, "
                    "which cannot be stored as UTF-8") from exc


def check_text(value: object, what: str, max_bytes: int,
               error: type[ValidationError] = ValidationError) -> str:
    """A str that encodes as UTF-8 in at most ``max_bytes`` bytes."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {_type_name(value)}")
    n = utf8_len(value, what, error)
    if n > max_bytes:
        raise error(f"{what} is {n} UTF-8 bytes; the limit is {max_bytes} bytes")
    return value


def check_input_text(value: object, what: str, max_bytes: int, empty: type[ValidationError]) -> str:
    """A text given to a verb (remember's text, recall's query): a str (TypeError), not empty or
    only whitespace (``empty``), valid Unicode (ValidationError: no lone surrogate), at most
    ``max_bytes`` UTF-8 bytes (:class:`~umi.TextTooLongError` with ``.limit`` / ``.actual``)."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {_type_name(value)}")
    if not value.strip():
        raise empty(f"{what} is empty or only whitespace")
    n = utf8_len(value, what)
    if n > max_bytes:
        raise TextTooLongError(f"{what} is {n} UTF-8 bytes; the limit is {max_bytes} bytes",
                               limit=max_bytes, actual=n)
    return value


def check_metadata_limits(metadata: Mapping[str, Any], what: str,
                          error: type[ValidationError]) -> None:
    """Count, key, value and total size limits of one (already scalar-checked) mapping; ``error``
    names what was wrong (see :func:`umi.types.validate_metadata`)."""
    if len(metadata) > METADATA_KEYS_MAX:
        raise error(f"{what} has {len(metadata)} keys; the limit is {METADATA_KEYS_MAX}")
    total = 0
    for k, v in metadata.items():
        total += utf8_len(k, f"{what} key {k!r}", error)
        if isinstance(v, str):
            n = utf8_len(v, f"{what}[{k!r}]", error)
            if n > METADATA_VALUE_BYTES_MAX:
                raise error(f"{what}[{k!r}] is {n} UTF-8 bytes; the limit is "
                                         f"{METADATA_VALUE_BYTES_MAX} bytes per value")
            total += n
        elif isinstance(v, int) and not isinstance(v, bool):
            # its decimal digits, without str(): Python refuses str() past 4300 digits
            total += v.bit_length() * 30103 // 100000 + 2
        elif v is not None:
            total += len(repr(v))
    if total > METADATA_BYTES_MAX:
        raise error(f"{what} is {total} bytes in all; the limit is {METADATA_BYTES_MAX} bytes")
