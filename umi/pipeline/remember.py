"""The remember pipeline.

validate → exact-duplicate check (source hash) → extract (LLM, or rules) → embed all
new entities in one batch → for each new entity: find candidates (current facts with
the same name, nearest vectors) and classify the evolution (LLM, or rules) → one
transaction: entities, relations, supersession, history, source → result.

Degradation is reported in ``RememberResult.warnings``, never hidden: extraction
fails → the text is stored as one note; embedding fails → stored without vectors
(keyword search still finds them); evolution classification fails → stored without
relations; storage fails → ``StorageError`` and nothing half-written.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import numpy as np

from ..errors import EmptyTextError, ProviderError, TextTooLongError, UmiError
from ..options import RememberOptions
from ..storage.base import SearchFilters, Source
from ..types import Entity, EvolutionRelation, RememberResult, normalize_content
from . import schemas
from .context import PipelineContext, provider_failure
from .evolution import Candidate, EvolutionDecision, parse_evolution, rule_classify
from .extraction import ExtractedEntity, note_for, parse_extraction, rule_extract
from .time import resolve_event_time

__all__ = ["validate_text", "remember"]


def validate_text(text: object, max_bytes: int) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    if not text.strip():
        raise EmptyTextError("text to remember is empty or only whitespace")
    n = len(text.encode("utf-8"))
    if n > max_bytes:
        raise TextTooLongError(
            f"text is {n} UTF-8 bytes; the limit is {max_bytes} bytes", limit=max_bytes, actual=n
        )
    return text


async def _extract(ctx: PipelineContext, text: str, opts: RememberOptions,
                   result: RememberResult) -> list[ExtractedEntity]:
    if not opts.extract_entities:
        return [note_for(text)]
    if ctx.llm is None:
        found = rule_extract(text)
    else:
        try:
            data = await ctx.ask("extract_entities", schemas.extraction_prompt(text), result.usage)
            found = parse_extraction(data)
        except ProviderError as exc:
            result.warnings.append(f"extraction failed, stored the text as one note: {provider_failure(exc)}")
            return [note_for(text)]
    if not found:
        result.warnings.append("no entities found in the text; stored it as one note")
        return [note_for(text)]
    return found


def _build_entities(found: Sequence[ExtractedEntity], opts: RememberOptions, source_id: str,
                    now: int) -> list[Entity]:
    out: list[Entity] = []
    seen: set[str] = set()
    for f in found:
        e = Entity(
            entity_type=f.entity_type,
            name=f.name,
            content=f.content,
            metadata=dict(opts.metadata or {}),
            importance=opts.importance,
            confidence=f.confidence,
            created_at=now,
            updated_at=now,
            # when the caller gave no time, the text may: "yesterday", "on March 3rd", "in 2019"
            event_time=opts.event_time if opts.event_time is not None else resolve_event_time(f.content, now),
            source_id=source_id,
        )
        if e.id not in seen:
            seen.add(e.id)
            out.append(e)
    return out


def _candidates_for(ctx: PipelineContext, e: Entity) -> list[Candidate]:
    """Current facts that a new entity may update: same name first, then nearest vectors."""
    cap = ctx.config.evolution_candidates
    if cap == 0:
        return []
    current = SearchFilters()
    same = [c for c in ctx.storage.find_by_name(e.name, filters=current) if c.id != e.id]
    same.sort(key=lambda c: (-c.created_at, c.id))
    picked = {c.id: c for c in same[:cap]}
    if e.embedding is not None and len(picked) < cap:
        for cid, score in ctx.storage.search_vector(e.embedding, cap, current):
            if cid != e.id and cid not in picked and score >= ctx.config.evolution_similarity:
                got = ctx.storage.get(cid)
                if got is not None and len(picked) < cap:
                    picked[cid] = got
    return [Candidate(c.id, c.name, c.entity_type.value, c.content) for c in picked.values()]


async def _classify(ctx: PipelineContext, e: Entity, cands: list[Candidate],
                    result: RememberResult) -> list[EvolutionDecision]:
    new = Candidate(e.id, e.name, e.entity_type.value, e.content)
    if ctx.llm is None:
        return rule_classify(new, cands)
    prompt = schemas.evolution_prompt(new.to_prompt(), [c.to_prompt() for c in cands])
    try:
        data = await ctx.ask("classify_evolution", prompt, result.usage)
        return parse_evolution(data, [c.id for c in cands])
    except ProviderError as exc:
        result.warnings.append(f"evolution detection failed for {e.name!r}: {provider_failure(exc)}")
        return []


def _siblings(ctx: PipelineContext, old_id: str, superseded: set[str]) -> list[Entity]:
    """Current entities stating the same thing as ``old_id`` from the same source (other facets
    of one sentence: 'Alice works at Acme' is both Alice's and Acme's fact)."""
    old = ctx.storage.get(old_id)
    if old is None or old.source_id is None:
        return []
    key = normalize_content(old.content)
    out = []
    for cid, _ in ctx.storage.search_text(old.content, 20, SearchFilters()):
        if cid == old_id or cid in superseded:
            continue
        c = ctx.storage.get(cid)
        if c is not None and c.source_id == old.source_id and normalize_content(c.content) == key:
            out.append(c)
    out.sort(key=lambda c: c.id)
    return out


def _commit(ctx: PipelineContext, entities: list[Entity], relations: list[EvolutionRelation],
            supersede: list[tuple[str, int]], source: Source) -> None:
    with ctx.storage.transaction():
        if entities:
            ctx.storage.upsert(entities)
        for old_id, at in supersede:
            ctx.storage.supersede(old_id, at)
        if relations:
            ctx.storage.add_relations(relations)
        ctx.storage.add_source(source)


async def remember(ctx: PipelineContext, text: str, opts: RememberOptions) -> RememberResult:
    """Run the pipeline. The caller holds the write lock."""
    result = RememberResult()
    source = Source.for_text(text, ctx.now_ms(), opts.metadata)
    result.source_id = source.id
    if await ctx.io(ctx.storage.find_source_by_hash, source.text_hash) is not None:
        result.duplicate = True
        result.warnings.append("this exact text was remembered before; nothing new was stored")
        return result

    found = await _extract(ctx, text, opts, result)
    now = ctx.now_ms()
    entities = _build_entities(found, opts, source.id, now)
    existing = {e.id for e in await ctx.io(ctx.storage.get_many, [e.id for e in entities])}
    if existing:
        result.warnings.append(f"{len(existing)} fact(s) were already known; not stored again")
    entities = [e for e in entities if e.id not in existing]

    if entities and opts.generate_embeddings and ctx.embedder is not None:
        try:
            vecs = await ctx.embed([e.text_for_embedding() for e in entities], "passage")
            for e, v in zip(entities, vecs):
                e.embedding = np.ascontiguousarray(v)
        except UmiError as exc:
            result.warnings.append(f"embedding failed, stored without vectors (keyword search still works): "
                                   f"{provider_failure(exc)}")

    relations: list[EvolutionRelation] = []
    supersede: list[tuple[str, int]] = []
    if entities and opts.detect_evolutions and opts.extract_entities:
        cand_lists = await ctx.io(lambda: [_candidates_for(ctx, e) for e in entities])  # one I/O hop
        todo = [(e, c) for e, c in zip(entities, cand_lists) if c]
        decided = await asyncio.gather(*(_classify(ctx, e, c, result) for e, c in todo))
        done: set[str] = set()
        for (e, _), decisions in zip(todo, decided):
            for d in decisions:
                relations.append(EvolutionRelation(d.candidate_id, e.id, d.evolution_type, d.reason,
                                                   d.confidence, created_at=now))
                if d.evolution_type.supersedes and d.candidate_id not in done:
                    done.add(d.candidate_id)
                    supersede.append((d.candidate_id, now))
        for old_id, _ in list(supersede):
            kind = next(r.evolution_type for r in relations if r.source_id == old_id)
            target = next(r.target_id for r in relations if r.source_id == old_id)
            for sib in await ctx.io(_siblings, ctx, old_id, done):
                done.add(sib.id)
                supersede.append((sib.id, now))
                relations.append(EvolutionRelation(sib.id, target, kind,
                                                   f"same statement as superseded fact {old_id}",
                                                   0.6, created_at=now))

    await ctx.io(_commit, ctx, entities, relations, supersede, source)
    result.entities = entities
    result.evolutions = relations
    return result

