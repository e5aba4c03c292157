"""How much of ``recall(limit=10)`` is spent on copies of another result.

What it measures: on ``benchmarks/data`` (38 chat sessions, 217 turns; 59 questions),
with the embedded default (``umi.Memory(path)``: DuckDB file, the local embedder, rule
extraction, no LLM), every turn is remembered (user and assistant, in order, with the
session date as ``event_time``), then each question is recalled twice — as an agent
asks it (3rd person) and as the user would (1st person) — with ``RecallOptions(limit=10)``.

A result is a **copy** when an earlier result of the same recall states the same thing:
the same source text and the same normalised content (rule extraction stores one
sentence about three names as three facts). Reported: results returned, copies among
them, the share of copies, and the number of recalls with at least one copy; plus how
many distinct statements the recalls returned (what ``limit`` should buy), and, as a check
that collapsing copies costs no retrieval, ``answer_hit@10``: the share of recalls with a
result from one of the question's answer turns (turn ids ride in each fact's metadata).

Run it from the repository root: ``python benchmarks/bench_copies.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"


def _date_ms(day: str) -> int:
    d = dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
    return int(d.timestamp() * 1000)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--limit", type=int, default=10)
    args = ap.parse_args(argv)

    import umi
    from umi.types import normalize_content

    conv_path, q_path = DATA / "conversations.jsonl", DATA / "questions.jsonl"
    if not conv_path.exists():
        print(f"{conv_path} does not exist: nothing to measure")
        return 1
    sessions = [json.loads(x) for x in conv_path.read_text().splitlines() if x.strip()]
    questions = [json.loads(x) for x in q_path.read_text().splitlines() if x.strip()]

    with tempfile.TemporaryDirectory(prefix="umi-copies-") as tmp:
        t0 = time.perf_counter()
        mem = umi.Memory(os.path.join(tmp, "copies.duckdb"))
        stored = 0
        for s in sessions:
            when = _date_ms(s["date"])
            for turn in s["turns"]:
                r = mem.remember_sync(turn["text"], umi.RememberOptions(event_time=when,
                                                                        metadata={"turn": turn["id"]}))
                stored += r.entity_count
        t_remember = time.perf_counter() - t0
        results = copies = recalls_with_copy = statements = recalls = answered = 0
        t0 = time.perf_counter()
        for q in questions:
            for text in (q["question"], q.get("question_first_person")):
                if not text:
                    continue
                hits = mem.recall_sync(text, umi.RecallOptions(limit=args.limit))
                recalls += 1
                answered += any(h.metadata.get("turn") in q["answer_turn_ids"] for h in hits)
                seen: set[tuple[str | None, str]] = set()
                here = 0
                for h in hits:
                    key = (h.source_id, normalize_content(h.content)) if h.source_id else (h.id, "")
                    if key in seen:
                        here += 1
                    seen.add(key)
                results += len(hits)
                copies += here
                statements += len(seen)
                recalls_with_copy += here > 0
        t_recall = time.perf_counter() - t0
        total = mem.count_sync()
        mem.close()

    figures = {
        "turns": sum(len(s["turns"]) for s in sessions),
        "facts_stored": total,
        "recalls": recalls,
        "limit": args.limit,
        "results": results,
        "copies": copies,
        "copy_share": round(copies / results, 4) if results else 0.0,
        "recalls_with_a_copy": recalls_with_copy,
        "distinct_statements": statements,
        "answer_hit_at_limit": round(answered / recalls, 4) if recalls else 0.0,
        "remember_s": round(t_remember, 2),
        "recall_s": round(t_recall, 2),
    }
    print(f"turns={figures['turns']} facts_stored={total} recalls={recalls} limit={args.limit}")
    print(f"results={results} copies={copies} ({figures['copy_share']:.1%}) "
          f"recalls_with_a_copy={recalls_with_copy}/{recalls} distinct_statements={statements} "
          f"answer_hit@{args.limit}={figures['answer_hit_at_limit']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
