"""The vector index cache file: what :meth:`umi.index.VectorIndex.save` writes and ``load`` reads.

Layout of ``path``: magic ``UMIVIDX\x01``, a little-endian u64 header length, the JSON header
(format, dim, high water mark, live count, store generation, index parameters, capacity, byte
sizes, and the graph file's name / size / CRC-32 when a graph was built), the ids as a JSON list
(``null`` for a free slot), the vectors of every slot below the high water mark (float32, row
major), a CRC-32 of everything before it and ``UMIVEND\x01``. The HNSW graph is a sibling file
``<path>.<token>.hnsw`` in hnswlib's own format. Each file is written to a temp file in the same
directory, fsynced and ``os.replace``-d, the graph first, so a crash leaves the old pair or the new
pair. Reading verifies sizes, checksums and ids and raises :class:`umi.errors.IndexCacheError` on
any mismatch; the caller then rebuilds from the store (the file is a cache, never the memory).
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from .errors import IndexCacheError, InvalidConfigError, ValidationError

if TYPE_CHECKING:
    from .index import VectorIndex

__all__ = ["write", "read", "atomic_write", "write_checksummed", "fsync_file", "fsync_dir", "file_crc",
           "ATOMIC_NAME_EXTRA", "INDEX_NAME_EXTRA"]

_MAGIC = b"UMIVIDX\x01"
_END = b"UMIVEND\x01"
_FORMAT_VERSION = 1
_MAP_VECTORS = os.name == "posix"
#: bytes per read when checksumming: one buffer, reused, small enough to stay in the CPU cache
#: (fresh 16 MiB reads cost ~3x as much: each is a new allocation the kernel must fault in)
_CHUNK = 1 << 18
#: random bytes (written as hex) in the name of a save's temp and graph files
_TOKEN_BYTES = 6


def _token() -> str:
    return secrets.token_hex(_TOKEN_BYTES)


def _temp_name(name: str, token: str | None = None) -> str:
    """The name of a temp file that is renamed to ``name`` once written: ``.<name>.<token>.tmp``
    (``.<name>.tmp`` without a token)."""
    return f".{name}.{token}.tmp" if token is not None else f".{name}.tmp"


def _graph_name(name: str, token: str) -> str:
    """The name of the HNSW graph file of the index file ``name``: ``<name>.<token>.hnsw``."""
    return f"{name}.{token}.hnsw"


#: bytes :func:`atomic_write` adds to the name of the file it replaces, for its temp file
ATOMIC_NAME_EXTRA = len(_temp_name("", _token()))
#: bytes :func:`write` adds to the name of the index file for the files it writes beside it: the most
#: is the graph's temp file (``.<name>.<token>.hnsw.tmp``)
INDEX_NAME_EXTRA = max(len(_temp_name(_graph_name("", _token()))), ATOMIC_NAME_EXTRA)


def write(self: VectorIndex, path: str | os.PathLike[str], generation: int) -> None:
    """Write ``self`` to ``path`` atomically, tagged with the store ``generation``."""
    generation = _ix()._check_int("generation", generation, 0, 2**63 - 1, ValidationError)
    path = Path(os.fspath(path))
    directory = path.parent
    if not directory.is_dir():
        raise IndexCacheError(
            f"cannot save index: directory {str(directory)!r} does not exist", path=str(path)
        )
    with self._lock:
        self._load_deferred_graph()  # a save replaces (and then deletes) the graph file it would read
        hw = len(self._ids)
        graph_meta = None
        graph_tmp = None
        token = _token()
        try:
            if self._graph is not None:
                graph_name = _graph_name(path.name, token)
                graph_tmp = directory / _temp_name(graph_name)
                self._graph.save_index(str(graph_tmp))
                size, crc = file_crc(graph_tmp)
                graph_meta = {"file": graph_name, "size": size, "crc32": crc}
            ids_blob = json.dumps(self._ids, ensure_ascii=False, separators=(",", ":")).encode(
                "utf-8"
            )
            header = {
                "format": _FORMAT_VERSION,
                "dim": self.dim,
                "high_water": hw,
                "count": len(self._slot),
                "generation": generation,
                "params": {
                    "hnsw_threshold": self.hnsw_threshold,
                    "M": self.M,
                    "ef_construction": self.ef_construction,
                    "ef_search": self.ef_search,
                    "seed": self.seed,
                },
                "capacity": self.capacity,
                "ids_bytes": len(ids_blob),
                "vector_bytes": hw * self.dim * 4,
                "graph": graph_meta,
            }
            head_blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
            vec = np.ascontiguousarray(self._vectors[:hw]).reshape(-1).view(np.uint8).data
            if graph_tmp is not None:  # the graph first: the main file that names it is replaced last
                fsync_file(graph_tmp)
                os.replace(graph_tmp, directory / graph_name)
                graph_tmp = directory / graph_name  # unreferenced until the main file is replaced
            atomic_write(path, lambda f: write_checksummed(
                f, (_MAGIC, struct.pack("<Q", len(head_blob)), head_blob, ids_blob, vec), _END))
        except OSError as exc:
            if graph_tmp is not None:
                try:
                    os.unlink(graph_tmp)
                except OSError:
                    pass
            raise IndexCacheError(
                f"cannot save index to {str(path)!r}: {exc}", path=str(path)
            ) from exc
        # graphs of older saves are no longer referenced
        keep = graph_meta["file"] if graph_meta else None
        for old in directory.glob(_graph_name(path.name, "*")):
            if old.name != keep:
                try:
                    old.unlink()
                except OSError:
                    pass


def read(
    cls: type[VectorIndex], path: str | os.PathLike[str], *, dim: int | None = None, build_graph: bool = True,
    defer_graph: bool = False,
) -> tuple[VectorIndex, int]:
    """:meth:`umi.index.VectorIndex.load` (its docstring says what it promises)."""
    if dim is not None:
        dim = _ix()._check_int("dim", dim, 1, _ix().INDEX_DIM_MAX)
    for name, flag in (("build_graph", build_graph), ("defer_graph", defer_graph)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    path = Path(os.fspath(path))
    spath = str(path)
    try:
        with open(path, "rb") as f:
            header, ids_blob, vectors = _read_index_file(f, spath, dim)
    except FileNotFoundError as exc:
        raise IndexCacheError(f"no index cache at {spath!r}: {exc}", path=spath) from exc
    except OSError as exc:
        raise IndexCacheError(f"cannot read index cache {spath!r}: {exc}", path=spath) from exc
    fdim, hw, cap = int(header["dim"]), int(header["high_water"]), int(header["capacity"])
    params, generation, graph_meta = (
        header["params"],
        int(header["generation"]),
        header["graph"],
    )
    try:
        ids = json.loads(ids_blob.decode("utf-8"))
        # whole-list checks in C (a per-id Python loop costs ~0.3 s at 100k ids)
        if (
            not isinstance(ids, list)
            or len(ids) != hw
            or not set(map(type, ids)) <= {str, type(None)}
            or "" in ids
        ):
            raise ValueError("ids")
        index = cls(fdim, **params)
    except (ValueError, TypeError, InvalidConfigError) as exc:
        raise IndexCacheError(f"index file {spath!r} has corrupt contents", path=spath) from exc
    live = np.zeros(cap, np.bool_)
    if None in ids:
        free = [s for s, i in enumerate(ids) if i is None]  # ascending: already a heap
        slot_of = {i: s for s, i in enumerate(ids) if i is not None}
        live[:hw] = True
        live[free] = False
    else:
        free = []
        slot_of = dict(zip(ids, range(hw)))
        live[:hw] = True
    if len(slot_of) != int(header.get("count", -1)):
        raise IndexCacheError(
            f"index file {spath!r} has corrupt contents (duplicate ids)", path=spath
        )
    index._vectors = vectors
    index._live = live
    index._ids = ids
    index._slot = slot_of
    index._free = free
    index._in_graph = np.zeros(cap, np.bool_)
    if graph_meta is not None:
        # the graph is always a sibling: a name with directories in it is not ours
        gpath = path.parent / Path(str(graph_meta.get("file"))).name
        if defer_graph:
            index._defer_graph(str(gpath), spath, graph_meta)
        else:
            index._graph, index._in_graph = open_graph(index, str(gpath), spath, graph_meta)
    elif build_graph and len(index) >= index.hnsw_threshold and len(index) > 0:
        index._build_graph()
    return index, generation

def _check_graph(gpath: Path, meta: dict[str, Any], spath: str) -> None:
    """The graph file is there, of the size and CRC-32 the main file recorded."""
    try:
        size, crc = file_crc(gpath)
    except OSError as exc:
        raise IndexCacheError(
            f"graph file of index {spath!r} is missing: {exc}", path=spath
        ) from exc
    if size != meta.get("size") or crc != meta.get("crc32"):
        raise IndexCacheError(f"graph file {str(gpath)!r} failed its checksum", path=spath)


def open_graph(self: VectorIndex, gpath: str, spath: str, meta: dict[str, Any]) -> tuple[Any, np.ndarray]:
    """The graph file ``gpath`` (``meta``: its name, size and CRC-32 as the index file ``spath``
    recorded them), checked and read by hnswlib: (graph, slot has a node) for ``self`` as it is
    now (its capacity). :class:`~umi.IndexCacheError` when it is missing, fails its checksum, or
    hnswlib refuses it, or its labels fall outside the index. hnswlib holds the GIL while it
    reads (~0.3-1 s at 100k x 384)."""
    _check_graph(Path(gpath), meta, spath)
    graph = _ix()._hnswlib().Index(space="ip", dim=self.dim)
    try:
        graph.load_index(gpath, max_elements=max(self.capacity, 1))
    except (RuntimeError, OSError) as exc:
        raise IndexCacheError(
            f"graph file {gpath!r} could not be loaded: {exc}", path=spath
        ) from exc
    graph.set_ef(self.ef_search)
    labels = np.asarray(graph.get_ids_list(), dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= self.capacity):
        raise IndexCacheError(
            f"graph file {gpath!r} has labels outside the index", path=spath
        )
    in_graph = np.zeros(self.capacity, np.bool_)
    in_graph[labels] = True
    return graph, in_graph


def _read_index_file(
    f: Any, spath: str, dim: int | None
) -> tuple[dict[str, Any], bytes, np.ndarray]:
    """Parse and verify the main file: (header, ids JSON bytes, vectors (capacity, dim))."""

    def corrupt(why: str) -> IndexCacheError:
        return IndexCacheError(f"index file {spath!r} is truncated or corrupt: {why}", path=spath)

    total = os.fstat(f.fileno()).st_size
    magic = f.read(len(_MAGIC))
    if magic != _MAGIC:
        raise IndexCacheError(f"{spath!r} is not a umi index file (bad magic)", path=spath)
    raw_len = f.read(8)
    if len(raw_len) != 8:
        raise corrupt("no header length")
    (head_len,) = struct.unpack("<Q", raw_len)
    if head_len > total:
        raise corrupt(f"header length {head_len} exceeds the file size {total}")
    head_blob = f.read(head_len)
    crc = zlib.crc32(head_blob, zlib.crc32(raw_len, zlib.crc32(magic)))
    try:
        header = json.loads(head_blob)
        fmt = int(header["format"])
        fdim, hw, cap = int(header["dim"]), int(header["high_water"]), int(header["capacity"])
        ids_bytes, vector_bytes = int(header["ids_bytes"]), int(header["vector_bytes"])
        int(header["generation"]), int(header["count"])
        if not isinstance(header["params"], dict) or not (
            header["graph"] is None or isinstance(header["graph"], dict)
        ):
            raise TypeError("params/graph")
    except (ValueError, KeyError, TypeError) as exc:
        raise corrupt("unreadable header") from exc
    if fmt != _FORMAT_VERSION:
        raise IndexCacheError(
            f"index file {spath!r} has format {fmt}, this umi reads {_FORMAT_VERSION}", path=spath
        )
    expected = len(_MAGIC) + 8 + head_len + ids_bytes + vector_bytes + 4 + len(_END)
    if total != expected:
        raise corrupt(f"{total} bytes, the header promises {expected}")
    if not (
        1 <= fdim <= _ix().INDEX_DIM_MAX
        and 0 <= hw <= cap <= max(2 * hw, _ix()._MIN_GROW)
        and vector_bytes == hw * fdim * 4
    ):
        raise corrupt(f"inconsistent sizes (dim {fdim}, slots {hw}, capacity {cap})")
    if dim is not None and fdim != dim:
        raise IndexCacheError(
            f"index file {spath!r} holds {fdim}-d vectors, expected {dim}-d", path=spath
        )
    ids_blob = f.read(ids_bytes)
    crc = zlib.crc32(ids_blob, crc)
    if _MAP_VECTORS and hw:
        # Map the vectors copy-on-write instead of reading them into fresh memory: the pages come
        # from the page cache, and only the slots written later get private copies (reopen of a
        # 100k x 384 index: ~150 MB not copied). Saves replace the file (os.replace), so the mapped
        # inode stays as it was. The index then starts at capacity == high water mark.
        # The checksum reads the file through a small buffer rather than the mapping, so no page
        # of the mapping is touched here.
        pos = f.tell()
        vectors: np.ndarray = np.memmap(f, dtype=np.float32, mode="c", offset=pos, shape=(hw, fdim))
        f.seek(pos)  # (np.memmap moves the file position)
        size, crc = _crc_of(f, crc, vector_bytes)
        if size != vector_bytes:
            raise corrupt("vectors cut short")
        header = dict(header, capacity=hw)
    else:
        vectors = np.zeros((cap, fdim), np.float32)
        view = vectors[:hw].reshape(-1).view(np.uint8).data
        if f.readinto(view) != vector_bytes:
            raise corrupt("vectors cut short")
        crc = zlib.crc32(view, crc)
    trailer = f.read(4 + len(_END))
    if (
        len(trailer) != 4 + len(_END)
        or trailer[4:] != _END
        or struct.unpack("<I", trailer[:4])[0] != crc
    ):
        raise IndexCacheError(f"index file {spath!r} failed its checksum", path=spath)
    return header, ids_blob, vectors


def file_crc(path: Path) -> tuple[int, int]:
    """(size, CRC-32) of the file at ``path``."""
    with open(path, "rb", buffering=0) as f:
        return _crc_of(f, 0, None)


def _crc_of(f: Any, crc: int, limit: int | None) -> tuple[int, int]:
    """(bytes read, CRC-32 continued from ``crc``) of the next ``limit`` bytes of ``f`` (None: to the end)."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    while limit is None or size < limit:
        want = _CHUNK if limit is None else min(_CHUNK, limit - size)
        got = f.readinto(view[:want])
        if not got:
            break
        size += got
        crc = zlib.crc32(view[:got], crc)
    return size, crc


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], object], *, text: bool = False,
                 tmp: str | os.PathLike[str] | None = None) -> None:
    """Replace ``path`` whole or not at all: ``write(f)`` fills a temp file beside it (``tmp``, or
    ``.<name>.<token>.tmp``; text mode is UTF-8), which is flushed, fsynced and ``os.replace``-d
    over ``path``; then the directory is fsynced, so the rename survives a crash too. On any
    failure the temp file is removed and the exception propagates (the caller names it)."""
    target = Path(os.fspath(path))
    temp = Path(os.fspath(tmp)) if tmp is not None else target.parent / _temp_name(target.name, _token())
    try:
        with open(temp, "w", encoding="utf-8") if text else open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    fsync_dir(target.parent)


def write_checksummed(f: IO[bytes], chunks: Iterable[Any], end: bytes) -> None:
    """Write ``chunks`` (bytes-like), then the CRC-32 of them all (u32 little-endian) and ``end``:
    the body and trailer of umi's cache files."""
    crc = 0
    for chunk in chunks:
        f.write(chunk)
        crc = zlib.crc32(chunk, crc)
    f.write(struct.pack("<I", crc) + end)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ix() -> Any:
    """:mod:`umi.index` (imported here on use: it imports this module)."""
    from . import index

    return index
