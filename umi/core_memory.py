"""Core memory: labelled blocks of text that are always rendered into the prompt.

The engine is the compiled class in :mod:`umi._native._arena`; this module adds
only what is not on the hot path (``repr``, ``blocks()``), without overriding
a compiled method.

Limits, in bytes of UTF-8: a label is 1-64 bytes of ``[A-Za-z0-9_.-]``; the
budget ``max_bytes`` (default 32 KiB, accepted 1 KiB-16 MiB) bounds the sum of
block contents. ``max_tokens`` is an optional second budget, counted by a
``tokenizer(content) -> int`` you pass or estimated as ``ceil(chars / 4)`` per
block. A write that would exceed either raises :class:`umi.CoreMemoryFullError`
(``.over_by``, ``.limit``) and leaves the memory as it was.

``render()`` lists the known labels ``system, persona, human, facts, goals,
scratch`` first, in that order, then the others in insertion order; replacing a
block keeps its place. XML escapes ``&``, ``<`` and ``>`` in content. Markdown
puts a backslash before whatever, at the start of a content line (after up to
three spaces), could open a block under CommonMark: a heading (``#``, a
``===``/``---`` underline), a container that could hold one (``>`` quotes,
``-``/``+``/``*`` bullets, ``1.``/``1)`` ordered markers), a fence, raw HTML, a
thematic break or a link reference definition — so content never renders as a
heading or a structure of its own (checked with a CommonMark parser). The same
state renders to the same string.

:class:`PersistentCoreMemory` (what ``Memory.core`` is) writes every change through to
the store before it returns; the arena stays the budgeted, rendered in-process copy.
"""

from __future__ import annotations

import threading
from typing import Protocol, Sequence

from ._native._arena import (
    CORE_MEMORY_LABEL_BYTES_MAX,
    CORE_MEMORY_MAX_BYTES_MAX,
    CORE_MEMORY_MAX_BYTES_MIN,
)
from ._native._arena import CoreMemory as _CompiledCoreMemory

__all__ = [
    "CORE_MEMORY_LABEL_BYTES_MAX",
    "CORE_MEMORY_MAX_BYTES_MAX",
    "CORE_MEMORY_MAX_BYTES_MIN",
    "KNOWN_LABELS",
    "CoreMemory",
    "PersistentCoreMemory",
]

#: Labels rendered first, in this order.
KNOWN_LABELS: tuple[str, ...] = ("system", "persona", "human", "facts", "goals", "scratch")


class CoreMemory(_CompiledCoreMemory):
    """Labelled text blocks under a byte budget, rendered into a prompt.

    >>> core = CoreMemory()
    >>> core.set_block("human", "Prefers short answers.", importance=0.9)
    >>> core.get_block("human")
    'Prefers short answers.'
    """

    __slots__ = ()

    def blocks(self) -> list[tuple[str, str, float]]:
        """``(label, content, importance)`` for every block, in render order."""
        out = []
        for label in self.labels():
            content = self.get_block(label)
            importance = self.get_importance(label)
            assert content is not None and importance is not None  # labels() just listed it
            out.append((label, content, importance))
        return out

    def __repr__(self) -> str:
        return (
            f"CoreMemory(blocks={len(self)}, used_bytes={self.used_bytes}, "
            f"max_bytes={self.max_bytes})"
        )


class BlockStore(Protocol):
    """Where a :class:`PersistentCoreMemory` keeps its blocks (one scope of one store)."""

    def load(self) -> Sequence[tuple[str, str, float]]:
        """``(label, content, importance)`` of every stored block, in insertion order."""

    def set(self, label: str, content: str, importance: float) -> None: ...

    def remove(self, label: str) -> bool: ...

    def clear(self) -> int: ...

    def stored(self) -> Sequence[tuple[str, str, float]]:
        """What :meth:`load` reads, inside a storage job already running (no check of its own)."""


class PersistentCoreMemory(CoreMemory):
    """A :class:`CoreMemory` whose writes go through to a store, each in its own transaction.

    ``set_block`` applies the write to the arena first (so a write over the budget raises
    :class:`umi.CoreMemoryFullError` and stores nothing), then stores it; if storing fails,
    the arena is put back and the storage error is raised. ``remove_block`` and ``clear``
    store first, then change the arena. Reads never touch the store. :meth:`reload` reads the
    store again (another process's writes, e.g. on Postgres). Thread-safe.
    """

    def _bind(self, store: BlockStore) -> "PersistentCoreMemory":
        self._store = store
        self._write_lock = threading.Lock()
        self._fill(store.load())
        return self

    def _fill(self, blocks: Sequence[tuple[str, str, float]]) -> None:
        trial = CoreMemory(self.max_bytes)  # a store over this budget fails here, leaving self as it was
        for label, content, importance in blocks:
            trial.set_block(label, content, importance)
        super().clear()
        for label, content, importance in blocks:
            super().set_block(label, content, importance)

    def reload(self) -> None:
        """Replace the in-process copy with what the store holds now."""
        with self._write_lock:
            self._fill(self._store.load())

    def _restored(self) -> None:
        """An import wrote this scope's stored blocks (the caller holds ``_write_lock``, and
        checked that they fit): read them again, inside the import's storage job."""
        self._fill(self._store.stored())

    def _forgotten(self) -> None:
        """The store forgot this scope's blocks (the caller holds ``_write_lock``): empty the
        arena to match, touching no store."""
        super().clear()

    def set_block(self, label: str, content: str, importance: float = 0.5) -> None:
        """Insert or replace block ``label`` (a replaced block keeps its position), and store it."""
        with self._write_lock:
            old_content, old_importance = (self.get_block(label), self.get_importance(label)) if label in self \
                else (None, None)
            super().set_block(label, content, importance)  # validates; over budget raises, nothing stored
            try:
                stored_importance = self.get_importance(label)
                assert stored_importance is not None
                self._store.set(label, content, stored_importance)
            except BaseException:
                if old_content is None or old_importance is None:
                    super().remove_block(label)
                else:
                    super().set_block(label, old_content, old_importance)
                raise

    def remove_block(self, label: str) -> bool:
        """Remove block ``label`` from the store and the arena; True if it existed."""
        with self._write_lock:
            if label not in self:
                super().remove_block(label)  # validates the label (raises InvalidLabelError)
                return False
            self._store.remove(label)
            return bool(super().remove_block(label))

    def clear(self) -> None:
        """Remove every block, from the store and the arena."""
        with self._write_lock:
            self._store.clear()
            super().clear()

    def __repr__(self) -> str:
        return (
            f"PersistentCoreMemory(blocks={len(self)}, used_bytes={self.used_bytes}, "
            f"max_bytes={self.max_bytes})"
        )
