"""The update pipeline: a user's correction of one fact.

``update(entity_id, content)`` keeps the old fact (superseded, with its history) and
stores the corrected one beside it: same type, name, metadata, importance, event time and
scope as the old fact, the new content, confidence 1, a fresh embedding, and an ``update``
relation from the old fact to the new one. The other facets of the old fact's statement
(same source, same content) are superseded with it, as ``remember`` does. The correction
text is kept as a source of the fact's scope. One transaction, under the write lock.
"""

from __future__ import annotations

from ..errors import EmbeddingError, ProviderError, ValidationError
from ..storage.base import Source
from ..types import Entity, EvolutionRelation, EvolutionType, RememberResult
from .context import PipelineContext, provider_failure
from .passages import embed_entities
from .remember import Changes, _facets, commit

__all__ = ["update", "CORRECTION_REASON"]

CORRECTION_REASON = "corrected by the user"


def _current(ctx: PipelineContext, entity_id: str) -> Entity:
    old = ctx.storage.get(entity_id)
    if old is None or (ctx.scope is not None and not ctx.scope.contains(old.scope)):
        raise ValidationError(f"no fact with id {entity_id!r} in this memory's scope")
    if old.valid_to is not None:
        raise ValidationError(f"fact {entity_id!r} was superseded at {old.valid_to}; update the current fact")
    return old


async def update(ctx: PipelineContext, entity_id: str, content: str) -> RememberResult:
    """Supersede the current fact ``entity_id`` by ``content`` (validated). Raises ValidationError
    when this view has no current fact with that id. Takes the write lock itself."""
    old = await ctx.io(_current, ctx, entity_id)
    now = ctx.now_ms()
    source = Source.for_text(content, now, None, scope=old.scope)
    result = RememberResult(source_id=source.id)
    new = Entity(entity_type=old.entity_type, name=old.name, content=content, metadata=dict(old.metadata),
                 importance=old.importance, confidence=1.0, created_at=now, updated_at=now,
                 event_time=old.event_time, source_id=source.id, scope=old.scope)
    if new.id == old.id:
        result.source_id = None
        result.warnings.append("the new content states the same fact; nothing changed")
        return result
    if ctx.embedder is not None:
        try:
            await embed_entities(ctx, [new])
        except (EmbeddingError, ProviderError) as exc:
            result.warnings.append(f"embedding failed, stored without a vector (keyword search still works): "
                                   f"{provider_failure(exc)}")

    def apply() -> Entity:
        cur = _current(ctx, entity_id)  # again, under the lock: another writer may have moved it
        known = ctx.storage.get(new.id)
        if known is not None and known.valid_to is not None:
            raise ValidationError(f"the corrected fact is stored already and was superseded (id {new.id}); "
                                  "remember it again to make it current")
        target = known if known is not None else new
        facets = _facets(ctx, cur)
        ch = Changes(entities=[] if known is not None else [new], source=None if known is not None else source)
        ch.supersede = [cur.id, *(f.id for f in facets)]
        ch.relations = [EvolutionRelation(cur.id, target.id, EvolutionType.UPDATE, CORRECTION_REASON, 1.0,
                                          created_at=now, scope=target.scope)]
        ch.relations += [EvolutionRelation(f.id, target.id, EvolutionType.UPDATE,
                                           f"same statement as corrected fact {cur.id}", 1.0, created_at=now,
                                           scope=target.scope) for f in facets]
        commit(ctx, ch, now, None)
        result.evolutions = ch.relations
        return target

    async with ctx.write_lock:
        target = await ctx.io(apply)
    if target is not new:
        result.source_id = None
        result.warnings.append("the corrected fact was already stored; the old fact now points to it")
    result.entities = [target] if target is new else []
    return result
