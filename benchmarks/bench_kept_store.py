"""Recall on a reopened store that ``bench_search.py --keep-store DIR`` built and kept.

A 1M store takes ~80 min to build on a 2-core box; kept, it can be reopened and measured again
in a few minutes, with the code of the tree the script is run from (copy it into another tree's
``benchmarks/`` to measure that tree's code on the same store). What it prints, with the
same 200 questions (and precomputed question vectors) as bench_search's store section:

* the reopen time (valid index caches) and the process RSS after it;
* hybrid recall p50 / p95 (``Memory.recall_sync``, fast path: vector + BM25 + name, fused,
  hydrated; embedding excluded) right after the reopen — while a store with
  ``vectors="background"`` reads its vectors —, then, when the store has ``wait_for_vectors``,
  once they are all in memory, with the RSS then;
* the parts: ``search_vector`` (k = 30), ``search_text`` (k = 30), ``search_content`` (both);
  the RSS at the end.

Run: ``python benchmarks/bench_kept_store.py DIR N [--out FILE]`` where ``N`` is the row count
the store was built with (the questions are drawn from the same seeded corpus). The store is
only read; its files are left as they were (nothing is written, so close saves nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_search as bs  # noqa: E402
from bench_memory import PrecomputedEmbedder  # noqa: E402

import umi  # noqa: E402
from umi.storage.duckdb import DuckDBStorageBackend  # noqa: E402

SEED = 20261101  # bench_search's default


def rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def p50_p95(fn: Callable[[Any], Any], items: list[Any], warm: int = 10) -> tuple[float, float]:
    for x in items[:warm]:
        fn(x)
    ts = []
    for x in items:
        t = time.perf_counter()
        fn(x)
        ts.append((time.perf_counter() - t) * 1e3)
    p50, p95 = np.percentile(ts, [50, 95])
    return float(p50), float(p95)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("n", type=int)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    _, queries = bs.clustered(args.n, bs.N_QUERIES, SEED + 7)
    del _
    texts = bs.store_texts(args.n, SEED)
    rng = np.random.default_rng(SEED + 11)
    qtexts = []
    for i in rng.integers(0, args.n, bs.N_QUERIES).tolist():  # as bench_search's store section
        t = texts[i].split()
        qtexts.append(" ".join(t[2:5]) + " " + t[0][:-1])
    del texts
    table = dict(zip(qtexts, queries))
    out: dict[str, Any] = {"n": args.n, "umi": str(Path(umi.__file__).parent)}
    t = time.perf_counter()
    store = DuckDBStorageBackend.connect(Path(args.dir) / "bench.duckdb")
    out["reopen_s"] = time.perf_counter() - t
    out["index_load_status"] = store.index_load_status
    out["rss_after_reopen_GB"] = rss_gb()
    m = umi.Memory(storage=store, embedder=PrecomputedEmbedder(table, bs.DIM))
    opts = umi.RecallOptions(limit=bs.K, deep_search=False)
    out["recall_right_after_reopen_ms"] = p50_p95(lambda q: m.recall_sync(q, opts), qtexts)
    if hasattr(store, "wait_for_vectors"):
        out["vectors_in_memory"] = store.wait_for_vectors(3600)
        out["recall_vectors_in_memory_ms"] = p50_p95(lambda q: m.recall_sync(q, opts), qtexts)
        out["rss_vectors_in_memory_GB"] = rss_gb()
    out["search_vector_k30_ms"] = p50_p95(lambda q: store.search_vector(table[q], 30), qtexts)
    out["search_text_k30_ms"] = p50_p95(lambda q: store.search_text(q, 30), qtexts)
    out["search_content_k30_ms"] = p50_p95(lambda q: store.search_content([q], [table[q]], 30), qtexts)
    out["rss_at_end_GB"] = rss_gb()  # the graph (read by the first search) and what the calls read
    m.close()
    store.close()
    for k, v in out.items():
        shown = f"{v[0]:.2f} / {v[1]:.2f} (p50 / p95)" if isinstance(v, tuple) else (
            f"{v:.2f}" if isinstance(v, float) else str(v))
        print(f"  {k:<36} {shown}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
