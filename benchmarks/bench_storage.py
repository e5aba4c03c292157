"""Archival storage: the DuckDB backend's write path, read path and reopen, side by side
with what a user would otherwise do in DuckDB directly.

What it measures, in one run, on ``--n`` entities (default 100k) with 384-d float32
vectors clustered like sentence embeddings (a shared mean direction, one gaussian
centroid per ~100 rows, per-row noise; never uniform random), 12-word contents drawn
from a Zipf vocabulary of 20k words, five entity types and two metadata keys
(``team``: 7 values, ``src``: 2 values):

* **Bulk upsert** rows/s through ``DuckDBStorageBackend.upsert`` (batches of 2000:
  Arrow bulk inserts into entities, postings, metadata and history, the in-process
  cache and the vector index), against ``executemany`` of the same entity rows into a
  plain DuckDB table (5k rows). Above ``hnsw_threshold`` (20k) every insert also goes
  into the HNSW graph, which dominates.
* **Search + hydrate**: ``search_vector(q, 10)`` then ``get_many`` of the hits, p50/p95,
  unfiltered and under filters letting ~14 %, ~10 % and ~1 % through; against DuckDB
  SQL (``array_cosine_similarity`` top-10, then the rows by id). Target p50 <= 1 ms.
* **Keyword search (BM25)**: the numba kernel over the in-process postings
  (``search_text``), 1-3 term queries, unfiltered and filtered. (The SQL BM25 path this
  used to be compared with was dropped: it was 10-100x slower and served no user.)
* **Point reads**: ``get_many`` of 10 ids, ``find_by_name``, ``count()``.
* **Reopen**: ``connect`` with valid index caches ("loaded": the vector index and the
  keyword postings files; median of ``--reopen-runs`` opens; then the first keyword search and
  reads, and, when a graph was saved, the first vector search, which reads it), with both caches 1000 writes
  behind ("caught_up") and with no cache ("rebuilt": vectors and postings read from
  DuckDB; the HNSW graph is then built lazily by the first search, timed separately).
  History, sources and relations are read on first use, not at open. Target (issue 9):
  <= 1 s with valid caches.

Latencies are per call (``time.perf_counter``) after a warm-up; the machine is shared,
so read p50. Run: ``python benchmarks/bench_storage.py [--n 100000] [--queries 200]
[--only-reopen] [--reopen-runs 3]`` (``--only-reopen``: the writes and the reopen section only).
Prints a table and writes ``benchmarks/results/bench_storage.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))  # run from a source tree without installing

import duckdb  # noqa: E402

from umi.storage.base import SearchFilters  # noqa: E402
from umi.storage.duckdb import INDEX_SUFFIX, DuckDBStorageBackend  # noqa: E402

try:  # the keyword index cache file (absent from older trees)
    from umi.storage.duckdb import TERMS_SUFFIX  # noqa: E402
except ImportError:  # pragma: no cover
    TERMS_SUFFIX = INDEX_SUFFIX
from umi.types import Entity  # noqa: E402

DIM = 384
TYPES = ["person", "organization", "project", "topic", "note"]
VOCAB = 20_000
T0 = 1_700_000_000_000


class Data:
    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.words = [f"w{i}" for i in range(VOCAB)]
        p = 1.0 / np.arange(1, VOCAB + 1)
        self.p = p / p.sum()
        self.mean = self.rng.standard_normal(DIM).astype(np.float32) * 0.5
        self.centroids = self.rng.standard_normal((n // 100 + 1, DIM)).astype(np.float32)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        v = self.mean + self.centroids[(rows // 100) % len(self.centroids)] + 0.6 * self.rng.standard_normal((len(rows), DIM))
        v = v.astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def batch(self, start: int, size: int) -> list[Entity]:
        rows = np.arange(start, start + size)
        vecs = self.vectors(rows)
        ws = self.rng.choice(VOCAB, size=(size, 12), p=self.p)
        return [Entity(TYPES[i % 5], f"entity {i}", " ".join(self.words[w] for w in ws[j]),
                       metadata={"team": i % 7, "src": "chat" if i % 2 else "doc"}, embedding=vecs[j],
                       created_at=T0 + i) for j, i in enumerate(rows.tolist())]

    def queries(self, m: int) -> np.ndarray:
        return self.vectors(self.rng.integers(0, self.n, m))

    def text_queries(self, m: int) -> list[str]:
        out = []
        for _ in range(m):
            k = int(self.rng.integers(1, 4))
            out.append(" ".join(self.words[w] for w in self.rng.choice(VOCAB, size=k, p=self.p)))
        return out


def timed(fn: Callable[[int], Any], n: int, warm: int = 5) -> dict[str, float]:
    for i in range(warm):
        fn(i)
    ts = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t)
    a = np.asarray(ts) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "calls": n}


def executemany_baseline(data: Data, rows: int) -> float:
    con = duckdb.connect(":memory:")
    con.execute(f"CREATE TABLE e (id VARCHAR PRIMARY KEY, entity_type VARCHAR, name VARCHAR, content VARCHAR, "
                f"metadata VARCHAR, created_at BIGINT, embedding FLOAT[{DIM}])")
    ents = data.batch(10_000_000, rows)
    params = [(e.id, e.entity_type.value, e.name, e.content, json.dumps(e.metadata), e.created_at,
               e.embedding.tolist()) for e in ents]  # type: ignore[union-attr]
    t = time.perf_counter()
    con.execute("BEGIN")
    con.executemany("INSERT INTO e VALUES (?, ?, ?, ?, ?, ?, ?)", params)
    con.execute("COMMIT")
    el = time.perf_counter() - t
    con.close()
    return rows / el


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--only-reopen", action="store_true", help="skip the read section")
    ap.add_argument("--reopen-runs", type=int, default=3, help="opens with valid caches (median reported)")
    args = ap.parse_args()
    n, nq = args.n, args.queries
    data = Data(n)
    tmp = Path(tempfile.mkdtemp(prefix="umi-bench-storage-"))
    path = tmp / "bench.duckdb"
    results: dict[str, Any] = {"n": n, "dim": DIM, "machine": platform.platform(), "python": platform.python_version(),
                               "duckdb": duckdb.__version__}
    rows: list[tuple[str, str, str]] = []
    try:
        # --- writes ----------------------------------------------------------------------
        b = DuckDBStorageBackend.connect(path, dim=DIM)
        spent = 0.0
        below = above = 0.0
        for start in range(0, n, 2000):
            batch = data.batch(start, min(2000, n - start))
            t = time.perf_counter()
            b.upsert(batch)
            el = time.perf_counter() - t
            spent += el
            if start + len(batch) <= 20_000:
                below += el
            else:
                above += el
        results["upsert_rows_per_s"] = n / spent
        results["upsert_rows_per_s_below_hnsw_threshold"] = min(n, 20_000) / below if below else None
        results["upsert_rows_per_s_above_hnsw_threshold"] = (n - 20_000) / above if above else None
        results["executemany_rows_per_s"] = executemany_baseline(data, 5000)
        rows.append(("bulk upsert (all)", f"{results['upsert_rows_per_s']:,.0f} rows/s", ""))
        if results["upsert_rows_per_s_below_hnsw_threshold"]:
            rows.append(("  first 20k (exact index)", f"{results['upsert_rows_per_s_below_hnsw_threshold']:,.0f} rows/s", ""))
        if results["upsert_rows_per_s_above_hnsw_threshold"]:
            rows.append(("  beyond 20k (HNSW inserts)", f"{results['upsert_rows_per_s_above_hnsw_threshold']:,.0f} rows/s", ""))
        rows.append(("DuckDB executemany (baseline)", f"{results['executemany_rows_per_s']:,.0f} rows/s", ""))

        # --- reads -----------------------------------------------------------------------
        qs = data.queries(nq)
        if b._cache.index is not None and n >= 20_000 and not args.only_reopen:
            t = time.perf_counter()
            b._cache.index.build_graph()
            results["hnsw_graph_build_s"] = time.perf_counter() - t
        filters = {
            "none": None,
            "team=3 (~14%)": SearchFilters(metadata={"team": 3}),
            "type+src (~10%)": SearchFilters(entity_types=("person",), metadata={"src": "doc"}),
            "team+type+src (~1%)": SearchFilters(entity_types=("person",), metadata={"team": 3, "src": "doc"}),
        }
        reads: dict[str, Any] = {}
        for label, f in ({} if args.only_reopen else filters).items():
            def hydrate(i: int, f: SearchFilters | None = f) -> None:
                hits = b.search_vector(qs[i % nq], 10, f)
                b.get_many([h for h, _ in hits])
            reads[f"search+hydrate {label}"] = timed(hydrate, nq)
        con = b._con
        sql_n = max(20, nq // 10)

        def sql_search(i: int) -> None:
            hits = con.execute(
                f"SELECT id FROM entities WHERE valid_to IS NULL AND embedding IS NOT NULL "
                f"ORDER BY array_cosine_similarity(embedding, ?::FLOAT[{DIM}]) DESC, id LIMIT 10",
                [qs[i % nq].tolist()]).fetchall()
            con.execute("SELECT * FROM entities WHERE id IN (SELECT unnest(?::VARCHAR[]))",
                        [[h[0] for h in hits]]).fetchall()
        if not args.only_reopen:
            reads["DuckDB SQL cosine top-10 + rows (baseline)"] = timed(sql_search, sql_n, warm=2)
            tq = data.text_queries(nq)
            for label, f in (("none", None), ("team=3", filters["team=3 (~14%)"])):
                reads[f"bm25 numba, filter {label}"] = timed(lambda i, f=f: b.search_text(tq[i % nq], 10, f), nq)
            ids10 = [b.list(limit=10, offset=int(o))[0].id for o in data.rng.integers(0, n - 20, 10)]
            reads["get_many(10 ids)"] = timed(lambda i: b.get_many(ids10), nq)
            reads["find_by_name"] = timed(lambda i: b.find_by_name(f"entity {(i * 7919) % n}"), nq)
            reads["count()"] = timed(lambda i: b.count(), max(20, nq // 5))
        results["reads"] = reads
        for k, v in reads.items():
            rows.append((k, f"{v['p50_ms']:.3f} ms", f"{v['p95_ms']:.3f} ms"))

        # --- reopen ----------------------------------------------------------------------
        b.search_text("w1", 1)  # compile the BM25 kernel here: the first reads after reopen time reads, not numba
        t = time.perf_counter()
        b.close()
        results["close_with_index_save_s"] = time.perf_counter() - t
        reopen: dict[str, float] = {}

        def is_cache(name: str) -> bool:
            return name.startswith((path.name + INDEX_SUFFIX, path.name + TERMS_SUFFIX))

        runs = []
        for _ in range(max(1, args.reopen_runs)):
            t = time.perf_counter()
            b = DuckDBStorageBackend.connect(path)
            runs.append(time.perf_counter() - t)
            status = b.index_load_status
            b.close()
        results["reopen_loaded_runs_s"] = runs
        reopen[f"reopen ({status}; median of {len(runs)})"] = float(np.median(runs))
        b = DuckDBStorageBackend.connect(path)
        # what the first reads of a session pay for what the open left unread (rows, vectors, history)
        t = time.perf_counter()
        hits = [i for i, _ in b.search_text("w3 w5", 10)]
        b.get_many(hits)
        b.history(hits[0])
        reopen["  then first search_text + get_many(hits) + history"] = time.perf_counter() - t
        if b._cache.index is not None and b._cache.index.graph_built:  # a graph was saved (not with --only-reopen)
            t = time.perf_counter()
            b.search_vector(qs[0], 10)  # the saved HNSW graph is read by the first search walking it
            reopen["  then first search_vector (reads the saved graph)"] = time.perf_counter() - t
        for f in list(tmp.iterdir()):  # keep the caches as of now, write, put them back: 1000 behind
            if is_cache(f.name):
                shutil.copy(f, tmp / ("keep-" + f.name))
        b.upsert(data.batch(n, 1000))
        b.close()
        for f in list(tmp.iterdir()):
            if f.name.startswith("keep-"):
                shutil.copy(f, tmp / f.name[5:])
        t = time.perf_counter()
        b = DuckDBStorageBackend.connect(path)
        reopen[f"reopen 1000 writes behind ({b.index_load_status})"] = time.perf_counter() - t
        b.close()
        for f in list(tmp.iterdir()):
            if is_cache(f.name):
                f.unlink()
        t = time.perf_counter()
        b = DuckDBStorageBackend.connect(path)
        reopen[f"reopen without cache ({b.index_load_status})"] = time.perf_counter() - t
        t = time.perf_counter()
        b.search_vector(qs[0], 10)
        reopen["  then first search (builds HNSW graph)"] = time.perf_counter() - t
        b.close()
        results["reopen_s"] = reopen
        rows.append(("close (saves index)", f"{results['close_with_index_save_s']:.2f} s", ""))
        for k, v in reopen.items():
            rows.append((k, f"{v:.2f} s", ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    width = max(len(r[0]) for r in rows) + 2
    print(f"DuckDB storage backend, n={n:,}, dim={DIM}, {platform.machine()} Python {platform.python_version()}, "
          f"DuckDB {duckdb.__version__}")
    print(f"{'operation':<{width}}{'p50 / rate':>16}{'p95':>14}")
    for name, a, c in rows:
        print(f"{name:<{width}}{a:>16}{c:>14}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_storage.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
