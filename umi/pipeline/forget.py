"""The forget pipeline: a statement, a source, or every fact a filter matches.

Forgetting is storage's ``delete`` (row, vector, postings, history snapshots → tombstones,
relations, and the source text once no fact comes from it) plus one rule that lives here,
about a fact the forgotten facts had superseded (a relation of a superseding kind at
``confidence >= MemoryConfig.supersede_confidence`` from it to a forgotten fact):

* If the forgotten fact was **current** (the end of its chain), or every fact that replaced it
  is forgotten too, the older fact is **revived** — unless another fact that is still stored
  supersedes it too.
* If the forgotten fact had itself been replaced by a fact that **stays** (following
  replacements of replacements, through facts forgotten in the same call), the older fact
  stays superseded, and the chain is kept: a superseding relation (the kind and confidence of
  the one that retired it) links it to each current fact at the end of the chain. Acme →
  Initech, Acme told again (Initech retired), Acme corrected to Globex, Acme forgotten:
  Globex stays the one current fact, Initech → Globex; forgetting Globex later revives
  Initech.

``forget(entity_id)`` forgets the *statement* the fact states: recall shows the facets of
one sentence (same source, same content) as one result, so forgetting that result removes
every facet, or the sentence would come back under another name.

Each call is one read (in the caller's I/O hop) and one transaction, under the write lock.
"""

from __future__ import annotations

import uuid
from typing import Iterable

from ..storage.base import SearchFilters
from ..types import UMI_NAMESPACE, Entity, EvolutionRelation
from .context import PipelineContext
from .remember import replacements, statement_key

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


def _supersedes(ctx: PipelineContext, rel: EvolutionRelation) -> bool:
    return rel.evolution_type.supersedes and rel.confidence >= ctx.config.supersede_confidence


def _relink(rel: EvolutionRelation, gone: Entity, to: Entity, at: int) -> EvolutionRelation:
    """``rel.source_id`` stays superseded by ``to``: the fact between them (``gone``) is forgotten.
    Its id carries the instant, like a restatement's."""
    rid = str(uuid.uuid5(UMI_NAMESPACE, f"relink\x1f{rel.source_id}\x1f{to.id}\x1f{at}"))
    return EvolutionRelation(rel.source_id, to.id, rel.evolution_type,
                             f"kept superseded: {gone.id}, which had replaced it and was replaced by this, "
                             "was forgotten", rel.confidence, id=rid, created_at=at,
                             scope=to.scope)  # a relation lives in its newer fact's scope


def forget_ids(ctx: PipelineContext, ids: Iterable[str], at: int, *, source_id: str | None = None) -> int:
    """Forget these facts in one transaction; revive what only they had superseded when the chain
    ended with them, or re-link it to the facts that replaced them (the module's rule).
    ``source_id``: also drop that source row (``forget_source`` of a text with no facts left).
    Returns how many facts were forgotten. The caller holds the write lock."""
    gone = ctx.storage.get_many(sorted(set(ids)))
    gone_ids = {e.id for e in gone}
    # Facts these had superseded: by which relations, to which forgotten fact.
    older: dict[str, list[tuple[EvolutionRelation, Entity]]] = {}
    for e in gone:
        for r in ctx.storage.relations_for(e.id):
            if r.target_id == e.id and r.source_id not in gone_ids and _supersedes(ctx, r):
                older.setdefault(r.source_id, []).append((r, e))
    after: dict[str, list[Entity]] = {}  # forgotten superseded fact -> the current facts that stay at its chain's end

    def staying(e: Entity) -> list[Entity]:
        if e.valid_to is None:
            return []
        if e.id not in after:
            after[e.id] = replacements(ctx, e.id, gone=gone_ids)
        return after[e.id]

    revive: list[str] = []
    relink: dict[str, EvolutionRelation] = {}
    for cid in sorted(older):
        c = ctx.storage.get(cid)
        if c is None or c.valid_to is None:
            continue
        kept = False
        for r, e in older[cid]:
            for s in staying(e):
                if s.id == cid:
                    continue
                kept = True
                if not any(x.source_id == cid and x.target_id == s.id and _supersedes(ctx, x)
                           for x in ctx.storage.relations_for(cid)):
                    rel = _relink(r, e, s, at)
                    relink.setdefault(rel.id, rel)
        if kept:
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
        if relink:
            ctx.storage.add_relations([relink[k] for k in sorted(relink)])
        if drop_source and source_id is not None and not ctx.storage.entity_ids_for_source(source_id):
            ctx.storage.delete_source(source_id)
    return len(gone)
