"""bench_memory: what a Memory costs end to end, against chromadb on the same vectors.

Measures, in one run:

* remember throughput, per call through ``Memory.remember_sync``: raw notes
  (``without_extraction``) and with Sim extraction + evolution detection, on the
  embedded DuckDB store, with the Sim embedder (its cost is shown separately, and
  the local e5 embedder's texts/s is shown beside it, since that is what the
  embedded default pays per text);
* the physical floor of a raw note, measured in the same run: a one-row DuckDB insert
  transaction on a file (``BEGIN; INSERT INTO facts (id, text, embedding FLOAT[384]);
  COMMIT``, one fsync), and the ratio of a raw-note remember (excl. Sim embedding) to it;
* bulk ingest rows/s excluding embedding: umi's storage ``upsert`` (DuckDB, Arrow bulk
  path, index and keyword postings kept in step) against chromadb's ``collection.add``
  (embedded, persistent, hnswlib-based), same precomputed 384-d vectors and texts;
* ``remember_many`` of 10,000 short texts (``--remember-many N``) on the embedded default:
  ``Memory(path)`` on a DuckDB file with the local e5 embedder (its text cache off) and rule
  extraction + evolution detection: texts/s end to end, and the share of that time spent
  inside the embedder (the rest is extraction, evolution, storage and the index);
  ``--only-remember-many`` runs just this case;
* recall latency p50/p95 at 10k and 100k stored memories through ``Memory.recall_sync``
  (vector + BM25 + name match, fused, hydrated), with the query embedding excluded
  (query vectors are precomputed; their embedding time is shown separately), against
  chromadb ``collection.query`` (vector only) on the same vectors;
* the floor under that: a raw hnswlib ``knn_query`` (k=10, umi's ``ef_search``) on the same
  vectors (umi's own graph when it has built one, else a graph built here with umi's
  parameters), and recall p50 as a multiple of it;
* the deep path with 3 query variants (a stub LLM answers the rewrite at once, variant vectors
  precomputed) against the fast path: p50 and the ratio;
* two writers whose LLM is slow (the Sim LLM behind a 200 ms ``asyncio.sleep`` per call), each
  making ``--writers-n`` ``remember_sync`` calls from its own thread on one Memory, against one
  writer alone: the wall time of both and the ratio (1.0: the writers overlap fully; 2.0: they
  take turns).

Vectors come from the Sim embedder (token-hashed, 384-d), computed once per text; with
``--vectors local``, the recall sizes use the local e5 embedder's vectors instead (real sentence
vectors, as a new user's store holds; on this corpus's small vocabulary they crowd together, and a
raw hnswlib query over them measured 0.52-0.73 ms at 100k against 0.74-0.84 ms over Sim vectors).
Embedding 100k texts with it took 48 minutes on this box, so those vectors are kept in
``--vector-cache`` (default ``~/.cache/umi/bench_memory``), one ``.npy`` file per list of texts,
named by a hash of the embedder's name, the kind and the texts, and read from there next time.
``--full`` adds nothing yet beyond 100k; ``--sizes 10000`` runs a subset.
Results: a table on stdout and JSON in benchmarks/results/bench_memory.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import umi
from umi import Entity, RecallOptions, RememberOptions
from umi.providers.base import EmbeddingProvider

RESULTS = Path(__file__).parent / "results"


def _times_ms(call, items) -> list[float]:  # type: ignore[no-untyped-def]
    """Milliseconds of ``call(item)`` for each item."""
    out = []
    for item in items:
        t0 = time.perf_counter()
        call(item)
        out.append((time.perf_counter() - t0) * 1e3)
    return out
FIRST = "Alice Bob Carol Dan Erin Frank Grace Heidi Ivan Judy Kim Liam Mia Noah Olga Pete Quinn Rosa Sam Tina".split()
ORGS = "Acme Initech Globex Hooli Umbrella Stark Wayne Wonka Cyberdyne Soylent".split()
CITIES = "Berlin Paris Lisbon Munich Oslo Madrid Rome Vienna Prague Dublin".split()
HOBBIES = "chess climbing violin painting running sailing baking cycling poetry gardening".split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = f"{rng.choice(FIRST)}{i}"
        kind = i % 3
        if kind == 0:
            out.append(f"{p} works at {rng.choice(ORGS)} Corp as an engineer")
        elif kind == 1:
            out.append(f"{p} lives in {rng.choice(CITIES)} and enjoys {rng.choice(HOBBIES)}")
        else:
            out.append(f"{p} is learning {rng.choice(HOBBIES)} with {rng.choice(FIRST)}")
    return out


class PrecomputedEmbedder(EmbeddingProvider):
    """Serves vectors computed ahead of time, so timings exclude embedding."""

    name = "precomputed"

    def __init__(self, table: dict[str, np.ndarray], dim: int) -> None:
        self.table, self.dim = table, dim

    def embed(self, texts, *, kind="passage"):
        return np.stack([self.table[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    async def aembed(self, texts, *, kind="passage"):  # a dict lookup: no worker-thread hop
        return self.embed(texts, kind=kind)


class TimedEmbedder(EmbeddingProvider):
    """Another embedder, with the wall time of its calls added up (same identity, so the store
    records the real embedder)."""

    def __init__(self, inner: EmbeddingProvider) -> None:
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.model = getattr(inner, "model", None)
        self.seconds, self.texts, self.calls = 0.0, 0, 0

    def embed(self, texts, *, kind="passage"):
        t0 = time.perf_counter()
        try:
            return self.inner.embed(texts, kind=kind)
        finally:
            self.seconds += time.perf_counter() - t0
            self.texts += len(texts)
            self.calls += 1

    async def aembed(self, texts, *, kind="passage"):
        t0 = time.perf_counter()
        try:
            return await self.inner.aembed(texts, kind=kind)
        finally:
            self.seconds += time.perf_counter() - t0
            self.texts += len(texts)
            self.calls += 1


def time_remember_many(n: int, tmp: str) -> dict:
    """remember_many on the embedded default: DuckDB file, local embedder, rules."""
    from umi.providers.local import LocalEmbeddingProvider

    emb = TimedEmbedder(LocalEmbeddingProvider(cache_size=0))
    emb.embed(["warm up: load the model"])
    emb.seconds = emb.texts = emb.calls = 0
    texts = corpus(n, seed=4)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with umi.Memory(os.path.join(tmp, "many.duckdb"), embedder=emb) as m:
        t0 = time.perf_counter()
        results = m.remember_many_sync(texts)
        dt = time.perf_counter() - t0
        stored = m.count_sync()
    return {"texts": n, "seconds": dt, "texts_per_s": n / dt, "embed_seconds": emb.seconds,
            "embed_share": emb.seconds / dt, "embedded_texts": emb.texts, "embed_calls": emb.calls,
            "per_s_excl_embedding": n / max(1e-9, dt - emb.seconds), "facts_stored": stored,
            "duplicates": sum(r.duplicate for r in results), "loadavg_1min_before": load}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class FloorTxn:
    """The least a durable remember can cost: one DuckDB transaction inserting one small fact
    row (id, text, a FLOAT[384] vector) into a file, with DuckDB's default settings (one fsync)."""

    def __init__(self, path: str) -> None:
        import duckdb

        self.vec = umi.SimEmbeddingProvider(0, 384).embed(["floor"])[0].tolist()
        self.con = duckdb.connect(path)
        self.con.execute("CREATE TABLE facts (id VARCHAR PRIMARY KEY, text VARCHAR NOT NULL, embedding FLOAT[384])")
        self.n = 0
        self.ms: list[float] = []

    def one(self, text: str) -> None:
        t0 = time.perf_counter()
        self.con.execute("BEGIN TRANSACTION")
        self.con.execute("INSERT INTO facts VALUES (?, ?, ?)", [f"f{self.n}", text, self.vec])
        self.con.execute("COMMIT")
        self.ms.append((time.perf_counter() - t0) * 1e3)
        self.n += 1

    def close(self) -> dict:
        self.con.close()
        mean = statistics.fmean(self.ms)
        return {"txns": self.n, "per_s": 1e3 / mean, "ms": mean, "ms_p50": statistics.median(self.ms)}


def time_remember(n: int, extract: bool, sim_emb: umi.SimEmbeddingProvider, tmp: str,
                  floor: FloorTxn | None = None) -> dict:
    """``n`` remember_sync calls; with ``floor``, a floor transaction after each call (timed apart),
    so both see the same machine (on a shared disk the fsync cost drifts by the minute)."""
    texts = corpus(n, seed=1 if extract else 2)
    per_call: list[float] = []
    # the embedder's time is taken inside the calls: embedding the same texts again afterwards
    # costs less (the Sim embedder caches its token features: ~0.15 vs ~0.4 ms a text)
    emb_timed = TimedEmbedder(sim_emb)
    with umi.Memory(os.path.join(tmp, f"rem{int(extract)}.duckdb"), llm=umi.SimLLMProvider(1),
                    embedder=emb_timed) as m:
        opts = RememberOptions() if extract else RememberOptions().without_extraction()
        for t in texts:
            t0 = time.perf_counter()
            m.remember_sync(t, opts)
            per_call.append(time.perf_counter() - t0)
            if floor is not None:
                floor.one(t)
    dt = sum(per_call)
    emb = emb_timed.seconds
    return {"texts": n, "per_s": n / dt, "per_s_excl_embedding": n / max(1e-9, dt - emb),
            "ms_excl_embedding": max(1e-9, dt - emb) / n * 1e3, "embed_share": emb / dt,
            "ms_p50": statistics.median(per_call) * 1e3, "embed_ms": emb / n * 1e3}


def time_remember_tail(n: int, gap_s: float, sim_emb: umi.SimEmbeddingProvider, tmp: str) -> dict:
    """``n`` raw-note remember_sync calls ``gap_s`` apart (an agent's turns between them): the
    per-call latency's percentiles. The journal fills every 256 calls; what that costs the caller
    shows in the tail."""
    texts = corpus(n + 20, seed=4)
    per_call: list[float] = []
    with umi.Memory(os.path.join(tmp, "tail.duckdb"), embedder=sim_emb) as m:
        opts = RememberOptions().without_extraction()
        for t in texts[:20]:
            m.remember_sync(t, opts)
        for t in texts[20:]:
            t0 = time.perf_counter()
            m.remember_sync(t, opts)
            per_call.append((time.perf_counter() - t0) * 1e3)
            time.sleep(gap_s)
    return {"texts": n, "gap_ms": gap_s * 1e3, "ms_p50": pct(per_call, 50), "ms_p99": pct(per_call, 99),
            "ms_p999": pct(per_call, 99.9), "ms_max": max(per_call)}


def local_embedder_speed(texts: list[str]) -> dict:
    try:
        from umi.providers.local import LocalEmbeddingProvider
    except ImportError:
        return {}
    e = LocalEmbeddingProvider(cache_size=0)
    t0 = time.perf_counter()
    e.embed(texts[:8])
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    e.embed(texts, kind="passage")
    return {"texts_per_s": len(texts) / (time.perf_counter() - t0), "first_call_s": load}


def build_umi(n: int, texts: list[str], vecs: np.ndarray, tmp: str, table: dict,
              llm: umi.SimLLMProvider | None = None) -> tuple[umi.Memory, float]:
    from umi.storage.duckdb import DuckDBStorageBackend

    st = DuckDBStorageBackend.connect(os.path.join(tmp, f"umi{n}.duckdb"), dim=vecs.shape[1])
    ents = [Entity("note", t.split()[0], t, embedding=vecs[i], created_at=1_700_000_000_000 + i)
            for i, t in enumerate(texts)]
    t0 = time.perf_counter()
    for i in range(0, n, 5000):
        with st.transaction():
            st.upsert(ents[i : i + 5000])
    dt = time.perf_counter() - t0
    st.build_vector_index()  # HNSW above 20k: build the graph before timing searches
    m = umi.Memory(storage=st, llm=llm, embedder=PrecomputedEmbedder(table, vecs.shape[1]))
    return m, n / dt


def build_chroma(n: int, texts: list[str], vecs: np.ndarray, tmp: str):
    import chromadb

    client = chromadb.PersistentClient(path=os.path.join(tmp, f"chroma{n}"))
    col = client.create_collection(f"bench{n}", metadata={"hnsw:space": "cosine"})
    ids = [f"id{i}" for i in range(n)]
    t0 = time.perf_counter()
    step = 5000
    for i in range(0, n, step):
        col.add(ids=ids[i : i + step], embeddings=vecs[i : i + step], documents=texts[i : i + step],
                metadatas=[{"entity_type": "note"}] * len(ids[i : i + step]))
    return col, n / (time.perf_counter() - t0)


# --- recall: the floor, the deep path, writers with a slow LLM ----------------------------------


def variants_of(query: str) -> list[str]:
    """The 3 rewrites the deep-path stub LLM answers for ``query``: distinct, and not the query."""
    words = query.split()
    return [" ".join(words[:-1]) + " facts", words[-1] + " " + words[0], " ".join(reversed(words))]


class VariantsLLM(umi.SimLLMProvider):
    """Answers ``rewrite_query`` with :func:`variants_of` at once (no thread hop, no latency), so
    the deep path's time is search time."""

    async def acomplete_json(self, system, prompt, schema, *, task):
        if task == "rewrite_query":
            from umi.pipeline.schemas import read_tag
            from umi.providers.base import LLMResult

            return LLMResult(data={"queries": variants_of(read_tag(prompt, "query"))}, usage=umi.Usage())
        return self.complete_json(system, prompt, schema, task=task)


class SlowLLM(umi.SimLLMProvider):
    """The Sim LLM behind a fixed latency per call (an ``asyncio.sleep``: it waits as a remote API
    does, holding no thread)."""

    def __init__(self, seed: int, latency_s: float) -> None:
        super().__init__(seed)
        self.latency_s = latency_s

    async def acomplete_json(self, system, prompt, schema, *, task):
        import asyncio

        await asyncio.sleep(self.latency_s)
        return self.complete_json(system, prompt, schema, task=task)


def embed_cached(emb: EmbeddingProvider, texts: list[str], kind: str, cache: Path | None) -> np.ndarray:
    """``emb.embed(texts, kind=kind)``, kept in ``cache`` (None: not kept) as an ``.npy`` file
    named by a hash of the embedder's name and model, the kind and the texts."""
    if cache is None:
        return emb.embed(texts, kind=kind)
    key = hashlib.sha256("\0".join([emb.name, str(getattr(emb, "model", "")), kind, *texts]).encode()).hexdigest()
    path = cache / f"{emb.name}-{kind}-{len(texts)}-{key[:16]}.npy"
    if path.exists():
        return np.load(path)
    print(f"embedding {len(texts):,} texts with {emb.name} (kept in {path})", file=sys.stderr, flush=True)
    out = np.concatenate([emb.embed(texts[i : i + 1000], kind=kind) for i in range(0, len(texts), 1000)])
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    return out


def time_raw_hnsw(st, vecs: np.ndarray, qv: np.ndarray) -> list[float]:
    """Per-query ms of a bare hnswlib knn_query (k=10) on the store's vectors: umi's own graph when
    built, else one built here with the index's parameters."""
    import hnswlib

    index = st._cache.index
    graph = index._graph
    if graph is None:
        graph = hnswlib.Index(space="ip", dim=vecs.shape[1])
        graph.init_index(max_elements=vecs.shape[0], M=index.M, ef_construction=index.ef_construction,
                         random_seed=index.seed)
        unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        graph.add_items(unit.astype(np.float32), np.arange(vecs.shape[0]), num_threads=1)
    graph.set_ef(index.ef_search)
    for i in range(10):
        graph.knn_query(qv[i], k=10, num_threads=1)
    lat = []
    for i in range(qv.shape[0]):
        t0 = time.perf_counter()
        graph.knn_query(qv[i], k=10, num_threads=1)
        lat.append((time.perf_counter() - t0) * 1e3)
    return lat


def time_writers(n: int, tmp: str, latency_s: float = 0.2) -> dict:
    """One writer's ``n`` remembers, then two writers' ``n`` each at once (two threads, one Memory)."""
    import threading

    texts = corpus(3 * n, seed=6)
    out = {"remembers_per_writer": n, "llm_latency_ms": latency_s * 1e3}
    for writers in (1, 2):
        llm = SlowLLM(1, latency_s)
        with umi.Memory(os.path.join(tmp, f"writers{writers}.duckdb"), llm=llm,
                        embedder=umi.SimEmbeddingProvider(0, 384)) as m:
            m.remember_sync("warm up: Zed works at Nowhere")

            def work(part: list[str]) -> None:
                for t in part:
                    m.remember_sync(t)

            threads = [threading.Thread(target=work, args=(texts[w * n:(w + 1) * n],)) for w in range(writers)]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            out[f"writers{writers}_s"] = time.perf_counter() - t0
            out[f"writers{writers}_llm_calls"] = sum(llm.calls.values())
    out["ratio"] = out["writers2_s"] / out["writers1_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--remember-n", type=int, default=500)
    ap.add_argument("--no-chroma", action="store_true")
    ap.add_argument("--remember-many", type=int, default=10_000, help="texts for the remember_many case (0: skip)")
    ap.add_argument("--only-remember-many", action="store_true", help="run only the remember_many case")
    ap.add_argument("--remember-tail", type=int, default=0,
                    help="raw-note remembers 150 ms apart, for the latency tail (0: skip; 560 crosses two journal move-ins)")
    ap.add_argument("--writers-n", type=int, default=20,
                    help="remembers per writer in the two-writers-with-a-slow-LLM case (0: skip)")
    ap.add_argument("--vectors", choices=("sim", "local"), default="sim",
                    help="the recall sizes' vectors: the Sim embedder's, or the local e5 embedder's (cached)")
    ap.add_argument("--vector-cache", default=os.path.join(os.path.expanduser("~"), ".cache", "umi", "bench_memory"),
                    help="where --vectors local keeps the vectors it computed")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    sim = umi.SimEmbeddingProvider(0, 384)
    if args.vectors == "local":
        from umi.providers.local import LocalEmbeddingProvider

        vec_emb: EmbeddingProvider = LocalEmbeddingProvider(cache_size=0)
        vec_cache: Path | None = Path(args.vector_cache)
    else:
        vec_emb, vec_cache = sim, None
    res: dict = {"machine": {"python": sys.version.split()[0], "cpus": os.cpu_count(), "platform": platform.platform()},
                 "vectors": vec_emb.name}
    rows = []
    with tempfile.TemporaryDirectory(prefix="umi-bench-") as tmp:
        if args.remember_many:
            many = time_remember_many(args.remember_many, tmp)
            res["remember_many"] = many
            rows.append((f"remember_many, {many['texts']:,} short texts (DuckDB file, local e5, rules)",
                         f"{many['texts_per_s']:.0f} texts/s",
                         f"{many['embed_share']:.0%} of the time in the embedder "
                         f"({many['embedded_texts'] / max(1e-9, many['embed_seconds']):.0f} texts/s inside it)",
                         f"{many['per_s_excl_embedding']:.0f}/s excl. embedding"))
        if args.only_remember_many:
            sizes = []
        else:
            ftx = FloorTxn(os.path.join(tmp, "floor.duckdb"))
            raw = time_remember(args.remember_n, False, sim, tmp, floor=ftx)
            floor = ftx.close()
            ext = time_remember(args.remember_n, True, sim, tmp)
            ratio = raw["ms_excl_embedding"] / floor["ms"]
            res["remember"] = {"raw_note": raw, "sim_extraction": ext, "floor_one_row_txn": floor,
                               "raw_note_over_floor": ratio,
                               "raw_note_over_floor_p50": (raw["ms_p50"] - raw["embed_ms"]) / floor["ms_p50"]}
            rows.append(("remember(), raw note (per call)", f"{raw['per_s']:.0f}/s",
                         f"{raw['per_s_excl_embedding']:.0f}/s ({raw['ms_excl_embedding']:.2f} ms) excl. Sim embedding", ""))
            rows.append(("  floor: one-row DuckDB insert txn on a file", f"{floor['per_s']:.0f}/s",
                         f"{floor['ms']:.2f} ms per BEGIN; INSERT (id, text, FLOAT[384]); COMMIT",
                         f"raw note {ratio:.1f}x the floor"))
            rows.append(("remember(), Sim extraction + evolution", f"{ext['per_s']:.0f}/s", f"{ext['per_s_excl_embedding']:.0f}/s excl. Sim embedding", ""))
            if args.remember_tail:
                tail = time_remember_tail(args.remember_tail, 0.15, sim, tmp)
                res["remember"]["raw_note_150ms_apart"] = tail
                rows.append((f"remember(), raw note, {tail['texts']} calls {tail['gap_ms']:.0f} ms apart",
                             f"p50 {tail['ms_p50']:.2f} ms",
                             f"p99 {tail['ms_p99']:.2f} / p99.9 {tail['ms_p999']:.2f} / max {tail['ms_max']:.2f} ms", ""))
            local = local_embedder_speed(corpus(256, seed=9))
            if local:
                res["local_embedder"] = local
                rows.append(("local e5 embedder (passages)", f"{local['texts_per_s']:.0f} texts/s", "the embedded default's ingest ceiling", ""))

        for n in sizes:
            texts = corpus(n, seed=3)
            t0 = time.perf_counter()
            vecs = embed_cached(vec_emb, texts, "passage", vec_cache)
            emb_rate = n / (time.perf_counter() - t0)
            rng = random.Random(5)
            queries = []
            for _ in range(args.queries):
                t = texts[rng.randrange(n)].split()
                queries.append(" ".join(t[2:5]) + " " + t[0][:-1])
            qt0 = time.perf_counter()
            qv = vec_emb.embed(queries, kind="query")
            q_embed_ms = (time.perf_counter() - qt0) / len(queries) * 1e3
            table = {q: qv[i] for i, q in enumerate(queries)}
            variant_texts = sorted({v for q in queries for v in variants_of(q)} - set(table))
            table.update(zip(variant_texts, embed_cached(vec_emb, variant_texts, "query", vec_cache)))
            # the stub LLM only rewrites for the deep path: the fast path (deep_search=False) never asks it
            m, umi_ingest = build_umi(n, texts, vecs, tmp, table, llm=VariantsLLM(1))
            opts = RecallOptions(limit=10, deep_search=False)
            for q in queries[:10]:
                m.recall_sync(q, opts)
            lat = _times_ms(lambda q: m.recall_sync(q, opts), queries)
            st = m.storage
            vlat = []
            for i in range(len(queries)):
                t0 = time.perf_counter()
                hits = st.search_vector(qv[i], 10)
                st.get_many([h for h, _ in hits])
                vlat.append((time.perf_counter() - t0) * 1e3)
            async def nothing() -> None:
                return None

            hop = []  # what the sync face's hop onto the Memory's loop thread and back costs alone
            for _ in range(len(queries)):
                t0 = time.perf_counter()
                m._engine.runner.run(nothing())
                hop.append((time.perf_counter() - t0) * 1e3)
            hlat = time_raw_hnsw(st, vecs, qv)
            deep_opts = RecallOptions(limit=10, deep_search=True)  # 3 variants from the stub LLM
            for q in queries[:10]:
                m.recall_sync(q, deep_opts)
            dlat = _times_ms(lambda q: m.recall_sync(q, deep_opts), queries)
            m.close()
            r = {"n": n, "umi_ingest_rows_s": umi_ingest, "vectors": vec_emb.name,
                 "query_embed_ms": q_embed_ms,
                 "umi_recall_p50_ms": pct(lat, 50), "umi_recall_p95_ms": pct(lat, 95),
                 "umi_vector_hydrate_p50_ms": pct(vlat, 50), "umi_vector_hydrate_p95_ms": pct(vlat, 95),
                 "sync_loop_hop_p50_ms": pct(hop, 50), "sync_loop_hop_p95_ms": pct(hop, 95),
                 "raw_hnswlib_k10_p50_ms": pct(hlat, 50), "raw_hnswlib_k10_p95_ms": pct(hlat, 95),
                 "recall_over_raw_hnswlib_p50": pct(lat, 50) / pct(hlat, 50),
                 "deep3_recall_p50_ms": pct(dlat, 50), "deep3_recall_p95_ms": pct(dlat, 95),
                 "deep3_over_fast_p50": pct(dlat, 50) / pct(lat, 50)}
            if vec_cache is None:  # (cached vectors are read, not made)
                r["sim_embed_texts_s"] = emb_rate
            if not args.no_chroma:
                col, chroma_ingest = build_chroma(n, texts, vecs, tmp)
                for i in range(10):
                    col.query(query_embeddings=qv[i : i + 1], n_results=10)
                clat = []
                for i in range(len(queries)):
                    t0 = time.perf_counter()
                    col.query(query_embeddings=qv[i : i + 1], n_results=10)
                    clat.append((time.perf_counter() - t0) * 1e3)
                r.update({"chroma_ingest_rows_s": chroma_ingest, "chroma_query_p50_ms": pct(clat, 50),
                          "chroma_query_p95_ms": pct(clat, 95)})
            res[f"n{n}"] = r
            chroma_i = f"{r['chroma_ingest_rows_s']:.0f} rows/s" if "chroma_ingest_rows_s" in r else "-"
            rows.append((f"bulk ingest excl. embedding, {n:,}", f"{umi_ingest:.0f} rows/s", f"chromadb {chroma_i}",
                         f"{umi_ingest / r['chroma_ingest_rows_s']:.1f}x" if "chroma_ingest_rows_s" in r else ""))
            cq = (f"chromadb vector-only p50 {r['chroma_query_p50_ms']:.2f} / p95 {r['chroma_query_p95_ms']:.2f} ms"
                  if "chroma_query_p50_ms" in r else "-")
            rows.append((f"recall p50/p95 excl. query embedding, {n:,}",
                         f"{r['umi_recall_p50_ms']:.2f} / {r['umi_recall_p95_ms']:.2f} ms", cq, ""))
            rows.append((f"  of which vector search + hydrate, {n:,}",
                         f"{r['umi_vector_hydrate_p50_ms']:.3f} / {r['umi_vector_hydrate_p95_ms']:.3f} ms",
                         f"query embedding ({vec_emb.name}) {q_embed_ms:.3f} ms", ""))
            rows.append((f"  of which the sync call's hop to the loop thread, {n:,}",
                         f"{r['sync_loop_hop_p50_ms']:.3f} / {r['sync_loop_hop_p95_ms']:.3f} ms", "a no-op coroutine", ""))
            rows.append((f"recall p50 vs raw hnswlib (k=10, same vectors), {n:,}",
                         f"{r['umi_recall_p50_ms']:.2f} ms",
                         f"hnswlib knn_query p50 {r['raw_hnswlib_k10_p50_ms']:.3f} ms (the floor)",
                         f"{r['recall_over_raw_hnswlib_p50']:.1f}x"))
            rows.append((f"deep-path recall, 3 variants, p50/p95, {n:,}",
                         f"{r['deep3_recall_p50_ms']:.2f} / {r['deep3_recall_p95_ms']:.2f} ms",
                         f"fast path p50 {r['umi_recall_p50_ms']:.2f} ms", f"{r['deep3_over_fast_p50']:.2f}x"))
        if args.writers_n and not args.only_remember_many:
            wr = time_writers(args.writers_n, tmp)
            res["two_writers_slow_llm"] = wr
            rows.append((f"2 writers x {wr['remembers_per_writer']} remembers, LLM {wr['llm_latency_ms']:.0f} ms/call",
                         f"{wr['writers2_s']:.2f} s",
                         f"1 writer x {wr['remembers_per_writer']}: {wr['writers1_s']:.2f} s "
                         f"({wr['writers1_llm_calls']} / {wr['writers2_llm_calls']} LLM calls)",
                         f"{wr['ratio']:.2f}x"))
    w = [max(len(str(r[i])) for r in rows) for i in range(4)]
    print(f"{'measure':<{w[0]}}  {'umi':<{w[1]}}  {'compared with':<{w[2]}}  ratio")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    RESULTS.mkdir(exist_ok=True)
    name = "bench_memory_remember_many.json" if args.only_remember_many else "bench_memory.json"
    (RESULTS / name).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
