"""BM25 keyword search alone, at bench_search's store scale, without the store.

The texts and the queries are bench_search's store section's (bench_memory's corpus, the
same seed; each query is words 2..4 of a stored fact plus its name less the last character),
tokenised as every backend does (``document_terms`` of name + content). The postings are
filled two ways: in bulk (``PostingsIndex.load`` of CSR, as a reopen does) and one document
at a time (``add_doc``, as upserts do; a later query may fold them, see
``PostingsIndex.fold_if_due``). Per
query: ``score(terms, k=30)`` (k as a recall of 10) and the top-k select of the hot cache's
``_text_hits``, with every row live (the mask a recall without filters uses). Reported: p50 /
p95 ms per query and the memory the postings hold (RSS growth while filling, and
again after the first query). ``--mode writes``: loaded in bulk, then documents rewritten (each
row's terms taken out and another document's put in) with a query every ``--batch`` rewrites, until
the postings written reach 1.5x the fold threshold (``FOLD_SHARE`` of the block): p50 / p95 / max
ms of those queries and of the write batches — a fold paid by one query shows as its max.

Run: ``python benchmarks/bench_bm25.py --n 1000000 --mode insession``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_memory import corpus  # noqa: E402

from umi.storage._bm25 import PostingsIndex, top_by_score_then_key  # noqa: E402
from umi.storage.text import document_terms, query_terms  # noqa: E402

SEED = 20261101  # bench_search's default
N_QUERIES = 200
K = 30  # a recall of 10 searches each list 3x as deep


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def queries(texts: list[str], n: int) -> list[list[str]]:
    rng = np.random.default_rng(SEED + 11)
    out = []
    for i in rng.integers(0, n, N_QUERIES).tolist():
        t = texts[i].split()
        out.append(query_terms(" ".join(t[2:5]) + " " + t[0][:-1]))
    return out


def to_csr(docs: list[dict[str, int]]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    by_term: dict[str, list[tuple[int, int]]] = {}
    for r, tf in enumerate(docs):
        for t, f in tf.items():
            by_term.setdefault(t, []).append((r, f))
    terms = list(by_term)
    offsets = np.zeros(len(terms) + 1, np.int64)
    np.cumsum([len(by_term[t]) for t in terms], out=offsets[1:])
    rows = np.fromiter((r for t in terms for r, _ in by_term[t]), np.int64, int(offsets[-1]))
    tfs = np.fromiter((f for t in terms for _, f in by_term[t]), np.float64, int(offsets[-1]))
    return terms, offsets, rows, tfs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--mode", choices=["bulk", "insession", "writes"], default="insession")
    ap.add_argument("--batch", type=int, default=200, help="rewrites between two queries (--mode writes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    n = args.n
    texts = corpus(n, seed=SEED)
    qs = queries(texts, n)
    docs, lens = [], np.empty(n, np.float64)
    for i, text in enumerate(texts):
        tf, dl = document_terms(text.split()[0], text)
        docs.append(tf)
        lens[i] = dl
    del texts
    n_post = sum(len(d) for d in docs)
    csr = to_csr(docs) if args.mode != "insession" else None
    gc.collect()
    before = rss()
    idx = PostingsIndex()
    t0 = time.perf_counter()
    if csr is not None:
        idx.load(*csr)
        del csr
    else:
        for r in range(n):
            idx.add_doc(r, docs[r])
    fill_s = time.perf_counter() - t0
    if args.mode != "writes":
        del docs
    gc.collect()
    held = rss() - before
    mask = np.ones(n, bool)
    avgdl = float(lens.sum()) / n
    keys = np.arange(n, dtype=np.uint64)

    import inspect

    with_keys = "keys" in inspect.signature(idx.score).parameters  # the tie-break keys, as the hot cache passes

    def one(terms: list[str]) -> int:
        cand, scores = idx.score(terms, n, avgdl, lens, mask, K, keys) if with_keys else idx.score(
            terms, n, avgdl, lens, mask, K)
        if cand.shape[0]:
            top_by_score_then_key(scores, keys[cand], K)
        return cand.shape[0]

    first = time.perf_counter()
    one(qs[0])
    first_s = time.perf_counter() - first
    wait = time.perf_counter()
    if hasattr(idx, "wait_fold"):  # a fold the first query started (in session): done before measuring
        idx.wait_fold(600.0)
        import threading

        for th in threading.enumerate():  # and the folded overlay freed (a thread frees it a term at a time)
            if th.name == "umi-bm25-free":
                th.join(600.0)
    wait_s = time.perf_counter() - wait
    gc.collect()
    held_after = rss() - before  # after a first query and the fold of the postings written in session
    for q in qs[:10]:
        one(q)
    if args.mode == "writes":
        return writes(args, idx, docs, lens, qs, one, n_post)
    ts = []
    for _ in range(args.rounds):
        for q in qs:
            t = time.perf_counter()
            one(q)
            ts.append(time.perf_counter() - t)
    ts = np.array(ts) * 1e3
    out = {"n": n, "mode": args.mode, "postings": n_post, "fill_s": round(fill_s, 2),
           "first_query_ms": round(first_s * 1e3, 2), "fold_wait_s": round(wait_s, 2),
           "p50_ms": round(float(np.percentile(ts, 50)), 3), "p95_ms": round(float(np.percentile(ts, 95)), 3),
           "max_ms": round(float(ts.max()), 3),
           "rss_held_bytes_per_posting": round(held / n_post, 1),
           "rss_held_after_first_query_bytes_per_posting": round(held_after / n_post, 1)}
    print(json.dumps(out), flush=True)
    if args.profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for q in qs:
            one(q)
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(18)
    return 0


def writes(args: argparse.Namespace, idx: PostingsIndex, docs: list[dict[str, int]], lens: np.ndarray,
           qs: list[list[str]], one: Callable[[list[str]], int], n_post: int) -> int:
    from umi.storage import _bm25

    n = len(docs)
    goal = int(1.5 * max(_bm25.FOLD_MIN, _bm25.FOLD_SHARE * n_post))
    rng = np.random.default_rng(SEED + 23)
    written = q_at = 0
    pauses: list[float] = []  # the cyclic collector's pauses (a full one walks the 1M documents held here)
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)
    t_q, t_w = [], []
    t_all = time.perf_counter()
    while written < goal:
        t = time.perf_counter()
        for _ in range(args.batch):
            r, src = (int(x) for x in rng.integers(0, n, 2))
            idx.remove_doc(r, list(docs[r]))
            written += len(docs[r])
            docs[r] = docs[src]
            idx.add_doc(r, docs[r])
            lens[r] = lens[src]
            written += len(docs[r])
        t_w.append(time.perf_counter() - t)
        t = time.perf_counter()
        one(qs[q_at % len(qs)])
        t_q.append(time.perf_counter() - t)
        q_at += 1
    gc.callbacks.remove(on_gc)
    tq, tw = np.array(t_q) * 1e3, np.array(t_w) * 1e3
    out = {"n": n, "mode": "writes", "postings": n_post, "written": written, "queries": len(t_q),
           "total_s": round(time.perf_counter() - t_all, 2),
           "q_p50_ms": round(float(np.percentile(tq, 50)), 3), "q_p95_ms": round(float(np.percentile(tq, 95)), 3),
           "q_max_ms": round(float(tq.max()), 3),
           "write_batch_p50_ms": round(float(np.percentile(tw, 50)), 3),
           "write_batch_max_ms": round(float(tw.max()), 3),
           "gc_pause_max_ms": round(max(pauses, default=0.0) * 1e3, 1)}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
