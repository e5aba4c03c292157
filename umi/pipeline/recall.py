"""The recall pipeline.

Fast path: vector top-k + BM25 top-k + exact name match (+ the time signal, and for a question
the facts that tell), fused by reciprocal rank fusion, with filters applied inside each search.
Deep path (asked for, or — with an LLM configured — by the rule in :mod:`umi.pipeline.retrieval`): the query is rewritten into 2–4
variants (LLM, or rules when there is none or it fails), each searched the fast way but by vector
alone (by keywords when it has no vector: the query's own keyword list stands for them), and every
list is fused together (a rule rewrite's lists at ``RULE_REWRITE_WEIGHT``). Results carry
their fused score; ties break by id.

Results are **statements**: facts that share one source and one normalised content (the
facets of a sentence about several names) are returned once, as the best-ranked facet,
with ``mentions`` holding the names of every facet found; ``limit`` counts statements.
``as_of`` answers from each fact's history, so a fact that was superseded and later
restated is not shown as current in between. With ``include_superseded``, a superseded fact
never ranks above a result that replaced it (:func:`below_replacements`).

Reranking (``MemoryConfig.reranker`` set, ``RecallOptions.rerank`` not False): the best
``max(limit, rerank_top_n)`` statements of either path (each list searched as deep as for a recall
of that many) are scored against the query by the reranker in one batched call, and the
reranker's order is fused with the fused order (reciprocal rank, equal weights: alone, the
SPLADE-tiny reranker lost temporal questions that the fused order gets right); the best ``limit``
are returned, each with its new score. A failing reranker degrades to the fused order with a warning.

Degradation is reported, not only logged: :class:`RecallResult` is the list of results
with ``warnings`` (query embedding failed, vector search skipped, rewriting failed).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .._validate import QUERY_BYTES_MAX, check_input_text
from ..errors import EmbeddingError, EmptyQueryError, InvalidConfigError, ProviderError
from ..options import RecallOptions, check_limit
from ..storage.base import SearchFilters
from ..types import Entity, Usage
from . import schemas
from .context import PipelineContext, provider_failure
from .passages import rerank_text
from .remember import statement_key
from .retrieval import (RULE_REWRITE_WEIGHT, Ranking, hop_signal, name_signal, needs_deep_search, query_names,
                        read_named, rrf_fuse, rule_rewrite, tell_signal, time_signal)

__all__ = ["validate_query", "recall", "filters_for", "RecallResult", "current_at", "reranker_for", "below_replacements"]

log = logging.getLogger("umi.recall")


def validate_query(query: object) -> str:
    """A recall query, at most ``umi._validate.QUERY_BYTES_MAX`` UTF-8 bytes: umi._validate's rule."""
    return check_input_text(query, "recall query", QUERY_BYTES_MAX, EmptyQueryError)


class RecallResult(list[Entity]):
    """What ``recall`` returns: a ``list[Entity]`` of statements, best first, plus ``warnings``
    — how this recall degraded (empty when it did not)."""

    warnings: tuple[str, ...]

    def __init__(self, entities: Iterable[Entity] = (), warnings: Sequence[str] = ()) -> None:
        super().__init__(entities)
        self.warnings = tuple(warnings)

    def __repr__(self) -> str:
        return f"RecallResult({list.__repr__(self)}, warnings={self.warnings!r})"


def filters_for(opts: RecallOptions, ctx: PipelineContext | None = None) -> SearchFilters:
    """The options' filters, kept inside the view's scope."""
    return ctx.within(opts.filters) if ctx is not None else opts.filters


def current_at(history: Sequence[Any], t: int) -> bool:
    """Was the fact current at ``t``, by its history? The last change at or before ``t`` decides:
    its snapshot's ``valid_to`` unset (or after ``t``). Nothing before ``t``: not yet stored."""
    last: Mapping[str, Any] | None = None
    for rec in history:
        if rec.at <= t:
            last = rec.snapshot
    if last is None or last.get("forgotten"):
        return False
    vt = last.get("valid_to")
    return vt is None or vt > t


def _ranked_lists(ctx: PipelineContext, query: str, qvec: np.ndarray | None, filters: SearchFilters,
                  k: int, content_only: bool = False,
                  content: tuple[list[tuple[str, float]] | None, list[tuple[str, float]]] | None = None
                  ) -> list[Ranking]:
    """The fast-path signals for one query, each a ranked id list (``content_only``: the vector
    and keyword lists alone; ``content``: the query's vector and keyword hits, already searched
    by :meth:`~umi.storage.base.StorageBackend.search_content`)."""
    if content is None:
        (content,) = ctx.storage.search_content([query], [qvec], k, filters)
    vector_hits, text_hits = content
    lists: list[Sequence[str]] = []
    if vector_hits is not None:
        lists.append([i for i, _ in vector_hits])
    lists.append([i for i, _ in text_hits])
    if content_only:
        return list(lists)
    found = list(lists)
    names = query_names(query)
    lists.append(name_signal(read_named(ctx.storage, names, filters), found, k))
    lists.extend(hop_signal(ctx.storage, query, names, found, filters, k))
    lists.extend(time_signal(ctx.storage, query, qvec, filters, k, ctx.now_ms(), lists))
    return [*lists, *tell_signal(ctx.storage, query, lists, k)]


async def _embed_queries(ctx: PipelineContext, queries: list[str], opts: RecallOptions,
                         warnings: list[str]) -> list[np.ndarray | None]:
    if not opts.use_vector_search or ctx.embedder is None or ctx.storage.dim is None:
        return [None] * len(queries)
    try:
        vecs = await ctx.embed(queries, "query")
    except (EmbeddingError, ProviderError) as exc:
        msg = f"query embedding failed, recalled by keywords and names only: {provider_failure(exc)}"
        log.warning("%s", msg)
        warnings.append(msg)
        return [None] * len(queries)
    if vecs.shape[1] != ctx.storage.dim:
        msg = f"embedder makes {vecs.shape[1]}-d vectors but the store holds {ctx.storage.dim}-d; vector search skipped"
        log.warning("%s", msg)
        warnings.append(msg)
        return [None] * len(queries)
    return list(vecs)


def _statements(ctx: PipelineContext, fused: list[tuple[str, float]], limit: int,
                as_of: int | None) -> list[Entity]:
    """The best ``limit`` statements of a fused ranking, each once, with the names it mentions.

    Walks the ranking in chunks (one storage read per chunk) until ``limit`` statements are
    found; a copy of an earlier statement adds its name to ``mentions``. A store that can show
    its entities without copying them (``peek_many``) is read that way, and only the statements
    returned are hydrated (in the same read's ``get_many``: the Sim faults count one read per chunk)."""
    peek = getattr(ctx.storage, "peek_many", None) if as_of is None else None
    out: list[Entity] = []
    groups: dict[tuple[str, str], tuple[Entity, list[str]]] = {}
    chunk = max(2 * limit, 20)
    pos = 0
    while pos < len(fused) and len(out) < limit:
        part = fused[pos : pos + chunk]
        pos += chunk
        ids = [i for i, _ in part]
        by_id = {e.id: e for e in (peek(ids) if peek is not None else ctx.storage.get_many(ids))}
        new: list[tuple[tuple[str, str], Entity, float]] = []
        for id_, score in part:
            e = by_id.get(id_)
            if e is None:
                continue
            # The store's as_of reads created_at/valid_to; a fact changed after as_of (superseded,
            # then revived) may have been superseded *at* as_of: its history says.
            if as_of is not None and e.updated_at > as_of and not current_at(ctx.storage.history(e.id), as_of):
                continue
            key = statement_key(e)
            got = groups.get(key)
            if got is None:
                if len(out) + len(new) >= limit:
                    continue
                groups[key] = (e, [e.name])
                new.append((key, e, score))
            elif e.name not in got[1]:
                got[1].append(e.name)
        # the statements this chunk adds, as the caller's own copies (get_many hands them out)
        own = {e.id: e for e in ctx.storage.get_many([e.id for _, e, _ in new])} if peek is not None else None
        for key, e, score in new:
            rep = e if own is None else own.get(e.id)
            if rep is None:  # forgotten between the two reads (a read off the store's lock)
                del groups[key]
                continue
            rep.score = score  # get_many hands out the caller's own copies (the storage contract)
            out.append(rep)
            groups[key] = (rep, groups[key][1])
    for rep, names in groups.values():
        low = rep.content.casefold()

        def place(n: str) -> tuple[int, str]:
            i = low.find(n.casefold())
            return (i if i >= 0 else len(low), n)

        rep.mentions = tuple(sorted(names, key=place))
    return out


def _fast_path(ctx: PipelineContext, query: str, qvec: np.ndarray | None, filters: SearchFilters, k: int,
               limit: int, pool: int, deep: bool | None,
               as_of: int | None) -> tuple[list[Ranking], bool, list[Entity] | None]:
    """Search, fuse, decide on the deep path, and hydrate when it is not needed — in one I/O hop
    (``pool`` statements: the ``limit``, or more for the reranker)."""
    lists = _ranked_lists(ctx, query, qvec, filters, k)
    if deep:  # asked for: the deep path fuses these lists with the variants' (none fused here)
        return lists, True, None
    fused = rrf_fuse(lists, ctx.config.rrf_k)
    # the automatic rule needs a model to rewrite with (see retrieval's docstring)
    if deep is None and ctx.llm is not None and needs_deep_search(query, fused, limit,
                                                                  ctx.config.deep_search_threshold):
        return lists, True, None
    return lists, False, _statements(ctx, fused, pool, as_of)


def _variant_contents(ctx: PipelineContext, variants: list[str], vvecs: list[np.ndarray | None],
                      filters: SearchFilters, k: int) -> list[tuple[list[tuple[str, float]] | None,
                                                                    list[tuple[str, float]]]]:
    """Each variant's content hits, as ``search_content`` gives them: a variant with a vector is
    searched by vector alone (all of them in one ``search_vector_many``: one graph-walk call), one
    without (its embedding failed) by keywords. A variant's keyword list is left out: the query's own
    is fused already, and the variants' (a rewrite repeats the query's words, or drifts from them)
    outvoted it. bench_quality, dev split, R@10: raw-deep (rule rewrites) .751 -> .765, deep .857 ->
    .857, the raw store with the Sim LLM's rewrites at weight 1 .561 -> .710; and a BM25 search less
    per variant (bench_memory, 3 variants at 100k: deep/fast 2.7-3.3x -> 2.2-2.3x, CPU)."""
    with_vec = [v for v in vvecs if v is not None]
    by_vec = iter(ctx.storage.search_vector_many(with_vec, k, filters) if with_vec else [])
    no_vec = [v for v, vv in zip(variants, vvecs) if vv is None]
    by_text = iter(ctx.storage.search_content(no_vec, [None] * len(no_vec), k, filters) if no_vec else [])
    empty: list[tuple[str, float]] = []
    return [(next(by_vec), empty) if vv is not None else next(by_text) for vv in vvecs]


def _deep_path(ctx: PipelineContext, lists: list[Ranking], variants: list[str],
               vvecs: list[np.ndarray | None], filters: SearchFilters, k: int, limit: int,
               as_of: int | None, variant_weight: float = 1.0) -> list[Entity]:
    """Every variant searched (:func:`_variant_contents`), everything fused and hydrated — in one
    I/O hop. Down-weighted (rule) variants add their content lists only, weighing ``variant_weight``:
    their names and time words are the query's own, whose lists are already in ``lists``."""
    weights = [1.0] * len(lists)
    contents = _variant_contents(ctx, variants, vvecs, filters, k) if variants else []
    for v, vv, content in zip(variants, vvecs, contents):
        more = _ranked_lists(ctx, v, vv, filters, k, content_only=variant_weight != 1.0, content=content)
        lists.extend(more)
        weights.extend([variant_weight] * len(more))
    return _statements(ctx, rrf_fuse(lists, ctx.config.rrf_k, weights), limit, as_of)


def reranker_for(ctx: PipelineContext, opts: RecallOptions) -> Any:
    """The reranker this recall uses, or None (see ``RecallOptions.rerank``)."""
    if opts.rerank is False:
        return None
    if ctx.config.reranker is None and opts.rerank:
        raise InvalidConfigError("RecallOptions(rerank=True) needs a reranker: MemoryConfig(reranker=LocalReranker())")
    return ctx.config.reranker


async def _rerank(ctx: PipelineContext, reranker: Any, query: str, qvec: np.ndarray | None, found: list[Entity],
                  limit: int, warnings: list[str]) -> list[Entity]:
    """``found`` (fused order) rescored by the reranker, both orders fused, the best ``limit``. A long
    fact is shown to the reranker as its passage nearest ``qvec`` (:func:`~umi.pipeline.passages.rerank_text`)."""
    if len(found) < 2:
        return found[:limit]
    try:
        raw = await asyncio.to_thread(reranker.score, query, [rerank_text(e, qvec) for e in found])
        scores = np.asarray(raw, dtype=np.float64)
        if scores.shape != (len(found),) or not np.all(np.isfinite(scores)):
            raise ProviderError(f"reranker {reranker.name!r} returned shape {scores.shape}, "
                                f"expected ({len(found)},) finite scores")
    except Exception as exc:  # a reranker that fails (or has a bug) costs the reranking, not the recall
        why = provider_failure(exc) if isinstance(exc, ProviderError) else f"{type(exc).__name__}: {exc}"
        msg = f"reranking failed, kept the fused order: {why}"
        log.warning("%s", msg)
        warnings.append(msg)
        return found[:limit]
    by_score = sorted(range(len(found)), key=lambda i: (-scores[i], found[i].id))
    by_id = {e.id: e for e in found}
    out = []
    for id_, score in rrf_fuse([[e.id for e in found], [found[i].id for i in by_score]], ctx.config.rrf_k)[:limit]:
        e = by_id[id_]  # a get_many copy (see _statements): setting its score touches no backend's object
        e.score = score
        out.append(e)
    return out


def sort_results(found: RecallResult, opts: RecallOptions) -> RecallResult:
    """``opts.sort_by`` applied to the already-chosen results (stable: ties keep relevance order)."""
    if opts.sort_by == "relevance":
        return found
    field = opts.sort_by
    dated = [e for e in found if getattr(e, field) is not None]
    undated = [e for e in found if getattr(e, field) is None]
    dated.sort(key=lambda e: getattr(e, field), reverse=not opts.sort_ascending)
    return RecallResult(dated + undated, found.warnings)


def below_replacements(ctx: PipelineContext, found: RecallResult) -> RecallResult:
    """With superseded facts included, a superseded fact never outranks a result that replaced it
    (an ``update``/``contradict`` relation from it, directly or along a chain of them): its score
    is capped just below its replacement's and the results re-sorted (stable). Asked "Alice" with
    history, "Alice left Acme and now works at Initech" comes before "Alice is an engineer at Acme"
    although the older sentence is nearer to the bare name."""
    at = {e.id: e for e in found}
    newer = {e.id: [r.target_id for r in ctx.storage.relations_for(e.id)
                    if r.source_id == e.id and r.evolution_type.supersedes and r.target_id in at]
             for e in found if e.valid_to is not None}
    capped: dict[str, float] = {}

    def score(i: str, path: frozenset[str]) -> float:
        if i not in capped:
            s: float = at[i].score or 0.0
            for j in newer.get(i, ()):
                if j not in path:  # a revived fact can close a cycle of relations: walk each once
                    s = min(s, float(np.nextafter(score(j, path | {i}), -np.inf)))
            capped[i] = s
        return capped[i]

    for e in found:
        e.score = score(e.id, frozenset())
    return RecallResult(sorted(found, key=lambda e: -(e.score or 0.0)), found.warnings)


async def recall(ctx: PipelineContext, query: str, opts: RecallOptions) -> RecallResult:
    found = await _recall(ctx, query, opts)
    if opts.include_superseded and opts.as_of is None and any(e.valid_to is not None for e in found):
        found = await ctx.io(below_replacements, ctx, found)
    return sort_results(found, opts)


async def _recall(ctx: PipelineContext, query: str, opts: RecallOptions) -> RecallResult:
    limit = check_limit(opts.limit) if opts.limit is not None else ctx.config.recall_limit
    filters = filters_for(opts, ctx)
    reranker = reranker_for(ctx, opts)
    pool = limit if reranker is None else max(limit, ctx.config.rerank_top_n)
    k = max(pool * 3, 20)  # each list searched as deep as a recall of `pool` would
    warnings: list[str] = []
    (qvec,) = await _embed_queries(ctx, [query], opts, warnings)
    # inline when the store allows; an as_of recall reads history, which a lazy store fetches
    hop = ctx.read if opts.as_of is None else ctx.io
    lists, deep, found = await hop(_fast_path, ctx, query, qvec, filters, k, limit, pool, opts.deep_search,
                                      opts.as_of)
    if not deep:
        assert found is not None
        if reranker is not None:
            found = await _rerank(ctx, reranker, query, qvec, found, limit, warnings)
        return RecallResult(found, warnings)
    variants: list[str] = []
    if ctx.llm is not None:
        try:
            data = await ctx.ask("rewrite_query", schemas.rewrite_prompt(query), Usage())
            variants = [v for v in data.get("queries", []) if isinstance(v, str) and v.strip()][:4]
        except ProviderError as exc:
            msg = f"query rewriting failed, used rule rewrites: {provider_failure(exc)}"
            log.warning("%s", msg)
            warnings.append(msg)
    weight = 1.0
    if not variants:
        variants, weight = rule_rewrite(query), RULE_REWRITE_WEIGHT
    variants = [v for v in dict.fromkeys(variants) if v.strip().lower() != query.strip().lower()]
    vvecs = await _embed_queries(ctx, variants, opts, warnings) if variants else []
    found = await hop(_deep_path, ctx, lists, variants, vvecs, filters, k, pool, opts.as_of,
                         weight)
    if reranker is not None:
        found = await _rerank(ctx, reranker, query, qvec, found, limit, warnings)
    return RecallResult(found, warnings)
