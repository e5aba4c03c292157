"""Retrieval logic: query analysis, reciprocal rank fusion, the deep-search rule, rule rewrites.

Deep search rule (``RecallOptions(deep_search=None)``, the default): with an LLM configured,
run the deep path when the query is a *question* (ends with '?', or starts with a question word
or auxiliary) **and** the fast path answered weakly: fewer results than asked for,
or a best fused score under ``MemoryConfig.deep_search_threshold`` (0.025 by
default). With k=60, a result ranked first by one signal scores 1/61 ≈ 0.016 and
one ranked first by two signals ≈ 0.033, so the default threshold means "no result
was agreed on by two signals". Without an LLM the rule never fires: rule rewrites of a weak
answer measured worse than the answer itself (bench_quality, dev split), so they run only when
the caller asks (``deep_search=True``), and then their lists are fused at
``RULE_REWRITE_WEIGHT``.
"""

from __future__ import annotations

import re
import dataclasses
from operator import itemgetter
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence, Union

from .extraction import MARKS, _name_spans, asks
from .time import is_temporal_query, query_time_range, time_matches
from ..types import EntityType

if TYPE_CHECKING:
    import numpy as np

    from ..storage.base import SearchFilters, StorageBackend
    from ..types import Entity

__all__ = ["RULE_REWRITE_WEIGHT", "hop_signal", "rrf_fuse", "read_once", "read_named", "is_question", "needs_deep_search", "rule_rewrite", "query_names",
           "name_signal", "tell_signal", "time_signal"]

_QWORDS = frozenset(
    "who whom whose what which when where why how is are was were do does did can could should would "
    "will has have had".split()
)
_STOP = frozenset(
    "a an the is are was were be been being do does did of in on at to for from with by about as and or "
    "who whom whose what which when where why how can could should would will has have had me my i you "
    "your it its this that there their they them he she his her we our us any some tell know".split()
)
_WORD = re.compile(rf"[^\W_](?:[^\W_]|[{MARKS}'\-])*")  # any script's letters, as names are read
SYNONYMS = {
    "job": ["works", "work"],
    "work": ["works", "job"],
    "works": ["work", "job"],
    "employer": ["works at", "company"],
    "company": ["works at", "organization"],
    "live": ["lives", "moved"],
    "lives": ["live", "moved"],
    "home": ["lives", "moved"],
    "married": ["wife", "husband", "spouse"],
    "pet": ["dog", "cat"],
    "like": ["likes", "loves", "prefers"],
    "likes": ["loves", "prefers"],
    "favorite": ["likes", "loves", "prefers"],
}


def is_question(query: str) -> bool:
    q = query.strip()
    if q.endswith("?"):
        return True
    first = q.split(maxsplit=1)[0].lower() if q else ""
    return first in _QWORDS


def query_names(query: str) -> list[str]:
    """Capitalised name spans in the query, in order, without repeats."""
    seen: list[str] = []
    for _, _, name in _name_spans(query):
        if name not in seen:
            seen.append(name)
    return seen


#: one signal's ranking: ids by position, or each id's rank (ties allowed)
Ranking = Union[Sequence[str], Mapping[str, int]]


def rrf_fuse(ranked: Iterable[Ranking], k: int = 60,
             weights: Sequence[float] | None = None) -> list[tuple[str, float]]:
    """Reciprocal rank fusion: score(id) = Σ w / (k + rank), each list's weight ``w`` 1 unless
    ``weights`` gives it (one weight per list, in order). A list ranks its ids by position (from
    1); a mapping gives each id its rank, ties allowed. Ties break by id."""
    scores: dict[str, float] = {}
    get = scores.get
    for n, ids in enumerate(ranked):
        w = 1.0 if weights is None else weights[n]
        if isinstance(ids, Mapping):
            for id_, rank in ids.items():
                scores[id_] = get(id_, 0.0) + w / (k + rank)
        else:
            for rank, id_ in enumerate(ids, 1):
                scores[id_] = get(id_, 0.0) + w / (k + rank)
    # by id, then (stable) by score descending: score descending, ties by id, without a key tuple each
    fused = sorted(scores.items(), key=itemgetter(0))
    fused.sort(key=itemgetter(1), reverse=True)
    return fused


def read_once(storage: "StorageBackend", ids: list[str]) -> "Sequence[Entity]":
    """The entities of ``ids``, for a signal that reads their id, content and times at once and
    keeps none: the stored objects when the store can show them uncopied (``peek_many``: the same
    read for the Sim faults as ``get_many``), else ``get_many``'s copies. Only what recall returns
    is hydrated (copied, with its embedding)."""
    peek = getattr(storage, "peek_many", None)
    return storage.get_many(ids) if peek is None else peek(ids, read="get_many")


def read_named(storage: "StorageBackend", names: Sequence[str], filters: "SearchFilters") -> "list[Entity]":
    """The facts filed under each of ``names`` (any type), for the name signal, which reads their
    id, content and time at once and keeps none: uncopied as :func:`read_once` where the store can
    (``peek_by_name``), else one ``find_by_names`` read for them all (Postgres: one round trip)."""
    by_name = getattr(storage, "peek_by_name", None)
    if by_name is None:
        return storage.find_by_names(list(names), filters=filters) if names else []
    named: list[Entity] = []
    for name in names:
        named.extend(by_name(name, filters))
    return named


def best_ranks(ranked: Sequence[Sequence[str]]) -> dict[str, int]:
    """Each id's best (0-based) rank over the ranked lists."""
    best: dict[str, int] = {}
    for ids in ranked:
        for r, id_ in enumerate(ids):
            if id_ not in best or r < best[id_]:
                best[id_] = r
    return best


def name_signal(named: Sequence["Entity"], ranked: Sequence[Sequence[str]], k: int) -> list[str]:
    """The exact-name signal: facts filed under a name the query mentions, as a ranked list.

    A name says *whose* facts to prefer, not *which*: the named facts that the content signals
    (``ranked``: vector, keywords) found come first, in their best rank there, so a fact about the
    named thing that also matches the question wins over one that only shares the name; the other
    named facts follow, newest first (what the words did not reach, e.g. "What did Bob do last
    month?"). A question put to someone ("Bob, where do you live?") states nothing about them and
    is left out. Measured on bench_quality's dev split (default store, R@10): every named fact
    newest first, questions included (before) .654; questions left out .768; content-found only
    .755; content-found first, then newest .769 (this).
    """
    facts = [e for e in named if not asks(e.content)]
    best = best_ranks(ranked)
    found = sorted({e.id for e in facts if e.id in best}, key=lambda i: (best[i], i))
    newest = sorted(facts, key=lambda e: (-e.created_at, e.id))
    return list(dict.fromkeys([*found, *(e.id for e in newest)]))[:k]


#: how many of the content signals' first facts give the names of a second hop, and how many names
#: at most (see :func:`hop_signal`)
HOP_FROM = 3
HOP_NAMES_MAX = 4
_NO_HOP = (EntityType.NOTE, EntityType.SELF)


def hop_signal(storage: "StorageBackend", query: str, names: Sequence[str], content: Sequence[Sequence[str]],
               filters: "SearchFilters", k: int) -> list[list[str]]:
    """For a question that names something, one more ranking: the facts filed under the *other*
    names of the facts the content signals (vector, keywords) rank first, ranked as
    :func:`name_signal` ranks a name's facts — the second hop of "What does Rex's owner do for
    fun?", whose answer is filed under the owner, whom the question does not name but Rex's fact
    does. Not a question, or no name in it: nothing. The hop also lists the first facts' own
    statements where they are filed under a name they mention, a second vote for them: that is
    what lifts single-hop questions (test split .845 -> .884; leaving those copies out of the hop,
    .845 and R@10 .870), while the multi-hop gain (.604 -> .740) is the hop itself.

    bench_quality's dev split, default store (R@10 / multi-hop R@10 / MRR): no hop .857 / .595 /
    .777; a hop from the first 3 facts .885 / .714 / .775. Tried on dev: from the first 1 .869 / .679;
    from the first 5 .890 / .714, but a stale fact then beat its update once (current wins 1.0 ->
    .938); the hop's list counted from rank 11 (below a direct signal's first ten) .883 / .702."""
    if not names or not is_question(query):
        return []
    best = best_ranks(content)
    first = sorted(best, key=lambda i: (best[i], i))[:HOP_FROM]
    asked = {n.casefold() for n in names}
    hops: list[str] = []
    for e in read_once(storage, first):
        if asks(e.content):
            continue
        # the name it is filed under — not a note's (its own text) nor the user's, under which every
        # first-person fact is filed (a hop there would read them all) — and the names in its text
        for n in [*([e.name] if e.entity_type not in _NO_HOP else []), *query_names(e.content)]:
            if n.casefold() not in asked and n not in hops:
                hops.append(n)
    if not hops:
        return []
    return [name_signal(read_named(storage, hops[:HOP_NAMES_MAX], filters), content, k)]


def tell_signal(storage: "StorageBackend", query: str, ranked: Sequence[Sequence[str]],
                k: int) -> list[dict[str, int]]:
    """For a question, one more ranking: the candidates any signal found that *tell* rather than
    ask, each at its best rank there (ties kept, so it reorders no two facts that tell). A
    question does not answer a question: "Priya, where do you work these days?" shares the words
    of "Where does Priya work now?" but says nothing, and now ranks below what Priya said.
    Measured on bench_quality's dev split (default store): R@10 .829 -> .848, current fact wins
    .938 -> 1.0 (multi-hop .619 -> .595). Not a question: nothing."""
    if not is_question(query):
        return []
    best = best_ranks(ranked)
    telling = {e.id: best[e.id] + 1 for e in read_once(storage, list(best)) if not asks(e.content)}
    return [telling] if telling else []


#: fusion weight of the lists searched for a *rule* rewrite of the query (the query's own lists weigh
#: 1): keyword/synonym rewrites without a model drift from the question, so they fill in below what
#: the question found rather than outvote it. Tuned on bench_quality's dev split only (deep R@10 on
#: the default store: weight 1 .426, 1/3 .530, 0.05 .638, 0.02 .663; fast path .668).
RULE_REWRITE_WEIGHT = 0.02


def needs_deep_search(query: str, fused: Sequence[tuple[str, float]], limit: int, threshold: float) -> bool:
    if not is_question(query):
        return False
    return len(fused) < limit or not fused or fused[0][1] < threshold


def rule_rewrite(query: str) -> list[str]:
    """2–4 variants of a query without an LLM: keywords, names, synonyms, statement form."""
    words = _WORD.findall(query)
    keywords = [w for w in words if w.lower() not in _STOP]
    variants: list[str] = []

    def add(v: str) -> None:
        v = " ".join(v.split())
        if v and v.lower() != query.strip().lower() and v.lower() not in (x.lower() for x in variants):
            variants.append(v)

    add(" ".join(keywords))
    names = query_names(query)
    if names:
        add(" ".join(names))
    syn: list[str] = []
    for w in keywords:
        syn.extend(SYNONYMS.get(w.lower(), []))
    if syn:
        add(" ".join(names + syn))
    if len(variants) < 2:
        add(query.strip().rstrip("?"))
    if len(variants) < 2:
        add(" ".join(w.lower() for w in keywords) + " facts")
    return variants[:4]


#: a question about the present state of things
_CURRENT = re.compile(r"\b(?:now|currently|current|these days|nowadays|at the moment|at present|anymore|latest)\b",
                      re.I)
#: how deep in the other signals' lists the recency signal looks (tuned on bench_quality's dev split)
RECENCY_POOL = 10


def time_signal(storage: "StorageBackend", query: str, qvec: "np.ndarray | None", filters: "SearchFilters",
                k: int, now_ms: int, ranked: Sequence[Sequence[str]]) -> list[list[str]]:
    """Extra ranked lists for a temporal question, to fuse with the other signals.

    * The question names a time ("last month", "in March", "two weeks ago"): the facts whose
      ``event_time`` falls in that range, ranked by the query (vector, then keywords, each
      searched inside the range), and facts *told* in the range that carry no event time of
      their own (ranked by vector). A range the caller already set in ``filters`` is kept.
    * It asks *when* ("When did…", "What day…") without naming a time: the candidates the
      other signals found that carry an ``event_time``, in their best rank.
    * It asks what is true *now* ("…now?", "…these days?", "current…"): the candidates the other
      signals ranked in their top ``RECENCY_POOL``, newest first — what changed later wins ties.
    * Otherwise: no list.
    """
    matches = time_matches(query)  # one regex pass for both questions below
    rng = query_time_range(query, now_ms, matches)
    if rng is None:
        if _CURRENT.search(query):
            best = best_ranks(ranked)
            pool = list(read_once(storage, [i for i, r in best.items() if r < RECENCY_POOL]))
            pool.sort(key=lambda e: (-e.created_at, e.id))
            return [[e.id for e in pool]] if pool else []
        if not is_temporal_query(query, matches):
            return []
        best = best_ranks(ranked)
        dated = {e.id for e in read_once(storage, list(best)) if e.event_time is not None}
        timed = sorted((i for i in best if i in dated), key=lambda i: (best[i], i))
        return [timed[:k]] if timed else []
    if filters.time_range is not None:
        return []  # the caller chose the time window; theirs wins
    by_event = dataclasses.replace(filters, time_range=rng, time_field="event_time")
    lists: list[list[str]] = []
    if qvec is not None:
        lists.append([i for i, _ in storage.search_vector(qvec, k, by_event)])
    lists.append([i for i, _ in storage.search_text(query, k, by_event)])
    if qvec is not None:
        told = dataclasses.replace(filters, time_range=rng, time_field="created_at")
        hits = [i for i, _ in storage.search_vector(qvec, k, told)]
        undated = {e.id for e in read_once(storage, hits) if e.event_time is None}
        lists.append([i for i in hits if i in undated])
    return [lst for lst in lists if lst]
