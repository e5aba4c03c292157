"""The three LLM tasks: their JSON schemas, fixed system prompts and prompt layout.

Prompts put the variable input last, inside tags, so the fixed system prompt
(and tool definition) can be cached by providers that support prompt caching,
and so the Sim LLM can read the input back out of the prompt.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from ..types import EntityType, EvolutionType

__all__ = [
    "EXTRACTION_SCHEMA",
    "REWRITE_SCHEMA",
    "EVOLUTION_SCHEMA",
    "EXTRACTION_SYSTEM",
    "REWRITE_SYSTEM",
    "EVOLUTION_SYSTEM",
    "extraction_prompt",
    "rewrite_prompt",
    "evolution_prompt",
    "read_tag",
    "SCHEMAS",
    "SYSTEMS",
]

ENTITY_TYPES = [t.value for t in EntityType]
EVOLUTION_CHOICES = [t.value for t in EvolutionType] + ["none"]

EXTRACTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "entities": {
            "type": "array",
            "maxItems": 32,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 200},
                    "entity_type": {"type": "string", "enum": ENTITY_TYPES},
                    "content": {"type": "string", "minLength": 1},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["name", "entity_type", "content"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["entities"],
    "additionalProperties": False,
}

REWRITE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "queries": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {"type": "string", "minLength": 1, "maxLength": 500},
        }
    },
    "required": ["queries"],
    "additionalProperties": False,
}

EVOLUTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "relations": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "candidate_id": {"type": "string"},
                    "evolution_type": {"type": "string", "enum": EVOLUTION_CHOICES},
                    "reason": {"type": "string"},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["candidate_id", "evolution_type", "reason", "confidence"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["relations"],
    "additionalProperties": False,
}

EXTRACTION_SYSTEM = (
    "You extract durable facts for an AI agent's long-term memory. From the text, list "
    "each named thing it states a fact about (people, organizations, projects, topics, "
    "locations, events, tasks; 'self' for the agent's user speaking of themself). For each, "
    "give its canonical name, one entity_type from: " + ", ".join(ENTITY_TYPES) + ", and "
    "content: one self-contained sentence stating the fact about it, resolving pronouns. "
    "Do not invent facts. If nothing durable is stated, return an empty list."
)

REWRITE_SYSTEM = (
    "You rewrite a memory-search query into 2 to 4 short, diverse search queries that "
    "together find the stored facts that answer it: name the entities involved, use "
    "synonyms, and turn questions into the statements that would answer them."
)

EVOLUTION_SYSTEM = (
    "You compare a NEW fact with OLDER facts stored in memory. For each older fact, say "
    "how the new one relates: 'update' (the new fact replaces the old, e.g. a changed "
    "job or address), 'contradict' (the new fact says the old one is false), 'extend' "
    "(adds detail to the same thing, both stay true), 'derive' (follows from it), or "
    "'none' (unrelated). Give a short reason and a confidence in [0, 1]."
)


def _tag(name: str, body: str) -> str:
    return f"<{name}>\n{body}\n</{name}>"


def read_tag(prompt: str, name: str) -> str:
    """The body of the last ``<name>…</name>`` block of a prompt ('' when absent)."""
    found = re.findall(rf"<{name}>\n(.*?)\n</{name}>", prompt, flags=re.S)
    return found[-1] if found else ""


def extraction_prompt(text: str) -> str:
    return "Extract the facts stated in this text.\n" + _tag("text", text)


def rewrite_prompt(query: str) -> str:
    return "Rewrite this memory-search query.\n" + _tag("query", query)


def evolution_prompt(new: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]]) -> str:
    """``new`` and each candidate: {id, name, entity_type, content}."""
    return (
        "Classify how the new fact relates to each older fact.\n"
        + _tag("new_fact", json.dumps(dict(new), sort_keys=True))
        + "\n"
        + _tag("older_facts", json.dumps([dict(c) for c in candidates], sort_keys=True))
    )


SCHEMAS = {
    "extract_entities": EXTRACTION_SCHEMA,
    "rewrite_query": REWRITE_SCHEMA,
    "classify_evolution": EVOLUTION_SCHEMA,
}
SYSTEMS = {
    "extract_entities": EXTRACTION_SYSTEM,
    "rewrite_query": REWRITE_SYSTEM,
    "classify_evolution": EVOLUTION_SYSTEM,
}
