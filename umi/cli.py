"""The ``umi`` command: demo, remember, recall, stats, import, export, mcp.

Every subcommand but ``demo`` works on a DuckDB file (``--db``, default ./umi.duckdb)
with the embedded default providers (local embedder, rule extraction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Iterator, Sequence, TextIO

from .errors import UmiError, ValidationError

__all__ = ["main"]


def _memory(db: str) -> Any:
    from .memory import Memory

    return Memory(db)


def _print_entity(e: Any, out: TextIO, *, with_score: bool = True) -> None:
    score = f"{e.score:.4f} " if with_score and e.score is not None else ""
    status = "" if e.valid_to is None else "  [superseded]"
    out.write(f"  {score}[{e.entity_type.value}] {e.name}: {e.content}{status}\n")


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .core_memory import CoreMemory
    from .options import RecallOptions
    from .working_memory import WorkingMemory

    out.write("== Core memory (always in the prompt; 32 KiB budget) ==\n")
    core = CoreMemory()
    core.set_block("system", "You are a helpful assistant with long-term memory.")
    core.set_block("persona", "Patient, precise, friendly.", importance=0.7)
    core.set_block("human", "Prefers concise answers. Works on <distributed systems> & databases.", importance=0.9)
    out.write(core.render() + "\n")
    out.write(f"used {core.used_bytes} of {core.max_bytes} bytes ({core.utilization:.2%})\n\n")

    out.write("== Working memory (session key-value store with TTLs) ==\n")
    now = [0.0]
    wm = WorkingMemory(clock=lambda: now[0])
    wm.set("session_id", b"abc123")
    wm.set("otp", b"424242", ttl_secs=30)
    out.write(f"session_id={wm.get('session_id')!r} otp={wm.get('otp')!r} ttl(otp)={wm.ttl('otp'):.0f}s\n")
    now[0] += 31.0
    out.write(f"31 s later: otp={wm.get('otp')!r} session_id={wm.get('session_id')!r} "
              f"(entries: {len(wm)}, {wm.used_bytes} bytes)\n\n")

    tmp = None
    db = args.db
    if db is None:
        tmp = tempfile.TemporaryDirectory(prefix="umi-demo-")
        db = os.path.join(tmp.name, "demo.duckdb")
    out.write(f"== Archival memory (DuckDB at {db}, local embedder, rule extraction) ==\n")
    try:
        with _memory(db) as memory:
            facts = [
                "Alice is a software engineer at Acme Corp.",
                "Bob lives in Berlin and loves climbing.",
                "Carol manages the Apollo project at Acme Corp.",
                "Alice left Acme Corp and now works at Initech.",
            ]
            for text in facts:
                r = memory.remember_sync(text)
                out.write(f"remember: {text!r} -> {r.entity_count} entities")
                if r.has_evolutions:
                    kinds = ", ".join(sorted({ev.evolution_type.value for ev in r.evolutions}))
                    out.write(f", evolutions: {kinds}")
                out.write("\n")
                for ev in r.evolutions:
                    old, new = memory.get_sync(ev.source_id), memory.get_sync(ev.target_id)
                    out.write(f"    {ev.evolution_type.value} of [{old.name}] {old.content!r} "
                              f"by [{new.name}] ({ev.reason}; confidence {ev.confidence:.2f})\n")
            for q in ("Where does Alice work?", "Who lives in Berlin?"):
                out.write(f"\nrecall: {q!r}\n")
                for e in memory.recall_sync(q, RecallOptions(limit=3)):
                    _print_entity(e, out)
            out.write("\nrecall with history: 'Alice' (include_superseded=True)\n")
            for e in memory.recall_sync("Alice", RecallOptions(limit=5, include_superseded=True)):
                _print_entity(e, out)
            out.write(f"\nstored entities: {memory.count_sync()} "
                      f"(current: {memory.count_sync(include_superseded=False)})\n")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def cmd_remember(args: argparse.Namespace, out: TextIO) -> int:
    from .options import RememberOptions

    opts = RememberOptions(importance=args.importance)
    if args.raw:
        opts = opts.without_extraction()
    with _memory(args.db) as memory:
        r = memory.remember_sync(args.text, opts)
    out.write(f"stored {r.entity_count} entities, {len(r.evolutions)} evolutions\n")
    for e in r.entities:
        out.write(f"  {e.id} [{e.entity_type.value}] {e.name}: {e.content}\n")
    for ev in r.evolutions:
        out.write(f"  {ev.evolution_type.value}: {ev.source_id} -> {ev.target_id} ({ev.reason})\n")
    for w in r.warnings:
        out.write(f"  warning: {w}\n")
    return 0


def cmd_recall(args: argparse.Namespace, out: TextIO) -> int:
    from .options import RecallOptions

    opts = RecallOptions(limit=args.limit, include_superseded=args.all)
    with _memory(args.db) as memory:
        hits = memory.recall_sync(args.query, opts)
    if args.json:
        for e in hits:
            out.write(json.dumps(e.to_dict(), sort_keys=True) + "\n")
    else:
        for e in hits:
            _print_entity(e, out)
        if not hits:
            out.write("  (nothing found)\n")
    return 0


def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    from .storage.base import SearchFilters
    from .types import EntityType

    with _memory(args.db) as memory:
        total = memory.count_sync()
        current = memory.count_sync(include_superseded=False)
        out.write(f"db: {args.db}\nentities: {total} (current {current}, superseded {total - current})\n")
        for t in EntityType:
            n = memory.storage.count(SearchFilters(entity_types=(t,), include_superseded=True))
            if n:
                out.write(f"  {t.value}: {n}\n")
        out.write(f"embedding dim: {memory.storage.dim}\n")
    return 0


def _read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") if path != "-" else _stdin() as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValidationError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if isinstance(rec, str):
                rec = {"text": rec}
            if not isinstance(rec, dict):
                raise ValidationError(f"{path}:{n}: each line must be a JSON object or string")
            yield n, rec


def _stdin() -> TextIO:
    return open(sys.stdin.fileno(), encoding="utf-8", closefd=False)


def _progress(done: int, total: int, err: TextIO) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    err.flush()


def cmd_import(args: argparse.Namespace, out: TextIO) -> int:
    """JSONL: {"text": ...} lines are remembered; {"kind": "entity"|"relation", ...} lines (what
    ``umi export`` writes) are restored as they were, ids included."""
    from .options import RememberOptions
    from .types import Entity, EvolutionRelation

    records = list(_read_jsonl(args.file))
    err = sys.stderr
    counts = {"remembered": 0, "duplicates": 0, "entities": 0, "relations": 0}
    with _memory(args.db) as memory:
        relations = []
        for i, (n, rec) in enumerate(records, start=1):
            kind = rec.get("kind", "text")
            try:
                if kind == "text":
                    opts = RememberOptions(metadata=rec.get("metadata"), event_time=rec.get("event_time"))
                    r = memory.remember_sync(rec["text"], opts)
                    counts["duplicates" if r.duplicate else "remembered"] += 1
                elif kind == "entity":
                    memory.storage.upsert([Entity.from_dict(rec)])
                    counts["entities"] += 1
                elif kind == "relation":
                    rec = {k: v for k, v in rec.items() if k != "kind"}
                    relations.append(EvolutionRelation(**rec))
                else:
                    raise ValidationError(f"unknown kind {kind!r}")
            except (KeyError, TypeError, UmiError) as exc:
                raise ValidationError(f"{args.file}:{n}: {exc}") from exc
            if not args.quiet:
                _progress(i, len(records), err)
        if relations:
            memory.storage.add_relations(relations)
            counts["relations"] = len(relations)
    if not args.quiet:
        err.write("\n")
    out.write(" ".join(f"{k}={v}" for k, v in counts.items()) + "\n")
    return 0


def cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    with _memory(args.db) as memory:
        target = open(args.out, "w", encoding="utf-8") if args.out else out
        try:
            seen_rel: set[str] = set()
            rels = []
            for e in memory.storage.iter_all():
                d = e.to_dict(with_embedding=args.embeddings)
                d["kind"] = "entity"
                target.write(json.dumps(d, sort_keys=True, ensure_ascii=False) + "\n")
                for r in memory.storage.relations_for(e.id):
                    if r.id not in seen_rel:
                        seen_rel.add(r.id)
                        rels.append(r)
            for r in sorted(rels, key=lambda r: (r.created_at, r.id)):
                d = r.to_dict()
                d["kind"] = "relation"
                target.write(json.dumps(d, sort_keys=True) + "\n")
        finally:
            if target is not out:
                target.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="umi", description="Memory for LLM agents.")
    p.add_argument("--version", action="version", version=f"umi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="show core, working and archival memory at work")
    d.add_argument("--db", default=None, help="DuckDB file (default: a temporary one)")
    d.set_defaults(fn=cmd_demo)

    def with_db(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--db", default="umi.duckdb", help="DuckDB file (default: ./umi.duckdb)")
        return sp

    r = with_db(sub.add_parser("remember", help="remember a text"))
    r.add_argument("text")
    r.add_argument("--importance", type=float, default=0.5)
    r.add_argument("--raw", action="store_true", help="store as one note, without extraction")
    r.set_defaults(fn=cmd_remember)

    q = with_db(sub.add_parser("recall", help="recall facts for a query"))
    q.add_argument("query")
    q.add_argument("--limit", type=int, default=10)
    q.add_argument("--all", action="store_true", help="include superseded facts")
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(fn=cmd_recall)

    s = with_db(sub.add_parser("stats", help="counts by type"))
    s.set_defaults(fn=cmd_stats)

    i = with_db(sub.add_parser("import", help="import a JSONL file ('-' for stdin)"))
    i.add_argument("file")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(fn=cmd_import)

    e = with_db(sub.add_parser("export", help="export entities and relations as JSONL"))
    e.add_argument("--out", default=None, help="file to write (default: stdout)")
    e.add_argument("--embeddings", action="store_true", help="include embedding vectors")
    e.set_defaults(fn=cmd_export)

    from .integrations import _mcp_cli  # the `mcp` subcommand; the MCP SDK loads only when it runs

    _mcp_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out if out is not None else sys.stdout
    try:
        return int(args.fn(args, out))
    except UmiError as exc:
        sys.stderr.write(f"umi: error: {exc}\n")
        return 2
    except FileNotFoundError as exc:
        sys.stderr.write(f"umi: error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
