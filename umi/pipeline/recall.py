"""The recall pipeline.

Fast path: vector top-k + BM25 top-k + exact name match, fused by reciprocal rank
fusion, with filters applied inside each search. Deep path (asked for, or by the
rule in :mod:`umi.pipeline.retrieval`): the query is rewritten into 2–4 variants
(LLM, or rules when there is none), each searched the fast way, and every list is
fused together. Results carry their fused score; ties break by id.
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from ..errors import EmptyQueryError, ProviderError, UmiError
from ..options import RecallOptions, check_limit
from ..storage.base import SearchFilters
from ..types import Entity, Usage
from . import schemas
from .context import PipelineContext
from .retrieval import needs_deep_search, query_names, rrf_fuse, rule_rewrite, time_signal

__all__ = ["validate_query", "recall", "filters_for"]

log = logging.getLogger("umi.recall")
QUERY_BYTES_MAX = 10_000


def validate_query(query: object) -> str:
    if not isinstance(query, str):
        raise TypeError(f"query must be str, not {type(query).__name__}")
    if not query.strip():
        raise EmptyQueryError("recall query is empty or only whitespace")
    n = len(query.encode("utf-8"))
    if n > QUERY_BYTES_MAX:
        from ..errors import TextTooLongError

        raise TextTooLongError(f"query is {n} UTF-8 bytes; the limit is {QUERY_BYTES_MAX}",
                               limit=QUERY_BYTES_MAX, actual=n)
    return query


def filters_for(opts: RecallOptions) -> SearchFilters:
    return SearchFilters(
        entity_types=opts.entity_types,
        time_range=opts.time_range,
        time_field=opts.time_field,
        metadata=opts.metadata,
        include_superseded=opts.include_superseded,
        as_of=opts.as_of,
    )


def _ranked_lists(ctx: PipelineContext, query: str, qvec: np.ndarray | None, filters: SearchFilters,
                  k: int) -> list[list[str]]:
    """The three fast-path signals for one query, each a ranked id list."""
    lists: list[list[str]] = []
    if qvec is not None:
        lists.append([i for i, _ in ctx.storage.search_vector(qvec, k, filters)])
    lists.append([i for i, _ in ctx.storage.search_text(query, k, filters)])
    named: list[Entity] = []
    for name in query_names(query):
        named.extend(ctx.storage.find_by_name(name, filters=filters))
    named.sort(key=lambda e: (-e.created_at, e.id))
    lists.append(list(dict.fromkeys(e.id for e in named))[:k])
    lists.extend(time_signal(ctx.storage, query, qvec, filters, k, ctx.now_ms(), lists))
    return lists


async def _embed_queries(ctx: PipelineContext, queries: list[str], opts: RecallOptions) -> list[np.ndarray | None]:
    if not opts.use_vector_search or ctx.embedder is None or ctx.storage.dim is None:
        return [None] * len(queries)
    try:
        vecs = await ctx.embed(queries, "query")
    except UmiError as exc:
        log.warning("query embedding failed, recalling by keywords and names only: %s", exc)
        return [None] * len(queries)
    if vecs.shape[1] != ctx.storage.dim:
        log.warning("embedder dim %d differs from stored dim %d; vector search skipped", vecs.shape[1], ctx.storage.dim)
        return [None] * len(queries)
    return list(vecs)


def _hydrate(ctx: PipelineContext, top: list[tuple[str, float]]) -> list[Entity]:
    by_id = {e.id: e for e in ctx.storage.get_many([i for i, _ in top])}
    out: list[Entity] = []
    for id_, score in top:
        e = by_id.get(id_)
        if e is not None:
            e = copy.copy(e)  # never mutate a backend's cached object
            e.score = score
            out.append(e)
    return out


def _fast_path(ctx: PipelineContext, query: str, qvec: np.ndarray | None, filters: SearchFilters, k: int,
               limit: int, deep: bool | None) -> tuple[list[list[str]], bool, list[Entity] | None]:
    """Search, fuse, decide on the deep path, and hydrate when it is not needed — in one I/O hop."""
    lists = _ranked_lists(ctx, query, qvec, filters, k)
    fused = rrf_fuse(lists, ctx.config.rrf_k)
    if deep is None:
        deep = needs_deep_search(query, fused, limit, ctx.config.deep_search_threshold)
    if deep:
        return lists, True, None
    return lists, False, _hydrate(ctx, fused[:limit])


def sort_results(found: list[Entity], opts: RecallOptions) -> list[Entity]:
    """``opts.sort_by`` applied to the already-chosen results (stable: ties keep relevance order)."""
    if opts.sort_by == "relevance":
        return found
    field = opts.sort_by
    dated = [e for e in found if getattr(e, field) is not None]
    undated = [e for e in found if getattr(e, field) is None]
    dated.sort(key=lambda e: getattr(e, field), reverse=not opts.sort_ascending)
    return dated + undated


async def recall(ctx: PipelineContext, query: str, opts: RecallOptions) -> list[Entity]:
    return sort_results(await _recall(ctx, query, opts), opts)


async def _recall(ctx: PipelineContext, query: str, opts: RecallOptions) -> list[Entity]:
    limit = check_limit(opts.limit) if opts.limit is not None else ctx.config.recall_limit
    filters = filters_for(opts)
    k = max(limit * 3, 20)
    (qvec,) = await _embed_queries(ctx, [query], opts)
    lists, deep, found = await ctx.io(_fast_path, ctx, query, qvec, filters, k, limit, opts.deep_search)
    if not deep:
        assert found is not None
        return found
    variants: list[str] = []
    if ctx.llm is not None:
        try:
            data = await ctx.ask("rewrite_query", schemas.rewrite_prompt(query), Usage())
            variants = [v for v in data.get("queries", []) if isinstance(v, str) and v.strip()][:4]
        except ProviderError as exc:
            log.warning("query rewriting failed, using rule rewrites: %s", exc)
    if not variants:
        variants = rule_rewrite(query)
    variants = [v for v in dict.fromkeys(variants) if v.strip().lower() != query.strip().lower()]
    if variants:
        vvecs = await _embed_queries(ctx, variants, opts)
        for v, vv in zip(variants, vvecs):
            lists.extend(await ctx.io(_ranked_lists, ctx, v, vv, filters, k))
    fused = rrf_fuse(lists, ctx.config.rrf_k)
    return await ctx.io(_hydrate, ctx, fused[:limit])
