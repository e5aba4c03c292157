"""The remember pipeline: a read plan and one commit.

validate → exact-duplicate look (no lock) → extract (LLM, or rules; every sentence kept)
→ embed in one batch → **read plan**, one I/O hop: which facts exist (current or
superseded), evolution candidates of each new fact (same name, nearest vectors), the
other facets of every candidate's statement, what had replaced each restated fact →
classify evolutions (LLM, or rules; no lock held) → **commit**, one I/O hop under the
write lock: if another writer committed since the plan was read (the store's
``generation`` moved), the plan is read and classified again; after
``OPTIMISTIC_ATTEMPTS`` such rounds the lock is held from plan to commit.

Lifecycle rules kept here (DESIGN.md):

* A fact told again while current is not stored again. A fact told again after it was
  superseded is **revived**, and what had replaced it is retired, with an ``update``
  relation from the replacement to the restated fact saying so.
* An ``update`` / ``contradict`` retires the older fact (and the other facets of its
  statement) only at ``confidence >= MemoryConfig.supersede_confidence``; below it the
  relation is recorded and both stay current.
* A source row is stored only when a new fact comes from it, so forgetting every fact of a
  text leaves nothing of the text behind, and the same text can be remembered again.

Degradation is reported in ``RememberResult.warnings``, never hidden: extraction fails →
the text is stored as one note; embedding fails → stored without vectors (keyword search
still finds them); evolution classification fails → stored without relations; storage
fails → ``StorageError`` and nothing half-written.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from .._validate import check_input_text
from ..errors import EmbeddingError, EmptyTextError, ProviderError
from ..options import RememberOptions
from ..storage.base import SearchFilters, Source
from ..types import (
    UMI_NAMESPACE,
    Entity,
    EvolutionRelation,
    EvolutionType,
    RememberResult,
    normalize_content,
    normalize_name,
)
from . import schemas
from .context import PipelineContext, provider_failure
from .evolution import Candidate, EvolutionDecision, parse_evolution, related, rule_classify
from .extraction import ExtractedEntity, note_for, parse_extraction, rule_extract, with_leftovers
from .passages import embed_entities
from .time import resolve_event_time

__all__ = ["validate_text", "remember", "remember_many", "statement_key", "replacements", "follow", "supersedes",
           "OPTIMISTIC_ATTEMPTS"]

#: read-plan rounds without the lock before a writer holds it from plan to commit
OPTIMISTIC_ATTEMPTS = 3

DUPLICATE_WARNING = "this exact text was remembered before; nothing new was stored"


def validate_text(text: object, max_bytes: int) -> str:
    """A text to remember (``max_bytes``: ``MemoryConfig.text_bytes_max``): umi._validate's rule."""
    return check_input_text(text, "text to remember", max_bytes, EmptyTextError)


def statement_key(e: Entity) -> tuple[str, str]:
    """Facts with one source and one normalised content state one thing (the facets of a
    sentence about several names). A fact without a source is its own statement."""
    if e.source_id is None:
        return ("", e.id)
    return (e.source_id, normalize_content(e.content))


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
    kept, left = with_leftovers(text, found)
    if not found:
        result.warnings.append("no entities found in the text; stored it as one note")
    elif left:
        result.warnings.append(f"{left} sentence(s) named nothing the extractor could attach them to; "
                               "kept them as one note of the text")
    return kept


def _build_entities(ctx: PipelineContext, found: Sequence[ExtractedEntity], opts: RememberOptions,
                    source_id: str, now: int) -> list[Entity]:
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
            scope=ctx.scope,
        )
        if e.id not in seen:
            seen.add(e.id)
            out.append(e)
    return out


# --- the read plan ----------------------------------------------------------------------


@dataclass
class Plan:
    """What one read hop learned. Everything the commit needs, nothing it must read again."""

    generation: int
    now: int
    duplicate: bool = False
    known: dict[str, Entity] = field(default_factory=dict)  # extracted ids already stored
    candidates: dict[str, list[Entity]] = field(default_factory=dict)  # new id -> older facts
    facets: dict[str, list[Entity]] = field(default_factory=dict)  # candidate/replacement id -> other facets
    replaced_by: dict[str, list[Entity]] = field(default_factory=dict)  # revived id -> current replacements

    def signature(self) -> tuple[object, ...]:
        """What the decisions were made from: two plans with one signature lead to one change set."""
        def ids(m: dict[str, list[Entity]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
            return tuple(sorted((k, tuple(e.id for e in v)) for k, v in m.items()))

        return (self.duplicate, tuple(sorted((i, e.valid_to is None) for i, e in self.known.items())),
                ids(self.candidates), ids(self.facets), ids(self.replaced_by))


def _facets(ctx: PipelineContext, e: Entity) -> list[Entity]:
    """The other current facts of ``e``'s statement (same source, same content)."""
    if e.source_id is None:
        return []
    key = statement_key(e)
    ids = [i for i in ctx.storage.entity_ids_for_source(e.source_id) if i != e.id]
    return sorted((c for c in ctx.storage.get_many(ids) if c.valid_to is None and statement_key(c) == key),
                  key=lambda c: c.id)


def is_duplicate(ctx: PipelineContext, source: Source) -> bool:
    """The exact text was told before (in this scope) and every fact it produced is current."""
    if ctx.storage.get_source(source.id) is None:
        return False
    ids = ctx.storage.entity_ids_for_source(source.id)
    return all(e.valid_to is None for e in ctx.storage.get_many(ids))


#: how many nearest facts (times ``evolution_candidates``) are searched for the same-name facts
#: closest to a new one
SAME_NAME_DEPTH = 10


def _candidates_for(ctx: PipelineContext, e: Entity, exclude: set[str]) -> list[Entity]:
    """Current facts that a new entity may update: same name first — the ones on its topic
    (:func:`~.evolution.related`: a shared name or predicate class), then the nearest by vector,
    then the newest — then nearest vectors of other names; only facts of the same user
    (DESIGN.md: evolution compares facts within one user).

    Topic before vector: "I relocated to Gdansk" and "My flat is in Seville" are far apart as
    vectors, and a talkative speaker has five nearer facts (bench_quality, a fresh dev seed: 2 of 5
    missed updates).

    Nearest before newest: someone who talks a lot has many facts under their name, and the one a
    new fact updates ("I switched jobs" → "I work at Acme") is seldom among the last few they said
    (bench_quality: with the newest five alone, rules retired no old job, city or diet on the dev split).
    """
    cap = ctx.config.evolution_candidates
    if cap == 0:
        return []
    current = ctx.user_filters()
    same = [c for c in ctx.storage.find_by_name(e.name, filters=current)
            if c.id not in exclude and ctx.same_user(c)]
    near: list[tuple[str, float]] = []
    if e.embedding is not None:
        deeper = 1 if ctx.scope.user_id is not None else 4  # other users' facts are skipped below
        near = ctx.storage.search_vector(e.embedding, cap * max(deeper, SAME_NAME_DEPTH) + len(exclude), current)
    rank = {cid: r for r, (cid, _) in enumerate(near)}
    told = _candidate(e)
    same.sort(key=lambda c: (not related(told, _candidate(c)), rank.get(c.id, len(rank)), -c.created_at, c.id))
    picked = {c.id: c for c in same[:cap]}
    if len(picked) < cap:
        others = [cid for cid, score in near
                  if cid not in exclude and cid not in picked and score >= ctx.config.evolution_similarity]
        for c in ctx.storage.get_many(others):
            if len(picked) < cap and ctx.same_user(c):
                picked[c.id] = c
    return list(picked.values())


def supersedes(ctx: PipelineContext, rel: EvolutionRelation) -> bool:
    """``rel`` retires its older fact: a superseding kind at ``supersede_confidence`` or above."""
    return rel.evolution_type.supersedes and rel.confidence >= ctx.config.supersede_confidence


class ChainReads(Protocol):
    """What a chain walk reads: the store, or a plan's reads of it (forget's, each read once)."""

    def relations_for(self, entity_id: str) -> list[EvolutionRelation]: ...

    def get_many(self, entity_ids: list[str]) -> list[Entity]: ...


def newer_ids(ctx: PipelineContext, reads: ChainReads, fid: str) -> list[str]:
    """The ids of the facts that superseded ``fid``: targets of its superseding relations (older →
    newer), sorted. Every chain walk takes its steps here."""
    return sorted({r.target_id for r in reads.relations_for(fid) if r.source_id == fid and supersedes(ctx, r)})


def follow(ctx: PipelineContext, start: str, through: Callable[[Entity], bool],
           skip: set[str] | frozenset[str] = frozenset(), *, reads: ChainReads | None = None) -> list[Entity]:
    """The facts reached from ``start`` by superseding relations (older → newer), breadth first,
    each once, walking on from a fact only when ``through(fact)``; ``skip``: never reached.
    ``reads``: what it reads (default the store)."""
    store: ChainReads = ctx.storage if reads is None else reads
    seen = {start}
    frontier = [start]
    out: list[Entity] = []
    while frontier:
        nxt = sorted({t for fid in frontier for t in newer_ids(ctx, store, fid) if t not in seen and t not in skip})
        seen.update(nxt)
        frontier = []
        for t in store.get_many(nxt):
            out.append(t)
            if through(t):
                frontier.append(t.id)
    return out


def replacements(ctx: PipelineContext, old_id: str, ours: set[str] | frozenset[str] = frozenset()) -> list[Entity]:
    """The current facts that replaced ``old_id``, following replacements of replacements
    (Acme → Initech → Globex: restating Acme retires Globex). ``ours``: neither returned nor
    walked through (the facts being told). Forget's walk of the same chains, memoised for a
    whole plan, is ``pipeline.forget._Chains.reach``."""
    reached = follow(ctx, old_id, lambda t: t.valid_to is not None, ours)
    return sorted((t for t in reached if t.valid_to is None), key=lambda e: e.id)


def read_plan(ctx: PipelineContext, source: Source, entities: list[Entity], opts: RememberOptions) -> Plan:
    """One I/O hop: everything :func:`_decide` and the commit need to know about the store."""
    plan = Plan(generation=ctx.storage.generation, now=ctx.now_ms())
    if is_duplicate(ctx, source):
        plan.duplicate = True
        return plan
    plan.known = {e.id: e for e in ctx.storage.get_many([e.id for e in entities])}
    ours = {e.id for e in entities}
    for old in plan.known.values():
        if old.valid_to is None:
            continue
        plan.replaced_by[old.id] = replacements(ctx, old.id, ours)
    if opts.detect_evolutions and opts.extract_entities:
        for e in entities:
            if e.id not in plan.known:
                cands = _candidates_for(ctx, e, ours)
                if cands:
                    plan.candidates[e.id] = cands
    for c in {c.id: c for cs in [*plan.candidates.values(), *plan.replaced_by.values()] for c in cs}.values():
        plan.facets[c.id] = [f for f in _facets(ctx, c) if f.id not in ours]
    return plan


# --- deciding -----------------------------------------------------------------------------


def _candidate(e: Entity) -> Candidate:
    return Candidate(e.id, e.name, e.entity_type.value, e.content)


def _candidates(e: Entity, cands: list[Entity]) -> tuple[Candidate, list[Candidate]]:
    return _candidate(e), [_candidate(c) for c in cands]


async def _classify(ctx: PipelineContext, e: Entity, cands: list[Entity],
                    result: RememberResult, warned: list[str]) -> list[EvolutionDecision]:
    """Ask the model; a failure is a warning (in ``warned``) and no decision."""
    assert ctx.llm is not None
    new, olds = _candidates(e, cands)
    prompt = schemas.evolution_prompt(new.to_prompt(), [c.to_prompt() for c in olds])
    try:
        data = await ctx.ask("classify_evolution", prompt, result.usage)
        return parse_evolution(data, [c.id for c in olds])
    except ProviderError as exc:
        warned.append(f"evolution detection failed for {e.name!r}: {provider_failure(exc)}")
        return []


def _to_classify(plan: Plan, entities: list[Entity]) -> list[tuple[Entity, list[Entity]]]:
    """The new facts with evolution candidates, in the order they were told."""
    return [(e, plan.candidates[e.id]) for e in entities if e.id not in plan.known and e.id in plan.candidates]


def asks_model(ctx: PipelineContext, plan: Plan, entities: list[Entity]) -> bool:
    """Deciding on this plan awaits the LLM (else :func:`decide_now` decides on the spot)."""
    return ctx.llm is not None and bool(_to_classify(plan, entities))


def may_ask_model(ctx: PipelineContext, opts: RememberOptions) -> bool:
    """Whether any plan of a text remembered with ``opts`` could need the LLM to decide (only
    evolution candidates are classified, and only extracted facts get candidates)."""
    return ctx.llm is not None and opts.detect_evolutions and opts.extract_entities


async def _decide(ctx: PipelineContext, plan: Plan, entities: list[Entity], source: Source,
                  result: RememberResult) -> Changes:
    if not asks_model(ctx, plan, entities):
        return decide_now(ctx, plan, entities, source, result)
    todo = _to_classify(plan, entities)
    warned: list[str] = []
    decided = await asyncio.gather(*(_classify(ctx, e, c, result, warned) for e, c in todo))
    return _changes(ctx, plan, entities, source, result, todo, list(decided), warned)


def decide_now(ctx: PipelineContext, plan: Plan, entities: list[Entity], source: Source,
               result: RememberResult) -> Changes:
    """:func:`_decide` when no model is asked (``not asks_model``): rules or nothing to classify.
    Synchronous, so it runs inside the hop that reads the plan and commits."""
    todo = _to_classify(plan, entities)
    return _changes(ctx, plan, entities, source, result, todo,
                    [rule_classify(*_candidates(e, c)) for e, c in todo], [])


@dataclass
class Changes:
    entities: list[Entity] = field(default_factory=list)
    revive: list[str] = field(default_factory=list)
    supersede: list[str] = field(default_factory=list)
    relations: list[EvolutionRelation] = field(default_factory=list)
    source: Source | None = None


def _restated_relation(old: Entity, back: Entity, at: int) -> EvolutionRelation:
    """``old`` (the replacement) is retired because ``back`` was told again. Its id carries the
    instant, so a fact that flips back and forth gets a relation for every flip."""
    rid = str(uuid.uuid5(UMI_NAMESPACE, f"restate\x1f{old.id}\x1f{back.id}\x1f{at}"))
    return EvolutionRelation(old.id, back.id, EvolutionType.UPDATE,
                             f"restated: {back.content[:200]!r} is current again", 1.0, id=rid,
                             created_at=at, scope=back.scope)  # a relation lives in its newer fact's scope


def _changes(ctx: PipelineContext, plan: Plan, entities: list[Entity], source: Source, result: RememberResult,
             todo: list[tuple[Entity, list[Entity]]], decided: list[list[EvolutionDecision]],
             warned: list[str]) -> Changes:
    """The change set of a plan, given the evolution decisions on ``todo`` (and the warnings
    deciding them gave)."""
    now = plan.now
    ch = Changes()
    new = [e for e in entities if e.id not in plan.known]
    ch.entities = new
    if new:
        ch.source = source
    current_known = [e for e in plan.known.values() if e.valid_to is None]
    if current_known:
        result.warnings.append(f"{len(current_known)} fact(s) were already known; not stored again")
    retired: set[str] = set()

    def retire(old: Entity, by: EvolutionRelation) -> None:
        """Supersede ``old`` and the other facets of its statement (one statement, one fate)."""
        if old.id in retired:
            return
        retired.add(old.id)
        ch.supersede.append(old.id)
        ch.relations.append(by)
        for f in plan.facets.get(old.id, []):
            if f.id not in retired:
                retired.add(f.id)
                ch.supersede.append(f.id)
                ch.relations.append(EvolutionRelation(
                    f.id, by.target_id, by.evolution_type, f"same statement as superseded fact {old.id}",
                    by.confidence, created_at=now, scope=by.scope))

    back_to: dict[str, tuple[Entity, list[Entity]]] = {}  # replacement id -> (it, the restated facts it replaced)
    for old in sorted(plan.known.values(), key=lambda e: e.id):  # one order, however the facts were found
        if old.valid_to is None:
            continue
        ch.revive.append(old.id)
        for repl in plan.replaced_by.get(old.id, []):
            back_to.setdefault(repl.id, (repl, []))[1].append(old)
    for repl, olds in (back_to[k] for k in sorted(back_to)):
        # the relation points at the restated facet about the same name, when there is one
        old = min(olds, key=lambda o: (normalize_name(o.name) != normalize_name(repl.name), o.id))
        retire(repl, _restated_relation(repl, old, now))

    result.warnings.extend(warned)
    threshold = ctx.config.supersede_confidence
    for (e, cands), decisions in zip(todo, decided):
        by_id = {c.id: c for c in cands}
        for d in decisions:
            rel = EvolutionRelation(d.candidate_id, e.id, d.evolution_type, d.reason, d.confidence,
                                    created_at=now, scope=e.scope)
            if d.evolution_type.supersedes and d.confidence >= threshold and d.candidate_id not in ch.revive:
                retire(by_id[d.candidate_id], rel)
            elif rel.id not in {r.id for r in ch.relations}:
                if d.evolution_type.supersedes:
                    result.warnings.append(
                        f"{d.evolution_type.value} of {by_id[d.candidate_id].name!r} at confidence "
                        f"{d.confidence:.2f} is under supersede_confidence {threshold:.2f}: both facts stay current")
                ch.relations.append(rel)
    return ch


# --- the commit ---------------------------------------------------------------------------


def commit(ctx: PipelineContext, ch: Changes, now: int, expected_generation: int | None) -> list[Entity] | None:
    """Write a change set in one transaction; returns the revived facts as stored. None (nothing
    written) when ``expected_generation`` is given and another writer committed since the plan."""
    if expected_generation is not None and ctx.storage.generation != expected_generation:
        return None
    if ch.entities or ch.revive or ch.supersede or ch.relations:
        with ctx.storage.transaction():
            ctx.begin_write()
            if ch.entities:
                ctx.storage.upsert(ch.entities)
            for rid in ch.revive:
                ctx.storage.revive(rid, now)
            for sid in ch.supersede:
                ctx.storage.supersede(sid, now)
            if ch.relations:
                ctx.storage.add_relations(ch.relations)
            if ch.source is not None:
                ctx.storage.add_source(ch.source)
    return ctx.storage.get_many(ch.revive) if ch.revive else []


def _commit_if_still_valid(ctx: PipelineContext, plan: Plan, ch: Changes, source: Source,
                           entities: list[Entity], opts: RememberOptions) -> list[Entity] | None:
    """Under the write lock: commit when no writer committed since the plan was read, or when the
    plan read again now is the same (another writer's commit did not touch these facts). None:
    the plan changed, decide again."""
    if ctx.storage.generation != plan.generation:
        if read_plan(ctx, source, entities, opts).signature() != plan.signature():
            return None
    return commit(ctx, ch, plan.now, None)


def _stamp(ch: Changes, now: int) -> Changes:
    """New facts take the instant of the plan they were decided on."""
    for e in ch.entities:
        e.created_at = e.updated_at = now
        e.valid_from = e.event_time if e.event_time is not None else now
    return ch


def _report(result: RememberResult, ch: Changes, revived: list[Entity]) -> None:
    result.entities = [*ch.entities, *revived]
    result.evolutions = ch.relations
    if ch.source is None:
        result.source_id = None  # nothing new came from this text, so it was not kept


def _plan_and_commit(ctx: PipelineContext, source: Source, entities: list[Entity], opts: RememberOptions,
                     result: RememberResult) -> None:
    """Read plan → decide → commit in one I/O hop, the write lock held: when no model decides,
    there is nothing to wait for in between."""
    plan = read_plan(ctx, source, entities, opts)
    if plan.duplicate:
        result.duplicate = True
        result.warnings.append(DUPLICATE_WARNING)
        return
    ch = _stamp(decide_now(ctx, plan, entities, source, result), plan.now)
    _report(result, ch, commit(ctx, ch, plan.now, None) or [])


async def _attempt(ctx: PipelineContext, source: Source, entities: list[Entity], opts: RememberOptions,
                   result: RememberResult, holding_lock: bool) -> bool:
    """Plan, decide, commit. False when another writer committed in between (nothing written)."""
    plan = await ctx.io(read_plan, ctx, source, entities, opts)
    if plan.duplicate:
        result.duplicate = True
        result.warnings.append(DUPLICATE_WARNING)
        return True
    ch = _stamp(await _decide(ctx, plan, entities, source, result), plan.now)
    if holding_lock:
        revived = await ctx.io(commit, ctx, ch, plan.now, None)
    else:
        async with ctx.write_lock:
            revived = await ctx.io(_commit_if_still_valid, ctx, plan, ch, source, entities, opts)
        if revived is None:
            return False
    _report(result, ch, revived)
    return True


async def _settle(ctx: PipelineContext, source: Source, entities: list[Entity], opts: RememberOptions,
                  result: RememberResult) -> None:
    """Read plan → decide → commit. Without a model to ask, in one hop under the write lock;
    with one, optimistically: the lock is held throughout only after ``OPTIMISTIC_ATTEMPTS``
    rounds in which other writers changed what the plan read."""
    if not may_ask_model(ctx, opts):
        async with ctx.write_lock:
            await ctx.io(_plan_and_commit, ctx, source, entities, opts, result)
        return
    base_warnings = list(result.warnings)
    for _ in range(OPTIMISTIC_ATTEMPTS):
        result.warnings = list(base_warnings)
        if await _attempt(ctx, source, entities, opts, result, holding_lock=False):
            return
    result.warnings = list(base_warnings)
    async with ctx.write_lock:  # a busy store: hold the lock from plan to commit this time
        await _attempt(ctx, source, entities, opts, result, holding_lock=True)


async def _embed_all(ctx: PipelineContext, groups: list[list[Entity]], results: list[RememberResult]) -> None:
    """One embedding batch for the facts of every text (long contents as passages too, see
    :mod:`umi.pipeline.passages`); a failure is reported on each text."""
    flat = [e for g in groups for e in g]
    if not flat or ctx.embedder is None:
        return
    try:
        await embed_entities(ctx, flat)
    except (EmbeddingError, ProviderError) as exc:
        for g, r in zip(groups, results):
            if g:
                r.warnings.append("embedding failed, stored without vectors (keyword search still works): "
                                  f"{provider_failure(exc)}")


async def remember(ctx: PipelineContext, text: str, opts: RememberOptions) -> RememberResult:
    """Remember one text. Takes the write lock itself, only around read plan → commit, so a slow
    model (extraction, evolution) never holds up another writer."""
    source = ctx.source_for(text, ctx.now_ms(), opts.metadata)
    result = RememberResult(source_id=source.id)
    if await ctx.read(is_duplicate, ctx, source, sources=[source.id]):
        result.duplicate = True
        result.warnings.append(DUPLICATE_WARNING)
        return result
    found = await _extract(ctx, text, opts, result)
    entities = _build_entities(ctx, found, opts, source.id, ctx.now_ms())
    if opts.generate_embeddings:
        await _embed_all(ctx, [entities], [result])
    await _settle(ctx, source, entities, opts, result)
    return result


# --- a chunk of texts (Memory.remember_many) -------------------------------------------------


async def remember_many(ctx: PipelineContext, texts: Sequence[str], opts: RememberOptions) -> list[RememberResult]:
    """A chunk of validated texts, a result per text: what :func:`remember` gives run on them one
    after the other. Extraction runs for all of them at once, their facts are embedded in one
    batch, and one transaction writes the chunk: under the write lock, each text's read plan is
    read inside that transaction (so it sees the earlier texts' writes), decided (on the loop:
    an LLM classifier holds the store meanwhile, so keep chunks small with one), and applied.
    Takes the write lock itself; a failure rolls the whole chunk back."""
    results: list[RememberResult] = []
    sources: list[Source] = []
    for text in texts:
        source = ctx.source_for(text, ctx.now_ms(), opts.metadata)
        sources.append(source)
        results.append(RememberResult(source_id=source.id))
    told = await ctx.read(lambda: [is_duplicate(ctx, s) for s in sources], sources=[s.id for s in sources])
    live = [i for i, dup in enumerate(told) if not dup]
    for i, dup in enumerate(told):
        if dup:
            results[i].duplicate = True
            results[i].warnings.append(DUPLICATE_WARNING)
    found = await asyncio.gather(*(_extract(ctx, texts[i], opts, results[i]) for i in live))
    facts = {i: _build_entities(ctx, f, opts, sources[i].id, ctx.now_ms()) for i, f in zip(live, found)}
    if opts.generate_embeddings:
        await _embed_all(ctx, [facts[i] for i in live], [results[i] for i in live])
    loop = asyncio.get_running_loop()

    def write_chunk() -> None:
        with ctx.storage.transaction():
            ctx.begin_write()
            for i in range(len(texts)):
                result, source = results[i], sources[i]
                if told[i]:
                    if is_duplicate(ctx, source):
                        continue
                    # Told word for word before, but a text earlier in this chunk superseded some of
                    # its facts: it restates them. Its facts are the ones it made the first time.
                    result.duplicate = False
                    result.warnings = []
                    facts[i] = ctx.storage.get_many(ctx.storage.entity_ids_for_source(source.id))
                entities = facts[i]
                plan = read_plan(ctx, source, entities, opts)
                if plan.duplicate:  # the same text earlier in this chunk
                    result.duplicate = True
                    result.warnings.append(DUPLICATE_WARNING)
                    continue
                if asks_model(ctx, plan, entities):
                    ch = asyncio.run_coroutine_threadsafe(_decide(ctx, plan, entities, source, result), loop).result()
                else:  # no model to wait for: no hop to the loop and back
                    ch = decide_now(ctx, plan, entities, source, result)
                _stamp(ch, plan.now)
                revived = commit(ctx, ch, plan.now, None)  # joins the chunk's transaction
                result.entities = [*ch.entities, *(revived or [])]
                result.evolutions = ch.relations
                if ch.source is None:
                    result.source_id = None

    async with ctx.write_lock:
        await ctx.io(write_chunk)
    return results
