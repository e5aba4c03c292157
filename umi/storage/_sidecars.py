"""The files a DuckDB store keeps beside its database file, named ``<file name><suffix>``: the one
list of their suffixes, and the check that a file name leaves room for them.

Every file is in the database file's directory, so each name must fit the file system's name
limit (``NAME_MAX``: 255 bytes on Linux's file systems): a database file name longer than
``NAME_MAX`` minus the longest addition (:data:`NAME_EXTRA_MAX`) would open and then fail at a
compact, or lose its index caches on every save. :func:`check_name_length` refuses such a name
up front, before anything is written.
"""

from __future__ import annotations

import os

from .._index_file import ATOMIC_NAME_EXTRA, INDEX_NAME_EXTRA
from ..errors import InvalidConfigError

__all__ = ["WAL_SUFFIX", "DUCKDB_TEMP_SUFFIX", "LOG_SUFFIX", "INDEX_SUFFIX", "TERMS_SUFFIX", "COMPACT_SUFFIX",
           "DATABASE_FILES", "NAME_EXTRA_MAX", "name_max", "check_name_length"]

#: DuckDB's write-ahead log of a database file
WAL_SUFFIX = ".wal"
#: DuckDB's spill directory (its ``temp_directory`` default), made when a query spills to disk
DUCKDB_TEMP_SUFFIX = ".tmp"
#: the commit log (:mod:`umi.storage._commit_log`)
LOG_SUFFIX = ".umilog"
#: the vector index cache (its HNSW graph and its temp files are named from it: ``INDEX_NAME_EXTRA``)
INDEX_SUFFIX = ".umiidx"
#: the keyword index cache (BM25 postings)
TERMS_SUFFIX = ".umiterms"
#: the new file :meth:`~umi.storage.duckdb.DuckDBStorageBackend.compact` writes (a database file too)
COMPACT_SUFFIX = ".compact.tmp"

#: the files of a database file that go with it (removed with it: ``remove_database_files``)
DATABASE_FILES = (WAL_SUFFIX, LOG_SUFFIX)

#: the index caches, each with what a save of it adds to its name (:func:`~umi._index_file.write`, whose
#: graph and temp files are named from the file's; :func:`~umi._index_file.atomic_write`'s temp file)
_CACHES = ((INDEX_SUFFIX, INDEX_NAME_EXTRA), (TERMS_SUFFIX, ATOMIC_NAME_EXTRA))
#: the other files beside a database file: DuckDB's, the commit log, a compact's copy and its files
_OTHERS = (*DATABASE_FILES, DUCKDB_TEMP_SUFFIX, COMPACT_SUFFIX,
           *(COMPACT_SUFFIX + s for s in (*DATABASE_FILES, DUCKDB_TEMP_SUFFIX)))
#: the most bytes a file beside the database file adds to its name (the suffixes are ASCII)
NAME_EXTRA_MAX = max(*(len(s) for s in _OTHERS), *(len(s) + extra for s, extra in _CACHES))

_NAME_MAX_FALLBACK = 255


def name_max(directory: str) -> int:
    """The longest file name (bytes) the file system of ``directory`` takes; 255 when it does not
    say (no ``pathconf``, a directory that does not exist)."""
    try:
        n = os.pathconf(directory, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return _NAME_MAX_FALLBACK
    return n if isinstance(n, int) and n > 0 else _NAME_MAX_FALLBACK


def check_name_length(path: str) -> None:
    """Refuse a database file name too long for the files kept beside it
    (:class:`~umi.InvalidConfigError` saying the limit)."""
    directory, name = os.path.split(os.path.abspath(path))
    size = len(os.fsencode(name))
    most = name_max(directory)
    limit = most - NAME_EXTRA_MAX
    if size > limit:
        raise InvalidConfigError(
            f"the database file name {name!r} is {size} bytes; this file system takes names of at most "
            f"{most} bytes, and umi keeps files beside the database whose names add up to {NAME_EXTRA_MAX} "
            f"bytes to its name (its commit log, index caches and their temp files, a compact's copy, "
            f"DuckDB's write-ahead log): give a file name of at most {limit} bytes")
