"""The update pipeline: a user's correction of one fact.

``update(entity_id, content)`` keeps the old fact (superseded, with its history) and
stores the corrected one beside it: same type, name, metadata, importance, event time and
scope as the old fact, the new content, confidence 1, a fresh embedding, and an ``update``
relation from the old fact to the new one. The other facets of the same statement (facts
of the same source with the same content) are superseded with it, as ``remember`` does.
The correction text is kept as a source of the fact's scope. One transaction.
"""

from __future__ import annotations

import numpy as np

from ..errors import UmiError, ValidationError
from ..storage.base import Source
from ..types import Entity, EvolutionRelation, EvolutionType, RememberResult
from .context import PipelineContext, provider_failure
from .remember import _commit, _siblings

__all__ = ["update"]

CORRECTION_REASON = "corrected by the user"


async def update(ctx: PipelineContext, entity_id: str, content: str) -> RememberResult:
    """Supersede the current fact ``entity_id`` by ``content`` (validated). The caller holds the
    write lock. Raises ValidationError when this view has no current fact with that id."""
    old = await ctx.io(ctx.storage.get, entity_id)
    if old is None or not ctx.sees(old.scope):
        raise ValidationError(f"no fact with id {entity_id!r} in this memory's scope")
    if old.valid_to is not None:
        raise ValidationError(f"fact {entity_id!r} was superseded at {old.valid_to}; update the current fact")
    now = ctx.now_ms()
    source = Source.for_text(content, now, None, scope=old.scope)
    result = RememberResult(source_id=source.id)
    new = Entity(entity_type=old.entity_type, name=old.name, content=content, metadata=dict(old.metadata),
                 importance=old.importance, confidence=1.0, created_at=now, updated_at=now,
                 event_time=old.event_time, source_id=source.id, scope=old.scope)
    if new.id == old.id:
        result.warnings.append("the new content states the same fact; nothing changed")
        return result
    if ctx.embedder is not None:
        try:
            (vec,) = await ctx.embed([new.text_for_embedding()], "passage")
            new.embedding = np.ascontiguousarray(vec)
        except UmiError as exc:
            result.warnings.append(f"embedding failed, stored without a vector (keyword search still works): "
                                   f"{provider_failure(exc)}")

    def plan() -> tuple[Entity | None, bool, list[Entity]]:
        return (ctx.storage.get(new.id), ctx.storage.get_source(source.id) is not None,
                _siblings(ctx, old.id, {old.id}, {}))

    known, have_source, siblings = await ctx.io(plan)
    if known is not None and known.valid_to is not None:
        raise ValidationError(f"the corrected fact is stored already and was superseded (id {new.id}); "
                              "remember it again to make it current")
    if known is not None:  # the correction is a fact already current: link to it, store nothing new
        new = known
        result.warnings.append("the corrected fact was already stored; the old fact now points to it")
    relations = [EvolutionRelation(old.id, new.id, EvolutionType.UPDATE, CORRECTION_REASON, 1.0,
                                   created_at=now, scope=old.scope)]
    relations += [EvolutionRelation(s.id, new.id, EvolutionType.UPDATE,
                                    f"same statement as corrected fact {old.id}", 1.0, created_at=now,
                                    scope=old.scope) for s in siblings]
    supersede = [(old.id, now)] + [(s.id, now) for s in siblings]
    await ctx.io(_commit, ctx, [] if known is not None else [new], relations, supersede, [] if have_source else [source])
    result.entities = [new]
    result.evolutions = relations
    return result
