"""The keyword index cache file: a store's BM25 postings saved beside it, tagged with a generation.

Reading every posting back from the database at open (a ``GROUP BY term`` over ~13 rows per
entity) was the largest part of a reopen; this file holds the same postings as CSR, so a
reopen reads ~20 MB instead. Like the vector index cache it is only a cache: the database
stays the truth, a file that is missing, unreadable, from another generation than it claims,
or inconsistent with the entities (see :meth:`EntityCache.adopt_postings`) is ignored and
the postings are read from the database.

The file also holds each metadata key's value codes per row (format 2): reading them back
from the database means joining every ``entity_metadata`` row to its entity, the largest
query of an open after the entity rows; they are checked the same way
(:meth:`EntityCache.adopt_metadata`). A format 1 file (no codes) is still read: the codes
then come from the database.

Layout (little-endian): ``MAGIC``, u64 header length, header JSON (``format``,
``generation``, counts and byte sizes, and ``meta``: per metadata key its name and number of
values), the row ids as UTF-8 joined by NUL (an empty one for a dead row; ids hold no NUL),
the terms likewise, offsets (int64, ``n_terms + 1``), rows (int64), term frequencies
(float64) — the arrays as the cache uses them, so a load makes views of the file's bytes, not
copies —, the metadata values as one JSON list (per key, its ``[type tag, canonical text]``
pairs in code order, code 1 first), per key its codes (int32 per row, 0 = absent), then the
CRC-32 of everything before it (u32) and ``END``. Written to a temp file, fsynced and renamed
over the old one.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .._index_file import atomic_write, write_checksummed
from ..errors import IndexCacheError

__all__ = ["TermCache", "save_terms", "load_terms"]

_MAGIC = b"UMITERMS"
_END = b"SMRETIMU"
_FORMAT = 2
#: formats this module reads (1: without the metadata codes)
_READS = (1, 2)

#: per metadata key (``meta:<key>``): int32 code per row (0 = absent), the values in code order
MetaCodes = dict[str, tuple[np.ndarray, list[tuple[str, str]]]]


class SavedIds:
    """The row ids of a loaded file (None: a dead row), split into Python strings only when
    iterated: a reopen whose rows come back in the saved order only compares the text
    (:meth:`same_as`), without making 100k strings."""

    __slots__ = ("_text", "_n", "_list")

    def __init__(self, text: str, n: int) -> None:
        if (text.count("\x00") + 1 if n else (0 if not text else -1)) != n:
            raise ValueError("ids")
        self._text, self._n = text, n
        self._list: list[str | None] | None = None

    def __len__(self) -> int:
        return self._n

    def _ids(self) -> list[str | None]:
        if self._list is None:
            ids: list[str | None] = self._text.split("\x00") if self._n else []  # type: ignore[assignment]
            self._list = [i or None for i in ids] if "" in ids else ids
        return self._list

    def __iter__(self) -> Any:
        return iter(self._ids())

    def __getitem__(self, i: int) -> str | None:
        return self._ids()[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SavedIds):
            return self._n == other._n and self._text == other._text
        return isinstance(other, list) and self.same_as(other)

    __hash__ = None  # type: ignore[assignment]

    def same_as(self, ids: list[str]) -> bool:
        """Whether ``ids`` are these, in this order, with no dead row among them. The text holds
        exactly ``n - 1`` NULs (checked when read) and no id holds one, so equal texts are equal lists."""
        if len(ids) != self._n:
            return False
        text = self._text
        if self._n and (not text or text[0] == "\x00" or text[-1] == "\x00" or "\x00\x00" in text):
            return False  # a dead row (an empty id)
        try:
            return "\x00".join(ids) == text
        except TypeError:  # a None
            return False


class TermCache:
    """What the file holds: ``ids[i]`` is row i (None: dead); term ``terms[t]`` owns
    ``rows[offsets[t]:offsets[t + 1]]`` and the same slice of ``tfs``."""

    __slots__ = ("generation", "ids", "terms", "offsets", "rows", "tfs", "meta")

    def __init__(self, generation: int, ids: "list[str | None] | SavedIds", terms: list[str], offsets: np.ndarray,
                 rows: np.ndarray, tfs: np.ndarray, meta: MetaCodes | None = None) -> None:
        self.generation, self.ids, self.terms = generation, ids, terms
        self.offsets, self.rows, self.tfs = offsets, rows, tfs
        #: the metadata codes (see :data:`MetaCodes`); None: not in the file (format 1)
        self.meta = meta


def save_terms(path: str, cache: TermCache) -> None:
    """Write ``cache`` to ``path`` atomically; :class:`~umi.IndexCacheError` on an I/O failure."""
    ids_blob = _join([i or "" for i in cache.ids], path, "an id")
    terms_blob = _join(cache.terms, path, "a term")
    offsets = np.ascontiguousarray(cache.offsets, dtype="<i8")
    rows = np.ascontiguousarray(cache.rows, dtype="<i8")
    tfs = np.ascontiguousarray(cache.tfs, dtype="<f8")
    meta = sorted((cache.meta or {}).items())
    n_ids = len(cache.ids)
    vals_blob = json.dumps([[list(v) for v in vals] for _, (_, vals) in meta], ensure_ascii=False,
                           separators=(",", ":")).encode("utf-8")
    codes = [np.ascontiguousarray(c[:n_ids], dtype="<i4") for _, (c, _) in meta]
    if any(c.shape[0] != n_ids for c in codes):
        raise IndexCacheError(f"cannot save the keyword index cache to {path!r}: a metadata code column is short", path=path)
    header = json.dumps({
        "format": _FORMAT, "generation": int(cache.generation), "n_ids": n_ids,
        "n_terms": len(cache.terms), "n_postings": int(rows.shape[0]),
        "ids_bytes": len(ids_blob), "terms_bytes": len(terms_blob),
        "meta": [[k, len(vals)] for k, (_, vals) in meta], "meta_vals_bytes": len(vals_blob),
    }, separators=(",", ":")).encode("utf-8")
    chunks: list[Any] = [_MAGIC, struct.pack("<Q", len(header)), header, ids_blob, terms_blob,
                         offsets.data, rows.data, tfs.data, vals_blob, *(c.data for c in codes)]
    try:
        atomic_write(path, lambda f: write_checksummed(f, chunks, _END))
    except OSError as exc:
        raise IndexCacheError(f"cannot save the keyword index cache to {path!r}: {exc}", path=path) from exc


def load_terms(path: str) -> TermCache:
    """Read a file written by :func:`save_terms`; :class:`~umi.IndexCacheError` when it is
    missing, truncated, fails its checksum or is of another format."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise IndexCacheError(f"cannot read the keyword index cache {path!r}: {exc}", path=path) from exc

    def corrupt(why: str) -> IndexCacheError:
        return IndexCacheError(f"keyword index cache {path!r} is truncated or corrupt: {why}", path=path)

    tail = 4 + len(_END)
    if len(data) < len(_MAGIC) + 8 + tail or not data.startswith(_MAGIC) or not data.endswith(_END):
        raise corrupt("bad magic")
    (crc,) = struct.unpack("<I", data[-tail:-len(_END)])
    if zlib.crc32(memoryview(data)[:-tail]) != crc:
        raise corrupt("checksum")
    pos = len(_MAGIC)
    (head_len,) = struct.unpack("<Q", data[pos:pos + 8])
    pos += 8
    try:
        h: dict[str, Any] = json.loads(data[pos:pos + head_len])
        fmt = int(h["format"])
        if fmt not in _READS:
            raise ValueError("format")
        n_ids, n_terms, n_post = int(h["n_ids"]), int(h["n_terms"]), int(h["n_postings"])
        pos += head_len
        ids = SavedIds(data[pos:pos + int(h["ids_bytes"])].decode("utf-8"), n_ids)
        pos += int(h["ids_bytes"])
        terms = _split(data[pos:pos + int(h["terms_bytes"])], n_terms)
        pos += int(h["terms_bytes"])
        offsets = np.frombuffer(data, "<i8", n_terms + 1, pos)
        pos += 8 * (n_terms + 1)
        rows = np.frombuffer(data, "<i8", n_post, pos)
        pos += 8 * n_post
        tfs = np.frombuffer(data, "<f8", n_post, pos)
        pos += 8 * n_post
        meta: MetaCodes | None = None
        if fmt >= 2:
            keys = [(str(k), int(m)) for k, m in h["meta"]]
            vals = json.loads(data[pos:pos + int(h["meta_vals_bytes"])])
            pos += int(h["meta_vals_bytes"])
            if not isinstance(vals, list) or len(vals) != len(keys):
                raise ValueError("metadata keys")
            meta = {}
            for (key, m), pairs in zip(keys, vals):
                codes = np.frombuffer(data, "<i4", n_ids, pos)
                pos += 4 * n_ids
                if (len(pairs) != m or not key.startswith("meta:")
                        or (n_ids and (int(codes.min()) < 0 or int(codes.max()) > m))):
                    raise ValueError("metadata codes")
                meta[key] = (codes, [(str(t), str(x)) for t, x in pairs])
        if (pos != len(data) - tail or len(ids) != n_ids or len(terms) != n_terms
                or offsets[0] != 0 or offsets[-1] != n_post or (n_terms and np.any(np.diff(offsets) < 0))
                or (n_post and (rows.min() < 0 or rows.max() >= n_ids))):
            raise ValueError("sizes")
        return TermCache(int(h["generation"]), ids, terms, offsets, rows, tfs, meta)
    except (ValueError, TypeError, KeyError) as exc:
        raise corrupt(f"inconsistent contents ({exc})") from exc


def _join(values: list[str], path: str, what: str) -> bytes:
    text = "\x00".join(values)
    if text.count("\x00") != max(len(values) - 1, 0):
        raise IndexCacheError(f"cannot save the keyword index cache to {path!r}: {what} holds a NUL", path=path)
    return text.encode("utf-8")


def _split(blob: bytes, n: int) -> list[str]:
    if n == 0:
        if blob:
            raise ValueError("unexpected text")
        return []
    return blob.decode("utf-8").split("\x00")
