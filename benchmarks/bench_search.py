"""Vector search: umi's exact numba kernel and HNSW index against numpy and faiss.

What it measures, side by side in one run, on 384-d float32 unit vectors at 10k and
100k rows (1M with ``--full``):

* **Memory read bandwidth** of this machine, measured first in the same run: the best
  of a one-thread and an all-threads numba sum over a 1 GiB buffer, and numpy's
  ``sum`` over the same buffer (numpy's pairwise sum is compute-bound, so it is shown
  but not used as the reference). The reference is the fastest read.
* **Exact top-10, one query**: ``umi.kernels.topk`` (fused dot + selection, one pass)
  pinned to one thread, pinned to all threads, and in its default mode (picks by
  measured speed); the same through ``VectorIndex.search`` (validation, query
  normalisation, ids); numpy (``V @ q`` + ``argpartition``); faiss ``IndexFlatIP``.
  Reported as p50 latency and effective GB/s = bytes of vectors scanned / p50, and
  as % of the read bandwidth with the same number of threads (the pinned rows) or of
  the fastest read (the others); the target is >= 80 %. The reference read rate is the
  faster of the 1 GiB buffer and a sum over the very same vectors (a 100k x 384 array
  fits in a large last-level cache, and then beats DRAM).
* **Exact top-10, 4 and 32 queries at once**: ``kernels.topk_many`` (one pass for all
  queries) vs numpy (``V @ Q.T`` + ``argpartition``) vs faiss flat.
* **HNSW top-10**: ``VectorIndex`` on its HNSW path (hnswlib, M=16, ef_construction=200,
  ef_search=128, one build thread, exact re-scoring of candidates) vs faiss
  ``IndexHNSWFlat`` with the same M / efConstruction / efSearch: build time, p50 and
  p95 latency, recall@10 against the exact result.
* **Index file**: ``VectorIndex.save`` / ``load`` with the HNSW graph (size, seconds).
* **Filtered search** through ``VectorIndex``: a mask letting 50 % of slots through
  (HNSW path with over-fetch) and 5 % (exact path).
* **DuckDB store** (``umi.storage.duckdb``, at the largest size run, ``--skip-duckdb``
  to leave out, ``--only-store`` to run nothing else): bulk upsert rows/s (10k per call,
  short sentences from bench_memory's small vocabulary, so the BM25 postings are a real
  store's), HNSW build time, search + hydrate (``search_vector`` then ``get_many`` of the
  10 hits) p50, **hybrid recall** p50/p95 of a ``umi.Memory`` over that store
  (``recall_sync``, fast path: vector + BM25 + name, fused, hydrated; the query vectors
  are precomputed, so embedding is excluded, as in bench_memory), reopen time with a valid
  index cache (and recall right after it, while the store reads its vectors in the background,
  then once they are all in memory) and with the cache deleted. Memory: the process RSS
  and its peak per phase (VmHWM restarted at each phase's start), the store's share (RSS
  minus the bench's own vectors and texts) and that per million facts. Targets: search +
  hydrate p50 <= 1 ms at 100k, reopen with a valid cache <= 2 s at 100k, hybrid recall p50
  <= 3 ms at 1M.

Vectors are shaped like real sentence embeddings (see :func:`clustered`: low
intrinsic dimension, a shared mean direction, topics and sub-clusters, wide noise),
never uniform random: HNSW recall on uniform random vectors says nothing about real
data. Queries are 200 fresh draws
from the same distribution. Latencies are per call, ``time.perf_counter``, after a
warm-up; the machine is shared, so p50 is the figure to read.

Run: ``python benchmarks/bench_search.py [--full] [--sizes 10000,100000] [--skip-duckdb]
[--only-store] [--keep-store DIR] [--out FILE]``. Prints each section's table as it completes and merges it into
``benchmarks/results/bench_search.json`` (or ``--out``) at once, so a run killed late keeps
everything measured before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT))  # run from a source tree without installing
sys.path.insert(0, str(HERE))  # bench_memory: the store section reuses its corpus and embedder

import numba
from numba import njit, prange

from umi import kernels
from umi.index import VectorIndex

DIM = 384
K = 10
N_QUERIES = 200
BATCH_SIZES = (4, 32)


# --- memory bandwidth --------------------------------------------------------------------


@njit(fastmath=True, cache=True)
def _sum_1t(a):  # pragma: no cover - compiled
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i]
    return s


@njit(fastmath=True, parallel=True, cache=True)
def _sum_nt(a):  # pragma: no cover - compiled
    s = np.float32(0.0)
    for i in prange(a.shape[0]):
        s += a[i]
    return s


def best_rate(fn: Callable[[], Any], nbytes: int, reps: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def measure_bandwidth() -> dict[str, float]:
    buf = np.ones((1 << 30) // 4, np.float32)  # 1 GiB: far beyond any cache
    out = {
        "numba_sum_1thread_GBps": best_rate(lambda: _sum_1t(buf), buf.nbytes),
        "numba_sum_all_threads_GBps": best_rate(lambda: _sum_nt(buf), buf.nbytes),
        "numpy_sum_GBps": best_rate(lambda: buf.sum(), buf.nbytes, reps=3),
        "threads": numba.get_num_threads(),
    }
    out["reference_GBps"] = max(out["numba_sum_1thread_GBps"], out["numba_sum_all_threads_GBps"])
    return out


# --- data ---------------------------------------------------------------------------------


def clustered(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and queries shaped like sentence embeddings.

    A 128-d latent space (topics, each with sub-clusters of ~100 rows, and wide
    per-row noise) mapped linearly into 384-d, plus a shared mean direction and a
    little isotropic noise: low intrinsic dimension, anisotropic, loosely clustered.
    The noise (1.3) is calibrated on 100k rows against real sentence vectors
    (MEASURED.md: hnswlib recall@10 0.967 / 0.988 / 0.996 at ef 50 / 100 / 200):
    noise 1.2 gave 0.980 / 0.993 / 0.998, noise 1.5 gave 0.954 at ef 128. Top-10
    cosines land around 0.55, as for a short query against passages.
    """
    latent = 128
    rng = np.random.default_rng(seed)
    proj = (rng.standard_normal((latent, DIM)) / np.sqrt(latent)).astype(np.float32)
    mean = (rng.standard_normal(DIM) * 0.5).astype(np.float32)
    n_topics, n_subs = max(8, n // 2000), max(4, n // 100)
    topics = rng.standard_normal((n_topics, latent)).astype(np.float32)
    subs = topics[rng.integers(0, n_topics, n_subs)] * 0.8
    subs += rng.standard_normal((n_subs, latent)).astype(np.float32) * 0.6

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, DIM), np.float32)
        for a in range(0, m, 100_000):
            b = min(m, a + 100_000)
            z = subs[rng.integers(0, n_subs, b - a)]
            z += 1.3 * rng.standard_normal((b - a, latent)).astype(np.float32)
            v = z @ proj + mean
            v += 0.1 * rng.standard_normal((b - a, DIM)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            out[a:b] = v
        return out

    return draw(n), draw(n_queries)


# --- timing helpers -----------------------------------------------------------------------


def latencies(fn: Callable[[Any], Any], args: list[Any], warmup: int = 3) -> np.ndarray:
    for a in args[:warmup]:
        fn(a)
    out = np.empty(len(args))
    for i, a in enumerate(args):
        t = time.perf_counter()
        fn(a)
        out[i] = time.perf_counter() - t
    return out


def interleaved(
    fns: dict[str, Callable[[Any], Any]], args: list[Any], warmup: int = 3
) -> dict[str, np.ndarray]:
    """Per-call latencies of several functions, taken in rotation on each argument.

    The machine is shared: timing one method after another lets a neighbour's load
    land on one method only. In rotation, every method sees the same conditions.
    """
    names = list(fns)
    for a in args[:warmup]:
        for name in names:
            fns[name](a)
    out = {name: np.empty(len(args)) for name in names}
    for i, a in enumerate(args):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]  # rotate who goes first
            t = time.perf_counter()
            fns[name](a)
            out[name][i] = time.perf_counter() - t
    return out


def pct(ts: np.ndarray, p: float) -> float:
    return float(np.percentile(ts, p) * 1e3)


def recall_at_k(got: list[list[int]], want: list[list[int]]) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


def numpy_topk(vectors: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ q
    part = np.argpartition(-scores, k)[:k]
    return part[np.lexsort((part, -scores[part]))]


def numpy_topk_many(vectors: np.ndarray, qs: np.ndarray, k: int) -> np.ndarray:
    scores = qs @ vectors.T
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    ps = np.take_along_axis(scores, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def try_faiss() -> Any:
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        return None
    return faiss


# --- one size -------------------------------------------------------------------------------


def bench_size(n: int, bandwidth: dict[str, float], seed: int) -> dict[str, Any]:
    print(f"\n== {n:,} x {DIM} float32 ({n * DIM * 4 / 1e6:.0f} MB) ==", flush=True)
    data, queries = clustered(n, N_QUERIES, seed)
    qlist = list(queries)
    nbytes = data.nbytes
    rows: dict[str, Any] = {"n": n, "dim": DIM, "vector_MB": nbytes / 1e6}
    truth = [kernels.topk(data, q, K)[0].tolist() for q in qlist]

    ids = [f"e{i:08d}" for i in range(n)]
    exact_idx = VectorIndex(DIM, hnsw_threshold=10**12)
    exact_idx.add(ids, data)
    faiss = try_faiss()
    flat = None
    if faiss is not None:
        flat = faiss.IndexFlatIP(DIM)
        flat.add(data)

    # The kernel, numpy and the plain reads all scan the index's own array, so that every
    # row below reads the same memory (faiss keeps its own copy).
    shared = exact_idx._vectors[:n]
    assert np.array_equal(shared, data)

    def pinned(threads: str) -> Callable[[np.ndarray], Any]:
        def run(q: np.ndarray) -> Any:
            saved = kernels.THREADS, kernels.PARALLEL_MIN_FLOATS
            kernels.THREADS, kernels.PARALLEL_MIN_FLOATS = threads, 0
            try:
                return kernels.topk(shared, q, K)
            finally:
                kernels.THREADS, kernels.PARALLEL_MIN_FLOATS = saved

        return run

    # Exact, one query, everything in rotation with a plain read of the same array (one
    # thread and all threads): the read is the bandwidth reference, taken under the
    # same conditions. The array may sit partly in a large last-level cache, so each
    # reference is the faster of that read and the 1 GiB DRAM read measured at start.
    flat_data = shared.reshape(-1)
    fns: dict[str, Callable[[Any], Any]] = {
        "read_1thread": lambda q: _sum_1t(flat_data),
        "read_all_threads": lambda q: _sum_nt(flat_data),
        "exact_umi_kernel_one": pinned("one"),
        "exact_umi_kernel_all": pinned("all"),
        "exact_umi_kernel": lambda q: kernels.topk(shared, q, K),
        "exact_umi_index": lambda q: exact_idx.search(q, K),
        "exact_numpy": lambda q: numpy_topk(shared, q, K),
    }
    if flat is not None:
        fns["exact_faiss_flat"] = lambda q: flat.search(q[None, :], K)
    ts = interleaved(fns, qlist[:100])

    def rate(name: str) -> float:
        return nbytes / (pct(ts[name], 50) / 1e3) / 1e9

    refs = {
        "one": max(bandwidth["numba_sum_1thread_GBps"], rate("read_1thread")),
        "all": max(bandwidth["numba_sum_all_threads_GBps"], rate("read_all_threads")),
    }
    refs["best"] = max(refs["one"], refs["all"])
    rot = {"one": rate("read_1thread"), "all": rate("read_all_threads")}
    rot["best"] = max(rot["one"], rot["all"])
    rows["read_bandwidth_GBps"] = {
        "same_array_1thread_p50": rate("read_1thread"),
        "same_array_all_threads_p50": rate("read_all_threads"),
        **refs,
    }
    for name, reference in [
        ("exact_umi_kernel_one", "one"),
        ("exact_umi_kernel_all", "all"),
        ("exact_umi_kernel", "best"),
        ("exact_umi_index", "best"),
        ("exact_numpy", "best"),
        ("exact_faiss_flat", "best"),
    ]:
        if name in ts:
            rows[name] = {
                "p50_ms": pct(ts[name], 50),
                "p95_ms": pct(ts[name], 95),
                "GBps": rate(name),
                "pct_of_bandwidth": 100 * rate(name) / refs[reference],
                "pct_of_read_in_rotation": 100 * rate(name) / rot[reference],
                "bandwidth_reference": reference,
            }
    np_res = [numpy_topk(data, q, K).tolist() for q in qlist[:50]]
    rows["exact_numpy"]["recall_vs_umi"] = recall_at_k(np_res, truth[:50])

    # exact, several queries per call: 4 (a recall's query variants) and 32
    for m in BATCH_SIZES:
        batches = [queries[i : i + m] for i in range(0, N_QUERIES - m + 1, m)][:25]
        bfns: dict[str, Callable[[Any], Any]] = {
            f"batch{m}_umi_kernel": lambda qs: kernels.topk_many(shared, qs, K),
            f"batch{m}_numpy": lambda qs: numpy_topk_many(shared, qs, K),
        }
        if flat is not None:
            bfns[f"batch{m}_faiss_flat"] = lambda qs: flat.search(qs, K)
        bts = interleaved(bfns, batches, warmup=1)
        for name, tb in bts.items():
            rows[name] = {"queries": m, "p50_ms": pct(tb, 50), "qps": m / (pct(tb, 50) / 1e3)}

    # HNSW through VectorIndex (threshold forced below n so the graph path is used)
    hn = VectorIndex(
        DIM, hnsw_threshold=min(n, 20_000), M=16, ef_construction=200, ef_search=128, seed=0
    )
    hn.add(ids, data)
    t = time.perf_counter()
    hn.build_graph()
    build_s = time.perf_counter() - t
    assert hn.path_for() == "hnsw"
    hfns: dict[str, Callable[[Any], Any]] = {"hnsw_umi_index": lambda q: hn.search(q, K)}
    fh = None
    if faiss is not None:
        fh = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)
        fh.hnsw.efConstruction = 200
        t = time.perf_counter()
        fh.add(data)
        faiss_build_s = time.perf_counter() - t
        fh.hnsw.efSearch = 128
        hfns["hnsw_faiss"] = lambda q: fh.search(q[None, :], K)
    hts = interleaved(hfns, qlist)
    got = [[int(i[1:]) for i, _ in hn.search(q, K)] for q in qlist]
    rows["hnsw_umi_index"] = {
        "build_s": build_s,
        "build_threads": 1,
        "p50_ms": pct(hts["hnsw_umi_index"], 50),
        "p95_ms": pct(hts["hnsw_umi_index"], 95),
        "recall@10": recall_at_k(got, truth),
    }
    if fh is not None:
        got = [fh.search(q[None, :], K)[1][0].tolist() for q in qlist]
        rows["hnsw_faiss"] = {
            "build_s": faiss_build_s,
            "build_threads": faiss.omp_get_max_threads(),
            "p50_ms": pct(hts["hnsw_faiss"], 50),
            "p95_ms": pct(hts["hnsw_faiss"], 95),
            "recall@10": recall_at_k(got, truth),
        }

    # the index file: save and load with the graph
    tmp = Path(tempfile.mkdtemp(prefix="umi-bench-idx-"))
    try:
        t = time.perf_counter()
        hn.save(tmp / "bench.idx", 1)
        save_s = time.perf_counter() - t
        size_mb = sum(p.stat().st_size for p in tmp.iterdir()) / 1e6
        t = time.perf_counter()
        loaded, _ = VectorIndex.load(tmp / "bench.idx", dim=DIM)
        load_s = time.perf_counter() - t
        same = loaded.search_many(queries[:20], K) == hn.search_many(queries[:20], K)
        rows["index_file"] = {
            "save_s": save_s,
            "load_s": load_s,
            "MB": size_mb,
            "same_results": same,
        }
        del loaded
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # filtered through VectorIndex
    rng = np.random.default_rng(seed + 1)
    for frac in (0.5, 0.05):
        mask = rng.random(hn.capacity) < frac
        path = hn.path_for(mask)
        ts = latencies(lambda q, mask=mask: hn.search(q, K, mask), qlist[:100])
        fgot = [[int(i[1:]) for i, _ in hn.search(q, K, mask)] for q in qlist[:100]]
        ftruth = [kernels.topk(data, q, K, mask[:n])[0].tolist() for q in qlist[:100]]
        rows[f"filtered_{int(frac * 100)}pct_umi_index"] = {
            "path": path,
            "p50_ms": pct(ts, 50),
            "p95_ms": pct(ts, 95),
            "recall@10": recall_at_k(fgot, ftruth),
        }

    return rows


# --- DuckDB store and a Memory over it -----------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """The high-water mark of the RSS since the last :func:`reset_peak_rss` (VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart the VmHWM high-water mark at the current RSS (Linux >= 4.0); False if it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def store_texts(n: int, seed: int) -> list[str]:
    """Short sentences from a small vocabulary (bench_memory's corpus), so the BM25 postings
    look like a real store's: a few long lists of common words, a unique name per fact."""
    from bench_memory import corpus

    return corpus(n, seed=seed)


def bench_duckdb(
    n: int, seed: int, report: Callable[[dict[str, Any]], None] | None = None, keep: Path | None = None
) -> dict[str, Any]:
    """Store-level figures and a Memory's recall over the same store.

    ``report(partial)`` is called after each phase, so a kill late in a long run loses
    nothing measured before it. Memory is the process RSS from /proc: ``base`` is taken
    with the bench's own vectors and texts in memory and no store open; a phase's peak is
    the VmHWM high-water mark restarted at the phase's start.
    """
    try:
        import umi
        from umi.storage.duckdb import INDEX_SUFFIX, DuckDBStorageBackend
        from umi.types import Entity, EntityType
        from bench_memory import PrecomputedEmbedder
    except ImportError as exc:
        return {"skipped": f"umi.storage.duckdb not importable: {exc}"}
    print(f"\n== DuckDB store + Memory.recall, {n:,} entities ==", flush=True)
    report = report or (lambda _: None)
    gb = 1e9
    out: dict[str, Any] = {"n": n, "rss_at_section_start_GB": rss_bytes() / gb}
    data, queries = clustered(n, N_QUERIES, seed + 7)
    texts = store_texts(n, seed)
    rng = np.random.default_rng(seed + 11)
    qtexts = []
    for i in rng.integers(0, n, N_QUERIES).tolist():  # as bench_memory: words of a stored fact
        t = texts[i].split()
        qtexts.append(" ".join(t[2:5]) + " " + t[0][:-1])
    table = dict(zip(qtexts, queries))
    import gc

    gc.collect()
    base = rss_bytes()
    out["rss_base_GB (bench vectors + texts, no store)"] = base / gb
    out["bench_vectors_GB (freed after the upsert)"] = data.nbytes / gb
    peak_ok = reset_peak_rss()
    out["rss_peak_method"] = "VmHWM restarted per phase" if peak_ok else "ru_maxrss (whole run)"

    # what the store itself holds: RSS minus the bench's own memory (its vectors, 1.5 GB at 1M,
    # are freed once written, so later phases subtract less)
    bench_own = [base]

    def mem(phase: str) -> None:
        now, peak = rss_bytes(), peak_rss_bytes()
        out[f"rss_after_{phase}_GB"] = now / gb
        out[f"rss_peak_{phase}_GB"] = peak / gb
        out[f"store_peak_{phase}_GB"] = (peak - bench_own[0]) / gb
        print(
            f"  {phase:<24} RSS {now / gb:6.2f} GB, peak {peak / gb:6.2f} GB; "
            f"the store's share: {(now - bench_own[0]) / gb:6.2f} GB, peak {(peak - bench_own[0]) / gb:6.2f} GB",
            flush=True,
        )
        report(out)
        reset_peak_rss()

    tmp = Path(tempfile.mkdtemp(prefix="umi-bench-"))
    path = tmp / "bench.duckdb"
    t0 = 1_700_000_000_000
    try:
        store = DuckDBStorageBackend.connect(path, dim=DIM)
        batch = 10_000
        spent = 0.0
        for a in range(0, n, batch):
            # built per batch: the bench holds no Entity beyond the one being written
            ents = [
                Entity(entity_type=EntityType.NOTE, name=texts[i].split()[0], content=texts[i],
                       embedding=data[i], created_at=t0 + i)
                for i in range(a, min(n, a + batch))
            ]
            t = time.perf_counter()
            store.upsert(ents)
            spent += time.perf_counter() - t
        out["bulk_upsert_rows_per_s"] = n / spent
        out["upsert_batch"] = batch
        mem("upsert")
        vectors_bytes = data.nbytes
        del ents, data  # the store holds the vectors now; the bench keeps only its queries
        gc.collect()
        bench_own[0] = base - vectors_bytes
        t = time.perf_counter()
        built = store.build_vector_index()  # HNSW above the threshold: built here, not timed below
        out["index_build_s (HNSW, 1 thread)" if built else "index_build_s (exact, no graph)"] = (
            time.perf_counter() - t
        )
        mem("index_build")
        out["rss_per_million_facts_GB (store open, index built)"] = (
            (rss_bytes() - bench_own[0]) / n * 1e6 / gb
        )

        def search_hydrate(q: np.ndarray) -> list[Any]:
            hits = store.search_vector(q, K)
            return store.get_many([i for i, _ in hits])

        ts = latencies(search_hydrate, list(queries))
        out["search_hydrate_p50_ms"] = pct(ts, 50)
        out["search_hydrate_p95_ms"] = pct(ts, 95)
        ts = latencies(lambda q: store.search_vector(q, K), list(queries))
        out["search_only_p50_ms"] = pct(ts, 50)

        # hybrid recall through a Memory: vector + BM25 + name, fused, hydrated; the query
        # embedding is a dict lookup (PrecomputedEmbedder), so it is excluded
        opts = umi.RecallOptions(limit=K, deep_search=False)

        def recall_ms(memory: Any) -> np.ndarray:
            return latencies(lambda q: memory.recall_sync(q, opts), qtexts, warmup=10)

        m = umi.Memory(storage=store, embedder=PrecomputedEmbedder(table, DIM))
        ts = recall_ms(m)
        out["hybrid_recall_p50_ms"] = pct(ts, 50)
        out["hybrid_recall_p95_ms"] = pct(ts, 95)
        mem("recall")
        t = time.perf_counter()
        m.close()
        store.close()
        out["close_s (saves cache)"] = time.perf_counter() - t
        del m, store
        gc.collect()

        t = time.perf_counter()
        store = DuckDBStorageBackend.connect(path)
        opened = time.perf_counter()
        out["reopen_valid_cache_s"] = opened - t
        out["reopen_valid_cache_status"] = store.index_load_status
        t = time.perf_counter()
        store.search_vector(queries[1], K)
        out["first_search_after_valid_reopen_s"] = time.perf_counter() - t
        m = umi.Memory(storage=store, embedder=PrecomputedEmbedder(table, DIM))
        ts = recall_ms(m)  # while the store reads its vectors in the background (if it does)
        out["hybrid_recall_after_reopen_p50_ms"] = pct(ts, 50)
        out["hybrid_recall_after_reopen_p95_ms"] = pct(ts, 95)
        if hasattr(store, "wait_for_vectors"):
            out["vectors_in_memory"] = store.wait_for_vectors(3600)
            # an upper bound: the reads ended by then (the recalls above ran meanwhile)
            out["vectors_read_in_background_within_s"] = time.perf_counter() - opened
            ts = recall_ms(m)
            out["hybrid_recall_vectors_in_memory_p50_ms"] = pct(ts, 50)
            out["hybrid_recall_vectors_in_memory_p95_ms"] = pct(ts, 95)
        mem("reopen_and_recall")
        out["rss_per_million_facts_GB (reopened, after recalls)"] = (
            (rss_bytes() - bench_own[0]) / n * 1e6 / gb
        )
        m.close()
        store.close()
        del m, store
        gc.collect()
        if keep is not None:  # the built store and its valid index cache, for profiling later
            keep.mkdir(parents=True, exist_ok=True)
            for p in tmp.iterdir():
                shutil.copy2(p, keep / p.name)

        for p in tmp.iterdir():
            if p.name.startswith(path.name + INDEX_SUFFIX):
                p.unlink()
        t = time.perf_counter()
        store = DuckDBStorageBackend.connect(path)
        out["reopen_missing_cache_s"] = time.perf_counter() - t
        out["reopen_missing_cache_status"] = store.index_load_status
        store.close()
        mem("reopen_missing_cache")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- report --------------------------------------------------------------------------------


def print_machine(result: dict[str, Any]) -> None:
    bw = result["bandwidth"]
    m = result["machine"]
    print(
        f"\nMachine: {m['cpus']} CPUs, numba {m['numba']} ({m['numba_threads']} threads), "
        f"faiss {m['faiss']}; load average {m['load_avg_1m_at_start']:.1f} at start "
        "(other processes share the cores)"
    )
    print("Memory read bandwidth (1 GiB buffer, best of 7):")
    print(f"  numba sum, 1 thread            {bw['numba_sum_1thread_GBps']:6.1f} GB/s")
    print(
        f"  numba sum, {bw['threads']} threads           {bw['numba_sum_all_threads_GBps']:6.1f} GB/s"
    )
    print(f"  numpy sum (compute-bound)      {bw['numpy_sum_GBps']:6.1f} GB/s")
    print(f"  reference (fastest read)       {bw['reference_GBps']:6.1f} GB/s")


def print_size(r: dict[str, Any], bw: dict[str, float]) -> None:
    n = r["n"]
    rb = r["read_bandwidth_GBps"]
    print(f"\n{n:,} x {r['dim']}  ({r['vector_MB']:.0f} MB of vectors), top-{K}")
    print(
        f"  read rate of this array (p50, in rotation with the searches): "
        f"{rb['same_array_1thread_p50']:.1f} GB/s (1 thread), "
        f"{rb['same_array_all_threads_p50']:.1f} GB/s (all)"
    )
    print(
        f"  % bw: against the faster of that and the 1 GiB read at start, "
        f"{rb['one']:.1f} / {rb['all']:.1f} / {rb['best']:.1f} GB/s (1 thread / all / best); "
        "% rot: against the in-rotation read alone"
    )
    print(
        f"  {'method':<34}{'p50 ms':>9}{'p95 ms':>9}{'GB/s':>8}{'% bw':>7}{'% rot':>7}"
        f"{'recall':>8}{'build s':>9}"
    )
    for key, label in [
        ("exact_umi_kernel_one", "exact  umi.kernels.topk, 1 thread"),
        ("exact_umi_kernel_all", f"exact  umi.kernels.topk, {bw['threads']} thr."),
        ("exact_umi_kernel", "exact  umi.kernels.topk, auto"),
        ("exact_umi_index", "exact  VectorIndex.search"),
        ("exact_numpy", "exact  numpy V@q + argpartition"),
        ("exact_faiss_flat", "exact  faiss IndexFlatIP"),
    ]:
        if key in r:
            x = r[key]
            rec = f"{x['recall_vs_umi']:.3f}" if "recall_vs_umi" in x else "1.000"
            print(
                f"  {label:<34}{x['p50_ms']:9.3f}{x['p95_ms']:9.3f}{x['GBps']:8.1f}"
                f"{x['pct_of_bandwidth']:7.0f}{x['pct_of_read_in_rotation']:7.0f}{rec:>8}{'':>9}"
            )
    for key, label in [
        ("hnsw_umi_index", "hnsw   VectorIndex (hnswlib)"),
        ("hnsw_faiss", "hnsw   faiss IndexHNSWFlat"),
    ]:
        if key in r:
            x = r[key]
            print(
                f"  {label:<34}{x['p50_ms']:9.3f}{x['p95_ms']:9.3f}{'':>8}{'':>7}{'':>7}"
                f"{x['recall@10']:8.3f}{x['build_s']:9.1f}"
            )
    for key in sorted(k for k in r if k.startswith("filtered_")):
        x = r[key]
        label = f"filter {key.split('_')[1].replace('pct', '%')} VectorIndex ({x['path']})"
        print(
            f"  {label:<34}{x['p50_ms']:9.3f}{x['p95_ms']:9.3f}{'':>8}{'':>7}{'':>7}{x['recall@10']:8.3f}"
        )
    if "index_file" in r:
        x = r["index_file"]
        print(
            f"  VectorIndex file with graph: {x['MB']:.0f} MB, save {x['save_s']:.2f} s, "
            f"load {x['load_s']:.2f} s, same results after load: {x['same_results']}"
        )
    for m in BATCH_SIZES:
        print(f"  {f'{m} queries per call':<34}{'p50 ms':>9}{'q/s':>9}")
        for key, label in [
            (f"batch{m}_umi_kernel", "exact  umi.kernels.topk_many"),
            (f"batch{m}_numpy", "exact  numpy Q@V.T + argpartition"),
            (f"batch{m}_faiss_flat", "exact  faiss IndexFlatIP"),
        ]:
            if key in r:
                x = r[key]
                print(f"  {label:<34}{x['p50_ms']:9.2f}{x['qps']:9.0f}")


def print_store(db: dict[str, Any]) -> None:
    if "skipped" in db:
        print(f"\nDuckDB store: skipped ({db['skipped']})")
        return
    print(f"\nDuckDB store + Memory.recall ({db.get('n', 0):,} entities, {DIM}-d)")
    for k, v in db.items():
        if k == "n":
            continue
        print(f"  {k:<54}{v:>12.3f}" if isinstance(v, float) else f"  {k:<54}{v!s:>12}")


def save(result: dict[str, Any], out: Path) -> None:
    """Write what has been measured so far, merged into ``out``: keys of this run replace the
    file's, and sizes are merged by row count (so ``--only-store`` keeps an earlier run's
    vector sections, and a kill loses nothing already measured)."""
    merged: dict[str, Any] = {}
    if out.exists():
        try:
            merged = json.loads(out.read_text())
        except ValueError:
            merged = {}
    sizes = {r["n"]: r for r in merged.get("sizes", [])}
    sizes.update({r["n"]: r for r in result.get("sizes", [])})
    merged.update(result)
    if sizes:
        merged["sizes"] = [sizes[n] for n in sorted(sizes)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--full", action="store_true", help="also run 1M rows (needs ~4 GB RAM and several minutes)"
    )
    ap.add_argument("--sizes", default="", help="comma-separated row counts (default 10000,100000)")
    ap.add_argument("--skip-duckdb", action="store_true", help="leave out the DuckDB store rows")
    ap.add_argument(
        "--only-store",
        action="store_true",
        help="run only the DuckDB store + Memory.recall section, at the largest size",
    )
    ap.add_argument(
        "--keep-store",
        default="",
        help="copy the store section's DuckDB file and index cache here before it is deleted",
    )
    ap.add_argument("--seed", type=int, default=20261101)
    ap.add_argument("--out", default=str(RESULTS / "bench_search.json"))
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s] or [10_000, 100_000]
    if args.full and 1_000_000 not in sizes:
        sizes.append(1_000_000)
    out = Path(args.out)

    result: dict[str, Any] = {
        "benchmark": "bench_search",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "numba": numba.__version__,
            "numpy": np.__version__,
            "numba_threads": numba.get_num_threads(),
            "load_avg_1m_at_start": os.getloadavg()[0],
        },
        "k": K,
        "queries": N_QUERIES,
    }
    faiss = try_faiss()
    result["machine"]["faiss"] = faiss.__version__ if faiss is not None else None
    if not args.only_store:
        kernels.warmup()
        print("measuring memory read bandwidth ...", flush=True)
        result["bandwidth"] = measure_bandwidth()
        print_machine(result)
        result["sizes"] = []
        for n in sizes:
            result["sizes"].append(bench_size(n, result["bandwidth"], args.seed))
            print_size(result["sizes"][-1], result["bandwidth"])
            save(result, out)
    if not args.skip_duckdb:

        def partial(db: dict[str, Any]) -> None:
            result["duckdb"] = dict(db, complete=False)
            save(result, out)

        result["duckdb"] = bench_duckdb(
            max(sizes), args.seed, report=partial, keep=Path(args.keep_store) if args.keep_store else None
        )
        result["duckdb"]["complete"] = True
        print_store(result["duckdb"])
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    print(
        f"\nload average {result['machine']['load_avg_1m_at_start']:.1f} at start, "
        f"{result['machine']['load_avg_1m_at_end']:.1f} at end"
    )
    save(result, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
