"""The DuckDB store's commit log: a file beside the database (``<path>.umilog``) that a small
insert-only commit (a remember of new facts) is appended to and synced, in place of a DuckDB
transaction. Such a commit is durable once its record is synced; its rows go into the tables
later, many commits in one transaction (:meth:`~umi.storage._duckdb_io.DuckDBDurable.materialise`),
after which the log is emptied.

Why a file of our own: a DuckDB transaction of one row costs ~1-1.5 ms of CPU besides its sync
(parse, bind, its commit's bookkeeping); an append and a sync of the same bytes cost ~0.2 ms of
CPU and the sync (bench_memory's raw-note remember: see the README).

Format: a header (``MAGIC``, then the database's uuid: a log is applied only to the database it
was written for) and records, each ``<u32 length><u32 crc32>`` and a payload of ``<i64
generation><u32 text bytes>``, the entry's JSON text (:func:`~umi.storage._duckdb_io.journal_entry`)
and its float32 vector bytes. A commit is acknowledged only after its record is synced, so a
record cut short or failing its checksum is the tail of a write that never returned: reading
stops there and an opening writer cuts it off. An entry whose generation the tables already
hold was moved in before a crash hit between that move and the emptying of the log: it is
skipped (generations only grow, and any commit that is not logged moves the log in first).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from .._index_file import fsync_dir
from ..errors import StorageError
from ._sidecars import LOG_SUFFIX

__all__ = ["LOG_SUFFIX", "CommitLog", "read_log", "remove_log"]

MAGIC = b"UMILOG1\n"
_UUID_BYTES = 36
_HEADER = len(MAGIC) + _UUID_BYTES
_RECORD = struct.Struct("<II")
_PAYLOAD = struct.Struct("<qI")

_sync = getattr(os, "fdatasync", os.fsync)


def _header(db_uuid: str) -> bytes:
    raw = db_uuid.encode("ascii")
    if len(raw) != _UUID_BYTES:
        raise ValueError(f"a database uuid is {_UUID_BYTES} characters, not {len(raw)}")
    return MAGIC + raw


def read_log(path: str, db_uuid: str) -> tuple[list[tuple[int, str, bytes | None]], int]:
    """The entries of the log at ``path`` ((generation, text, vector bytes or None), in the order
    written) and the length of its good part (0: no log). :class:`StorageError` when the log was
    written for another database (its uuid is not ``db_uuid``) and holds a commit (one cut back
    to its header, as a crash after a move into the tables leaves it, holds none)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise StorageError(f"cannot read the commit log {path!r}: {exc}") from exc
    if len(data) < _HEADER:  # created, its header not synced: nothing was ever logged in it
        return [], 0
    if data[:len(MAGIC)] != MAGIC:
        raise StorageError(f"{path!r} is not a umi commit log; move it away to open the database")
    out, at = _records(data)
    if out and data[len(MAGIC):_HEADER] != db_uuid.encode("ascii"):  # (one holding no commit is stale: no matter)
        raise StorageError(
            f"the commit log {path!r} belongs to another database than the one beside it (its uuid "
            f"is {data[len(MAGIC):_HEADER].decode('ascii', 'replace')!r}, the database's {db_uuid!r}): "
            "the database file was replaced. Move the log away to open the database; its commits "
            "cannot be applied to this one")
    return out, at


def _records(data: bytes) -> tuple[list[tuple[int, str, bytes | None]], int]:
    """The whole records after the header of the log ``data`` and the length of its good part."""
    out = []
    at = _HEADER
    while at + _RECORD.size <= len(data):
        size, crc = _RECORD.unpack_from(data, at)
        body = data[at + _RECORD.size:at + _RECORD.size + size]
        if len(body) < size or size < _PAYLOAD.size or zlib.crc32(body) != crc:
            break  # the tail of an append that was never acknowledged
        generation, n_text = _PAYLOAD.unpack_from(body)
        text = body[_PAYLOAD.size:_PAYLOAD.size + n_text].decode("utf-8")
        vectors = body[_PAYLOAD.size + n_text:] or None
        out.append((generation, text, vectors))
        at += _RECORD.size + size
    return out, at


class CommitLog:
    """The log of one open, writable database file, opened (and started again) on the first
    append. :meth:`empty` cuts it back once its entries are in the tables; a close after that
    removes it."""

    def __init__(self, path: str, db_uuid: str) -> None:
        self.path = path
        self._header = _header(db_uuid)
        self._fd: int | None = None
        self._size = 0

    def append(self, generation: int, text: str, vectors: bytes | None) -> None:
        """Write one entry and sync it: when this returns, the entry survives a crash. On failure
        nothing of it stays (the file is cut back) and :class:`StorageError` is raised; an
        interrupt (Ctrl-C) there cuts it back too and is raised as it is (the commit it carried
        is rolled back: a record left behind would bring it back at the next open after a crash)."""
        raw = text.encode("utf-8")
        body = _PAYLOAD.pack(generation, len(raw)) + raw + (vectors or b"")
        record = _RECORD.pack(len(body), zlib.crc32(body)) + body
        try:
            if self._fd is None:
                self._open()
            assert self._fd is not None
            _write_all(self._fd, record)
            _sync(self._fd)
        except BaseException as exc:
            self._cut_back()
            if isinstance(exc, OSError):
                raise StorageError(f"cannot write the commit log {self.path!r}: {exc}") from exc
            raise
        self._size += len(record)

    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        try:
            if self._size and os.fstat(fd).st_size < self._size:  # (not the file it was: gone)
                self._size = 0
            if self._size:  # closed after a cut that failed: its good part holds acknowledged entries
                os.ftruncate(fd, self._size)
                os.lseek(fd, self._size, os.SEEK_SET)
            else:
                os.ftruncate(fd, 0)  # whatever was here is in the tables (or never acknowledged)
                _write_all(fd, self._header)
                _sync(fd)
                fsync_dir(Path(self.path).parent)  # the file's name survives a crash too
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = self._size or len(self._header)

    def _cut_back(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
            os.lseek(self._fd, self._size, os.SEEK_SET)
        except OSError:  # the next append's record would follow garbage: it cuts the file first (_open)
            self.close()

    def empty(self) -> None:
        """Every entry is in the tables (their transaction committed): cut the file back to its
        header. Not synced: should the cut be lost in a crash, the entries it cut are skipped
        when read (the tables hold their generations)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, len(self._header))
            os.lseek(self._fd, len(self._header), os.SEEK_SET)
            self._size = len(self._header)
        except OSError:  # the next append cuts it back to its header
            self._size = len(self._header)
            self.close()

    def close(self, *, remove: bool = False) -> None:
        """Close the file; ``remove``: every entry is in the tables, the file goes too."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if remove:
            self._size = 0  # (an append after this starts a new file)
            remove_log(self.path)


def remove_log(path: str) -> None:
    """Remove the log at ``path`` (its entries are in the tables). Should that fail, they are
    skipped when read, and the next append starts the file again: logged, not raised."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        import logging

        logging.getLogger("umi.storage.duckdb").warning(
            "could not remove the commit log %r (its entries are in the tables): %s", path, exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
