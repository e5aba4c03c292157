"""Evolution: how a new fact relates to the older facts it may update.

``rule_classify`` is the rule set used when no LLM is configured (and by the Sim
LLM): cue words in the new fact decide between ``update`` ("no longer", "now",
"moved to", "left", ...), ``contradict`` (the new fact negates what the old one
says), ``derive`` ("therefore", "so", ...) and ``extend`` (another fact about the
same name). ``parse_evolution`` reads an LLM's answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..errors import InvalidResponseError
from ..types import EvolutionType, normalize_name

__all__ = ["EvolutionDecision", "rule_classify", "parse_evolution", "Candidate"]

UPDATE_CUES = re.compile(
    r"\b(no longer|not anymore|anymore|now|nowadays|moved to|moved|moving to|relocated|left|quit|"
    r"changed|switched|instead|became|becomes|has become|retired|resigned|promoted|replaced|"
    r"used to|formerly|previously|these days|new job|joined|renamed)\b",
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


def _content_words(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if t not in _STOP}


def rule_classify(new: Candidate, candidates: Sequence[Candidate]) -> list[EvolutionDecision]:
    """Decide, for each older candidate, whether and how ``new`` evolves it. Deterministic."""
    out: list[EvolutionDecision] = []
    new_words = _content_words(new.content)
    update_cue = UPDATE_CUES.search(new.content)
    negated = NEGATION.search(new.content)
    derive_cue = DERIVE_CUES.search(new.content)
    for c in candidates:
        if c.id == new.id:
            continue
        same_name = normalize_name(c.name) == normalize_name(new.name)
        mentions = normalize_name(c.name) in normalize_name(new.content)
        old_words = _content_words(c.content)
        overlap = len(new_words & old_words) / max(1, len(old_words | new_words))
        if not same_name and not mentions:
            continue
        if negated and not NEGATION.search(c.content) and overlap >= 0.5 and not update_cue:
            et, why, conf = EvolutionType.CONTRADICT, f"negates: {negated.group(0)!r}", 0.85
        elif update_cue:
            et, why, conf = EvolutionType.UPDATE, f"update cue {update_cue.group(0)!r}", 0.8 if same_name else 0.65
        elif derive_cue and overlap > 0:
            et, why, conf = EvolutionType.DERIVE, f"derived: {derive_cue.group(0)!r}", 0.6
        elif same_name:
            et, why, conf = EvolutionType.EXTEND, "another fact about the same name", 0.7
        else:
            continue
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
        reason = item.get("reason", "")
        seen.add(cid)  # type: ignore[arg-type]
        out.append(EvolutionDecision(cid, et, str(reason)[:500], float(conf)))  # type: ignore[arg-type]
    return out
