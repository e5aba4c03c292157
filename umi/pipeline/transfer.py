"""Export and import: a store (or one scope of it) as JSONL, and back.

An export is one JSON object per line, in this order: a ``header`` line, then every
``source``, ``entity`` (superseded ones too; vectors only when asked), ``relation`` and
``history`` record, each with its scope, then a ``core`` record for every core-memory block
(``scope``, ``label``, ``content``, ``importance``; each scope's blocks in their order) of every
core scope the view sees (a scoped view: the core scopes inside its ``Scope(user_id, agent_id)``).
It is read in one I/O hop under the write lock, so it is one consistent state, and since
forgetting scrubs content from every table, an export after forgets holds nothing that was
forgotten. Every record holds only the keys of :data:`KEYS`; version 3 added ``core``
records (a version-2 file, without them, imports as before).

Import is **all-or-nothing**: every line is read and checked first (an error names the
file and line, and nothing is written): a key the format does not define is refused, and so
is a core scope whose blocks (those stored merged with the file's, a file's block replacing a
stored one of its label) would not fit ``MemoryConfig.core_memory_bytes``
(:class:`~umi.errors.CoreMemoryFullError`); records that come without a vector are embedded
again (with a progress callback) when the Memory has an embedder; then every record is
written in one transaction through ``StorageBackend.restore`` and ``set_core_block`` (each
core block as a ``"set"``: the core history is not exported, its import appends a record per
block). Importing an export gives back the same entities, relations, validity, history and
core blocks.

Lines holding only a text (``{"text": ...}`` or a JSON string) are remembered, one by one,
after the records: each is its own transaction, and a failed run can simply be run again
(texts already remembered are exact duplicates and are skipped) — resumable, not atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping

from .._validate import utf8_len
from ..core_memory import CORE_MEMORY_MAX_BYTES_MAX, CoreMemory
from ..errors import CoreMemoryFullError, InvalidConfigError, UmiError, ValidationError
from ..options import TEXT_BYTES_MAX, RememberOptions
from ..storage.base import HistoryRecord, Source
from ..types import Entity, EvolutionRelation, Scope
from .context import PipelineContext
from .passages import embed_entities, needs_passages
from .remember import validate_text

__all__ = ["FORMAT", "FORMAT_VERSION", "KEYS", "export_records", "ImportPlan", "parse_lines", "restore"]

FORMAT = "umi-export"
FORMAT_VERSION = 3  # 3: core records
KINDS = ("header", "source", "entity", "relation", "history", "core", "text")

def _fields(cls: type) -> frozenset[str]:
    """A record kind's keys: its dataclass's fields (what ``to_dict`` writes) and ``kind``."""
    return frozenset({"kind", *(f.name for f in fields(cls))})


#: The keys a record of each kind may have (what export writes, and the text lines' options);
#: import refuses any other. An entity's ``score`` and ``mentions`` are ``Entity.to_dict``'s
#: (export drops them, import ignores them).
KEYS: dict[str, frozenset[str]] = {
    "header": frozenset({"kind", "format", "version", "embedder", "dim", "scope"}),
    "source": _fields(Source),
    "entity": _fields(Entity),
    "relation": _fields(EvolutionRelation),
    "history": _fields(HistoryRecord),
    "core": frozenset({"kind", "scope", "label", "content", "importance"}),
    "text": frozenset({"kind", "text", "metadata", "event_time"}),
}

Progress = Callable[[int, int], None]


def _scope_dict(scope: Scope) -> dict[str, str | None] | None:
    return None if scope.is_unset else scope.to_dict()


def export_records(ctx: PipelineContext, *, embeddings: bool) -> list[dict[str, Any]]:
    """Every record the view sees, as JSON-ready dicts, in export order. Runs in one I/O hop."""
    scope = ctx.scope
    st = ctx.storage
    out: list[dict[str, Any]] = [{
        "kind": "header", "format": FORMAT, "version": FORMAT_VERSION,
        "embedder": getattr(ctx.embedder, "name", None), "dim": st.dim,
        "scope": _scope_dict(scope),
    }]
    view = None if scope.is_unset else scope
    for s in st.iter_sources(view):
        out.append({"kind": "source", "id": s.id, "text_hash": s.text_hash, "text": s.text,
                    "created_at": s.created_at, "metadata": dict(s.metadata), "scope": _scope_dict(s.scope)})
    everything = ctx.filters(include_superseded=True)
    offset = 0
    while True:
        page = st.list(everything, limit=1000, offset=offset)
        if not page:
            break
        for e in page:
            d = e.to_dict(with_embedding=embeddings)
            d["kind"] = "entity"
            d.pop("score", None)
            d.pop("mentions", None)
            out.append(d)
        offset += len(page)
    for r in st.iter_relations(view):
        d = r.to_dict()
        d["kind"] = "relation"
        d["scope"] = _scope_dict(r.scope)
        out.append(d)
    for h in st.iter_history(view):
        out.append({"kind": "history", "entity_id": h.entity_id, "seq": h.seq, "op": h.op, "at": h.at,
                    "snapshot": dict(h.snapshot), "scope": _scope_dict(h.scope)})
    for sc in st.core_scopes(view):
        for b in sorted(st.core_blocks(sc), key=lambda b: b.position):
            out.append({"kind": "core", "scope": _scope_dict(sc), "label": b.name, "content": b.content,
                        "importance": b.importance})
    return out


def dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def write_file(path: str, records: Iterable[Mapping[str, Any]]) -> None:
    """Write an export to ``path`` so that a failure leaves what was there: an existing file is
    replaced (keeping its mode) only once the new export is written whole and synced; a new file
    is removed again. A path that is no regular file (a FIFO, ``/dev/stdout``) is written as it
    is, and so is a file in a directory that takes no new file (there is no other way)."""
    lines = (dumps(r) + "\n" for r in records)
    target = os.path.realpath(path)

    def in_place() -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)

    if os.path.exists(target) and not os.path.isfile(target):
        return in_place()
    if not os.path.exists(target):
        try:
            return in_place()
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.",
                                   suffix=".tmp")
    except OSError:
        return in_place()
    os.close(fd)

    def fill(f: Any) -> None:
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        f.writelines(lines)

    from .._index_file import atomic_write  # (numpy comes with it: not at import)

    atomic_write(target, fill, text=True, tmp=tmp)


@dataclass(frozen=True)
class CoreRecord:
    """One core block of a file (``line``: its line number, for errors)."""

    scope: Scope  # a core scope: Scope(user_id, agent_id)
    label: str
    content: str
    importance: float
    line: int


@dataclass
class ImportPlan:
    """What a file holds, checked, before anything is written."""

    sources: list[Source] = field(default_factory=list)
    entities: list[Entity] = field(default_factory=list)
    relations: list[EvolutionRelation] = field(default_factory=list)
    history: list[HistoryRecord] = field(default_factory=list)
    core: list[CoreRecord] = field(default_factory=list)
    texts: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    header: dict[str, Any] | None = None

    @property
    def records(self) -> int:
        return len(self.sources) + len(self.entities) + len(self.relations) + len(self.history) + len(self.core)


def _int(rec: Mapping[str, Any], key: str) -> int:
    v = rec[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValidationError(f"{key!r} must be an integer, got {v!r}")
    return v


def _scope(rec: Mapping[str, Any]) -> Scope:
    return Scope.from_dict(rec.get("scope"))


def _parse(rec: Mapping[str, Any], plan: ImportPlan, n: int, text_bytes_max: int) -> None:
    kind = rec.get("kind", "text")
    if kind not in KINDS:
        raise ValidationError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    unknown = sorted(set(rec) - KEYS[kind])
    if unknown:
        raise ValidationError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in a "
                              f"{kind} record; allowed: {', '.join(map(repr, sorted(KEYS[kind])))}")
    if kind == "header":
        version = rec.get("version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValidationError(f"the header's version must be an integer, got {version!r}")
        if rec.get("format", FORMAT) != FORMAT or version > FORMAT_VERSION:
            raise ValidationError(f"not a {FORMAT} file of version {FORMAT_VERSION} or older: "
                                  f"format {rec.get('format')!r} version {rec.get('version')!r}")
        plan.header = dict(rec)
    elif kind == "text":
        text = rec.get("text")
        if not isinstance(text, str):
            raise ValidationError("a text line needs a 'text' string")
        validate_text(text, text_bytes_max)  # what remember would refuse after the records went in
        RememberOptions(metadata=rec.get("metadata"), event_time=rec.get("event_time"))  # checked now, not half-way
        plan.texts.append((n, dict(rec)))
    elif kind == "source":
        meta = rec.get("metadata") or {}
        plan.sources.append(Source(str(rec["id"]), str(rec["text_hash"]), str(rec["text"]),
                                   _int(rec, "created_at"), dict(meta), _scope(rec)))
    elif kind == "entity":
        plan.entities.append(Entity.from_dict({k: v for k, v in rec.items() if k != "kind"}))
    elif kind == "relation":
        plan.relations.append(EvolutionRelation(
            source_id=rec["source_id"], target_id=rec["target_id"], evolution_type=rec["evolution_type"],
            reason=rec.get("reason", ""), confidence=rec.get("confidence", 1.0), id=rec.get("id", ""),
            created_at=_int(rec, "created_at"), scope=_scope(rec)))
    elif kind == "core":
        scope = _scope(rec)
        if scope.session_id is not None:
            raise ValidationError(f"a core block belongs to Scope(user_id, agent_id), not to a session: "
                                  f"session_id {scope.session_id!r}")
        label, content, importance = rec["label"], rec["content"], rec.get("importance", 0.5)
        if not isinstance(label, str) or not isinstance(content, str):
            raise ValidationError("a core record's 'label' and 'content' must be strings")
        CoreMemory(CORE_MEMORY_MAX_BYTES_MAX).set_block(label, "", importance)  # the label and importance rules
        utf8_len(content, "a core record's 'content'", ValidationError)  # no lone surrogate (the size: below)
        plan.core.append(CoreRecord(scope, label, content, float(importance), n))
    else:  # history
        snap = rec.get("snapshot")
        if not isinstance(snap, Mapping):
            raise ValidationError("a history record needs a 'snapshot' object")
        op = rec.get("op")
        if op not in ("create", "update", "supersede", "revive", "delete"):
            raise ValidationError(f"unknown history op {op!r}")
        plan.history.append(HistoryRecord(str(rec["entity_id"]), _int(rec, "seq"), op, _int(rec, "at"),
                                          dict(snap), _scope(rec)))


def parse_lines(lines: Iterable[str], where: str, text_bytes_max: int = TEXT_BYTES_MAX) -> ImportPlan:
    """Read and check every line; the first bad one raises ``ValidationError('<where>:<n>: ...')``.
    ``text_bytes_max``: the Memory's ``MemoryConfig.text_bytes_max``, which text lines must fit."""
    plan = ImportPlan()
    for n, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{where}:{n}: not valid JSON ({exc.msg})") from exc
        except RecursionError as exc:
            raise ValidationError(f"{where}:{n}: JSON nested too deeply") from exc
        if isinstance(rec, str):
            rec = {"text": rec}
        if not isinstance(rec, dict):
            raise ValidationError(f"{where}:{n}: each line must be a JSON object or string")
        try:
            _parse(rec, plan, n, text_bytes_max)
        except (KeyError, TypeError, ValueError, UmiError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValidationError(f"{where}:{n}: {what}") from exc
    return plan


def check_consistent(plan: ImportPlan, ctx: PipelineContext) -> None:
    """Relations must join stored or imported facts; a scoped view imports only its scope."""
    ids = {e.id for e in plan.entities}
    missing = [r for r in plan.relations if not ({r.source_id, r.target_id} <= ids)]
    if missing:
        have = {e.id for e in ctx.storage.get_many(sorted({x for r in missing for x in (r.source_id, r.target_id)}))}
        for r in missing:
            for end in (r.source_id, r.target_id):
                if end not in ids and end not in have:
                    raise ValidationError(f"relation {r.id} refers to entity {end}, which is neither stored "
                                          "nor in the file")
    # A stored fact that changed since the export (superseded, revived, updated) is not overwritten
    # with its older state: its history and relations would contradict its row.
    stored = {e.id: e for e in ctx.storage.get_many(sorted(ids))} if ids else {}
    for e in plan.entities:
        current = stored.get(e.id)
        if current is not None and _state(current) != _state(e):
            raise ValidationError(f"entity {e.id} is stored in another state than the file's (changed since "
                                  f"the export: updated_at {current.updated_at}, the file's {e.updated_at}); "
                                  "importing would overwrite it with the older state: forget it first, or "
                                  "import into another store")
    # Vectors made by another embedder (or of another size) would be wrong neighbours: embed again.
    theirs = (plan.header or {}).get("embedder")
    ours = getattr(ctx.embedder, "name", None)
    dim = ctx.storage.dim if ctx.storage.dim is not None else getattr(ctx.embedder, "dim", None)
    for e in plan.entities:
        if e.embedding is not None and ((theirs is not None and theirs != ours) or e.embedding.size != dim):
            e.embedding = e.passage_embeddings = None
    if not ctx.scope.is_unset:
        scoped: list[Entity | Source] = [*plan.entities, *plan.sources]
        for what in scoped:
            if not ctx.sees(what.scope):
                raise ValidationError(f"record {what.id} belongs to scope {what.scope.to_dict()}, outside this "
                                      f"view's scope {ctx.scope.to_dict()}")
        for c in plan.core:  # core blocks are kept per Scope(user_id, agent_id): the view's, session aside
            if not ctx.scope.core.contains(c.scope):
                raise ValidationError(f"line {c.line}: core block {c.label!r} belongs to scope {c.scope.to_dict()}, "
                                      f"outside this view's scope {ctx.scope.to_dict()}")
    check_core_fits(ctx, plan)


def check_core_fits(ctx: PipelineContext, plan: ImportPlan) -> None:
    """Every core scope of the file, its stored blocks with the file's set over them in order,
    fits ``MemoryConfig.core_memory_bytes``, else :class:`~umi.errors.CoreMemoryFullError`."""
    budget = ctx.config.core_memory_bytes
    by_scope: dict[Scope, list[CoreRecord]] = {}
    for c in plan.core:
        by_scope.setdefault(c.scope, []).append(c)
    for sc, recs in by_scope.items():
        trial = CoreMemory(budget)
        try:
            for b in sorted(ctx.storage.core_blocks(sc), key=lambda b: b.position):
                trial.set_block(b.name, b.content, b.importance)
        except CoreMemoryFullError as exc:  # written under a larger budget: as opening that scope says
            raise InvalidConfigError(
                f"the stored core blocks of {sc.to_dict()} do not fit core_memory_bytes={budget} ({exc}); "
                "nothing was imported") from exc
        for c in recs:
            try:
                trial.set_block(c.label, c.content, c.importance)
            except CoreMemoryFullError as exc:
                raise CoreMemoryFullError(
                    f"line {c.line}: core block {c.label!r} of scope {sc.to_dict()} does not fit "
                    f"core_memory_bytes={budget} with the scope's other blocks ({exc}); nothing was imported",
                    over_by=exc.over_by, limit=exc.limit) from exc


def _state(e: Entity) -> tuple[Any, ...]:
    """What an import may not silently change about a stored fact."""
    return (e.content, e.valid_from, e.valid_to, e.updated_at)


async def embed_missing(ctx: PipelineContext, plan: ImportPlan, progress: Progress | None) -> int:
    """Give every imported fact without a vector one, and a long one without passage vectors
    those (older exports, exports without vectors): batched, progress after each batch."""
    if ctx.embedder is None:
        return 0
    todo = [e for e in plan.entities if e.embedding is None or needs_passages(e)]
    bs = ctx.config.embedding_batch_size
    for i in range(0, len(todo), bs):
        chunk = todo[i : i + bs]
        await embed_entities(ctx, chunk)
        if progress is not None:
            progress(min(i + bs, len(todo)), len(todo))
    return len(todo)


def restore(ctx: PipelineContext, plan: ImportPlan) -> None:
    """Write every record in one transaction (the caller holds the write lock, and the core
    write locks of the loaded core memories of ``plan.core``'s scopes, which read their blocks
    again once it returned): the core budgets are checked again first (a block set since
    :func:`check_consistent` counts), so an import over one writes nothing."""
    check_core_fits(ctx, plan)
    with ctx.storage.transaction():
        ctx.begin_write()
        ctx.storage.restore(plan.entities, plan.sources, plan.relations, plan.history)
        at = ctx.now_ms()
        for c in plan.core:
            ctx.storage.set_core_block(c.scope, c.label, c.content, c.importance, at)

