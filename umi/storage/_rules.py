"""Write rules of the storage contract that both kinds of backend apply, written once.

:class:`~umi.storage.cached.CachedStore` applies them to what it holds in process,
:class:`~umi.storage.postgres.PostgresStorageBackend` to rows it read in its transaction under
its locks. The functions are pure (what a write read in, what it changes out); :class:`SharedWrites`
holds the public write methods that are the same over both, each backend supplying
``_set_validity`` and ``_edit_core`` (read, apply the rule, write, in its own transaction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..types import CoreBlockRecord, CoreHistoryRecord, CoreOp, Entity, Scope, check_scope
from ._common import check_core_block, check_core_name, check_id, check_time, clone_entity, snapshot_of
from .base import HistoryOp, HistoryRecord

__all__ = ["SharedWrites", "core_change", "history_record", "upsert_entry", "validity_change"]

#: the public method of each core-block edit (the name its errors and injected faults carry)
CORE_METHODS: dict[CoreOp, str] = {"set": "set_core_block", "remove": "remove_core_block", "clear": "clear_core_blocks"}


def history_record(last_seq: int, eid: str, op: HistoryOp, at: int, snapshot: dict[str, Any],
                   scope: Scope) -> HistoryRecord:
    """The record a write appends to the history of ``eid``, whose last record is ``last_seq`` (0:
    none): numbered ``last_seq + 1``. A forget's ``snapshot`` is the entity's
    :func:`~umi.storage.base.tombstone` (as every earlier record of it becomes), its ``scope``
    :data:`~umi.storage.base.TOMBSTONE_SCOPE`; any other write's is
    :func:`snapshot_of` the entity after it, in its scope."""
    return HistoryRecord(eid, last_seq + 1, op, at, snapshot, scope)


def upsert_entry(e: Entity, existed: bool) -> tuple[str, HistoryOp, int, dict[str, Any], Scope]:
    """What an upsert of ``e`` records (:func:`history_record`'s arguments but the seq): ``"update"``
    of a stored id, else ``"create"``, at its ``updated_at``."""
    return e.id, "update" if existed else "create", e.updated_at, snapshot_of(e), e.scope


def validity_change(old: Entity, valid_to: int | None, at: int) -> Entity | None:
    """Supersede (``valid_to`` set) a current entity or revive (``None``) a superseded one at ``at``:
    its new state (``updated_at`` becomes ``max(updated_at, at)``; no embedding), or None when it is
    in that state already (no change, no history)."""
    if (old.valid_to is None) == (valid_to is None):
        return None
    new = clone_entity(old, None)
    new.valid_to = valid_to
    new.updated_at = max(old.updated_at, at)
    return new


def core_change(sc: Scope, blocks: Sequence[CoreBlockRecord], last_seq: int, op: CoreOp, at: int, name: str = "",
                content: str | None = None, importance: float | None = None
                ) -> tuple[list[CoreBlockRecord], CoreHistoryRecord] | None:
    """The blocks of core scope ``sc`` (``blocks``, in position order) after ``op``, and the core
    history record it appends (seq ``last_seq + 1``): ``"set"`` gives block ``name`` ``content`` and
    ``importance`` (an existing name keeps its position, a new one goes at the end), ``"remove"``
    drops block ``name`` and ``"clear"`` every block (later blocks move up: positions stay 0..n-1).
    None when it changes nothing (a remove of an absent name, a clear of no blocks): no record."""
    if op == "set":
        assert content is not None and importance is not None
        pos = next((i for i, b in enumerate(blocks) if b.name == name), len(blocks))
        out = [*blocks[:pos], CoreBlockRecord(name, content, importance, pos), *blocks[pos + 1:]]
    else:
        out = [CoreBlockRecord(b.name, b.content, b.importance, i)
               for i, b in enumerate(b for b in blocks if op == "remove" and b.name != name)]
        if len(out) == len(blocks):
            return None
    return out, CoreHistoryRecord(sc, name, last_seq + 1, op, at, content, importance)


class SharedWrites:
    """The public writes whose checks and rules are the same over every backend."""

    def _set_validity(self, eid: str, valid_to: int | None, at: int, op: HistoryOp) -> bool:  # pragma: no cover
        """Apply :func:`validity_change` to stored entity ``eid`` with a history record ``op``; False
        when it is absent or unchanged."""
        raise NotImplementedError

    def _edit_core(self, sc: Scope, op: CoreOp, at: int, name: str = "", content: str | None = None,
                   importance: float | None = None) -> int:  # pragma: no cover
        """Apply :func:`core_change` to the stored blocks of ``sc`` and store its result; returns
        how many blocks there were before (0 when nothing changed)."""
        raise NotImplementedError

    def supersede(self, entity_id: str, valid_to: int) -> bool:
        eid = check_id(entity_id)
        vt: int = check_time(valid_to, "valid_to")  # type: ignore[assignment]  # never None here
        return self._set_validity(eid, vt, vt, "supersede")

    def revive(self, entity_id: str, at: int) -> bool:
        eid = check_id(entity_id)
        when: int = check_time(at, "at")  # type: ignore[assignment]  # never None here
        return self._set_validity(eid, None, when, "revive")

    def set_core_block(self, scope: Scope, name: str, content: str, importance: float, at: int) -> None:
        sc = check_scope(scope).core  # type: ignore[union-attr]
        name, content, imp, when = check_core_block(name, content, importance, at)
        self._edit_core(sc, "set", when, name, content, imp)

    def remove_core_block(self, scope: Scope, name: str, at: int) -> bool:
        sc = check_scope(scope).core  # type: ignore[union-attr]
        name = check_core_name(name)
        when: int = check_time(at, "at")  # type: ignore[assignment]  # never None here
        return bool(self._edit_core(sc, "remove", when, name))

    def clear_core_blocks(self, scope: Scope, at: int) -> int:
        sc = check_scope(scope).core  # type: ignore[union-attr]
        when: int = check_time(at, "at")  # type: ignore[assignment]  # never None here
        return self._edit_core(sc, "clear", when)
