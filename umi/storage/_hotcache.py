"""The in-process read path of archival memory: entities, filter columns, postings, vectors.

:class:`EntityCache` holds every stored entity in a form that answers the hot
queries without touching disk: entity objects by row, numpy column arrays aligned
to rows (type, times, liveness, document length) that turn a filter into a bool
mask in a few vectorised operations (:func:`umi.storage.filters.mask`), coded columns
(scope components, source id, one per metadata key: int32 value codes), a name index,
BM25 postings, the original embeddings and the :class:`umi.index.VectorIndex`
whose slots map to rows, and the passage vectors of long facts (few: scanned exactly, see
:meth:`EntityCache.search_vector`). :class:`~umi.storage.cached.CachedStore` (DuckDB, Lance, Sim)
keeps every entity here, loaded from its durable store on open.

Transactions: :meth:`begin` starts a journal that records each touched entity's
state before its first change; :meth:`rollback` puts those states back (and drops
a vector dimension fixed inside the transaction), :meth:`commit` forgets them.

Not thread-safe on its own: its owner serialises access.
"""

from __future__ import annotations

import itertools

import builtins
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import StorageError
from ..index import by_score_then_id
from ..types import SCOPE_FIELDS, Entity, EntityType, normalize_name
from . import filters as F
from ._bm25 import PostingsIndex, csr_add_docs, top_by_score_then_key
from ._common import clone_entity
from ._overlap import beside
from .filters import I64_MAX, TYPE_CODES, NormFilters, meta_key
from .text import document_terms

__all__ = ["EntityCache", "LoadedRows", "TYPE_CODES", "coded_values"]


def coded_values(e: Entity) -> list[tuple[str, Any]]:
    """(coded column, value) of every set coded field of ``e``: scope components, source id and
    metadata (as ``meta:<key>`` -> (type tag, canonical text))."""
    out: list[tuple[str, Any]] = [(name, v) for name, v in zip(SCOPE_FIELDS, e.scope.as_tuple()) if v is not None]
    if e.source_id is not None:
        out.append(("source_id", e.source_id))
    for k, v in e.metadata.items():
        out.append(("meta:" + k, meta_key(v)))
    return out


_MASK_CACHE_SIZE = 32


class EntityCache:
    """Every entity of a store, indexed for filtered vector, keyword and name lookups.

    ``index_factory(dim)`` makes the vector index once the dimension is known.
    """

    _by_name_map: dict[str, int | set[int]] | None
    _names_loaded: list[str] | Callable[[], list[str]] | None

    def __init__(self, *, dim: int | None, index_factory: Callable[[int], Any]) -> None:
        self.dim = dim
        self._index_factory = index_factory
        self.index: Any = None
        self.version = 0
        self._reset_rows(16)

    # --- storage of rows -------------------------------------------------------------
    def _reset_rows(self, cap: int) -> None:
        self._row_of: dict[str, int] = {}
        self._ents: list[Entity | None] = []  # None: not materialised yet (see bulk_load) or dead
        self._row_ids: list[str] = []  # row -> id (also for dead rows)
        self._lazy: Callable[[int], Entity] | None = None
        self._n = 0
        self._cap = 0
        self._alive = np.zeros(0, bool)
        self._type = np.zeros(0, np.int8)
        self._created = np.zeros(0, np.int64)
        self._event = np.zeros(0, np.int64)
        self._has_event = np.zeros(0, bool)
        self._valid_to = np.zeros(0, np.int64)
        self._doc_len = np.zeros(0, np.float64)
        self._has_vec = np.zeros(0, bool)
        # rows whose vector is not in _vecs but stored durably (see bulk_load: fetch_vectors); once
        # read, kept in _vec_read (row -> vector) rather than written into _vecs, whose untouched
        # pages cost nothing (a write there makes the OS zero a whole page, up to 2 MiB)
        self._vec_pending = np.zeros(0, bool)
        self._vec_read: dict[int, np.ndarray] = {}
        self._fetch_vectors: Callable[[builtins.list[str]], tuple[builtins.list[str], np.ndarray]] | None = None
        self._row_slot = np.zeros(0, np.int64)
        self._id_key = np.zeros(0, np.uint64)  # row -> id_order_keys of its id (ties broken by id)
        self._vecs: np.ndarray | None = None
        self._slot_row = np.full(0, -1, np.int64)
        self._by_name = {}  # normalised name -> row(s) (see the property)
        # coded columns: name -> int32 codes per row (0 = unset), name -> value -> code
        self._meta_codes: dict[str, np.ndarray] = {}
        self._meta_vals: dict[str, dict[Any, int]] = {}
        self._postings = PostingsIndex()
        self._n_alive = 0
        self._n_vecs = 0
        self._total_len = 0
        self._masks: OrderedDict[Any, tuple[int, np.ndarray, Any]] = OrderedDict()
        # passage vectors of long facts: row -> matrix; their stacked, normalised form for search
        self._pass: dict[int, np.ndarray] = {}
        self._pass_stack: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._journal: dict[str, tuple[Entity | None, np.ndarray | None, np.ndarray | None]] | None = None
        self._journal_dim: int | None = None
        self._grow(cap)

    @property
    def _by_name(self) -> dict[str, int | set[int]]:
        """Normalised name -> its row, or the set of its rows when several share it (a set per
        name cost ~0.1 s per 100k rows at open, and most names have one row). After a bulk load
        it is made on first use (a name lookup or a write), from the loaded names."""
        by_name = self._by_name_map
        if by_name is None:
            loaded = self._names_loaded
            names: list[str] = (loaded() if callable(loaded) else loaded) or []
            n = len(names)
            by_name = dict(zip(names, range(n)))  # the last row of each name
            if len(by_name) < n:  # rows whose name a later row shares
                last = np.fromiter(map(by_name.__getitem__, names), np.int64, n)
                for i in np.flatnonzero(last != np.arange(n)).tolist():
                    _name_add(by_name, names[i], i)
            self._by_name_map = by_name
            self._names_loaded = None
        return by_name

    @_by_name.setter
    def _by_name(self, value: dict[str, int | set[int]] | None) -> None:
        self._by_name_map = value
        self._names_loaded = None

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = max(16, need, int(self._cap * 1.5))

        def g(a: np.ndarray, fill: Any = 0) -> np.ndarray:
            out = np.full(cap, fill, a.dtype)
            out[: a.shape[0]] = a
            return out

        self._alive = g(self._alive, False)
        self._type = g(self._type)
        self._created = g(self._created)
        self._event = g(self._event)
        self._has_event = g(self._has_event, False)
        self._valid_to = g(self._valid_to, I64_MAX)
        self._doc_len = g(self._doc_len)
        self._has_vec = g(self._has_vec, False)
        self._vec_pending = g(self._vec_pending, False)
        self._row_slot = g(self._row_slot, -1)
        self._id_key = g(self._id_key)
        for k, arr in self._meta_codes.items():
            self._meta_codes[k] = g(arr)
        if self._vecs is not None:
            self._own_vectors(cap)
        self._cap = cap

    def _ensure_dim(self, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
        if self.dim != dim:  # checked by the backend before; a bug if reached
            raise StorageError(f"vector of {dim} dimensions in a {self.dim}-d store")
        if self._vecs is None:
            self._vecs = np.zeros((self._cap, dim), np.float32)
        if self.index is None:
            self.index = self._index_factory(dim)

    def _own_vectors(self, cap: int) -> None:
        """A writable vector matrix of ``cap`` rows (after a bulk load ``_vecs`` may be a read-only
        view of the loaded Arrow buffer, shorter than the other columns: copied on first write)."""
        v = self._vecs
        assert v is not None
        if v.shape[0] >= cap and v.flags.writeable:
            return
        grown = np.zeros((cap, v.shape[1]), np.float32)
        m = v.shape[0]
        if self._vec_pending[:m].any():  # copy only the rows held here
            rows = np.flatnonzero(self._has_vec[:m] & ~self._vec_pending[:m])
            grown[rows] = v[rows]
        else:
            grown[:m] = v
        self._vecs = grown

    def _grow_slots(self, need: int) -> None:
        """``_slot_row`` holds at least ``need`` slots (new ones map to no row)."""
        have = self._slot_row.shape[0]
        if need > have:
            grown = np.full(max(need, int(have * 1.5), 16), -1, np.int64)
            grown[:have] = self._slot_row
            self._slot_row = grown

    def _map_slot(self, row: int, slot: int) -> None:
        self._grow_slots(slot + 1)
        self._slot_row[slot] = row
        self._row_slot[row] = slot

    def _unmap_slot(self, row: int) -> None:
        slot = int(self._row_slot[row])
        if slot >= 0:
            if slot < self._slot_row.shape[0] and self._slot_row[slot] == row:
                self._slot_row[slot] = -1
            self._row_slot[row] = -1

    def _vec(self, row: int) -> np.ndarray | None:
        """The stored vector of a row (a read-only view; read from the durable store on first
        use), or None."""
        if not self._has_vec[row]:
            return None
        if self._vec_pending[row]:
            v = self._vec_read.get(row)
            if v is None:
                self._load_vectors([row])
                v = self._vec_read[row]
            return v
        return self._vecs[row]  # type: ignore[index]

    def _load_vectors(self, rows: Iterable[int]) -> None:
        """Read the pending vectors of ``rows`` not read yet, in one durable read."""
        got = self._vec_read
        want = [r for r in rows if self._vec_pending[r] and r not in got]
        if want:
            at, mat = self._read_vectors(want)
            mat.flags.writeable = False
            for i, r in enumerate(at.tolist()):
                got[r] = mat[i]

    def _read_vectors(self, rows: builtins.list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, their stored vectors) from the durable store, in the order it returned them."""
        assert self._fetch_vectors is not None
        ids = self._row_ids
        got_ids, mat = self._fetch_vectors([ids[r] for r in rows])
        if len(got_ids) != len(rows):
            raise StorageError(f"{len(rows) - len(got_ids)} stored vector(s) are missing from the database")
        row_of = self._row_of
        return np.fromiter(map(row_of.__getitem__, got_ids), np.int64, len(got_ids)), mat

    def install_vectors(self, ids: builtins.list[str], mat: np.ndarray) -> bool:
        """The stored vectors of ``ids`` (read after a lazy open) put in for the rows still waiting
        for theirs; a row written since the open keeps what it was given. True once no vector is
        left to read from the durable store."""
        row_of = self._row_of
        rows = np.fromiter((row_of.get(i, -1) for i in ids), np.int64, len(ids))
        keep = rows >= 0
        keep[keep] = self._vec_pending[rows[keep]]
        if not keep.any():
            return self._fetch_vectors is None
        return self._put_vectors(rows[keep], mat[keep])

    def vectors_pending(self) -> int:
        """How many rows' vectors are still to be read from the durable store."""
        return int(np.count_nonzero(self._vec_pending[: self._n])) if self._fetch_vectors is not None else 0

    def _put_vectors(self, rows: np.ndarray, mat: np.ndarray) -> bool:
        """The stored vectors ``mat`` of pending ``rows`` into ``_vecs`` (no longer pending); True
        once none is left pending (every read is then from memory)."""
        self._own_vectors(self._cap)
        self._vecs[rows] = mat  # type: ignore[index]
        self._vec_pending[rows] = False
        held = self._vec_read
        if held:
            for r in rows.tolist():
                held.pop(r, None)
        if self._vec_pending[: self._n].any():
            return False
        self._fetch_vectors, self._vec_read = None, {}
        return True

    def _unpend_vectors(self) -> None:
        """Every pending vector into ``_vecs`` (to rebuild the index from them): those read for a
        call already, and the rest in one durable read."""
        rows = np.flatnonzero(self._vec_pending[: self._n]).tolist()
        if not rows:
            return
        held = self._vec_read
        kept = [r for r in rows if r in held]
        unread = [r for r in rows if r not in held]
        parts = [self._read_vectors(unread)] if unread else []
        if kept:
            parts.append((np.array(kept, np.int64), np.stack([held[r] for r in kept])))
        for at, mat in parts:
            self._put_vectors(at, mat)

    def _ent(self, row: int) -> Entity:
        """The stored entity of a live row (built from the bulk-loaded columns on first use)."""
        e = self._ents[row]
        if e is None:
            assert self._lazy is not None and self._alive[row]
            e = self._ents[row] = self._lazy(row)
        return e

    # --- indexing one row ------------------------------------------------------------
    def _index_row(self, row: int, e: Entity, terms: tuple[dict[str, int], int] | None) -> None:
        self._ents[row] = e
        self._alive[row] = True
        self._type[row] = TYPE_CODES[e.entity_type]
        self._created[row] = e.created_at
        self._has_event[row] = e.event_time is not None
        self._event[row] = 0 if e.event_time is None else e.event_time
        self._valid_to[row] = I64_MAX if e.valid_to is None else e.valid_to
        _name_add(self._by_name, normalize_name(e.name), row)
        for k, v in coded_values(e):
            vals = self._meta_vals.setdefault(k, {})
            code = vals.setdefault(v, len(vals) + 1)
            codes = self._meta_codes.get(k)
            if codes is None:
                codes = self._meta_codes[k] = np.zeros(self._cap, np.int32)
            codes[row] = code
        tfs, dl = terms if terms is not None else document_terms(e.name, e.content)
        self._postings.add_doc(row, tfs)
        self._doc_len[row] = dl
        self._total_len += dl
        self._n_alive += 1

    def _unindex_row(self, row: int, e: Entity) -> None:
        name = normalize_name(e.name)
        cur = self._by_name.get(name)
        if isinstance(cur, set):
            cur.discard(row)
            if not cur:
                del self._by_name[name]
        elif cur == row:
            del self._by_name[name]
        for k, _ in coded_values(e):
            self._meta_codes[k][row] = 0
        tfs, dl = document_terms(e.name, e.content)
        self._postings.remove_doc(row, tfs)
        self._total_len -= dl
        self._n_alive -= 1
        self._alive[row] = False

    def _apply(self, eid: str, new: Entity | None, vec: np.ndarray | None,
               terms: tuple[dict[str, int], int] | None = None, slot: int | None = None,
               passages: np.ndarray | None = None) -> None:
        """Make ``eid`` hold ``new`` (``None``: absent) with vector ``vec`` and ``passages``. ``slot``
        is given when the caller already put ``vec`` into the vector index (batched writes)."""
        row = self._row_of.get(eid)
        old = self._ent(row) if row is not None else None
        had_vec = row is not None and bool(self._has_vec[row])
        # the vector index first: it is the only step that can fail for a reason of its own
        if slot is None:
            slot = -1
            if new is not None and vec is not None:
                self._ensure_dim(vec.shape[0])
                slot = int(np.asarray(self.index.add([eid], vec[None, :]))[0])
            elif had_vec:
                self.index.remove([eid])
        self.version += 1
        if old is not None:
            assert row is not None
            self._unindex_row(row, old)
            self._unmap_slot(row)
            if had_vec:
                self._has_vec[row] = False
                if self._vec_pending[row]:
                    self._vec_pending[row] = False
                    self._vec_read.pop(row, None)
                self._n_vecs -= 1
            if self._pass.pop(row, None) is not None:
                self._pass_stack = None
        if new is None:
            if row is not None:
                self._ents[row] = None
                del self._row_of[eid]
            return
        if row is None:
            row = self._n
            self._grow(row + 1)
            self._n += 1
            self._ents.append(None)
            self._row_ids.append(eid)
            self._row_of[eid] = row
            self._id_key[row] = id_order_keys([eid])[0]
        self._index_row(row, new, terms)
        if vec is not None:
            self._own_vectors(self._cap)
            self._vecs[row] = vec  # type: ignore[index]
            self._has_vec[row] = True
            self._n_vecs += 1
            self._map_slot(row, slot)
            if passages is not None:
                self._pass[row] = passages
                self._pass_stack = None

    # --- transactions ----------------------------------------------------------------
    def begin(self) -> None:
        if self._journal is not None:
            raise StorageError("cache transaction already open")
        self._journal = {}
        self._journal_dim = self.dim

    def commit(self) -> None:
        self._journal = None

    def rollback(self) -> None:
        """Put every entity touched since :meth:`begin` back as it was."""
        journal, self._journal = self._journal, None
        if not journal:
            return
        for eid, (old, vec, passages) in reversed(list(journal.items())):
            self._apply(eid, old, vec, passages=passages)
        if self._journal_dim is None and self.dim is not None:
            # the first vector arrived inside the rolled-back transaction
            if self._n_vecs:
                raise StorageError("cache rollback left vectors behind in a store that had none")
            self.dim = None
            self.index = None
            self._vecs = None
            self._slot_row = np.full(0, -1, np.int64)
        self.version += 1

    def _touch(self, eid: str) -> None:
        j = self._journal
        if j is not None and eid not in j:
            row = self._row_of.get(eid)
            if row is None:
                j[eid] = (None, None, None)
            else:
                vec = self._vec(row)
                j[eid] = (self._ent(row), None if vec is None else vec.copy(), self._pass.get(row))

    # --- writes ----------------------------------------------------------------------
    def put_many(self, ents: Sequence[Entity],
                 terms: Sequence[tuple[dict[str, int], int]] | None = None) -> list[bool]:
        """Insert or replace, in order (a repeated id: the last one stays). ``ents`` are private
        validated copies whose embeddings (if any) have the store's dimension; ``terms`` their
        :func:`~umi.storage.text.document_terms` when the caller has them. Returns, per entity,
        whether its id was new at that point. Vectors go to the index in one batch."""
        if self._journal is not None:  # the journal keeps the old vectors: read them in one go
            row_of = self._row_of
            self._load_vectors([row_of[e.id] for e in ents if e.id in row_of])
        for e in ents:
            self._touch(e.id)
        last: dict[str, int] = {e.id: pos for pos, e in enumerate(ents)}
        add_ids = [i for i, pos in last.items() if ents[pos].embedding is not None]
        drop_ids = [i for i, pos in last.items() if ents[pos].embedding is None and self.has_vector(i)]
        slots: dict[str, int] = {}
        if add_ids:
            self._ensure_dim(ents[last[add_ids[0]]].embedding.shape[0])  # type: ignore[union-attr]
            mat = np.stack([ents[last[i]].embedding for i in add_ids])  # type: ignore[misc]
            got = np.asarray(self.index.add(add_ids, mat))
            slots = dict(zip(add_ids, got.tolist()))
        if drop_ids:
            self.index.remove(drop_ids)
        out = []
        seen: set[str] = set()
        for e in ents:
            out.append(e.id not in seen and e.id not in self._row_of)
            seen.add(e.id)
        for eid, pos in last.items():
            e = ents[pos]
            vec = e.embedding
            stored = e if vec is None else clone_entity(e, None)
            stored.embedding = stored.passage_embeddings = None
            self._apply(eid, stored, vec, None if terms is None else terms[pos],
                        slot=slots[eid] if vec is not None else -1, passages=e.passage_embeddings)
        return out

    def remove(self, eid: str) -> Entity | None:
        """Remove; returns the removed entity (with its embedding) or None."""
        row = self._row_of.get(eid)
        if row is None:
            return None
        old = self._entity_at(row)
        self._touch(eid)
        self._apply(eid, None, None)
        return old

    def set_validity(self, eid: str, new: Entity) -> Entity:
        """Hold ``new``, the state :func:`~umi.storage._rules.validity_change` gave stored entity
        ``eid`` (only ``valid_to`` and ``updated_at`` differ); returns a copy of it for the caller."""
        row = self._row_of[eid]
        self._touch(eid)
        # only the row's columns change: name, metadata, text and vector are the same
        self.version += 1
        self._ents[row] = new
        self._valid_to[row] = I64_MAX if new.valid_to is None else new.valid_to
        return self._entity_at(row)

    def ids_with(self, column: str, value: Any) -> builtins.list[str]:
        """Ids of the live rows whose coded ``column`` holds ``value``, sorted."""
        code = self._meta_vals.get(column, {}).get(value)
        if code is None:
            return []
        rows = np.flatnonzero(self._alive[: self._n] & (self._meta_codes[column][: self._n] == code))
        return sorted(self._row_ids[r] for r in rows.tolist())

    # --- reads -----------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n_alive

    def __contains__(self, eid: object) -> bool:
        return eid in self._row_of

    def reads_from_memory(self) -> bool:
        """True when no read needs the durable store (no vector left to fetch on demand)."""
        return self._fetch_vectors is None or not bool(self._vec_pending[: self._n].any())

    def _entity_at(self, row: int) -> Entity:
        e = clone_entity(self._ent(row), self._vec(row))
        e.passage_embeddings = self._pass.get(row)  # read-only
        return e

    def peek(self, eid: str) -> Entity | None:
        """The stored entity itself (no embedding). Callers must not change it."""
        row = self._row_of.get(eid)
        return None if row is None else self._ent(row)

    def peek_many(self, ids: Sequence[str]) -> builtins.list[Entity]:
        """The stored entities themselves (no embedding), in the order of ``ids``, missing ones
        skipped. Callers must not change them."""
        row_of, ent = self._row_of, self._ent
        return [ent(r) for r in map(row_of.get, ids) if r is not None]

    def has_vector(self, eid: str) -> bool:
        row = self._row_of.get(eid)
        return row is not None and bool(self._has_vec[row])

    def get(self, eid: str) -> Entity | None:
        row = self._row_of.get(eid)
        return None if row is None else self._entity_at(row)

    def get_many(self, ids: Sequence[str]) -> list[Entity]:
        row_of = self._row_of
        rows = [r for r in map(row_of.get, ids) if r is not None]
        self._load_vectors(rows)
        return [self._entity_at(r) for r in rows]

    # --- filters -----------------------------------------------------------------------
    def row_mask(self, nf: NormFilters) -> np.ndarray:
        """Rows (0..n-1) that match; cached until the next change."""
        key = nf.cache_key
        hit = self._masks.get(key)
        if hit is not None and hit[0] == self.version:
            self._masks.move_to_end(key)
            return hit[1]
        m = F.mask(nf, self)
        self._masks[key] = (self.version, m, None)
        self._masks.move_to_end(key)
        while len(self._masks) > _MASK_CACHE_SIZE:
            self._masks.popitem(last=False)
        return m

    # MaskColumns (see umi.storage.filters.mask)
    @property
    def n(self) -> int:
        return self._n

    def column(self, name: str) -> np.ndarray:
        return {"alive": self._alive, "type": self._type, "created": self._created, "event": self._event,
                "has_event": self._has_event, "valid_to": self._valid_to}[name]

    def code_column(self, name: str) -> np.ndarray | None:
        return self._meta_codes.get(name)

    def code_of(self, name: str, value: Any) -> int | None:
        return self._meta_vals.get(name, {}).get(value)

    def codes_given(self, name: str) -> int:
        """How many values of coded column ``name`` have a code. Codes are never reused: a value
        first seen later gets a greater code."""
        return len(self._meta_vals.get(name, ()))

    def _matches(self, row: int, nf: NormFilters) -> bool:
        """One row against the filters (the reference predicate)."""
        return bool(self._alive[row]) and F.matches(nf, self._ent(row))

    def _slot_mask(self, nf: NormFilters) -> tuple[bool, np.ndarray | None]:
        """(any eligible vector, mask in slot space or None for 'every live vector')."""
        if self.index is None or self._n_vecs == 0 or nf.empty:
            return False, None
        rm = self.row_mask(nf)
        key = nf.cache_key
        ver, _, cached = self._masks[key]
        if cached is not None:
            return cached
        n = self._n
        eligible = int(np.count_nonzero(rm & self._has_vec[:n]))
        if eligible == 0:
            out: tuple[bool, np.ndarray | None] = (False, None)
        elif eligible == self._n_vecs:
            out = (True, None)
        else:
            cap = max(int(self.index.capacity), 1)
            self._grow_slots(cap)
            ext = np.zeros(n + 1, bool)  # slot_row == -1 reads ext[-1], which is False
            ext[:n] = rm
            out = (True, ext[self._slot_row[:cap]])
        self._masks[key] = (ver, rm, out)
        return out

    # --- queries -----------------------------------------------------------------------
    def count(self, nf: NormFilters) -> int:
        return int(np.count_nonzero(self.row_mask(nf)))

    def _ordered_rows(self, rows: Iterable[int]) -> list[int]:
        ids, created = self._row_ids, self._created
        return sorted(rows, key=lambda r: (int(created[r]), ids[r]))

    def list(self, nf: NormFilters, limit: int, offset: int) -> list[Entity]:
        rows = np.flatnonzero(self.row_mask(nf))
        if offset >= rows.shape[0]:
            return []
        # exact order needs created_at then id: sort only the rows up to the need-th's time, ties included
        need = offset + limit
        if need < rows.shape[0]:
            created = self._created[rows]
            rows = rows[created <= np.partition(created, need - 1)[need - 1]]
        picked = self._ordered_rows(rows.tolist())[offset:offset + limit]
        self._load_vectors(picked)
        return [self._entity_at(r) for r in picked]

    def find_by_name(self, norm_name: str, etype: EntityType | None, nf: NormFilters,
                     peek: bool = False) -> builtins.list[Entity]:
        """The entities filed under ``norm_name``, oldest first: copies, or (``peek``) the stored
        objects themselves, without embedding (see :meth:`peek`)."""
        got = self._by_name.get(norm_name)
        if got is None:
            return []
        rows = got if isinstance(got, set) else (got,)
        code = None if etype is None else TYPE_CODES[etype]
        hits = self._ordered_rows(r for r in rows if (code is None or self._type[r] == code) and self._matches(r, nf))
        if peek:
            return [self._ent(r) for r in hits]
        self._load_vectors(hits)
        return [self._entity_at(r) for r in hits]

    def search_vector(self, q: np.ndarray, k: int, nf: NormFilters) -> builtins.list[tuple[str, float]]:
        any_eligible, mask = self._slot_mask(nf)
        if not any_eligible:
            return []
        return self._with_passages(q, self.index.search_unit(q, k, mask), k, nf)

    def search_vector_many(self, qs: np.ndarray, k: int, nf: NormFilters) -> builtins.list[builtins.list[tuple[str, float]]]:
        """:meth:`search_vector` for each row of ``qs`` (unit float32), in one index call."""
        any_eligible, mask = self._slot_mask(nf)
        if not any_eligible:
            return [[] for _ in range(qs.shape[0])]
        return [self._with_passages(q, res, k, nf)
                for q, res in zip(qs, self.index.search_many_unit(qs, k, mask))]

    def _with_passages(self, q: np.ndarray, res: Iterable[tuple[Any, Any]], k: int,
                       nf: NormFilters) -> builtins.list[tuple[str, float]]:
        """The index's hits, each fact at the best of its vector and its passages': one hit per fact."""
        if not self._pass:  # the index's own answer: (id, score) by score, then id, at most k
            return res if isinstance(res, list) else _ranked(res, k)
        best = {str(i): float(s) for i, s in res}
        for i, s in self._passage_hits(q, k, nf):
            if s > best.get(i, -2.0):
                best[i] = s
        return _ranked(best.items(), k)

    def _passage_hits(self, q: np.ndarray, k: int, nf: NormFilters) -> builtins.list[tuple[str, float]]:
        """The ``k`` facts (that ``nf`` lets through) whose best passage is nearest ``q``, with that
        cosine. An exact scan: passages belong to long facts only, so they are few."""
        if self._pass_stack is None:
            order = sorted(self._pass)
            mats = [self._pass[r] for r in order]
            stacked = np.concatenate(mats).astype(np.float32)
            stacked /= np.linalg.norm(stacked, axis=1, keepdims=True)
            self._pass_stack = (stacked, np.asarray(order, np.int64),
                                np.cumsum([0] + [m.shape[0] for m in mats[:-1]]))
        mat, rows, starts = self._pass_stack
        allowed = self.row_mask(nf)[rows]
        if not allowed.any():
            return []
        qn = np.asarray(q, np.float32) / np.float32(np.linalg.norm(q))
        best = np.maximum.reduceat(mat @ qn, starts)[allowed]
        owners = rows[allowed]
        if best.shape[0] > k:
            keep = np.argpartition(-best, k - 1)[:k]
            best, owners = best[keep], owners[keep]
        ids = self._row_ids
        return [(ids[int(r)], float(s)) for r, s in zip(owners, best)]

    def load_passages(self, by_id: dict[str, np.ndarray]) -> None:
        """Passage vectors read at open (ids of facts not stored, or without a vector, are skipped)."""
        for eid, mat in by_id.items():
            row = self._row_of.get(eid)
            if row is not None and self._has_vec[row]:
                self._pass[row] = mat
        self._pass_stack = None

    def search_text(self, terms: Sequence[str], k: int, nf: NormFilters) -> builtins.list[tuple[str, float]]:
        scorer = self._text_scorer(terms, k, nf)
        return [] if scorer is None else self._text_hits(scorer.run(), k)

    def _text_scorer(self, terms: Sequence[str], k: int, nf: NormFilters) -> Any:
        """The BM25 kernel call of a keyword search, ready to run (None: nothing can match)."""
        if not terms or nf.empty or self._n_alive == 0:
            return None
        return self._postings.scorer(terms, self._n_alive, self._total_len / self._n_alive,
                                     self._doc_len[: self._n], self.row_mask(nf), k, self._id_key)

    def _text_hits(self, scored: tuple[np.ndarray, np.ndarray], k: int) -> builtins.list[tuple[str, float]]:
        cand, scores = scored
        if cand.shape[0] == 0:
            return []
        # the k best by (score, id): the kernel ranks by (score, id-order key) and keeps every
        # row sharing the k-th's key too; those few are ordered by the ids themselves
        sel = top_by_score_then_key(scores, self._id_key[cand], k)
        ids = self._row_ids
        out = [(ids[r], s) for r, s in zip(cand[sel].tolist(), scores[sel].tolist())]
        return by_score_then_id(out)[:k]

    def search_content(self, qs: Sequence[np.ndarray | None], terms: Sequence[Sequence[str]], k: int,
                       nf: NormFilters) -> builtins.list[tuple[builtins.list[tuple[str, float]] | None,
                                                               builtins.list[tuple[str, float]]]]:
        """For each query, (:meth:`search_vector` of its vector — None when it has none —,
        :meth:`search_text` of its terms), each answer the same as its own call's. The keyword
        kernels run on the helper thread while the vectors are searched here (:mod:`._overlap`),
        when they read at least ``OVERLAP_POSTINGS_MIN`` postings."""
        scorers = [self._text_scorer(t, k, nf) for t in terms]
        with_vec = [q for q in qs if q is not None]

        def vectors() -> builtins.list[builtins.list[tuple[str, float]]]:
            if len(with_vec) == 1:
                return [self.search_vector(with_vec[0], k, nf)]
            return self.search_vector_many(np.stack(with_vec), k, nf) if with_vec else []

        def keywords() -> builtins.list[tuple[np.ndarray, np.ndarray] | None]:
            return [None if s is None else s.run() for s in scorers]

        work = sum(s.postings for s in scorers if s is not None)
        if with_vec and work >= OVERLAP_POSTINGS_MIN:
            scored, by_vec = beside(keywords, vectors)
        else:
            scored, by_vec = keywords(), vectors()
        found = iter(by_vec)
        return [(None if q is None else next(found), [] if sc is None else self._text_hits(sc, k))
                for q, sc in zip(qs, scored)]

    # --- bulk load and the vector index -------------------------------------------------
    def bulk_load(self, rows: "LoadedRows") -> None:
        """Replace everything with column data read in bulk (see :class:`LoadedRows`). Entity
        objects are built on first use. The vector index is left unset (see adopt_index)."""
        n = len(rows.ids)
        self._reset_rows(n + 16)
        self.index = None
        self.version += 1
        self._n = n
        self._ents = [None] * n
        self._row_ids = list(rows.ids)
        self._row_of = dict(zip(rows.ids, range(n)))
        self._id_key[:n] = id_order_keys(self._row_ids) if rows.id_keys is None else rows.id_keys
        self._lazy = rows.materialise
        self._alive[:n] = True
        self._type[:n] = rows.type_codes
        self._created[:n] = rows.created
        self._has_event[:n] = rows.has_event
        self._event[:n] = rows.event
        self._valid_to[:n] = rows.valid_to
        self._doc_len[:n] = rows.doc_len
        self._n_alive = n
        self._total_len = int(rows.doc_len.sum()) if n else 0
        self._by_name = None  # made from the loaded names when first needed (see _by_name)
        self._names_loaded = rows.name_norm
        for key, (codes, vals) in rows.metadata.items():
            col = np.zeros(self._cap, np.int32)
            col[:n] = codes
            self._meta_codes[key] = col
            self._meta_vals[key] = dict(vals)
        self._postings.load(rows.terms, rows.term_offsets, rows.posting_rows, rows.posting_tfs)
        if rows.vectors is not None and self.dim is None:
            self.dim = int(rows.vectors.shape[1])
        if self.dim is not None:
            if rows.vectors is not None and n:
                self._vecs = rows.vectors[:n]  # may be read-only: copied on the first write (_own_vectors)
            else:
                self._vecs = np.zeros((self._cap, self.dim), np.float32)
        self._has_vec[:n] = rows.has_vec[:n]
        self._n_vecs = int(np.count_nonzero(rows.has_vec[:n]))
        if rows.vectors is None and self._n_vecs:
            if rows.fetch_vectors is None or self.dim is None:
                raise StorageError("bulk load without vectors needs fetch_vectors and a dimension")
            # the vector index has its own copy: the stored vectors are read when a row's is needed
            self._vec_pending[:n] = rows.has_vec[:n]
            self._fetch_vectors = rows.fetch_vectors

    # --- the keyword postings, for the keyword index cache file ----------------------------
    def export_postings(self) -> tuple[builtins.list[str | None], builtins.list[str], np.ndarray, np.ndarray,
                                       np.ndarray]:
        """(row ids, None for a dead row; terms, offsets, rows, tfs): the postings as CSR."""
        n = self._n
        ids = [i if a else None for i, a in zip(self._row_ids, self._alive[:n].tolist())]
        return (ids, *self._postings.export())

    def load_postings(self, terms: builtins.list[str], offsets: np.ndarray, rows: np.ndarray, tfs: np.ndarray) -> None:
        """Replace the postings (CSR over this cache's rows, e.g. read from the database)."""
        self._postings.load(terms, offsets, rows, tfs)
        self.version += 1

    def adopt_postings(self, ids: Sequence[str | None], terms: builtins.list[str], offsets: np.ndarray,
                       rows: np.ndarray, tfs: np.ndarray, changed_ids: Iterable[str], *,
                       check_sample: int = 4) -> bool:
        """Use postings saved from an earlier cache (its row ``i`` held ``ids[i]``), after dropping
        the entities written or forgotten since (``changed_ids``) and indexing the current text of
        those still here. False (postings left as they were) when they do not agree with the
        entities: every other live row's term frequencies must add up to its length, every other
        row's to nothing, and a sample of rows must hold exactly its entity's terms."""
        n = self._n
        changed = self._rows_of(changed_ids)
        pos_row = self._saved_rows(ids)
        if pos_row is None:  # the database returned the rows in the same order
            new_rows = rows
        else:
            new_rows = pos_row[rows] if rows.shape[0] else np.zeros(0, np.int64)
        drop = new_rows < 0
        if changed:
            drop |= np.isin(new_rows, np.asarray(changed, np.int64))
        if drop.any():
            keep = ~drop
            term_of = np.repeat(np.arange(len(terms)), np.diff(offsets))[keep]
            kept = np.bincount(term_of, minlength=len(terms))
            live_terms = np.flatnonzero(kept)
            terms = [terms[t] for t in live_terms.tolist()]
            offsets = np.zeros(len(terms) + 1, np.int64)
            np.cumsum(kept[live_terms], out=offsets[1:])
            new_rows, tfs = new_rows[keep], tfs[keep]
        sums = np.bincount(new_rows, weights=tfs, minlength=n)[:n] if n else np.zeros(0)
        expect = np.where(self._alive[:n], self._doc_len[:n], 0.0)
        expect[changed] = 0.0
        if sums.shape[0] != n or not np.array_equal(sums, expect):
            return False
        sample = np.flatnonzero(expect > 0)
        if sample.shape[0]:
            rng = random.Random(n)
            # (indices drawn from a range: the same rows as sampling the list of 100k rows, unmade)
            for r in sample[rng.sample(range(sample.shape[0]), min(check_sample, sample.shape[0]))].tolist():
                at = np.flatnonzero(new_rows == r)
                held = {terms[t]: int(f) for t, f in zip((np.searchsorted(offsets, at, side="right") - 1).tolist(),
                                                         tfs[at].tolist())}
                e = self._ent(r)
                if held != document_terms(e.name, e.content)[0]:
                    return False
        if changed:  # the current text of the entities written since the save
            docs = [(r, document_terms(e.name, e.content)[0]) for r, e in ((r, self._ent(r)) for r in changed)]
            terms, offsets, new_rows, tfs = csr_add_docs(terms, offsets, new_rows, tfs, docs)
        self._postings.load(terms, offsets, new_rows, tfs)
        self.version += 1
        return True

    def _rows_of(self, ids: Iterable[str]) -> builtins.list[int]:
        """The rows of those of ``ids`` this cache holds, ascending, once each."""
        get = self._row_of.get
        return sorted({r for r in map(get, ids) if r is not None})

    def _saved_rows(self, ids: Sequence[str | None]) -> np.ndarray | None:
        """Row of a saved cache (its row ``i`` held ``ids[i]``, None: dead) -> row here (-1: none);
        None when they are this cache's rows in this order (the usual reopen)."""
        if len(ids) == self._n and ids == self._row_ids:  # (a SavedIds compares its text: SavedIds.same_as)
            return None
        return np.fromiter(map(self._row_of.get, ids, itertools.repeat(-1)), np.int64, len(ids))  # type: ignore[arg-type]

    # --- the metadata codes, for the keyword index cache file -------------------------------
    def export_metadata(self) -> dict[str, tuple[np.ndarray, builtins.list[tuple[str, str]]]]:
        """Per metadata key (``meta:<key>``): its code per row (0: absent, and for a dead row) and
        its values in code order (code 1 first)."""
        n = self._n
        out = {}
        for key, vals in self._meta_vals.items():
            if key.startswith("meta:"):
                order = sorted(vals.items(), key=lambda kv: kv[1])
                if [c for _, c in order] != builtins.list(range(1, len(order) + 1)):
                    continue  # codes not 1, 2, ... (the file keeps values by position): left out, and
                    # the next open, whose key counts then disagree, reads the codes from the database
                out[key] = (self._meta_codes[key][:n], [v for v, _ in order])
        return out

    def load_metadata(self, codes: dict[str, tuple[np.ndarray, dict[Any, int]]]) -> None:
        """Set the metadata keys' codes (per row) and values (value -> code), e.g. read from the database."""
        n = self._n
        for key in [k for k in self._meta_codes if k.startswith("meta:")]:
            del self._meta_codes[key], self._meta_vals[key]
        for key, (col, vals) in codes.items():
            full = np.zeros(self._cap, np.int32)
            full[:n] = col[:n]
            self._meta_codes[key] = full
            self._meta_vals[key] = dict(vals)
        self._masks.clear()
        self.version += 1

    def adopt_metadata(self, ids: Sequence[str | None], saved: dict[str, tuple[np.ndarray, builtins.list[tuple[str, str]]]],
                       counts: dict[str, int], changed_ids: Iterable[str], *, check_sample: int = 4) -> bool:
        """Use metadata codes saved from an earlier cache (its row ``i`` held ``ids[i]``): the saved
        rows' codes, and for the entities written or forgotten since (``changed_ids``) their current
        metadata. False (codes left as they were) when they do not agree with the entities: every
        live row must be a saved one or a changed one, each key must be set on as many rows as
        ``counts`` (the stored rows per key) says, and a sample of rows must hold exactly its
        entity's metadata."""
        n = self._n
        pos_row = self._saved_rows(ids)
        changed = self._rows_of(changed_ids)
        covered = np.zeros(n, bool)
        if pos_row is None:
            covered[:] = True
        else:
            covered[pos_row[pos_row >= 0]] = True
        covered[changed] = True
        if not covered[self._alive[:n]].all():
            return False
        out: dict[str, tuple[np.ndarray, dict[Any, int]]] = {}
        for key, (col, values) in saved.items():
            if col.shape[0] != len(ids):
                return False
            codes = np.zeros(n, np.int32)
            if pos_row is None:
                codes[:] = col[:n]
            else:
                keep = pos_row >= 0
                codes[pos_row[keep]] = col[keep]
            codes[changed] = 0
            out[key] = (codes, {v: c + 1 for c, v in enumerate(values)})
        for r in changed:  # the current metadata of the entities written since the save
            if not self._alive[r]:
                continue
            for key, v in coded_values(self._ent(r)):
                if key.startswith("meta:"):
                    codes, vals = out.setdefault(key, (np.zeros(n, np.int32), {}))
                    codes[r] = vals.setdefault(v, len(vals) + 1)
        for key, (codes, _) in out.items():
            codes[~self._alive[:n]] = 0
        got = {k: int(np.count_nonzero(c)) for k, (c, _) in out.items()}
        if {k: c for k, c in got.items() if c} != {k: c for k, c in counts.items() if c}:
            return False
        live = np.flatnonzero(self._alive[:n])
        if live.shape[0]:
            rng = random.Random(n)
            for r in live[rng.sample(range(live.shape[0]), min(check_sample, live.shape[0]))].tolist():
                want = {k: v for k, v in coded_values(self._ent(r)) if k.startswith("meta:")}
                held = {k: int(codes[r]) for k, (codes, _) in out.items() if codes[r]}
                if held.keys() != want.keys() or any(out[k][1].get(v) != held[k] for k, v in want.items()):
                    return False
        self.load_metadata(out)
        return True

    def _vector_rows(self) -> tuple[np.ndarray, builtins.list[str]]:
        rows = np.flatnonzero(self._has_vec[: self._n])
        ids = self._row_ids
        if rows.shape[0] == len(ids):  # every row has a vector (the usual case): the ids as they are
            return rows, ids
        return rows, [ids[r] for r in rows.tolist()]

    def _map_slots(self, rows: np.ndarray, slots: np.ndarray) -> None:
        self._row_slot[:] = -1
        cap = max(int(self.index.capacity) if self.index is not None else 0, int(slots.max(initial=-1)) + 1, 1)
        self._slot_row = np.full(cap, -1, np.int64)
        if rows.shape[0]:
            self._slot_row[slots] = rows
            self._row_slot[rows] = slots

    def rebuild_index(self) -> None:
        """A fresh vector index from the cached vectors."""
        self.index = None
        self.version += 1
        self._row_slot[:] = -1
        self._slot_row = np.full(0, -1, np.int64)
        if self.dim is None:
            return
        self.index = self._index_factory(self.dim)
        rows, ids = self._vector_rows()
        if rows.shape[0] == 0:
            return
        self._unpend_vectors()
        vecs = self._vecs
        assert vecs is not None
        # every row has a vector (the usual case): a view, not a copy of the whole matrix
        mat = vecs[: rows.shape[0]] if rows.shape[0] == self._n else vecs[rows]
        slots = np.asarray(self.index.add(ids, mat), np.int64)
        self._map_slots(rows, slots)

    def adopt_index(self, index: Any, changed_ids: Iterable[str], *, check_sample: int = 32) -> bool:
        """Use a loaded index after replaying ``changed_ids`` (ids written since it was saved).
        Returns False (and leaves no index) when it does not agree with the cached vectors:
        a different count, an id missing, or a sampled vector pointing elsewhere."""
        if self.dim is None or int(index.dim) != self.dim:
            return False
        add_ids, drop_ids = [], []
        for eid in sorted(set(changed_ids)):
            if self.has_vector(eid):
                add_ids.append(eid)
            elif index.slot_of(eid) >= 0:
                drop_ids.append(eid)
        if add_ids:
            add_rows = [self._row_of[i] for i in add_ids]
            self._load_vectors(add_rows)
            index.add(add_ids, np.stack([self._vec(r) for r in add_rows]))  # type: ignore[misc]
        if drop_ids:
            index.remove(drop_ids)
        if len(index) != self._n_vecs:
            return False
        rows, ids = self._vector_rows()
        slots = index.slots_of(ids)
        if slots.shape[0] and int(slots.min()) < 0:
            return False
        if rows.shape[0]:
            rng = random.Random(len(ids))
            picks = rng.sample(range(len(ids)), min(check_sample, len(ids)))
            self._load_vectors(rows[picks].tolist())
            for k in picks:
                got = index.get_vector(ids[k])
                if got is None or not _same_direction(np.asarray(got, np.float32), self._vec(int(rows[k]))):  # type: ignore[arg-type]
                    return False
        self.index = index
        self._map_slots(rows, slots)
        self.version += 1
        return True


@dataclass
class LoadedRows:
    """Everything :meth:`EntityCache.bulk_load` needs, as columns (row i = ``ids[i]``).

    ``materialise(i)`` builds row i's Entity (without embedding) when first needed. ``vectors``
    may be None with ``has_vec`` set: then each row's vector is read by ``fetch_vectors`` when
    first needed (a reopen with a valid vector index cache needs none of them to search).
    ``metadata`` maps each key to (int32 value codes per row, 0 = absent; (type tag,
    canonical text) -> code). Postings are CSR: term i owns
    ``posting_rows[term_offsets[i]:term_offsets[i + 1]]`` (and the same slice of ``posting_tfs``).
    """

    ids: list[str]
    #: the normalised names (or a function returning them: called when a name index is first needed)
    name_norm: list[str] | Callable[[], list[str]]
    type_codes: np.ndarray
    created: np.ndarray
    has_event: np.ndarray
    event: np.ndarray
    valid_to: np.ndarray
    doc_len: np.ndarray
    vectors: np.ndarray | None
    has_vec: np.ndarray
    metadata: dict[str, tuple[np.ndarray, dict[tuple[str, str], int]]]
    terms: list[str]
    term_offsets: np.ndarray
    posting_rows: np.ndarray
    posting_tfs: np.ndarray
    materialise: Callable[[int], Entity] = field(repr=False, default=None)  # type: ignore[assignment]
    #: with ``vectors`` None: ``fetch_vectors(ids) -> (ids, matrix)`` reads stored vectors on demand
    fetch_vectors: Callable[[list[str]], tuple[list[str], np.ndarray]] | None = field(repr=False, default=None)
    #: :func:`id_order_keys` of ``ids`` when the loader has them (else computed from ``ids``)
    id_keys: np.ndarray | None = field(repr=False, default=None)
    #: the loader's own key per row (DuckDB's rowid), for what it reads later about the same rows
    row_keys: np.ndarray | None = field(repr=False, default=None)


#: the keyword kernels go to the helper thread (:mod:`._overlap`) only when they read this many
#: postings in all: below, the hand-off costs about what it would save (~25 us of kernel)
OVERLAP_POSTINGS_MIN = 5_000


def _name_add(by_name: dict[str, int | set[int]], name: str, row: int) -> None:
    """File ``row`` under ``name`` in a name map (a name's one row, or the set of its rows)."""
    cur = by_name.get(name)
    if cur is None:
        by_name[name] = row
    elif isinstance(cur, set):
        cur.add(row)
    elif cur != row:
        by_name[name] = {cur, row}


def _ranked(res: Iterable[tuple[Any, Any]], k: int) -> builtins.list[tuple[str, float]]:
    """An index's hits as (id, score), score descending then id, at most ``k``."""
    return by_score_then_id([(str(i), float(s)) for i, s in res])[:k]


def id_order_keys(ids: Sequence[str]) -> np.ndarray:
    """uint64 keys in id order: the first 8 bytes of each id's UTF-8, big-endian, zero-padded.
    UTF-8 byte order is code point order (Python's ``str`` order), so ``key(a) < key(b)`` implies
    ``a < b``; equal keys say nothing (the ids are compared themselves). (A bulk load has its ids
    in Arrow: :func:`id_order_keys_arrow`.)"""
    raw = np.array([i.encode("utf-8", "surrogatepass")[:8] for i in ids], dtype="S8")
    return raw.view(">u8").astype(np.uint64) if raw.shape[0] else np.zeros(0, np.uint64)


def id_order_keys_arrow(arr: Any) -> np.ndarray:
    """:func:`id_order_keys` of an Arrow string array (or chunked array) without nulls, vectorised."""
    import pyarrow as pa  # type: ignore[import-untyped]

    n = len(arr)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type == pa.large_string():
        arr = arr.cast(pa.string())
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    if n == 0:
        return np.zeros(0, np.uint64)
    at = offsets[:-1, None] + np.arange(8)
    short = (offsets[1:] - offsets[:-1]) < 8
    if short.any():  # ids under 8 bytes: zero-padded
        at[short] = np.minimum(at[short], offsets[1:][short, None])
        data = np.append(data[: offsets[-1]], np.zeros(1, np.uint8))
        end = at == offsets[1:, None]
        at[end] = data.shape[0] - 1
    head = np.ascontiguousarray(data[at])
    return head.view(">u8").reshape(n).astype(np.uint64)


def _same_direction(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    na = float(np.linalg.norm(a))
    nb = float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return False
    return float(np.dot(a / na, b / nb)) > 1.0 - 1e-5
