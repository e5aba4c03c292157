"""The forget pipeline: a statement, a source, or every fact a filter matches.

Forgetting is storage's ``delete`` (row, vector, postings, history snapshots → tombstones,
relations, and the source text once no fact comes from it) plus one rule that lives here,
about each fact the forgotten facts had superseded (a relation of a superseding kind at
``confidence >= MemoryConfig.supersede_confidence`` from it to a forgotten fact; a relation's
source is the older fact, its target the newer):

* **It stays superseded** when a current fact that stays still replaces it: following
  replacements of replacements (:func:`~umi.pipeline.remember.replacements`), walking on
  through forgotten facts that were superseded themselves. Where its chain ran through a
  forgotten fact, a new superseding relation (the kind and confidence of the one that retired
  it) links it to the next fact that stays, so the chain is kept for ``history``,
  ``relations`` and a later forget.
* **Else its chain ended with what is forgotten now** (the forgotten fact was current, or all
  after it is forgotten in the same call), and it is **revived** if it was the current one
  just before: of the facts whose chains end at one forgotten current fact, those retired
  last come back (the facets of one statement, or facts it replaced at once, retire together);
  the others stay superseded, linked to them.

Acme → Initech, Acme told again (Initech retired), Acme corrected to Globex, Acme forgotten:
Globex stays the one current fact, Initech → Globex; forgetting Globex then revives Initech.
A relation left from an earlier turn of a chain (Acme → Initech, still there after Acme was
told again) keeps nothing superseded by itself: only a current fact it leads to does. (The old
rule, "revived unless another stored fact supersedes it", could leave two current facts, or
none.)

``forget(entity_id)`` forgets the *statement* the fact states: recall shows the facets of
one sentence (same source, same content) as one result, so forgetting that result removes
every facet, or the sentence would come back under another name.

Each call is one read (in the caller's I/O hop) and one transaction, under the write lock.
"""

from __future__ import annotations

import uuid
from typing import Callable, Iterable, Iterator

from ..storage.base import SearchFilters
from ..types import UMI_NAMESPACE, Entity, EvolutionRelation
from .context import PipelineContext
from .remember import follow, newer_ids, statement_key, supersedes

__all__ = ["statement_ids", "source_ids", "filter_ids", "forget_ids", "forget_scope"]

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


class _Chains:
    """What one forget's plan reads of the store — each fact and each fact's relation list read
    once — and the chains it walks, memoised: :meth:`reach` walks each stretch of a chain once for
    all the facts that lead into it (a chain of n facts with every other one forgotten: n/2 walks
    of up to n steps each before). Valid for one call: the caller holds the write lock."""

    def __init__(self, ctx: PipelineContext) -> None:
        self._ctx = ctx
        self._storage = ctx.storage
        self._rels: dict[str, list[EvolutionRelation]] = {}
        self._facts: dict[str, Entity | None] = {}
        self._through: dict[str, frozenset[str]] = {}  # superseded fact -> :meth:`reach` of it

    def relations_for(self, entity_id: str) -> list[EvolutionRelation]:
        if entity_id not in self._rels:
            self._rels[entity_id] = self._storage.relations_for(entity_id)
        return self._rels[entity_id]

    def get_many(self, entity_ids: Iterable[str]) -> list[Entity]:
        ids = list(entity_ids)
        missing = sorted({i for i in ids if i not in self._facts})
        if missing:
            got = {e.id: e for e in self._storage.get_many(missing)}
            self._facts.update((i, got.get(i)) for i in missing)
        return [e for e in map(self._facts.__getitem__, ids) if e is not None]

    def get(self, entity_id: str) -> Entity | None:
        return next(iter(self.get_many([entity_id])), None)

    def follow(self, start: str, through: Callable[[Entity], bool]) -> list[Entity]:
        """:func:`~umi.pipeline.remember.follow`, reading through this plan's reads."""
        return follow(self._ctx, start, through, reads=self)

    def reach(self, start: str) -> frozenset[str]:
        """The current facts ``start`` leads to through superseded facts: the ids of the current
        facts ``follow(start, superseded)`` reaches (``start`` itself never)."""
        out: set[str] = set()
        for t in self.get_many(newer_ids(self._ctx, self, start)):
            if t.valid_to is None:
                out.add(t.id)
            else:
                out |= self._reach_superseded(t.id)
        out.discard(start)
        return frozenset(out)

    def _reach_superseded(self, root: str) -> frozenset[str]:
        """:meth:`reach` of the superseded fact ``root``, with ``root`` counted if reached again (it
        is superseded: never). Facts that lead to each other (a fact told again after it was
        replaced) reach the same: one depth-first walk (Tarjan's strongly connected components,
        without recursion) memoises every superseded fact it passes."""
        memo = self._through
        if root in memo:
            return memo[root]
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        acc: dict[str, set[str]] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        work: list[tuple[str, Iterator[str]]] = []

        def enter(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            acc[v] = set()
            walk_on = []
            for t in self.get_many(newer_ids(self._ctx, self, v)):
                if t.valid_to is None:
                    acc[v].add(t.id)
                else:
                    walk_on.append(t.id)
            work.append((v, iter(walk_on)))

        enter(root)
        while work:
            v, todo = work[-1]
            for w in todo:
                if w in memo:
                    acc[v] |= memo[w]
                elif w not in index:
                    enter(w)
                    break
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if low[v] == index[v]:  # v's component is complete: every fact of it reaches the same
                    members = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        members.append(m)
                        if m == v:
                            break
                    reached = frozenset().union(*(acc[m] for m in members))
                    for m in members:
                        memo[m] = reached
                if work:
                    u = work[-1][0]
                    low[u] = min(low[u], low[v])
                    acc[u] |= memo.get(v, acc[v])
        return memo[root]


def _next_staying(chains: _Chains, e: Entity, gone: set[str]) -> list[Entity]:
    """The first facts that stay after the forgotten ``e`` in its chain: what replaced it, or,
    for a replacement forgotten too and superseded itself, what replaced that (walking on only
    through forgotten facts that were superseded). [] for a current ``e`` (its own chain ends
    with it)."""
    if e.valid_to is None:
        return []
    after = chains.follow(e.id, lambda t: t.id in gone and t.valid_to is not None)
    return sorted((t for t in after if t.id not in gone), key=lambda t: t.id)


def _replacements(chains: _Chains, old_id: str, gone: set[str]) -> list[Entity]:
    """:func:`~umi.pipeline.remember.replacements` of ``old_id`` with ``gone`` forgotten: the
    current facts that replace it and stay, walking through the superseded ones."""
    return chains.get_many(sorted(chains.reach(old_id) - gone))


def _ends(chains: _Chains, start: str, gone: set[str]) -> set[str]:
    """The forgotten current facts ``start`` leads to through superseded facts (forgotten or not:
    Acme, Initech, Globex, Umbrella, Initech and Umbrella forgotten at once: Acme's chain ends with
    Umbrella too, through Globex, revived now; so Acme stays superseded)."""
    return set(chains.reach(start) & gone)


def _latest(chains: _Chains, ids: list[str], gone: set[str]
            ) -> tuple[list[str], dict[str, dict[str, list[Entity]]]]:
    """Of facts whose chain ends in a forgotten current fact, the ones to revive: per such end,
    those retired last (current just before it; facets of one statement, or facts it replaced
    at once, retire together); and for each of the others, per end, the ones revived after it in
    that chain (Acme corrected, Initech, Initech corrected, Initech told again, Initech forgotten:
    the correction of Initech is current again, not the correction of Acme too)."""
    facts = {e.id: e for e in chains.get_many(ids)}

    def retired(i: str) -> int:
        return facts[i].valid_to or 0

    by_end: dict[str, list[str]] = {}
    for i in sorted(facts):
        for end in _ends(chains, i, gone):
            by_end.setdefault(end, []).append(i)
    later: dict[str, dict[str, set[str]]] = {}  # i -> end -> the last retired of that end's facts
    for end, group in by_end.items():
        last = max(retired(i) for i in group)
        lasts = {j for j in group if retired(j) == last}
        for i in group:
            if i not in lasts:
                later.setdefault(i, {})[end] = lasts
    keep = [i for i in ids if i in facts and i not in later]
    kept = set(keep)

    def revived_after(first: set[str]) -> set[str]:
        """The revived facts from ``first`` on: a newer one that stays superseded itself (the newest
        of one end's facts but not of another's) passes on to those after it, so nothing is left
        linked to nothing (each step goes to a later retirement: no cycle)."""
        out: set[str] = set()
        todo, seen = sorted(first), set(first)
        while todo:
            j = todo.pop()
            if j in kept:
                out.add(j)
                continue
            for n in sorted(set().union(*later.get(j, {}).values())):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return out

    return keep, {i: {end: [facts[j] for j in sorted(revived_after(first))] for end, first in sorted(later[i].items())}
                  for i in sorted(later)}


def _links(ctx: PipelineContext, chains: "_Chains", older: str, newer: str) -> bool:
    """A stored relation already has ``newer`` superseding ``older``."""
    return any(x.source_id == older and x.target_id == newer and supersedes(ctx, x)
               for x in chains.relations_for(older))


def _relink(rel: EvolutionRelation, gone: Entity, to: Entity, at: int) -> EvolutionRelation:
    """``rel.source_id`` stays superseded by ``to``: its chain to it ran through ``gone`` (one of
    the facts forgotten now; ``rel`` retired it into one). Its id carries the instant, like a
    restatement's."""
    rid = str(uuid.uuid5(UMI_NAMESPACE, f"relink\x1f{rel.source_id}\x1f{to.id}\x1f{at}"))
    return EvolutionRelation(rel.source_id, to.id, rel.evolution_type,
                             f"kept superseded: {gone.id}, which had replaced it, was forgotten",
                             rel.confidence, id=rid, created_at=at,
                             scope=to.scope)  # a relation lives in its newer fact's scope


def forget_ids(ctx: PipelineContext, ids: Iterable[str], at: int, *, source_id: str | None = None) -> int:
    """Forget these facts in one transaction; revive what they had superseded when its chain ended
    with them, else keep it superseded, re-linked past them (the module's rule).
    ``source_id``: also drop that source row (``forget_source`` of a text with no facts left).
    Returns how many facts were forgotten. The caller holds the write lock."""
    store = ctx.storage
    chains = _Chains(ctx)  # the plan reads through it
    gone = chains.get_many(sorted(set(ids)))
    gone_ids = {e.id for e in gone}
    # Facts these had superseded: by which relations, to which forgotten fact.
    older: dict[str, list[tuple[EvolutionRelation, Entity]]] = {}
    for e in gone:
        for r in chains.relations_for(e.id):
            if r.target_id == e.id and r.source_id not in gone_ids and supersedes(ctx, r):
                older.setdefault(r.source_id, []).append((r, e))
    revive: list[str] = []
    relink: dict[str, EvolutionRelation] = {}
    for cid in sorted(older):
        c = chains.get(cid)
        if c is None or c.valid_to is None:
            continue
        # the current facts that still replace it, through the forgotten ones
        if not _replacements(chains, cid, gone_ids):
            revive.append(cid)  # its chain ended with what is forgotten now (but see below)
            continue
        for r, e in older[cid]:
            for nxt in _next_staying(chains, e, gone_ids):
                if nxt.id == cid or not (nxt.valid_to is None or _replacements(chains, nxt.id, gone_ids)):
                    continue  # a dead end: a relation left from an earlier turn of the chain
                if not _links(ctx, chains, cid, nxt.id):
                    rel = _relink(r, e, nxt, at)
                    relink[rel.id] = rel
    revive, later = _latest(chains, revive, gone_ids)
    for cid, by_end in later.items():  # stays superseded: its chain now goes on to those revived
        for end, successors in by_end.items():
            # named by its last relation to a forgotten fact that leads to that end: Acme → Initech,
            # Acme told again, Acme → Globex, both forgotten: Globex (Initech leads there too, back
            # through Acme told again: a turn of the chain that is over)
            # (none leads there when it reached that end by a relation that stays: a fact superseded
            # by two at once, one of them forgotten; then any of them names it)
            r, e = max([(r, e) for r, e in older[cid] if e.id == end or end in chains.reach(e.id)] or older[cid],
                       key=lambda p: (p[0].created_at, p[0].id))
            for nxt in successors:
                if _links(ctx, chains, cid, nxt.id):
                    continue  # a relation that stays links them already
                rel = _relink(r, e, nxt, at)
                relink[rel.id] = rel
    drop_source = source_id is not None and store.get_source(source_id) is not None
    if not gone and not drop_source:
        return 0
    with store.transaction():
        for e in gone:
            store.delete(e.id, at)
        for cid in revive:
            store.revive(cid, at)
        if relink:
            store.add_relations([relink[k] for k in sorted(relink)])
        if drop_source and source_id is not None and not store.entity_ids_for_source(source_id):
            store.delete_source(source_id)
    return len(gone)


def forget_scope(ctx: PipelineContext, at: int) -> int:
    """Forget every fact of ``ctx.scope`` (superseded too; the chain rule as :func:`forget_ids`)
    and the stored texts of that scope no fact comes from (an import can bring such a text; a
    fact's text goes with its last fact): nothing of the scope's is left but tombstones, which
    name no scope. One transaction. Returns how many facts were forgotten."""
    store = ctx.storage
    with store.transaction():
        # asked first, before this transaction changes anything (one durable query on a store that
        # reads sources on demand); forgetting facts leaves no other text lone: a fact's text goes
        # with its last fact, and a text a fact of another scope comes from stays
        lone = store.lone_source_ids(ctx.scope)
        n = forget_ids(ctx, filter_ids(ctx, SearchFilters(scope=ctx.scope, include_superseded=True)), at)
        for sid in lone:
            store.delete_source(sid)
    return n
