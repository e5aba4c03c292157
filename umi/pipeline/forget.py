"""The forget pipeline: a statement, a source, or every fact a filter matches.

Forgetting is storage's ``delete`` (row, vector, postings, history snapshots → tombstones,
relations, and the source text once no fact comes from it) plus one rule that lives here:
a fact that the forgotten facts had superseded is **revived**, unless another fact that
is still stored supersedes it too (a relation of a superseding kind at
``confidence >= MemoryConfig.supersede_confidence``).

``forget(entity_id)`` forgets the *statement* the fact states: recall shows the facets of
one sentence (same source, same content) as one result, so forgetting that result removes
every facet, or the sentence would come back under another name.

Each call is one read (in the caller's I/O hop) and one transaction, under the write lock.
"""

from __future__ import annotations

from typing import Iterable

from ..storage.base import SearchFilters
from ..types import Entity
from .context import PipelineContext
from .remember import statement_key

__all__ = ["statement_ids", "source_ids", "filter_ids", "forget_ids"]

PAGE = 1000


def visible(ctx: PipelineContext, e: Entity) -> bool:
    """A view forgets only what it can see."""
    return ctx.sees(e.scope)


def statement_ids(ctx: PipelineContext, entity_id: str) -> list[str]:
    """``entity_id`` and the other facets of its statement (superseded ones too), or []."""
    e = ctx.storage.get(entity_id)
    if e is None or not visible(ctx, e):
        return []
    if e.source_id is None:
        return [e.id]
    key = statement_key(e)
    facets = ctx.storage.get_many(ctx.storage.entity_ids_for_source(e.source_id))
    return sorted({e.id, *(f.id for f in facets if statement_key(f) == key and visible(ctx, f))})


def source_ids(ctx: PipelineContext, source_id: str) -> list[str]:
    return [f.id for f in ctx.storage.get_many(ctx.storage.entity_ids_for_source(source_id)) if visible(ctx, f)]


def filter_ids(ctx: PipelineContext, filters: SearchFilters) -> list[str]:
    filters = ctx.within(filters)
    out: list[str] = []
    offset = 0
    while True:
        page = ctx.storage.list(filters, limit=PAGE, offset=offset)
        if not page:
            return out
        out.extend(e.id for e in page if visible(ctx, e))
        offset += len(page)


def _supersedes(ctx: PipelineContext, rel: object) -> bool:
    return bool(rel.evolution_type.supersedes  # type: ignore[attr-defined]
                and rel.confidence >= ctx.config.supersede_confidence)  # type: ignore[attr-defined]


def forget_ids(ctx: PipelineContext, ids: Iterable[str], at: int, *, source_id: str | None = None) -> int:
    """Forget these facts in one transaction and revive what only they had superseded.
    ``source_id``: also drop that source row (``forget_source`` of a text with no facts left).
    Returns how many facts were forgotten. The caller holds the write lock."""
    gone = ctx.storage.get_many(sorted(set(ids)))
    gone_ids = {e.id for e in gone}
    # Facts these had superseded, and whether anything that stays supersedes them too.
    revive: list[str] = []
    for cid in sorted({r.source_id for e in gone for r in ctx.storage.relations_for(e.id)
                       if r.target_id == e.id and r.source_id not in gone_ids and _supersedes(ctx, r)}):
        c = ctx.storage.get(cid)
        if c is None or c.valid_to is None:
            continue
        if not any(r.source_id == cid and r.target_id not in gone_ids and _supersedes(ctx, r)
                   for r in ctx.storage.relations_for(cid)):
            revive.append(cid)
    drop_source = source_id is not None and ctx.storage.get_source(source_id) is not None
    if not gone and not drop_source:
        return 0
    with ctx.storage.transaction():
        for e in gone:
            ctx.storage.delete(e.id, at)
        for cid in revive:
            ctx.storage.revive(cid, at)
        if drop_source and source_id is not None and not ctx.storage.entity_ids_for_source(source_id):
            ctx.storage.delete_source(source_id)
    return len(gone)
