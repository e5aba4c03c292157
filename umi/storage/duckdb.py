"""``DuckDBStorageBackend``: the default archival store, one DuckDB file (or ``":memory:"``).

A :class:`~umi.storage.cached.CachedStore` over DuckDB: every read is served from the
in-process cache, which is loaded from DuckDB on open; each commit writes its change set to
DuckDB in one transaction (a handful of bulk statements; a small insert-only one, such as a
remember, as one statement whose history rows carry the rest, moved into the tables before any
read of them: see :mod:`umi.storage._duckdb_io`), and a failed commit rolls the cache back.
DuckDB is the source of truth.

Opening: the path is checked first — a NUL byte (DuckDB would cut the path there) raises
:class:`~umi.ValidationError`, a directory :class:`~umi.StorageError`, and a path DuckDB opens
as an *in-memory* database (an existing ``.json``/``.jsonl``/``.csv``/``.parquet`` file, read
as data) :class:`~umi.StorageError`, since every write there would vanish. **One open store per
file per process**: DuckDB shares one database between connections of a process, so its file
lock never refuses a second open there, and two caches over one file would diverge; a second
``connect`` of a file already open in this process (read-only or not) raises
:class:`~umi.StorageLockedError` until the first is closed. Another *process* holding the file
gets the same error from DuckDB's lock. Every other failure at open is a
:class:`~umi.StorageError`.

Vector index: a :class:`umi.index.VectorIndex` saved beside the file as
``<path>.umiidx`` with the generation it reflects. On open it is loaded when its
generation matches, caught up (entities written or forgotten since, from the
``updated_generation`` and history ``generation`` columns) when it is behind, and rebuilt
from the cached vectors when missing, unreadable or inconsistent; ``index_load_status`` says
which. Its HNSW graph file is checked and read by the first search that walks the graph (a
damaged one is then built again, as after a rebuild: see :meth:`umi.index.VectorIndex.load`). The BM25 postings have a cache file of their own, ``<path>.umiterms``
(:mod:`umi.storage._termcache`), saved with the vector index and used, caught up or ignored
on open the same way; it also holds the metadata codes. With both caches valid, an open reads
from DuckDB only the entity rows (not their vectors) and core blocks; history, sources and
relations are read when first needed (see :mod:`umi.storage.cached`). The vectors are then read
on a thread of the store's own (``vectors="background"``, the default: :class:`_VectorLoader`)
while the store serves calls, reading any a call returns before it gets there; once all are in
memory, recall reads inline (a reopened 3k store's hybrid recall: 4.5 ms with vectors still to
read, 1.1 ms with all of them in memory). ``vectors="on_demand"`` reads only the ones a call
returns, for a process that must not hold a second copy of every vector (the index has one). Both are saved on :meth:`close` (and every ``save_index_every``
commits when set). A crash can cost a cache file, never a committed write.

Threads: one re-entrant lock guards the connection and the cache; every call holds it
and a transaction holds it until it ends, so readers in other threads wait for a
commit or rollback and never see uncommitted state.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import duckdb

from .._validate import check_real
from ..errors import (
    IndexCacheError,
    InvalidConfigError,
    StorageError,
    StorageLockedError,
)
from ._common import check_int
from .._index_file import fsync_dir
from ..index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, HNSW_THRESHOLD
from ._duckdb_io import (DuckDBDurable, copy_database, load_metadata, load_postings, metadata_counts,
                          open_journaled, remove_database_files, replay_log)
from ._commit_log import CommitLog
from ._sidecars import COMPACT_SUFFIX, INDEX_SUFFIX, LOG_SUFFIX, TERMS_SUFFIX
from ._overlap import Background
from ._duckdb_schema import check_path, open_connection, prepare, stored_generation
from ._txn import raise_wrapped
from .cached import CachedStore, FaultyDurable

__all__ = ["DuckDBStorageBackend", "INDEX_SUFFIX", "TERMS_SUFFIX"]

log = logging.getLogger("umi.storage.duckdb")

# the files beside the database file (one list: umi.storage._sidecars): the vector index cache at
# ``<database path> + INDEX_SUFFIX``, the keyword index cache (BM25 postings) at ``+ TERMS_SUFFIX``,
# the commit log at ``+ LOG_SUFFIX``; compact() writes the new file at ``+ COMPACT_SUFFIX``

#: files open in this process: each key of a file (:func:`_file_keys`) -> the store holding it
_OPEN_FILES: dict[object, "weakref.ref[DuckDBStorageBackend]"] = {}
_OPEN_FILES_LOCK = threading.Lock()


def _file_keys(path: str) -> tuple[object, ...]:
    """What a database file is known by in this process: its real path, and its device and inode
    once it exists — the one name of a file that every path to it shares (a hard link or a bind
    mount is another real path to the same file, which DuckDB would open as a second database:
    its lock is the process's own, and refuses no second open of it here)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:  # not created yet: its path is all it has
        return (real,)
    return (real, (st.st_dev, st.st_ino))


def _make_index(params: dict[str, int], dim: int) -> Any:
    from ..index import VectorIndex

    return VectorIndex(dim, **params)


def _check_pos_int(name: str, value: object, lo: int, hi: int) -> int:
    return check_int(value, name, lo, hi)  # type: ignore[return-value]


class _CacheFiles:
    """The keyword and vector index cache files of an opening store, each read and verified on a
    thread of its own (file reads, checksums) while the main one opens DuckDB and loads the rows;
    :meth:`get` waits for a file and returns what its reader returned or raises what it raised
    (:class:`~umi.IndexCacheError` for a missing, unreadable or corrupt file). Files absent when
    the store starts opening are not read (:meth:`has`)."""

    def __init__(self, index_path: str | None, terms_path: str | None) -> None:
        self._reads: dict[str, Background] = {}
        for key, path, read in (("terms", terms_path, _read_terms), ("index", index_path, _read_index)):
            if path is not None and os.path.exists(path):
                self._reads[key] = Background(functools.partial(read, path), f"umi-cache-{key}")

    def has(self, key: str) -> bool:
        return key in self._reads

    def get(self, key: str) -> Any:
        return self._reads[key].result()

    def finish(self) -> None:
        """Wait for the readers (an open that fails leaves no thread behind) and drop what was not used."""
        for read in self._reads.values():
            read.join()
        self._reads.clear()


def _read_terms(path: str) -> Any:
    from ._termcache import load_terms

    return load_terms(path)


def _read_index(path: str) -> Any:
    from ..index import VectorIndex

    # a file without a graph gets one from the first search that needs it, not here; a saved graph
    # is checked and read by that search (~0.4-0.7 s at 100k: a 170 MB file, then hnswlib's read,
    # which holds the GIL and would stall the open's other work)
    return VectorIndex.load(path, build_graph=False, defer_graph=True)


#: rows of vectors read per batch by :class:`_VectorLoader` (one batch is put in under the store's lock)
VECTOR_BATCH = 4096


#: the loaders of this process: stopped at interpreter exit (a store never closed), as a daemon
#: thread still inside DuckDB while Python finalises aborts the process ("terminate called")
_LOADERS: "weakref.WeakSet[_VectorLoader]" = weakref.WeakSet()


#: stores whose journal mover may run (:meth:`DuckDBStorageBackend._after_commit`): waited for at
#: interpreter exit for the same reason, and set at exit so that a mover not yet moving leaves the
#: journal in the log, for the next open
_MOVING: "weakref.WeakSet[DuckDBStorageBackend]" = weakref.WeakSet()
_EXITING = threading.Event()
#: how long exit waits for a mover (one inside DuckDB ends in one move-in; one waiting for a
#: store's lock looks every ``LOCK_POLL_SECS`` whether the store closed or exit began, and ends)
MOVER_EXIT_WAIT_SECS = 10.0
#: how often a thread of the store's (a loader, a mover) looks whether it should stop while it
#: waits for the store's lock
LOCK_POLL_SECS = 0.05


def _lock_unless(lock: Any, stop: Callable[[], bool]) -> bool:
    """Take ``lock`` for a thread of the store's, or give up (False) once ``stop()`` says so. The
    lock is polled for, never waited on: a caller holding it may be waiting for this thread (close
    joins it), and a waiter is woken as soon as the lock is released."""
    while not lock.acquire(timeout=LOCK_POLL_SECS):
        if stop():
            return False
    return True


@atexit.register
def _stop_background_threads() -> None:
    _EXITING.set()
    for loader in list(_LOADERS):
        loader.stop()
    for store in list(_MOVING):
        mover = store._mover
        if mover is not None:
            mover.join(MOVER_EXIT_WAIT_SECS)


class _VectorLoader:
    """Reads the vectors a lazy open left in the database into the cache, on a thread of its own.

    The rows come from one cursor of their own (:meth:`DuckDBDurable.stream_vectors`), read
    without the store's lock; each batch is put in under the lock, for the rows still waiting
    for theirs (a row written meanwhile keeps what it was given). Calls go on meanwhile: a
    vector one of them needs first is read for it, as on demand. :meth:`stop` is called by
    every call that replaces the connection (close, compact) under the lock, which the thread
    only polls for (never waits on), so it stops within one batch read; the thread also ends
    when the store closes or reloads its cache under it. A failure leaves the rest read on
    demand (logged)."""

    def __init__(self, store: "DuckDBStorageBackend") -> None:
        self._stop = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(weakref.ref(store), store._durable, store._lock, store._cache),
            name="umi-vectors", daemon=True)
        _LOADERS.add(self)
        self._thread.start()

    def _run(self, ref: Any, durable: Any, lock: Any, cache: Any) -> None:
        batches = durable.stream_vectors(VECTOR_BATCH)
        try:
            for ids, mat in batches:
                if not _lock_unless(lock, self._stop.is_set):
                    return
                try:
                    store = ref()
                    gone = store is None or store._closed or store._cache is not cache
                    del store  # held only here: a store dropped unclosed is not kept alive by its thread
                    if gone or self._stop.is_set():
                        return
                    if cache.install_vectors(ids, mat):
                        return  # every vector is in memory
                finally:
                    lock.release()
        except Exception as exc:  # noqa: BLE001 - a thread of the store's own: the rest is read on demand
            log.warning("reading the stored vectors in the background failed (they are read when needed): %s", exc)
        finally:
            batches.close()
            self.done.set()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread (its batch in flight is dropped), waiting at most ``timeout`` s."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # one batch read outlasting the wait: the store closes beside it
            log.warning("the background vector reader did not stop within %g s (a batch read still "
                        "running); going on without it", timeout)


class DuckDBStorageBackend(CachedStore):
    """Archival memory in one DuckDB file. Open with :meth:`connect`."""

    supports_concurrent_writers = False
    supports_multiple_processes = False
    #: True for a file; an instance opened on ``":memory:"`` says False
    durable = True

    @classmethod
    def connect(cls, path: str | os.PathLike[str] = ":memory:", *, read_only: bool = False,
                dim: int | None = None, hnsw_threshold: int = HNSW_THRESHOLD, M: int = HNSW_M,
                ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH, seed: int = 0,
                save_index_every: int | None = None, vectors: str = "background",
                faults: Any = None) -> "DuckDBStorageBackend":
        """Open (creating if needed) the store at ``path``.

        ``dim`` fixes the vector dimension up front (else the first vector fixes it; a
        store that has one refuses another). ``read_only`` opens an existing file for
        reading (DuckDB allows that only while no other process holds it for writing).
        ``hnsw_threshold``, ``M``, ``ef_construction``, ``ef_search``, ``seed`` configure the
        vector index; ``save_index_every`` saves the index cache every that many commits.
        ``faults`` (a :class:`umi.sim.FaultInjector`) makes commits fail when it fires
        ``STORAGE_WRITE_FAIL`` (see :class:`~umi.storage.cached.FaultyDurable`).
        """
        return cls(path, read_only=read_only, dim=dim, hnsw_threshold=hnsw_threshold, M=M,
                   ef_construction=ef_construction, ef_search=ef_search, seed=seed,
                   save_index_every=save_index_every, vectors=vectors, faults=faults)

    def __init__(self, path: str | os.PathLike[str] = ":memory:", *, read_only: bool = False,
                 dim: int | None = None, hnsw_threshold: int = HNSW_THRESHOLD, M: int = HNSW_M,
                 ef_construction: int = HNSW_EF_CONSTRUCTION, ef_search: int = HNSW_EF_SEARCH, seed: int = 0,
                 save_index_every: int | None = None, vectors: str = "background", faults: Any = None) -> None:
        if not isinstance(vectors, str):
            raise TypeError(f"vectors must be a str, not {type(vectors).__name__}")
        if vectors not in ("background", "on_demand"):
            raise InvalidConfigError(f"vectors must be 'background' or 'on_demand', not {vectors!r}")
        self._vector_mode = vectors
        self._vector_loader: _VectorLoader | None = None
        #: the thread moving a full journal into the tables (:meth:`_after_commit`), or None
        self._mover: Background | None = None
        if faults is not None:
            from ..sim.faults import FaultInjector

            if not isinstance(faults, FaultInjector):
                raise TypeError(f"faults must be a umi.sim.FaultInjector or None, not {type(faults).__name__}")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be str or PathLike, not {type(path).__name__}")
        spath = os.fspath(path)
        if not isinstance(spath, str):
            raise TypeError("path must be a text path")
        if not isinstance(read_only, bool):
            raise TypeError(f"read_only must be a bool, not {type(read_only).__name__}")
        if dim is not None:
            dim = _check_pos_int("dim", dim, 1, 65_536)
        self._index_params = {
            "hnsw_threshold": _check_pos_int("hnsw_threshold", hnsw_threshold, 0, 2**62),
            "M": _check_pos_int("M", M, 2, 1024),
            "ef_construction": _check_pos_int("ef_construction", ef_construction, 1, 1_000_000),
            "ef_search": _check_pos_int("ef_search", ef_search, 1, 1_000_000),
            "seed": _check_pos_int("seed", seed, 0, 2**31 - 1),
        }
        if save_index_every is not None:
            save_index_every = _check_pos_int("save_index_every", save_index_every, 1, 2**62)
        self.path = spath
        self.read_only = read_only
        self.in_memory = spath == ":memory:" or spath == ""
        self.durable = not self.in_memory
        #: the file's real path (absolute, symlinks resolved; checked first: no path with a NUL byte
        #: is resolved): every file this store writes beside it (the commit log, a compact's copy,
        #: the index caches) is named from it, as DuckDB names its write-ahead log, so a chdir of the
        #: process meanwhile moves none, and an open through a symlink finds the same files as one
        #: by the file's own name (a commit log left by a crash beside a symlink's name was missed
        #: by the next open through the file's name, and a compact replaced the symlink)
        self._file = spath if self.in_memory else check_path(os.path.realpath(check_path(spath)))
        self.index_path: str | None = None if self.in_memory else self._file + INDEX_SUFFIX
        self.terms_path: str | None = None if self.in_memory else self._file + TERMS_SUFFIX
        self._terms_dirty = False
        self.save_index_every = save_index_every
        self.index_load_status = "rebuilt"
        self._commits_since_save = 0
        self._index_dirty = False
        self._claimed: tuple[object, ...] = ()
        if not self.in_memory:
            self._claim()
        # the cache files are read and checked on a helper thread while DuckDB opens and loads
        self._cache_files = _CacheFiles(self.index_path, self.terms_path)
        try:
            con = open_connection(None if self.in_memory else spath, read_only)
            try:
                if not self.in_memory:
                    self._claim()  # the file exists now: its inode too (a link made from now on is refused)
                # commits a crash left in the journal go into the tables before anything reads them
                con = open_journaled(con, None if self.in_memory else spath, read_only)
                generation, dim_stored, self.db_uuid = prepare(con, spath, read_only, dim)
                log = None
                if not self.in_memory:  # the commits a crash left in the commit log, too
                    con, generation = replay_log(con, self._file, read_only, self.db_uuid, generation)
                    log = None if read_only else CommitLog(self._file + LOG_SUFFIX, self.db_uuid)
                raw = DuckDBDurable(con, dim_stored, log)
                # with an index cache to load, search needs none of the stored vectors at open;
                # with a keyword index cache, none of the postings
                raw.vectors_at_open = not self._cache_files.has("index")
                raw.postings_at_open = not self._cache_files.has("terms")
                durable: Any = raw if faults is None else FaultyDurable(raw, faults)
                self._init_state(durable, dim_stored, self._new_index)
                loaded = self._durable.load(dim_stored)
                loaded.generation, loaded.dim = generation, dim_stored
                self._open_cache(loaded)
                self._remove_stale_temp_files()
                self._open_terms(raw)
                raw.vectors_at_open = raw.postings_at_open = True  # a reload (_reload) reads everything
                self._open_index()
                raw.serial()  # opened: DuckDB's worker threads for bulk work only from now on
            except BaseException:
                con.close()
                raise
        except BaseException as exc:
            self._cache_files.finish()
            self._release()
            raise_wrapped(exc, f"cannot open the DuckDB store {spath!r}")
        self._cache_files.finish()
        self._closed = False
        self._load_vectors_in_background()

    def _load_vectors_in_background(self) -> None:
        if self._vector_mode == "background" and self._cache.vectors_pending():
            self._vector_loader = _VectorLoader(self)

    def _stop_vector_loader(self) -> None:
        loader, self._vector_loader = self._vector_loader, None
        if loader is not None:
            loader.stop()

    def wait_for_vectors(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for every stored vector to be in memory (see
        ``vectors`` in :meth:`connect`); True when they are."""
        end = time.monotonic() + check_real(timeout, "timeout", 0.0, 86_400.0)
        while True:  # a compact or checkpoint meanwhile starts a new thread: wait for that one
            loader = self._vector_loader
            if loader is None or not loader.done.wait(max(0.0, end - time.monotonic())):
                break
            if loader is self._vector_loader:
                break
        if not self._lock.acquire(timeout=max(0.0, end - time.monotonic())):
            return False  # a transaction on another thread holds the store past the timeout
        try:
            return self._closed or not self._cache.vectors_pending()
        finally:
            self._lock.release()

    # --- one open store per file per process ---------------------------------------------------
    def _claim(self) -> None:
        """Hold the database file for this store: by every key it has now (:func:`_file_keys`; a
        claim made again once the file exists, or after a compact replaced it, adds its inode and
        lets go of keys it no longer has). :class:`~umi.StorageLockedError` when another open
        store of this process holds one of them, by whatever path it was opened."""
        keys = _file_keys(self._file)
        with _OPEN_FILES_LOCK:
            for key in keys:
                ref = _OPEN_FILES.get(key)
                other = ref() if ref is not None else None
                # a store holds its keys from its first claim (before its open's work) until its
                # release (after its close's): one still opening, or closing, holds the file too
                if other is not None and other is not self:
                    raise StorageLockedError(
                        f"the database {self.path!r} is already open in this process (a store opened as "
                        f"{other.path!r}" + ("" if other.path == self.path else ", another path to the same file")
                        + "); DuckDB shares one database per process, so umi allows one open store per "
                        "file: use that one, or close it first", path=self.path)
            self._let_go(set(self._claimed) - set(keys))
            for key in keys:
                _OPEN_FILES[key] = weakref.ref(self)
            self._claimed = keys

    def _let_go(self, keys: "set[object] | tuple[object, ...]") -> None:
        for key in keys:  # (under _OPEN_FILES_LOCK)
            ref = _OPEN_FILES.get(key)
            if ref is not None and ref() in (self, None):
                del _OPEN_FILES[key]

    def _release(self) -> None:
        if not self._claimed:
            return
        with _OPEN_FILES_LOCK:
            self._let_go(self._claimed)
        self._claimed = ()

    # --- opening -----------------------------------------------------------------------
    @property
    def _new_index(self) -> Callable[[int], Any]:
        # a partial, not a bound method: the cache must not hold the backend (and its connection) in a cycle
        return functools.partial(_make_index, dict(self._index_params))

    @property
    def _con(self) -> Any:
        return self._durable.con  # type: ignore[attr-defined]

    def _remove_stale_temp_files(self) -> None:
        """Temp files of index saves cut short by a crash (we hold the write lock: no save is running)."""
        if self.index_path is None or self.terms_path is None or self.read_only:
            return
        remove_database_files(self._file + COMPACT_SUFFIX)  # a compact cut short before its rename
        directory, name = os.path.split(os.path.abspath(self.index_path))
        names = (f".{name}.", f".{os.path.basename(self.terms_path)}.")
        try:
            for entry in os.scandir(directory):
                if entry.name.startswith(names) and entry.name.endswith(".tmp"):
                    os.unlink(entry.path)
        except OSError as exc:
            log.warning("could not remove stale index temp files in %s: %s", directory, exc)

    def _changed_since(self, generation: int) -> list[str]:
        """Ids of the entities written or forgotten after ``generation``."""
        if generation >= self._generation:
            return []
        return [r[0] for r in self._con.execute(
            "SELECT entity_id FROM history WHERE generation > ? UNION "
            "SELECT id FROM entities WHERE updated_generation > ?", [generation, generation]).fetchall()]

    def _open_terms(self, raw: DuckDBDurable) -> None:
        """Fill the keyword postings and the metadata codes from the keyword index cache (caught
        up with what changed since it was saved), or from the database when it is missing, does
        not agree, or (an older file) holds no metadata codes."""
        self._terms_dirty = True
        if raw.postings_at_open or self.terms_path is None:
            return
        cache = self._cache
        try:
            tc = self._cache_files.get("terms")
        except IndexCacheError as exc:
            log.warning("keyword index cache unusable, reading the postings from the database: %s", exc)
            tc = None
        changed = None if tc is None or tc.generation > self._generation else self._changed_since(tc.generation)
        meta_ok = False
        if changed is not None and tc.meta is not None:
            meta_ok = cache.adopt_metadata(tc.ids, tc.meta, metadata_counts(self._con), changed)
            if not meta_ok:
                log.warning("keyword index cache's metadata codes disagree with the database, reading them from it")
        if not meta_ok:
            assert raw.rowids_loaded is not None
            cache.load_metadata(load_metadata(self._con, raw.rowids_loaded))
        raw.rowids_loaded = None
        if changed is not None and cache.adopt_postings(tc.ids, tc.terms, tc.offsets, tc.rows, tc.tfs, changed):
            self._terms_dirty = tc.generation != self._generation or not meta_ok
            return
        if tc is not None:
            log.warning("keyword index cache disagrees with the database, reading the postings from it")
        cache.load_postings(*load_postings(self._con, cache.export_postings()[0]))

    def _open_index(self) -> None:
        cache = self._cache
        if cache.dim is None or not self._cache_files.has("index"):
            self._rebuild_index()
            return
        try:
            index, gen = self._cache_files.get("index")
            if int(index.dim) != cache.dim:
                raise IndexCacheError(f"index file {self.index_path!r} holds {index.dim}-d vectors, expected "
                                      f"{cache.dim}-d", path=self.index_path)
        except IndexCacheError as exc:
            log.warning("vector index cache unusable, rebuilding from the database: %s", exc)
            self._rebuild_index()
            return
        p = self._index_params
        if gen > self._generation or index.M != p["M"] or index.ef_construction != p["ef_construction"]:
            self._rebuild_index()
            return
        index.hnsw_threshold = p["hnsw_threshold"]
        index.ef_search = p["ef_search"]
        if not cache.adopt_index(index, self._changed_since(gen)):
            log.warning("vector index cache disagrees with the database, rebuilding it")
            self._rebuild_index()
            return
        self.index_load_status = "loaded" if gen == self._generation else "caught_up"
        self._index_dirty = gen != self._generation

    def _rebuild_index(self) -> None:
        self._cache.rebuild_index()
        self.index_load_status = "rebuilt"
        if not self.read_only and self.index_path is not None and (self._cache.dim is not None or self._terms_dirty):
            self._save_index_quietly()

    # --- plumbing ------------------------------------------------------------------------
    def _describe(self) -> str:
        return f"DuckDB store {self.path!r}"

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise StorageError(f"the DuckDB store {self.path!r} was opened read_only; writes are refused")

    def _after_commit(self) -> None:
        self._commits_since_save += 1
        self._index_dirty = True
        if self.save_index_every is not None and self._commits_since_save >= self.save_index_every:
            self._save_index_quietly()
        if getattr(self._durable, "journal_full", False) and (self._mover is None or self._mover.done):
            # the commit returns now; the thread takes the store's lock when the caller lets it go
            try:
                self._mover = Background(self._move_journal_in, "umi-journal-move-in")
            except RuntimeError:  # no new thread (a thread limit, an interpreter shutting down): the
                return  # commit is durable all the same; the next commit (or close) moves the journal in
            _MOVING.add(self)

    def _move_journal_in(self) -> None:
        """Move a full journal into the tables (see ``DuckDBDurable.journal_full``) unless the store
        closed, another write moved it meanwhile, or the interpreter is exiting (a daemon thread
        inside DuckDB then aborts the process; the log keeps the entries for the next open). A
        failure is logged and changes nothing: the entries stay in the log, and the next commit
        moves them in first (and raises if it fails).

        The lock is polled for (:func:`_lock_unless`): close() joins this thread, and a close()
        inside a transaction holds the lock while it joins; the thread then sees the store closed
        and ends, instead of waiting for the thread that waits for it."""
        lock = self._lock
        if not _lock_unless(lock, lambda: self._closed or _EXITING.is_set()):
            return
        try:
            durable = self._durable
            if self._closed or _EXITING.is_set() or not getattr(durable, "journal_full", False):
                return
            try:
                durable.materialise()  # type: ignore[attr-defined]
            except BaseException as exc:  # noqa: BLE001 - a thread of its own: nobody to raise to (a
                # SystemExit there ends only this thread, which Background would drop unsaid)
                log.warning("could not move the commit log of %r into the tables (the next commit "
                            "tries again): %s: %s", self.path, type(exc).__name__, exc)
        finally:
            lock.release()

    def _rollback_tx(self) -> None:
        try:
            super()._rollback_tx()
        except Exception:  # noqa: BLE001 - the cache is rebuilt from the source of truth
            log.exception("cache rollback failed; reloading it from the database")
            self._reload()

    def _reload(self) -> None:
        durable = self._durable
        self._init_state(durable, durable.dim, self._new_index)  # type: ignore[attr-defined]
        loaded = durable.load(durable.dim)  # type: ignore[attr-defined]
        loaded.generation = stored_generation(self._con)
        self._open_cache(loaded)
        self._cache.rebuild_index()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------
    def save_index(self) -> bool:
        """Save the index caches now — the vector index and the keyword postings (they reflect
        the committed state). False when there is nothing to save (in memory, read_only)."""
        with self._lock:
            self._check_open()
            if self._depth:
                raise StorageError("save_index() inside a transaction: the index would not match a commit")
            if self.read_only or self.index_path is None:
                return False
            self._save_caches()
            return True

    def _save_caches(self) -> None:
        from ._termcache import TermCache, save_terms

        assert self.index_path is not None and self.terms_path is not None
        if self._cache.index is not None:
            self._cache.index.save(self.index_path, self._generation)
        save_terms(self.terms_path, TermCache(self._generation, *self._cache.export_postings(),
                                              meta=self._cache.export_metadata()))
        self._commits_since_save = 0
        self._index_dirty = self._terms_dirty = False

    def _save_index_quietly(self) -> None:
        if self.index_path is None or self.read_only:
            return
        try:
            self._save_caches()
        except (IndexCacheError, OSError) as exc:
            log.warning("could not save the index caches (they will be rebuilt on open): %s", exc)

    def checkpoint(self) -> None:
        """Write DuckDB's WAL into the database file and save the index cache. A thread reading
        the vectors in the background is stopped for it (DuckDB refuses a checkpoint beside its
        open read once anything was written) and started again after it."""
        with self._lock:
            self._check_writable()
            if self._depth:
                raise StorageError("checkpoint() inside a transaction")
            self._stop_vector_loader()
            try:
                with self._durable.bulk():  # type: ignore[attr-defined]
                    self._con.execute("CHECKPOINT")
            except duckdb.Error as exc:
                raise StorageError(f"checkpoint failed: {exc}") from exc
            finally:
                self._load_vectors_in_background()
            self._save_index_quietly()

    def compact(self) -> bool:
        """Rewrite the database file so that it holds only what is stored now. DuckDB keeps a
        deleted row's bytes in its row group (under a delete mask) and in freed blocks, so the
        text of a forgotten fact stays readable in the file until this runs: every table is copied
        into a new file (``COPY FROM DATABASE``), which is synced and renamed over the old one, and
        the index caches beside it are saved again. Time and disk space grow with the file's size;
        the store answers nothing meanwhile. A failure before the rename leaves the store as it
        was. False for a store in memory (nothing on disk).

        No other process can open the file in between: the new file is opened (and so locked)
        before the rename, while the old one is still open; a process that opens the file once
        both are closed, before this store opens it again, gets the new file with every commit in
        it; should it write there, this store raises :class:`~umi.StorageLockedError` and is closed
        (its cache no longer matches the file)."""
        with self._lock:  # (as close: no other call starts or stops the thread meanwhile)
            self._stop_vector_loader()  # its cursor reads the file compact replaces
            try:
                return self._compact()
            finally:
                if not self._closed:
                    self._load_vectors_in_background()

    def _compact(self) -> bool:
        with self._lock:
            self._check_writable()
            if self._depth:
                raise StorageError("compact() inside a transaction: it rewrites the committed state")
            if self.in_memory:
                return False
            raw: DuckDBDurable = getattr(self._durable, "inner", self._durable)  # type: ignore[arg-type]
            tmp = self._file + COMPACT_SUFFIX
            held = None
            try:
                with raw.bulk():
                    copy_database(raw.con, tmp)
                held = duckdb.connect(tmp)  # the new file's lock, held across the rename
                os.replace(tmp, self._file)
            except (duckdb.Error, OSError) as exc:
                if held is not None:
                    held.close()
                remove_database_files(tmp)
                raise StorageError(f"compact of {self.path!r} failed, the store is unchanged: "
                                   f"{type(exc).__name__}: {exc}") from exc
            try:  # the new file is in place and holds every commit, whatever fails from here
                fsync_dir(Path(self._file).parent)
            except OSError as exc:
                log.warning("compact of %r: could not sync the directory after the rename: %s", self.path, exc)
            raw.close()  # the replaced file (no write-ahead log after the copy's CHECKPOINT)
            held.close()
            remove_database_files(tmp)  # (its name is gone; a write-ahead log of that name, if any)
            try:
                self._claim()  # the new file: another inode
                raw.reconnect(open_connection(self._file, False))
                if stored_generation(raw.con) != self._generation:
                    raw.close()
                    raise StorageLockedError(
                        f"another process opened {self.path!r} and wrote to it while it was compacted (every "
                        "commit is in the file); this store is closed: open it again", path=self.path)
            except BaseException:
                self._closed = True  # the file is whole; this handle can no longer reach it
                self._release()
                raise
            if self._cache.index is not None:  # a graph saved again would hold a forgotten fact's vector
                self._cache.index.erase_removed()
            try:
                self._save_caches()  # a cache saved before the forget still holds its words
            except (IndexCacheError, OSError) as exc:
                raise StorageError(f"compact of {self.path!r} rewrote the database but could not save the index "
                                   f"caches beside it (they may still hold forgotten words): {exc}") from exc
            return True

    def build_vector_index(self) -> bool:
        """Build the HNSW graph now, waiting for it (searches build it on a thread when first
        needed, serving exact results meanwhile). False when the store is below ``hnsw_threshold``."""
        with self._lock:
            index = self._cache.index
        if index is None or len(index) < index.hnsw_threshold:
            return False
        index.build_graph()
        return True

    def _before_close(self) -> None:
        if self._index_dirty or self._terms_dirty:
            self._save_index_quietly()

    def close(self) -> None:
        """Roll back an open transaction, save the index cache, close the file. Idempotent."""
        try:
            # under the lock: a compact on another thread cannot start a thread between the stop
            # and the close (it would read on the closed connection, or DuckDB refuse the close)
            with self._lock:
                self._stop_vector_loader()
                super().close()
        finally:
            mover = self._mover
            if mover is not None:
                mover.join()  # it found the store closed (close moved the journal in)
            self._release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"entities={len(self._cache)}, generation={self._generation}"
        return f"DuckDBStorageBackend({self.path!r}, dim={self.dim}, {state})"
