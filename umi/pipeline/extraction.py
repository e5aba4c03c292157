"""Entity extraction: parse an LLM's answer, or extract by rules when there is no LLM.

The rules are what the embedded default (no LLM configured) and the Sim LLM use:
sentences are split; capitalised name spans are found (a pronoun/function-word
stop-list keeps "He", "The", "Monday" out of names); each span gets a type from
suffix and context rules (organisation suffixes, "works at X", "lives in X",
"Project X", event words); pronouns are resolved to the last person named; first-
person statements become facts about ``self``. A text with no named thing becomes
one ``note``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import InvalidResponseError
from ..types import ENTITY_NAME_BYTES_MAX, EntityType

__all__ = ["ExtractedEntity", "rule_extract", "parse_extraction", "note_for", "split_sentences"]

SELF_NAME = "User"
NOTE_NAME_CHARS = 60


@dataclass(frozen=True)
class ExtractedEntity:
    name: str
    entity_type: EntityType
    content: str
    confidence: float = 0.8


_SENT_SPLIT = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9\"'(])|\n+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9&'.\-]*")

STOP_CAPS = frozenset(
    """
    i i'm i've i'd i'll me my mine we we're our ours you you're your yours he he's him his she she's her
    hers they they're them their theirs it it's its this that these those there here the a an and or but
    so if then when while where who whom whose what which why how yes no not also however although
    today tomorrow yesterday tonight now later soon recently currently yet still
    monday tuesday wednesday thursday friday saturday sunday
    january february march april may june july august september october november december
    mr mrs ms dr prof sir please thanks thank hi hello dear ok okay
    """.split()
)
PRONOUNS_PERSON = frozenset({"he", "she", "him", "her", "his", "hers"})
FIRST_PERSON = re.compile(r"\b(?:I|I'm|I've|I'd|I'll|[Mm]e|[Mm]y|[Mm]ine|[Mm]yself)\b")

ORG_SUFFIXES = frozenset(
    """
    corp corp. corporation inc inc. incorporated ltd ltd. llc gmbh ag plc co co. company labs lab
    technologies technology systems group university college institute bank foundation
    partners studios studio agency hospital school ventures capital holdings airlines
    """.split()
)
EVENT_WORDS = frozenset(
    "conference summit meeting meetup wedding party festival launch hackathon workshop trip "
    "retreat concert birthday anniversary offsite standup".split()
)
LOCATION_WORDS = frozenset(
    "city town street avenue park lake river mountain island county state country valley beach".split()
)
ORG_CONTEXT = re.compile(
    r"\b(?:works?|worked|working|employed|job|hired|joined|joins|interned?|left|quit|leaves|"
    r"founded|co-?founded|runs|manages|ceo|cto|engineer|manager|director)\s+(?:\w+\s+){0,2}?"
    r"(?:at|for|by|of|with)?\s*$",
    re.I,
)
LOC_CONTEXT = re.compile(
    r"\b(?:lives?|lived|living|moved|moving|moves|relocated|based|born|grew up|stays?|visit(?:ed|ing|s)?|"
    r"travel(?:led|ed|ing|s)?|flew|flying|went|going|trip)\s+(?:up\s+)?(?:in|to|from|at|near)?\s*$",
    re.I,
)
PROJECT_CONTEXT = re.compile(r"\b(?:project|working on|building|builds|maintains|develops)\s+$", re.I)
TASK_CUE = re.compile(r"\b(?:todo|to-do|remind me|need to|needs to|must|deadline|due)\b", re.I)


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(text.strip()) if s and s.strip()]


def _is_cap(tok: str) -> bool:
    return tok[:1].isupper() or (tok[:1].isdigit() and any(c.isupper() for c in tok))


def _name_spans(sentence: str) -> list[tuple[int, int, str]]:
    """(start, end, name) of runs of capitalised words; 'of'/'&' may join two runs."""
    toks = [(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(sentence)]
    spans: list[tuple[int, int, str]] = []
    i = 0
    while i < len(toks):
        s, e, w = toks[i]
        bare = w.rstrip(".'").lower()
        if _is_cap(w) and bare not in STOP_CAPS and not (bare.endswith("'s") and bare[:-2] in STOP_CAPS):
            j = i
            end = e
            while j + 1 < len(toks):
                nw = toks[j + 1][2]
                if _is_cap(nw) and nw.rstrip(".'").lower() not in STOP_CAPS:
                    j += 1
                    end = toks[j][1]
                elif nw in ("of", "&", "de", "van", "von") and j + 2 < len(toks) and _is_cap(toks[j + 2][2]):
                    j += 2
                    end = toks[j][1]
                else:
                    break
            name = sentence[s:end]
            if name.endswith("'s"):
                name = name[:-2]
            name = name.rstrip(".,'")
            if name and len(name.encode()) <= ENTITY_NAME_BYTES_MAX:
                spans.append((s, end, name))
            i = j + 1
        else:
            i += 1
    return spans


def _classify(name: str, before: str, after: str) -> EntityType:
    words = name.lower().split()
    last = words[-1] if words else ""
    if last in ORG_SUFFIXES or last.rstrip(".") in ORG_SUFFIXES:
        return EntityType.ORGANIZATION
    if last in EVENT_WORDS:
        return EntityType.EVENT
    if last in LOCATION_WORDS:
        return EntityType.LOCATION
    if words and words[0] == "project":
        return EntityType.PROJECT
    if PROJECT_CONTEXT.search(before):
        return EntityType.PROJECT
    if ORG_CONTEXT.search(before):
        return EntityType.ORGANIZATION
    if LOC_CONTEXT.search(before):
        return EntityType.LOCATION
    if re.match(r"^\s*(?:corp|inc|ltd|llc)\b", after, re.I):
        return EntityType.ORGANIZATION
    return EntityType.PERSON


def rule_extract(text: str) -> list[ExtractedEntity]:
    """Extract facts from ``text`` by rules. Deterministic; never raises on text."""
    out: list[ExtractedEntity] = []
    seen: set[tuple[str, str, str]] = set()
    last_person: str | None = None
    for sentence in split_sentences(text):
        spans = _name_spans(sentence)
        # Resolve person pronouns to the last person named (in this sentence or before).
        resolved = sentence
        if last_person and not any(_classify(n, sentence[:s], sentence[e:]) == EntityType.PERSON for s, e, n in spans):
            resolved = re.sub(
                r"\b(He|She|he|she)\b", last_person, sentence, count=1
            )
            resolved = re.sub(r"\b(His|Her|his|her)\b", last_person + "'s", resolved, count=1)
        typed = []
        for s, e, name in spans:
            et = _classify(name, sentence[:s], sentence[e:])
            typed.append((name, et))
            if et == EntityType.PERSON:
                last_person = name
        if not typed and resolved != sentence and last_person:
            typed.append((last_person, EntityType.PERSON))
        if FIRST_PERSON.search(sentence):
            typed.insert(0, (SELF_NAME, EntityType.SELF))
        if TASK_CUE.search(sentence):
            typed.append((sentence[:NOTE_NAME_CHARS].rstrip(), EntityType.TASK))
        content = resolved.strip()
        for name, et in typed:
            key = (et.value, name.lower(), content.lower())
            if key in seen:
                continue
            seen.add(key)
            conf = 0.9 if et != EntityType.PERSON or name in sentence else 0.7
            out.append(ExtractedEntity(name=name, entity_type=et, content=content, confidence=conf))
    return out


def note_for(text: str) -> ExtractedEntity:
    """The whole text as one ``note``: what ``without_extraction`` and failed extraction store."""
    first = " ".join(text.split())
    name = first[:NOTE_NAME_CHARS].rstrip()
    if len(first) > NOTE_NAME_CHARS:
        name = name.rsplit(" ", 1)[0] if " " in name else name
        name += "…"
    return ExtractedEntity(name=name or "note", entity_type=EntityType.NOTE, content=text.strip(), confidence=1.0)


def parse_extraction(data: Mapping[str, Any]) -> list[ExtractedEntity]:
    """Turn an ``extract_entities`` answer into entities; malformed items raise InvalidResponseError."""
    items = data.get("entities") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise InvalidResponseError("extraction answer has no 'entities' list")
    out: list[ExtractedEntity] = []
    seen: set[tuple[str, str, str]] = set()
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InvalidResponseError(f"extraction entity #{i} is not an object")
        name, content = item.get("name"), item.get("content")
        if not isinstance(name, str) or not name.strip() or not isinstance(content, str) or not content.strip():
            raise InvalidResponseError(f"extraction entity #{i} needs a non-empty name and content")
        if len(name.encode()) > ENTITY_NAME_BYTES_MAX:
            raise InvalidResponseError(f"extraction entity #{i} name is over {ENTITY_NAME_BYTES_MAX} bytes")
        try:
            et = EntityType.parse(item.get("entity_type", "note"))
        except (ValueError, TypeError) as exc:
            raise InvalidResponseError(f"extraction entity #{i}: {exc}") from exc
        conf = item.get("confidence", 0.8)
        if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0 <= conf <= 1:
            raise InvalidResponseError(f"extraction entity #{i} confidence must be in [0, 1], got {conf!r}")
        key = (et.value, name.strip().lower(), content.strip().lower())
        if key in seen:
            continue
        seen.add(key)
        out.append(ExtractedEntity(name.strip(), et, content.strip(), float(conf)))
    return out
