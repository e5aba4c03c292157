"""Evolution: how a new fact relates to the older facts it may update.

``rule_classify`` is the rule set used when no LLM is configured (and by the Sim
LLM): cue words in the new fact decide between ``update`` ("no longer", "now",
"moved to", "left", ...), ``contradict`` (the new fact negates what the old one
says), ``derive`` ("therefore", "so", ...) and ``extend`` (another fact about the
same name). Rules compare two facts only when both are *about* their name (:func:`_about`): a
first-person turn that merely mentions someone ("Bob: I told Alice I moved") says nothing new
about Alice, and another speaker's turn never replaces a speaker's own fact. A question
("Bob, where do you live now?") tells nothing and so changes nothing; a hedged change ("I almost
moved") did not happen; a cue made of predicate words ("moved", "new job") needs the new fact to
name what it changed to; speaker labels, contractions, cue words and time phrases are no shared
subject.
``parse_evolution`` reads an LLM's answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

from .._validate import TEXT_BYTES_MAX
from ..errors import InvalidResponseError
from ..types import EvolutionType, normalize_name
from .extraction import answer_text, asks

__all__ = ["EvolutionDecision", "rule_classify", "parse_evolution", "Candidate", "related"]

UPDATE_CUES = re.compile(
    r"\b(no longer|not anymore|anymore|now|nowadays|moved to|moved|moving to|relocated|left|quit|"
    r"changed|switched|instead|became|becomes|has become|retired|resigned|promoted|replaced|"
    r"used to|formerly|previously|these days|new job|joined|renamed|"
    # changes told without those words: "I handed in my notice at X", "first week at Y", "no more
    # meat", "goodbye Leeds, hello York", "the move to York is done", "our new flat"
    r"handed in (?:my|his|her|their) notice|first (?:day|week|month) at|started (?:at|as|working)|"
    r"no more|goodbye|the move to|new (?:flat|home|house|apartment|place|role|position|employer))\b",
    re.I,
)
NEGATION = re.compile(r"\b(not|never|no|isn't|aren't|wasn't|weren't|doesn't|don't|didn't|hasn't|haven't|won't)\b|n't\b", re.I)
DERIVE_CUES = re.compile(r"\b(therefore|thus|hence|so|which means|as a result|consequently|because of)\b", re.I)
_TOKEN = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the is are was were be been to of in at on for and or but with as by it its not no never "
                  "does do did doesn't don't didn't isn't aren't wasn't".split())


@dataclass(frozen=True)
class Candidate:
    """An older fact the new one is compared with."""

    id: str
    name: str
    entity_type: str
    content: str

    def to_prompt(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "entity_type": self.entity_type, "content": self.content}


@dataclass(frozen=True)
class EvolutionDecision:
    candidate_id: str
    evolution_type: EvolutionType
    reason: str
    confidence: float


#: Words that state the same kind of thing, so "moved to Munich" and "lives in Berlin" compare.
PREDICATE_CLASSES = {
    "residence": "live lives lived living moved move moving moves relocated relocate based home address".split(),
    "job": ("work works worked working job employed employer hired joined left quit engineer manager "
            "ceo cto developer designer role position").split(),
    "relationship": "married wife husband spouse partner girlfriend boyfriend dating divorced engaged".split(),
    "preference": "likes like loves love prefers prefer favorite favourite hates hate enjoys enjoy".split(),
}
_CLASS_OF = {w: c for c, words in PREDICATE_CLASSES.items() for w in words}

#: an occupation held ("I'm now a route planner", "as an editor") speaks of a job too, so "Still at
#: Quillon Press as an editor" and "I switched jobs, I'm now a route planner" compare; an occupation
#: met ("the dentist's chair", "I saw a lawyer") does not
_ROLE = re.compile(
    r"(?:\b(?:as|am|is|are|was|were|be|being|became|become|now)|'m|'re)\s+(?:a|an)\s+(?:[a-z-]+\s+)?(?:analyst|planner|nurse|doctor|teacher|lecturer|professor|lawyer|solicitor|"
    r"accountant|editor|writer|journalist|artist|architect|chef|pilot|dentist|carpenter|electrician|plumber|"
    r"mechanic|midwife|therapist|physiotherapist|pharmacist|surgeon|paramedic|firefighter|ranger|barista|tester|"
    r"programmer|scientist|researcher|consultant|economist|banker|librarian|translator|photographer|"
    r"receptionist|secretary|director|founder|freelancer|intern|engineer|manager|developer|designer)\b(?!')",
    re.I)

#: a job that is not one held: "the new job market", "a job interview at the museum"
_NOT_A_JOB = re.compile(r"\bjobs?\s+(?=(?:market|search|searching|hunt|hunting|board|fair|offer|interview|ad|advert|"
                        r"listing|application)s?\b)", re.I)

#: a home held ("my flat is in Seville"), not one viewed ("I viewed a flat in Graz")
_HOME = re.compile(r"\b(?:my|our)\s+(?:new\s+)?(?:flat|apartment|house|place)\s+(?:is|'s)\s+in\b", re.I)

#: a line whose subject is someone of the speaker's ("My cousin works at a hospital", "My
#: neighbour's cat…") tells of them, not of the speaker
_RELATIVE_SUBJECT = re.compile(
    r"^\W*(?:my|our)\s+(?:[a-z-]+\s+)?(?:mum|mom|mother|dad|father|parents?|brother|sister|siblings?|cousin|"
    r"uncle|aunt|nephew|niece|gran|granny|grandma|grandmother|grandpa|grandfather|grandparents|son|daughter|"
    r"kids?|children|wife|husband|partner|boyfriend|girlfriend|fianc[eé]e?|flatmate|roommate|housemate|"
    r"neighbou?r|friend|colleague|co-?worker|boss|landlord|landlady)(?:'s)?\b(?!\s+and\s+(?:i|me)\b)",
    re.I)


#: what is left of a contraction once split at the apostrophe ("I'm" -> "i", "m"): no content
_CONTRACTION_PARTS = frozenset("m s re ve ll d t".split())


def _content_words(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if t not in _STOP and t not in _CONTRACTION_PARTS}


def _told(content: str) -> str:
    """What a fact says, without its speaker label ("Bob: I moved" -> "I moved"): the label says
    who spoke, so two lines of one speaker do not share a name or a subject because of it."""
    from .extraction import speaker_of

    return content[content.index(":") + 1:] if speaker_of(content) else content


#: words that say nothing about *what* a fact is about: cue words and personal pronouns (two
#: first-person facts share "i", not a subject matter)
_NOT_PREDICATES = frozenset("now no longer anymore instead i me my mine myself we us our you your he him his "
                            "she her they them their "
                            # function words and times of day say nothing of what either ("so I ran…",
                            # "first week at Acme done, so different")
                            "so from there here this that these those just really very too also still about "
                            "into out up then than when what which who how have has had will would can could "
                            "should get got going go went done did make made one some any much more most other "
                            "such only same if because while after before again ever once all being week day "
                            "month year morning evening night today yesterday tomorrow ago last next".split())


def _predicates(text: str, names: set[str]) -> set[str]:
    """Content words that are not names, mapped to their predicate class, stemmed to 5 letters.
    The words of an update cue ("these days") and of a time expression ("two days ago") say when
    or that something changed, not what: they count only when they name a class ("new job")."""
    from .time import find_time_spans

    text = _NOT_A_JOB.sub("", text)
    cued = {w for m in UPDATE_CUES.finditer(text) for w in _content_words(m.group(0))}
    cued |= {w for sp in find_time_spans(text, 0) for w in _content_words(sp.phrase)}
    out = {"job"} if _ROLE.search(text) else set()
    if _HOME.search(text):
        out.add("residence")
    for t in _content_words(text):
        if t in names or t in _NOT_PREDICATES or (t in cued and _class_of(t) is None):
            continue
        out.add(_class_of(t) or t[:5])
    return out


#: a change that did not happen, or not yet: "I almost moved to Leeds", "I might quit"
HEDGE = re.compile(r"\b(?:almost|nearly|might|maybe|perhaps|thinking (?:about|of)|considering|planning to|"
                   r"hope to|hoping to|would like to|wish)\b", re.I)


def _update_cue(new: Candidate) -> re.Match[str] | None:
    """The cue that says ``new`` changes an older fact, or None.

    A hedged fact changes nothing. A cue made of predicate words ("moved", "left", "new job")
    counts only when the fact names what it changed to ("I moved to Leeds", "I left Acme"): "I
    moved my desk by the window" and "the new job market is wild" are no news about a home or a job.
    """
    told = _told(new.content)
    if HEDGE.search(told):
        return None
    named = bool(_names_in(told) - {normalize_name(new.name)})
    for m in UPDATE_CUES.finditer(told):
        if named or not any(_class_of(w) for w in _content_words(m.group(0))):
            return m
    return None


def _class_of(word: str) -> str | None:
    """The predicate class of a word or of its plural ("jobs" -> job)."""
    return _CLASS_OF.get(word) or (_CLASS_OF.get(word[:-1]) if word.endswith("s") else None)


def _names_in(text: str) -> set[str]:
    from .extraction import _name_spans

    return {normalize_name(n) for _, _, n in _name_spans(text)}


@lru_cache(maxsize=16384)
def _topic(content: str, name: str) -> tuple[frozenset[str], frozenset[str]]:
    """What a fact filed under ``name`` speaks of: the other names it tells, and its predicates
    (names' words excluded). Cached: a name's older facts are compared with every new one."""
    own = normalize_name(name)
    told = _told(content)
    names = frozenset(_names_in(told) - {own})
    words = {w for n in names | {own} for w in n.split()}
    return names, frozenset(_predicates(told, words))


def related(new: Candidate, old: Candidate) -> bool:
    """Do two facts about one name speak of the same thing (another shared name, or a shared
    predicate)? Only then can one update, contradict or derive from the other."""
    new_names, new_preds = _topic(new.content, new.name)
    old_names, old_preds = _topic(old.content, new.name)
    if new_names & old_names:
        return True
    # a word of the other fact's names is not a predicate either ("Leeds" in "I left Leeds")
    drop = {w[:5] for n in new_names | old_names for w in n.split()}
    return bool((new_preds - drop) & (old_preds - drop))


def _opens_with_name(body: str) -> bool:
    from .extraction import _name_spans

    spans = _name_spans(body)
    first = re.search(r"\w", body)
    return bool(spans) and first is not None and spans[0][0] == first.start()


def _about(c: Candidate) -> bool:
    """Is the fact about the name it is filed under? A fact filed under the speaker of a
    labelled turn ("Bob: …") is about Bob when Bob speaks of himself (first person); a
    first-person fact that names someone else mid-sentence is about the speaker, not them."""
    from .extraction import FIRST_PERSON, about_speaker, speaker_of

    if c.entity_type == "self":
        return True
    own = normalize_name(c.name)
    speaker = speaker_of(c.content)
    body = c.content[c.content.index(":") + 1:] if speaker else c.content
    if speaker is not None and normalize_name(speaker) == own:
        # "Rosa got a job as a firefighter, we're all so proud" and "my cousin works at…" tell of
        # Rosa and the cousin, though the speaker says "we"
        return about_speaker(body) and not _RELATIVE_SUBJECT.search(body) and not _opens_with_name(body)
    first_person = FIRST_PERSON.search(body) is not None
    if first_person and re.search(rf"(?<!\w){re.escape(own)}(?!\w)", normalize_name(body)):
        # "My sister Dana is a doctor": a possessive that introduces the name is about the name
        if re.search(rf"(?<!\w)(?:my|our)\s+(?:\w+\s+){{0,2}}{re.escape(own)}(?!\w)", normalize_name(body)):
            return True
        return False  # "I met Alice": about the speaker
    return True


def rule_classify(new: Candidate, candidates: Sequence[Candidate]) -> list[EvolutionDecision]:
    """Decide, for each older candidate, whether and how ``new`` evolves it. Deterministic."""
    out: list[EvolutionDecision] = []
    new_words = _content_words(new.content)
    update_cue = _update_cue(new)
    negated = NEGATION.search(new.content)
    derive_cue = DERIVE_CUES.search(new.content)
    for c in candidates:
        if c.id == new.id:
            continue
        # Rules only relate facts about the same name; an LLM may relate more (vector neighbours).
        if normalize_name(c.name) != normalize_name(new.name):
            continue
        old_words = _content_words(c.content)
        overlap = len(new_words & old_words) / max(1, len(old_words | new_words))
        if asks(new.content) or asks(c.content):
            # a question ("Bob, where do you live now?") tells nothing, so it changes nothing
            out.append(EvolutionDecision(c.id, EvolutionType.EXTEND, "a question about the same name", 0.7))
            continue
        if not related(new, c) or not (_about(new) and _about(c)):
            out.append(EvolutionDecision(c.id, EvolutionType.EXTEND, "another fact about the same name", 0.7))
            continue
        if negated and not NEGATION.search(c.content) and overlap >= 0.5 and not update_cue:
            et, why, conf = EvolutionType.CONTRADICT, f"negates: {negated.group(0)!r}", 0.85
        elif update_cue:
            et, why, conf = EvolutionType.UPDATE, f"update cue {update_cue.group(0)!r}", 0.8
        elif derive_cue and overlap > 0:
            et, why, conf = EvolutionType.DERIVE, f"derived: {derive_cue.group(0)!r}", 0.6
        else:
            et, why, conf = EvolutionType.EXTEND, "another fact about the same name", 0.7
        out.append(EvolutionDecision(c.id, et, why, conf))
    return out


def parse_evolution(data: Mapping[str, Any], candidate_ids: Sequence[str]) -> list[EvolutionDecision]:
    """Read a ``classify_evolution`` answer; 'none' entries are dropped, unknown ids rejected."""
    items = data.get("relations") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise InvalidResponseError("evolution answer has no 'relations' list")
    known = set(candidate_ids)
    out: list[EvolutionDecision] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise InvalidResponseError(f"evolution relation #{i} is not an object")
        cid = item.get("candidate_id")
        kind = item.get("evolution_type")
        if cid not in known:
            raise InvalidResponseError(f"evolution relation #{i} names unknown candidate {cid!r}")
        if kind == "none" or cid in seen:
            continue
        try:
            et = EvolutionType.parse(kind)  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            raise InvalidResponseError(f"evolution relation #{i}: {exc}") from exc
        conf = item.get("confidence", 0.5)
        if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0 <= conf <= 1:
            raise InvalidResponseError(f"evolution relation #{i} confidence must be in [0, 1]")
        reason = answer_text(str(item.get("reason", ""))[:500], f"evolution relation #{i} reason", TEXT_BYTES_MAX)
        seen.add(cid)
        out.append(EvolutionDecision(cid, et, reason, float(conf)))
    return out
