# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: autotestdict=False, auto_pickle=False
"""Compiled core- and working-memory arenas over csrc/.

Private: import :class:`umi.CoreMemory` and :class:`umi.WorkingMemory`. These
classes validate arguments, read the clock and turn C return codes into umi
errors; the C layer does the bytes and slots. The hot paths (``get``, ``set``,
``set_block``, ``render``) make no Python-level calls when no user clock or
tokenizer is configured.
"""

import os

from cpython.exc cimport PyErr_Clear
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.long cimport PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8, PyUnicode_GET_LENGTH
from libc.math cimport isfinite
from libc.string cimport strlen, strncpy
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint32_t, uint64_t

from umi.errors import (
    CoreMemoryFullError,
    InvalidConfigError,
    InvalidImportanceError,
    InvalidKeyError,
    InvalidLabelError,
    InvalidTTLError,
    NotAnIntegerError,
    ValidationError,
    ValueTooLargeError,
    WorkingMemoryFullError,
)

cdef extern from "Python.h":
    char *PyOS_double_to_string(double val, char format_code, int precision, int flags,
                                int *ptype) except NULL


# The limits are defined once, in umi._validate; the arenas re-export them.
from umi._validate import (
    CORE_MEMORY_LABEL_BYTES_MAX,
    CORE_MEMORY_MAX_BYTES_MAX,
    CORE_MEMORY_MAX_BYTES_MIN,
    CORE_MEMORY_TOKENS_MAX,
    WORKING_MEMORY_KEY_BYTES_MAX,
    WORKING_MEMORY_MAX_BYTES_MAX,
    WORKING_MEMORY_MAX_BYTES_MIN,
    WORKING_MEMORY_MAX_ENTRIES_MAX,
    WORKING_MEMORY_TTL_SECS_MAX,
    WORKING_MEMORY_VALUE_BYTES_MAX,
)
from umi._validate import check_real as _check_real

cdef Py_ssize_t _LABEL_MAX = CORE_MEMORY_LABEL_BYTES_MAX
cdef Py_ssize_t _KEY_MAX = WORKING_MEMORY_KEY_BYTES_MAX
cdef Py_ssize_t _VALUE_MAX = WORKING_MEMORY_VALUE_BYTES_MAX
cdef double _TTL_MAX = WORKING_MEMORY_TTL_SECS_MAX

# Hash seed per process: no output depends on hash order, and a random seed
# keeps adversarial keys from forcing long probe runs.
cdef uint64_t _SEED = int.from_bytes(os.urandom(8), "little")

cdef enum _Arena:
    _CORE = 0
    _WORKING = 1


cdef int _check(umi_rc rc, const umi_err_detail *d, int arena, object name) except -1:
    """Raise the umi error for a C return code; the one place codes map to errors."""
    if rc == UMI_OK:
        return 0
    if rc == UMI_ERR_NOMEM:
        raise MemoryError("umi arena: out of memory")
    if rc == UMI_ERR_BYTES_FULL:
        if arena == _CORE:
            raise CoreMemoryFullError(
                f"core memory is full: writing block {name!r} would use {d.over_by} bytes "
                f"more than max_bytes={d.limit}",
                over_by=d.over_by, limit=d.limit)
        raise WorkingMemoryFullError(
            f"working memory is full: storing key {name!r} would use {d.over_by} bytes "
            f"more than max_bytes={d.limit}",
            over_by=d.over_by, limit=d.limit, key=name)
    if rc == UMI_ERR_ENTRIES_FULL:
        raise WorkingMemoryFullError(
            f"working memory is full: storing key {name!r} would need {d.over_by} more "
            f"entries than max_entries={d.limit}",
            over_by=d.over_by, limit=d.limit, key=name)
    if rc == UMI_ERR_TOKENS_FULL:
        raise CoreMemoryFullError(
            f"core memory is full: writing block {name!r} would use {d.over_by} tokens "
            f"more than max_tokens={d.limit}",
            over_by=d.over_by, limit=d.limit)
    if rc == UMI_ERR_NOT_INTEGER:
        raise NotAnIntegerError(
            f"incr: the value of key {name!r} is not an ASCII decimal integer in "
            f"[-2**63, 2**63 - 1]", key=name)
    if rc == UMI_ERR_OVERFLOW:
        raise NotAnIntegerError(
            f"incr: the result for key {name!r} would leave the signed 64-bit range "
            f"[-2**63, 2**63 - 1]", key=name)
    raise ValidationError(f"umi arena: invalid argument for {name!r} (code {<int>rc})")


# --- argument coercion -------------------------------------------------------

# PyUnicode_AsUTF8AndSize is declared without an exception clause so the fast
# path has no try block; a NULL result (a lone surrogate) is handled by the
# cold functions below, which turn the pending UnicodeEncodeError into ours.
cdef extern from "Python.h":
    const char *_utf8_or_null "PyUnicode_AsUTF8AndSize"(object s, Py_ssize_t *size)


cdef int _raise_not_utf8(str what, object value, type error) except -1:
    PyErr_Clear()  # the pending error is recreated below, with a traceback
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        if error is InvalidKeyError:
            raise InvalidKeyError(f"{what} is not encodable as UTF-8: {exc.reason}",
                                  key=value) from exc
        if error is InvalidLabelError:
            raise InvalidLabelError(
                f"label must be 1-{_LABEL_MAX} bytes of [A-Za-z0-9_.-], got {value!r}",
                label=value) from exc
        raise ValidationError(f"{what} is not encodable as UTF-8: {exc.reason}") from exc
    raise SystemError(f"{what}: PyUnicode_AsUTF8AndSize failed on a UTF-8-encodable str")


cdef int _raise_type(str what, object value, str expected) except -1:
    raise TypeError(f"{what} must be {expected}, not {type(value).__name__}")


cdef inline const char *_utf8(object s, Py_ssize_t *n, str what) except NULL:
    if not PyUnicode_Check(s):
        _raise_type(what, s, "str")
    cdef const char *p = _utf8_or_null(s, n)
    if p == NULL:
        _raise_not_utf8(what, s, ValidationError)
    return p


cdef inline const char *_key(object key, Py_ssize_t *n) except NULL:
    if not PyUnicode_Check(key):
        _raise_type("key", key, "str")
    cdef const char *p = _utf8_or_null(key, n)
    if p == NULL:
        _raise_not_utf8("key", key, InvalidKeyError)
    if n[0] == 0 or n[0] > _KEY_MAX:
        raise InvalidKeyError(
            f"key must be 1-{_KEY_MAX} UTF-8 bytes, got {n[0]} bytes", key=key)
    return p


cdef inline const char *_label(object label, Py_ssize_t *n) except NULL:
    if not PyUnicode_Check(label):
        _raise_type("label", label, "str")
    cdef const char *p = _utf8_or_null(label, n)
    if p == NULL:
        _raise_not_utf8("label", label, InvalidLabelError)
    if not umi_core_label_ok(p, <size_t>n[0]):
        raise InvalidLabelError(
            f"label must be 1-{_LABEL_MAX} bytes of [A-Za-z0-9_.-], got {label!r} "
            f"({n[0]} bytes)", label=label)
    return p


cdef inline bint _is_real(object x):
    # bool is an int, but True as a TTL or importance is a bug, not a number.
    return PyFloat_Check(x) or (PyLong_Check(x) and not isinstance(x, bool))


cdef double _ttl(object ttl_secs, str what) except? -1.0:
    cdef double t
    if PyFloat_Check(ttl_secs):
        t = PyFloat_AS_DOUBLE(ttl_secs)
    elif not _is_real(ttl_secs):
        raise TypeError(f"{what} must be a number of seconds, not {type(ttl_secs).__name__}")
    elif not (0 < ttl_secs <= _TTL_MAX):  # an int: compared exactly, never float()-converted
        t = -1.0
    else:
        t = float(ttl_secs)
    if not (t > 0.0 and t <= _TTL_MAX):  # NaN fails both comparisons
        raise InvalidTTLError(
            f"{what} must be > 0 and at most {_TTL_MAX:g} seconds (7 days), got {ttl_secs!r}",
            limit=_TTL_MAX, actual=ttl_secs)
    return t


cdef double _importance(object importance) except? -1.0:
    cdef double x
    if PyFloat_Check(importance):
        x = PyFloat_AS_DOUBLE(importance)
    elif not _is_real(importance):
        raise TypeError(f"importance must be a float, not {type(importance).__name__}")
    elif not (0 <= importance <= 1):  # an int: compared exactly, never float()-converted
        x = -1.0
    else:
        x = float(importance)
    if not (x >= 0.0 and x <= 1.0):  # NaN fails both comparisons
        raise InvalidImportanceError(
            f"importance must be within [0, 1], got {importance!r}", actual=importance)
    return x


cdef uint64_t _int_in(object value, str what, uint64_t lo, uint64_t hi) except? 0:
    if not PyLong_Check(value) or isinstance(value, bool):
        raise TypeError(f"{what} must be int, not {type(value).__name__}")
    if not (lo <= value <= hi):
        raise InvalidConfigError(f"{what} must be within [{lo}, {hi}], got {value!r}")
    return <uint64_t>value


# --- CoreMemory ---------------------------------------------------------------

cdef class CoreMemory:
    """Labelled text blocks under a byte budget, rendered into a prompt.

    ``max_bytes`` (1 KiB-16 MiB) bounds the UTF-8 bytes of all block contents.
    ``max_tokens`` optionally bounds their token count too, counted by
    ``tokenizer(content) -> int`` or, without one, estimated as
    ``ceil(len(content) / 4)`` characters per block. Every write that would
    exceed a budget raises :class:`umi.CoreMemoryFullError` and changes nothing.
    """

    def __cinit__(self, max_bytes=32 * 1024, *, max_tokens=None, tokenizer=None):
        cdef uint64_t mb = _int_in(max_bytes, "max_bytes", CORE_MEMORY_MAX_BYTES_MIN,
                                   CORE_MEMORY_MAX_BYTES_MAX)
        cdef uint64_t mt = 0
        if max_tokens is not None:
            mt = _int_in(max_tokens, "max_tokens", 1, CORE_MEMORY_MAX_BYTES_MAX)
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable, not {type(tokenizer).__name__}")
        self._tokenizer = tokenizer
        self._rendered = [None, None]
        self._fragments = [{}, {}]
        _check(umi_core_init(&self._core, mb, mt, _SEED), NULL, _CORE, None)
        self._ready = True
        # Versions that cannot match yet, so the first render builds.
        self._rendered_version[0] = self._rendered_version[1] = self._core.version - 1

    def __init__(self, max_bytes=32 * 1024, *, max_tokens=None, tokenizer=None):
        # __cinit__ has already validated and applied the arguments; this
        # signature is here so introspection (help, stubtest) sees them.
        pass

    def __dealloc__(self):
        if self._ready:
            umi_core_free(&self._core)
            self._ready = False

    cdef uint64_t _tokens(self, object content) except? 0:
        if self._tokenizer is None:
            return <uint64_t>((PyUnicode_GET_LENGTH(content) + 3) // 4)
        n = self._tokenizer(content)
        if not PyLong_Check(n) or isinstance(n, bool):
            raise TypeError(f"tokenizer must return int, not {type(n).__name__}")
        if n < 0:
            raise ValidationError(f"tokenizer returned a negative token count: {n}")
        if n > CORE_MEMORY_TOKENS_MAX:
            # More than 64 bits can count is over any token budget (and the implicit one).
            limit = self._core.max_tokens if self._core.max_tokens else CORE_MEMORY_TOKENS_MAX
            raise CoreMemoryFullError(
                f"core memory is full: the tokenizer counted {n} tokens for one block, more "
                f"than max_tokens={limit}", over_by=n - limit, limit=limit)
        return <uint64_t>n

    def set_block(self, label, content, importance=0.5):
        """Insert or replace block ``label``; a replaced block keeps its position."""
        cdef Py_ssize_t llen, clen
        cdef const char *lp = _label(label, &llen)
        cdef const char *cp = _utf8(content, &clen, "content")
        cdef double imp = _importance(importance)
        cdef uint64_t tokens = self._tokens(content)
        cdef umi_err_detail err
        # Python's own float formatting: locale-independent, correctly rounded.
        # In [0, 1] with two decimals it is always four characters.
        cdef char imp_text[8]
        cdef char *formatted = PyOS_double_to_string(imp, b'f', 2, 0, NULL)
        strncpy(imp_text, formatted, 7)
        imp_text[7] = 0
        PyMem_Free(formatted)
        cdef umi_rc rc = umi_core_set(&self._core, lp, <size_t>llen, cp, <size_t>clen, imp,
                                      imp_text, tokens, &err)
        _check(rc, &err, _CORE, label)

    def get_block(self, label):
        """The content of block ``label``, or None."""
        cdef Py_ssize_t llen
        cdef const char *lp = _label(label, &llen)
        cdef uint32_t bid = umi_core_find(&self._core, lp, <size_t>llen)
        cdef size_t clen
        cdef const char *cp
        if bid == UMI_ID_NONE:
            return None
        cp = umi_core_content(&self._core, bid, &clen)
        return PyUnicode_DecodeUTF8(cp, <Py_ssize_t>clen, NULL)

    def get_importance(self, label):
        """The importance of block ``label``, or None."""
        cdef Py_ssize_t llen
        cdef const char *lp = _label(label, &llen)
        cdef uint32_t bid = umi_core_find(&self._core, lp, <size_t>llen)
        if bid == UMI_ID_NONE:
            return None
        return self._core.blocks[bid].importance

    def remove_block(self, label):
        """Remove block ``label``; True if it existed."""
        cdef Py_ssize_t llen
        cdef const char *lp = _label(label, &llen)
        cdef uint32_t bid = umi_core_find(&self._core, lp, <size_t>llen)
        if bid == UMI_ID_NONE:
            return False
        umi_core_remove(&self._core, lp, <size_t>llen)
        for kept in self._fragments:
            (<dict>kept).pop(bid, None)
        return True

    def labels(self):
        """Block labels in render order."""
        cdef size_t n = umi_core_count(&self._core), i, blen
        cdef uint32_t *ids
        cdef const char *lp
        out = []
        if n == 0:
            return out
        ids = <uint32_t *>PyMem_Malloc(n * sizeof(uint32_t))
        if ids == NULL:
            raise MemoryError("umi arena: out of memory")
        try:
            umi_core_order(&self._core, ids)
            for i in range(n):
                out.append(self._label_of(ids[i]))
        finally:
            PyMem_Free(ids)
        return out

    cdef str _label_of(self, uint32_t bid):
        cdef umi_block *b = &self._core.blocks[bid]
        return PyUnicode_DecodeUTF8(b.label, <Py_ssize_t>b.label_len, NULL)

    def clear(self):
        """Remove every block."""
        umi_core_clear(&self._core)
        self._fragments = [{}, {}]

    def render(self, format="xml"):
        """The blocks as one prompt-ready string: ``"xml"`` or ``"markdown"``.

        Same state, same string: known labels first (system, persona, human,
        facts, goals, scratch), then the others in insertion order.
        """
        cdef int f
        if not PyUnicode_Check(format):
            raise TypeError(f"format must be str, not {type(format).__name__}")
        if format == "xml":
            f = UMI_CORE_XML
        elif format == "markdown":
            f = UMI_CORE_MARKDOWN
        else:
            raise ValidationError(f"format must be 'xml' or 'markdown', got {format!r}")
        if self._rendered_version[f] == self._core.version:
            return self._rendered[f]
        text = self._render(<umi_core_format>f)
        self._rendered[f] = text
        self._rendered_version[f] = self._core.version
        return text

    cdef str _render(self, umi_core_format fmt):
        # Each block's fragment is escaped and decoded once per change of the
        # block (its generation); a render joins the kept fragments.
        cdef size_t n = umi_core_count(&self._core), i, flen
        cdef uint32_t stack_ids[32]
        cdef uint32_t *ids = stack_ids
        cdef uint32_t bid
        cdef uint64_t gen
        cdef const char *fp
        cdef dict kept = <dict>self._fragments[<int>fmt]
        cdef const char *head = umi_core_head(fmt)
        cdef const char *tail = umi_core_tail(fmt)
        parts = [PyUnicode_DecodeUTF8(head, <Py_ssize_t>strlen(head), NULL)]
        if n > 32:
            ids = <uint32_t *>PyMem_Malloc(n * sizeof(uint32_t))
            if ids == NULL:
                raise MemoryError("umi arena: out of memory")
        try:
            umi_core_order(&self._core, ids)
            for i in range(n):
                bid = ids[i]
                gen = self._core.blocks[bid].gen
                entry = kept.get(bid)
                if entry is None or <uint64_t>(<tuple>entry)[0] != gen:
                    _check(umi_core_fragment(&self._core, bid, fmt, &fp, &flen), NULL, _CORE,
                           None)
                    entry = (gen, PyUnicode_DecodeUTF8(fp, <Py_ssize_t>flen, NULL))
                    kept[bid] = entry
                parts.append((<tuple>entry)[1])
        finally:
            if ids != stack_ids:
                PyMem_Free(ids)
        parts.append(PyUnicode_DecodeUTF8(tail, <Py_ssize_t>strlen(tail), NULL))
        return "".join(parts)

    def __len__(self):
        return umi_core_count(&self._core)

    def __contains__(self, label):
        cdef Py_ssize_t llen
        cdef const char *lp
        if not PyUnicode_Check(label):
            _raise_type("label", label, "str")
        lp = _utf8_or_null(label, &llen)
        if lp == NULL:
            PyErr_Clear()  # not UTF-8, so not a label
            return False
        if not umi_core_label_ok(lp, <size_t>llen):
            return False
        return umi_core_find(&self._core, lp, <size_t>llen) != UMI_ID_NONE

    @property
    def used_bytes(self):
        """UTF-8 bytes of all block contents."""
        return umi_core_used_bytes(&self._core)

    @property
    def max_bytes(self):
        return self._core.arena.max_bytes

    @property
    def remaining_bytes(self):
        return self._core.arena.max_bytes - umi_core_used_bytes(&self._core)

    @property
    def utilization(self):
        """used_bytes / max_bytes."""
        return <double>umi_core_used_bytes(&self._core) / <double>self._core.arena.max_bytes

    @property
    def used_tokens(self):
        """Tokens of all block contents (tokenizer, or the chars/4 estimate)."""
        return self._core.used_tokens

    @property
    def max_tokens(self):
        """The token budget, or None when there is none."""
        return self._core.max_tokens if self._core.max_tokens else None


# --- WorkingMemory ------------------------------------------------------------

cdef double _user_time(object clock) except? -1.0:
    cdef double t
    v = clock()
    if PyFloat_Check(v):
        t = PyFloat_AS_DOUBLE(v)
    elif _is_real(v):
        # an int beyond any float, exactly like NaN and inf: not a time
        t = _check_real(v, "clock()", -1.7e308, 1.7e308, InvalidConfigError)
    else:
        raise TypeError(f"clock() must return a number of seconds, not {type(v).__name__}")
    if not isfinite(t):
        raise InvalidConfigError(f"clock() must return finite seconds, got {v!r}")
    return t



cdef class WorkingMemory:
    """A session key-value store with per-entry TTLs, a byte budget and an entry cap.

    Keys are ``str`` (1-256 UTF-8 bytes), values ``bytes`` (at most 64 KiB).
    ``clock`` is a zero-argument callable returning seconds; by default the C
    monotonic clock is read directly. Every operation reads the clock once and
    first drops the entries that have expired, so an expired value is never
    returned and ``used_bytes`` counts the entries live at the last operation.
    """

    def __cinit__(self, max_bytes=1 << 20, max_entries=10_000, default_ttl_secs=3600,
                  on_full="error", clock=None):
        cdef uint64_t mb = _int_in(max_bytes, "max_bytes", WORKING_MEMORY_MAX_BYTES_MIN,
                                   WORKING_MEMORY_MAX_BYTES_MAX)
        cdef uint64_t me = _int_in(max_entries, "max_entries", 1, WORKING_MEMORY_MAX_ENTRIES_MAX)
        try:
            self._default_ttl_secs = _ttl(default_ttl_secs, "default_ttl_secs")
        except InvalidTTLError as exc:
            raise InvalidConfigError(str(exc)) from exc
        if not PyUnicode_Check(on_full):
            raise TypeError(f"on_full must be str, not {type(on_full).__name__}")
        if on_full == "error":
            self._evict_lru = False
        elif on_full == "evict_lru":
            self._evict_lru = True
        else:
            raise InvalidConfigError(f"on_full must be 'error' or 'evict_lru', got {on_full!r}")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be a zero-argument callable, not {type(clock).__name__}")
        self._clock = clock
        _check(umi_wm_init(&self._wm, mb, me, _SEED), NULL, _WORKING, None)
        self._ready = True

    def __init__(self, max_bytes=1 << 20, max_entries=10_000, default_ttl_secs=3600,
                 on_full="error", clock=None):
        # __cinit__ has already validated and applied the arguments; this
        # signature is here so introspection (help, stubtest) sees them.
        pass

    def __dealloc__(self):
        if self._ready:
            umi_wm_free(&self._wm)
            self._ready = False

    cdef inline double _now(self) except? -1.0:
        if self._clock is None:  # the default: C monotonic clock, no Python call
            return umi_monotonic_secs()
        return _user_time(self._clock)

    cdef double _ttl_or_default(self, object ttl_secs) except? -1.0:
        if ttl_secs is None:
            return self._default_ttl_secs
        return _ttl(ttl_secs, "ttl_secs")

    def set(self, key, value, ttl_secs=None):
        """Store ``value`` under ``key``; replaces any value and restarts its TTL."""
        cdef Py_ssize_t klen
        cdef const char *kp = _key(key, &klen)
        if not PyBytes_Check(value):
            raise TypeError(f"value must be bytes, not {type(value).__name__}")
        cdef Py_ssize_t vlen = PyBytes_GET_SIZE(value)
        if vlen > _VALUE_MAX:
            raise ValueTooLargeError(
                f"value for key {key!r} is {vlen} bytes; the limit is {_VALUE_MAX} bytes",
                limit=_VALUE_MAX, actual=vlen)
        cdef double ttl = self._ttl_or_default(ttl_secs)
        cdef double now = self._now()
        cdef umi_err_detail err
        cdef umi_rc rc = umi_wm_set(&self._wm, now, kp, <size_t>klen, PyBytes_AS_STRING(value),
                                    <size_t>vlen, ttl, self._evict_lru, &err)
        if rc != UMI_OK:
            _check(rc, &err, _WORKING, key)

    def get(self, key):
        """The value of a live ``key``, or None (missing or expired). Counts as use."""
        cdef Py_ssize_t klen
        cdef const char *kp = _key(key, &klen)
        cdef const char *vp
        cdef size_t vlen
        if umi_wm_get(&self._wm, self._now(), kp, <size_t>klen, &vp, &vlen) != UMI_OK:
            return None
        return PyBytes_FromStringAndSize(vp, <Py_ssize_t>vlen)

    def delete(self, key):
        """Remove ``key``; True if it was live."""
        cdef Py_ssize_t klen
        cdef const char *kp = _key(key, &klen)
        return bool(umi_wm_delete(&self._wm, self._now(), kp, <size_t>klen))

    def ttl(self, key):
        """Seconds until ``key`` expires, or None when it is not live."""
        cdef Py_ssize_t klen
        cdef const char *kp = _key(key, &klen)
        cdef double left
        if umi_wm_ttl(&self._wm, self._now(), kp, <size_t>klen, &left) != UMI_OK:
            return None
        return left

    def touch(self, key, ttl_secs=None):
        """Restart ``key``'s TTL (default TTL when None); True if it was live."""
        cdef Py_ssize_t klen
        cdef const char *kp = _key(key, &klen)
        cdef double ttl = self._ttl_or_default(ttl_secs)
        return umi_wm_touch(&self._wm, self._now(), kp, <size_t>klen, ttl) == UMI_OK

    def incr(self, key, delta=1):
        """Add ``delta`` to an ASCII-decimal integer value and return the result.

        A missing key counts from 0 and gets the default TTL; an existing key
        keeps its TTL. Raises :class:`umi.NotAnIntegerError` when the value is
        not a signed 64-bit decimal integer or the result would leave that range.
        """
        cdef Py_ssize_t klen
        cdef const char *kp = _key(key, &klen)
        if not PyLong_Check(delta) or isinstance(delta, bool):
            raise TypeError(f"delta must be int, not {type(delta).__name__}")
        if not (INT64_MIN <= delta <= INT64_MAX):
            raise NotAnIntegerError(
                f"delta must be within the signed 64-bit range [-2**63, 2**63 - 1], got {delta}",
                key=key)
        cdef int64_t d = delta
        cdef int64_t out = 0
        cdef umi_err_detail err
        cdef umi_rc rc = umi_wm_incr(&self._wm, self._now(), kp, <size_t>klen, d,
                                     self._default_ttl_secs, self._evict_lru, &out, &err)
        _check(rc, &err, _WORKING, key)
        return out

    def expire(self):
        """Remove every expired entry; returns how many were removed."""
        return umi_wm_expire(&self._wm, self._now())

    def clear(self):
        """Remove every entry."""
        umi_wm_clear(&self._wm)

    def keys(self):
        """Live keys, least recently used first."""
        cdef size_t klen
        cdef const char *kp
        umi_wm_expire(&self._wm, self._now())
        cdef uint32_t eid = umi_wm_first(&self._wm)
        out = []
        while eid != UMI_ID_NONE:
            kp = umi_wm_key(&self._wm, eid, &klen)
            out.append(PyUnicode_DecodeUTF8(kp, <Py_ssize_t>klen, NULL))
            eid = umi_wm_next(&self._wm, eid)
        return out

    def __len__(self):
        umi_wm_expire(&self._wm, self._now())
        return umi_wm_len(&self._wm)

    def __contains__(self, key):
        cdef Py_ssize_t klen
        cdef const char *kp
        if not PyUnicode_Check(key):
            _raise_type("key", key, "str")
        kp = _utf8_or_null(key, &klen)
        if kp == NULL:
            PyErr_Clear()  # not UTF-8, so not a key
            return False
        if klen == 0 or klen > _KEY_MAX:
            return False
        return bool(umi_wm_contains(&self._wm, self._now(), kp, <size_t>klen))

    @property
    def used_bytes(self):
        """UTF-8 key bytes + value bytes of the entries stored."""
        return umi_wm_used_bytes(&self._wm)

    @property
    def max_bytes(self):
        return self._wm.arena.max_bytes

    @property
    def max_entries(self):
        return self._wm.max_entries

    @property
    def default_ttl_secs(self):
        return self._default_ttl_secs

    @property
    def on_full(self):
        return "evict_lru" if self._evict_lru else "error"
