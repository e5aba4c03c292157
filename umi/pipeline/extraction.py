"""Entity extraction: parse an LLM's answer, or extract by rules when there is no LLM.

The rules are what the embedded default (no LLM configured) and the Sim LLM use:
sentences are split; capitalised name spans are found (a pronoun/function-word
stop-list keeps "He", "The", "Monday" out of names); each span gets a type from
suffix and context rules (organisation suffixes, "works at X", "lives in X",
"Project X", event words); pronouns are resolved to the last person named; first-
person statements become facts about ``self`` — or, on a line that starts with a speaker
label ("Bob: I work at Acme"), facts about that speaker (a group chat's turns are not all
the user's).

Capitalisation at the start of a sentence is no evidence of a name: there a word that is
common English ("Budget is tight this quarter.") is not a name unless the text also
writes it capitalised mid-sentence, and numbers or amounts ("5M") never start a name.

Nothing told is lost: :func:`with_leftovers` checks that every sentence of the text is
covered by some extracted fact (by rules or by an LLM) and keeps the sentences that are
not as one ``note`` of the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .._validate import check_text
from ..errors import InvalidResponseError, ValidationError
from ..types import ENTITY_CONTENT_BYTES_MAX, ENTITY_NAME_BYTES_MAX, EntityType
from ._lexicon import COMMON_WORDS

__all__ = ["ExtractedEntity", "about_speaker", "answer_text", "asks", "rule_extract", "speaker_of", "parse_extraction",
           "note_for", "split_sentences",
           "with_leftovers", "uncovered_sentences"]

SELF_NAME = "User"
NOTE_NAME_CHARS = 60


@dataclass(frozen=True)
class ExtractedEntity:
    name: str
    entity_type: EntityType
    content: str
    confidence: float = 0.8


#: combining marks: part of the letter before them ("José" typed decomposed, NFD)
MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
#: a word: letters of any script and digits ("Müller", "Łukasz", "2024"), then those, marks and &'.-
_WORD = re.compile(rf"[^\W_](?:[^\W_]|[{MARKS}&'.\-])*")
#: a sentence break candidate: white space after . ! ? ; (a break when the next character opens a
#: sentence: see split_sentences), or a line break
_SENT_BREAK = re.compile(r"(?<=[.!?;])\s+(?=(\S))|\n+")

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


#: a speaker label at the start of a line: one to three capitalised words and a colon ("Bob:",
#: "Mary Ann:"), then the turn
_LABEL_WORD = rf"[^\W\d_](?:[^\W\d_]|[{MARKS}'\-])*"
_SPEAKER = re.compile(rf"^\s*({_LABEL_WORD}(?: {_LABEL_WORD}){{0,2}})\s*:\s+(?=\S)")


def _label(line: str) -> "re.Match[str] | None":
    """A speaker label opening ``line`` ("Zoë: ...", "Mary Ann: ..."): 1-3 words, each capitalised."""
    m = _SPEAKER.match(line)
    return m if m is not None and all(w[:1].isupper() for w in m.group(1).split()) else None


def speaker_of(line: str, mid_caps: frozenset[str] = frozenset()) -> str | None:
    """The speaker a line's label names ("Bob: I work at Acme" -> "Bob"), or None.

    A label word must not be a pronoun/function word, and a label of common English words
    ("Note:", "Update:") is a label only when the text also writes it capitalised mid-sentence
    (the same evidence :func:`_name_spans` asks of a sentence's first word)."""
    m = _label(line)
    if m is None:
        return None
    words = m.group(1).split()
    if any(_bare(w) in STOP_CAPS for w in words):
        return None
    if all(looks_common(w) and _bare(w) not in mid_caps for w in words):
        return None
    return m.group(1)


def asks(content: str) -> bool:
    """Does a fact's content ask rather than tell ("Bob, where do you live now?")? A question
    states nothing about the names it mentions: it neither updates a fact nor is one."""
    return content.rstrip().endswith("?")


_WE = re.compile(r"\b(?:[Ww]e|[Uu]s|[Oo]ur|[Oo]urs|[Ww]e're|[Ww]e've)\b")
#: words that open a line about someone other than its speaker
_OTHER_SUBJECT = frozenset("he she they it his her their its".split())


def about_speaker(body: str, mid_caps: frozenset[str] = frozenset()) -> bool:
    """Does a speaker's line (``body``: the text after "Bob:") tell about the speaker? In the first
    person ("I moved", "we moved"), or news without a subject ("First week at Acme done",
    "Goodbye Leeds, hello York"): it names something, and does not open with a name or a
    pronoun that says whom it is about. Small talk ("Good for you.") names nothing and is not."""
    if FIRST_PERSON.search(body) or _WE.search(body):
        return True
    spans = _name_spans(body, mid_caps)
    first = _WORD.search(body)
    return bool(spans) and first is not None and first.start() != spans[0][0] \
        and _bare(first.group(0)) not in _OTHER_SUBJECT


def split_sentences(text: str) -> list[str]:
    """Sentences: split after . ! ? ; where the next one opens with a capital (any script), a digit,
    a quote or a parenthesis ("e.g. this" stays whole), and at every line break."""
    text = text.strip()
    out: list[str] = []
    start = 0
    for m in _SENT_BREAK.finditer(text):
        nxt = m.group(1)
        if nxt is not None and not (nxt.isupper() or nxt.isdigit() or nxt in "\"'(") and "\n" not in m.group(0):
            continue
        out.append(text[start:m.start()])
        start = m.end()
    out.append(text[start:])
    return [s.strip() for s in out if s and s.strip()]


def _is_cap(tok: str) -> bool:
    """A word that may be part of a name: capitalised, not starting with a digit ("5M", "2024")."""
    return tok[:1].isupper()


_COMMON_SUFFIXES = ("ing", "ings", "tion", "tions", "sion", "ment", "ments", "ness", "ity", "ful", "less",
                    "ous", "able", "ible", "ism")


def looks_common(word: str) -> bool:
    """Is ``word`` (any case) a common English word rather than a name? A lexicon, plurals of
    it, and the suffixes of common nouns and adjectives ("Planning", "Decisions")."""
    w = word.lower().rstrip(".'")
    if w.endswith("'s"):
        w = w[:-2]
    if w in COMMON_WORDS or w in STOP_CAPS:
        return True
    if w.endswith("s") and (w[:-1] in COMMON_WORDS or (w.endswith("es") and w[:-2] in COMMON_WORDS)):
        return True
    return len(w) > 5 and w.endswith(_COMMON_SUFFIXES)


def _joinable(sentence: str, end: int, start: int) -> bool:
    """Only white space may stand between two words of one name ("Welcome, Miso" is not a name)."""
    return not sentence[end:start].strip()


def _name_spans(sentence: str, mid_caps: frozenset[str] = frozenset()) -> list[tuple[int, int, str]]:
    """(start, end, name) of runs of capitalised words; 'of'/'&' may join two runs.

    The sentence's first word is a name (or part of one) only when it is not common English
    (:func:`looks_common`), or when ``mid_caps`` — the words the text capitalises
    mid-sentence — holds it.
    """
    toks = [(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(sentence)]
    spans: list[tuple[int, int, str]] = []
    starts = _starts(sentence, toks)
    i = 0
    while i < len(toks):
        s, e, w = toks[i]
        bare = w.rstrip(".'").lower()
        if i in starts and _is_cap(w) and looks_common(w) and _bare(w) not in mid_caps:
            i += 1  # "Budget is tight", "In Chicago", "Took Biscuit": the capital is the sentence's
            continue
        if _is_cap(w) and bare not in STOP_CAPS and not (bare.endswith("'s") and bare[:-2] in STOP_CAPS):
            j = i
            end = e
            while j + 1 < len(toks) and _joinable(sentence, end, toks[j + 1][0]):
                nw = toks[j + 1][2]
                if _is_cap(nw) and nw.rstrip(".'").lower() not in STOP_CAPS:
                    j += 1
                    end = toks[j][1]
                elif (nw in ("of", "&", "de", "van", "von") and j + 2 < len(toks) and _is_cap(toks[j + 2][2])
                      and _joinable(sentence, toks[j + 1][1], toks[j + 2][0])):
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


def _bare(word: str) -> str:
    w = word.lower().rstrip(".'")
    return w[:-2] if w.endswith("'s") else w


def _starts(sentence: str, toks: list[tuple[int, int, str]]) -> set[int]:
    """Indexes of the tokens that start a sentence: the first, and after a speaker label
    ("Amara: First week at…") the first of the turn."""
    label = _label(sentence)
    if label is None:
        return {0}
    return {0, next((k for k, t in enumerate(toks) if t[0] >= label.end()), 0)}


def _mid_caps(sentences: list[str]) -> frozenset[str]:
    """Words the text writes capitalised somewhere other than at a sentence's start."""
    out = set()
    for sentence in sentences:
        toks = [(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(sentence)]
        starts = _starts(sentence, toks)
        for k, (_, _, w) in enumerate(toks):
            if k not in starts and _is_cap(w):
                out.add(_bare(w))
    return frozenset(out)


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
    sentences = split_sentences(text)
    mid_caps = _mid_caps(sentences)
    # (sentence, its line's speaker): split_sentences of each line, in order, is split_sentences(text)
    said = [(sentence, speaker_of(line, mid_caps)) for line in text.strip().split("\n")
            for sentence in split_sentences(line)]
    for sentence, speaker in said:
        spans = _name_spans(sentence, mid_caps)
        label = _label(sentence) if speaker else None
        body = sentence
        if label is not None:  # the label says who speaks, not whom the line is about
            spans = [sp for sp in spans if sp[0] >= label.end()]
            body = sentence[label.end():]
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
        if speaker and about_speaker(body, mid_caps):
            typed.insert(0, (speaker, EntityType.PERSON))
        elif not speaker and FIRST_PERSON.search(sentence):  # first person without a label: the user
            typed.insert(0, (SELF_NAME, EntityType.SELF))
        if TASK_CUE.search(sentence):
            typed.append((sentence[:NOTE_NAME_CHARS].rstrip(), EntityType.TASK))
        content = resolved.strip()
        for name, et in typed:
            key = (et.value, name.lower(), content.lower())
            if key in seen:
                continue
            seen.add(key)
            conf = 0.9 if et != EntityType.PERSON or name in sentence or name == speaker else 0.7
            out.append(ExtractedEntity(name=name, entity_type=et, content=content, confidence=conf))
    return out


_COVER_STOP = frozenset(
    "a an the is are was were be been am to of in on at for and or but with as by it its this that i me my "
    "we our you your he she him her his they them their so do does did have has had not no".split()
)


def _cover_keys(text: str) -> list[str]:
    """What a sentence says, for the coverage check: its words, stop words out, stemmed
    (so "work" and "works" agree when an LLM rephrases)."""
    words = [w.lower() for w in re.findall(r"[^\W_]+", text)]
    keys = [_stem(w) for w in words if w not in _COVER_STOP]
    return keys or [_stem(w) for w in words]


def _stem(word: str) -> str:
    """A crude stem: a plural or third-person "s" off, then five letters ("works" -> "work")."""
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    return word[:5]


#: share of a sentence's words that the extracted facts must hold for the sentence to count as kept;
#: a model's paraphrase that drops more than this keeps the sentence as a note too (keeping a
#: sentence twice costs a little space; losing it breaks the promise)
COVERAGE_MIN = 0.8


def uncovered_sentences(text: str, found: list[ExtractedEntity]) -> list[str]:
    """Sentences of ``text`` whose words the facts in ``found`` (names and contents) do not hold."""
    held: set[str] = set()
    for f in found:
        held.update(_cover_keys(f.name))
        held.update(_cover_keys(f.content))
    out = []
    for sentence in split_sentences(text):
        keys = _cover_keys(sentence)
        if keys and sum(k in held for k in keys) < COVERAGE_MIN * len(keys):
            out.append(sentence)
    return out


def with_leftovers(text: str, found: list[ExtractedEntity]) -> tuple[list[ExtractedEntity], int]:
    """``found`` plus, when some sentences are not in any fact, one ``note`` holding them.

    Returns the facts and how many sentences the note holds (0: every sentence was kept).
    A text none of whose sentences was attached becomes one note of the whole text.
    """
    left = uncovered_sentences(text, found)
    if not left:
        return found, 0
    if not found or len(left) == len(split_sentences(text)):
        return [*found, note_for(text)], len(left)
    return [*found, note_for("\n".join(left))], len(left)


def note_for(text: str) -> ExtractedEntity:
    """The whole text as one ``note``: what ``without_extraction`` and failed extraction store."""
    first = " ".join(text.split())
    name = first[:NOTE_NAME_CHARS].rstrip()
    if len(first) > NOTE_NAME_CHARS:
        name = name.rsplit(" ", 1)[0] if " " in name else name
        name += "…"
    return ExtractedEntity(name=name or "note", entity_type=EntityType.NOTE, content=text.strip(), confidence=1.0)


def answer_text(value: str, what: str, max_bytes: int) -> str:
    """Text of a model's answer that umi will store: what a record refuses (a lone surrogate, more
    than ``max_bytes`` UTF-8 bytes) is the model's mistake, an :class:`InvalidResponseError`, so
    the pipeline degrades as for any bad answer instead of failing the user's call."""
    try:
        return check_text(value, what, max_bytes)
    except ValidationError as exc:
        raise InvalidResponseError(str(exc)) from exc


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
        answer_text(name.strip(), f"extraction entity #{i} name", ENTITY_NAME_BYTES_MAX)
        answer_text(content.strip(), f"extraction entity #{i} content", ENTITY_CONTENT_BYTES_MAX)
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
