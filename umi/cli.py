"""The ``umi`` command: demo, remember, recall, stats, import, export, mcp.

Every subcommand but ``demo`` works on a DuckDB file (``--db``, default ./umi.duckdb)
with the embedded default providers (local embedder, rule extraction). The read
commands (``recall``, ``stats``, ``export``) take ``--read-only``: the file is opened
for reading only (it must exist, and nothing in it changes, not even the index cache).

Every failure is one line on stderr, ``umi: error: ...``, never a traceback (set
``UMI_TRACEBACK=1`` to see one), and an exit code:

* 0 — done;
* 1 — the operation failed: storage, a provider, the operating system (a missing file,
  a directory, permission denied, EIO, ENOSPC), out of memory, or an internal error;
* 2 — the input was refused: a bad argument, a file that is not UTF-8 text, JSON that
  is malformed or nested too deeply, a value out of range;
* 130 — interrupted (Ctrl-C). A closed stdout (``umi export | head``) ends quietly with 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
from typing import Any, Sequence, TextIO

from .errors import UmiError, ValidationError

__all__ = ["main"]


def _require_file(db: str, why: str) -> None:
    """A command that never creates its database refuses a path with no file (a typo, say)."""
    if not os.path.isfile(db):
        raise FileNotFoundError(errno.ENOENT, f"no such database file ({why})", db)


def _memory(db: str, args: argparse.Namespace | None = None) -> Any:
    """The Memory a command works on: the whole store, or the scope of ``--user`` / ``--agent``;
    with ``--read-only``, the file opened for reading only (it must exist)."""
    from .memory import Memory

    scope = {"user_id": getattr(args, "user", None), "agent_id": getattr(args, "agent", None)}
    if not getattr(args, "read_only", False):
        return Memory(db, **scope)
    from .providers.local import LocalEmbeddingProvider
    from .storage.duckdb import DuckDBStorageBackend

    _require_file(db, "--read-only never creates one")
    embedder = LocalEmbeddingProvider()
    return Memory(db, embedder=embedder, storage=DuckDBStorageBackend.connect(db, read_only=True), **scope)


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
    with _memory(args.db, args) as memory:
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
    with _memory(args.db, args) as memory:
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

    with _memory(args.db, args) as memory:
        total = memory.count_sync()
        current = memory.count_sync(include_superseded=False)
        out.write(f"db: {args.db}\nentities: {total} (current {current}, superseded {total - current})\n")
        for t in EntityType:
            n = memory.count_sync(where=SearchFilters(entity_types=(t,), include_superseded=True))
            if n:
                out.write(f"  {t.value}: {n}\n")
        out.write(f"embedding dim: {memory.storage.dim}\n")
    return 0


def _stdin() -> TextIO:
    return open(sys.stdin.fileno(), encoding="utf-8", closefd=False)


def _progress(done: int, total: int, err: TextIO) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    err.flush()


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def cmd_import(args: argparse.Namespace, out: TextIO) -> int:
    """What ``umi export`` wrote goes back in all-or-nothing (every line checked first — a key the
    format does not define is refused, core blocks must fit the core budget —, facts without
    vectors embedded again, one transaction with the core blocks); ``{"text": ...}`` lines are
    remembered one by one after it (a rerun skips what is already there)."""
    err = sys.stderr
    progress = None if args.quiet else (lambda done, total: _progress(done, total, err))
    with _memory(args.db, args) as memory:
        with _stdin() if args.file == "-" else open(args.file, encoding="utf-8") as f:
            counts = memory.import_sync(f, progress=progress)
    if progress is not None and (counts.get("embedded") or counts.get("remembered") or counts.get("duplicates")):
        err.write("\n")
    out.write(" ".join(f"{k}={v}" for k, v in counts.items()) + "\n")
    return 0


def cmd_export(args: argparse.Namespace, out: TextIO) -> int:
    if args.out is not None and _same_file(args.out, args.db):
        raise ValidationError(f"--out {args.out!r} is the database being exported; write the export elsewhere "
                              "(refusing to overwrite its own database)")
    with _memory(args.db, args) as memory:
        memory.export_sync(args.out if args.out else out, embeddings=args.embeddings)
    return 0


def cmd_compact(args: argparse.Namespace, out: TextIO) -> int:
    """Rewrite the database file so that forgotten text is gone from disk (:meth:`Memory.compact`)."""
    _require_file(args.db, "compact rewrites an existing file, it never creates one")
    before = os.path.getsize(args.db)
    with _memory(args.db, args) as memory:
        memory.compact_sync()
    out.write(f"compacted {args.db}: {before} -> {os.path.getsize(args.db)} bytes\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="umi", description="Memory for LLM agents.")
    p.add_argument("--version", action="version", version=f"umi {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="show core, working and archival memory at work")
    d.add_argument("--db", default=None, help="DuckDB file (default: a temporary one)")
    d.set_defaults(fn=cmd_demo)

    def with_db(sp: argparse.ArgumentParser, *, reads: bool = False) -> argparse.ArgumentParser:
        sp.add_argument("--db", default="umi.duckdb", help="DuckDB file (default: ./umi.duckdb)")
        sp.add_argument("--user", default=None, help="work in this user's scope (default: every scope)")
        sp.add_argument("--agent", default=None, help="work in this agent's scope (default: every scope)")
        if reads:
            sp.add_argument("--read-only", action="store_true",
                            help="open the file for reading only (it must exist; nothing is written)")
        return sp

    r = with_db(sub.add_parser("remember", help="remember a text"))
    r.add_argument("text")
    r.add_argument("--importance", type=float, default=0.5)
    r.add_argument("--raw", action="store_true", help="store as one note, without extraction")
    r.set_defaults(fn=cmd_remember)

    q = with_db(sub.add_parser("recall", help="recall facts for a query"), reads=True)
    q.add_argument("query")
    q.add_argument("--limit", type=int, default=10)
    q.add_argument("--all", action="store_true", help="include superseded facts")
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(fn=cmd_recall)

    s = with_db(sub.add_parser("stats", help="counts by type"), reads=True)
    s.set_defaults(fn=cmd_stats)

    i = with_db(sub.add_parser("import", help="import a JSONL file ('-' for stdin)"))
    i.add_argument("file")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(fn=cmd_import)

    e = with_db(sub.add_parser("export", help="export sources, facts, relations, history and core blocks as JSONL"), reads=True)
    e.add_argument("--out", default=None, help="file to write (default: stdout)")
    e.add_argument("--embeddings", action="store_true", help="include embedding vectors")
    e.set_defaults(fn=cmd_export)

    c = with_db(sub.add_parser("compact", help="rewrite the database file so that forgotten text is gone from disk"))
    c.set_defaults(fn=cmd_compact)

    from .integrations import _mcp_cli  # the `mcp` subcommand; the MCP SDK loads only when it runs

    _mcp_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out if out is not None else sys.stdout
    try:
        return int(args.fn(args, out))
    except BaseException as exc:  # noqa: BLE001 - the one place every failure becomes a line and a code
        if isinstance(exc, SystemExit):
            raise
        if os.environ.get("UMI_TRACEBACK"):
            import traceback

            traceback.print_exc()
        message, code = _failure(exc, args)
        if message is None:
            return code
        try:
            sys.stderr.write(f"umi: error: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # stderr itself is gone: the exit code still says it
            pass
        return code


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates printable
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failure(exc: BaseException, args: argparse.Namespace) -> tuple[str | None, int]:
    """(one-line message, exit code) for any exception out of a command."""
    from .errors import ValidationError as _Invalid

    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, BrokenPipeError):
        # the reader went away (`umi export | head`): not an error of ours
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return None, 0
    if isinstance(exc, _Invalid):
        return _one_line(str(exc)), 2
    if isinstance(exc, UmiError) and not isinstance(exc, OSError):  # (a TransferFileError: by its errno below)
        return _one_line(f"{type(exc).__name__}: {exc}"), 1
    if isinstance(exc, UnicodeDecodeError):
        where = getattr(args, "file", None) or "input"
        return (_one_line(f"{where} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                          f"{exc.reason}"), 2)
    if isinstance(exc, UnicodeEncodeError):
        return _one_line(f"text is not valid Unicode (a lone surrogate at index {exc.start}; "
                         "was an argument not UTF-8?)"), 2
    if isinstance(exc, RecursionError):
        where = getattr(args, "file", None) or "input"
        return f"{where}: a JSON value is nested too deeply to read", 2
    if isinstance(exc, json.JSONDecodeError):
        return _one_line(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"), 2
    if isinstance(exc, OSError):
        what = exc.strerror or type(exc).__name__
        if exc.errno == errno.ENOSPC:
            what = "no space left on the device"
        elif exc.errno == errno.EIO:
            what = "input/output error (the disk or file system failed)"
        path = exc.filename
        return _one_line(f"{path}: {what}" if path is not None else what), 1
    if isinstance(exc, MemoryError):
        return "out of memory", 1
    return _one_line(f"internal error: {type(exc).__name__}: {exc} (set UMI_TRACEBACK=1 for details)"), 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
