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
"""

from __future__ import annotations

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
