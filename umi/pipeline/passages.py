"""Long texts as passages: the one place that decides how a fact's content is split and embedded.

An embedder reads a bounded window (e5's 512 tokens); a longer text is pooled into one vector
(the local embedder averages its windows, others truncate), so a detail at the end of a long
message is diluted and a question about it does not find the fact. A fact whose content is
longer than :data:`PASSAGE_WORDS` words therefore also gets one vector per **passage**: runs
of whole sentences of at most ``PASSAGE_WORDS`` words, each starting with the last sentence of
the one before (so a detail that straddles a cut is whole in one of them). The passages all
belong to one stored fact (``Entity.passage_embeddings``); vector search scores a fact by the
best of its main vector and its passages. Keyword search already indexes the whole content.

``PASSAGE_WORDS`` = 200 keeps a passage inside e5's window even at 2.5 tokens a word (most
non-English text), so each passage is embedded whole, never pooled. A text without spaces
(Chinese, Japanese) is cut every :data:`PASSAGE_CHARS` characters as well. Short texts (the
common case) get no passages and cost nothing extra.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..types import Entity
from .context import PipelineContext

__all__ = ["PASSAGE_WORDS", "PASSAGE_CHARS", "split_passages", "needs_passages", "embed_entities"]

#: most words in one passage (and a text with more words than this gets passages)
PASSAGE_WORDS = 200
#: most characters in one passage (texts written without spaces)
PASSAGE_CHARS = 1200

_SENTENCE = re.compile(r"[^.!?。！？\n]*(?:[.!?。！？]+|\n+|$)")


def _pieces(text: str) -> list[str]:
    """Sentences, each cut further into runs of at most PASSAGE_WORDS words / PASSAGE_CHARS chars."""
    out: list[str] = []
    for m in _SENTENCE.finditer(text):
        s = m.group().strip()
        if not s:
            continue
        words = s.split()
        for i in range(0, len(words), PASSAGE_WORDS):
            run = " ".join(words[i : i + PASSAGE_WORDS])
            out.extend(run[j : j + PASSAGE_CHARS] for j in range(0, len(run), PASSAGE_CHARS))
    return out


def _size(piece: str) -> tuple[int, int]:
    return len(piece.split()), len(piece)


def split_passages(text: str) -> list[str]:
    """The passages of ``text``; ``[]`` when it fits in one (at most PASSAGE_WORDS words and
    PASSAGE_CHARS characters). Deterministic: the same text gives the same passages."""
    words, chars = _size(text)
    if words <= PASSAGE_WORDS and chars <= PASSAGE_CHARS:
        return []
    passages: list[str] = []
    cur: list[str] = []
    cw = cc = 0
    for piece in _pieces(text):
        pw, pc = _size(piece)
        if cur and (cw + pw > PASSAGE_WORDS or cc + pc + 1 > PASSAGE_CHARS):
            passages.append(" ".join(cur))
            last = cur[-1]
            lw, lc = _size(last)
            # overlap: the next passage opens with this one's last sentence, when there is room
            cur, cw, cc = ([last], lw, lc + 1) if lw + pw <= PASSAGE_WORDS and lc + pc + 1 <= PASSAGE_CHARS \
                else ([], 0, 0)
        cur.append(piece)
        cw += pw
        cc += pc + 1
    if cur:
        passages.append(" ".join(cur))
    return passages


def _passage_text(e: Entity, passage: str) -> str:
    """What is embedded for one passage: the fact's name, as for its whole content."""
    return f"{e.name}: {passage}"


def needs_passages(e: Entity) -> bool:
    """``e`` is long and has no passage vectors yet."""
    return e.passage_embeddings is None and bool(split_passages(e.content))


async def embed_entities(ctx: PipelineContext, entities: Sequence[Entity]) -> None:
    """Give ``entities`` their vectors in one embedding batch: the content vector and, for a long
    content, a vector per passage. Raises EmbeddingError / ProviderError (nothing is set then)."""
    texts = [e.text_for_embedding() for e in entities]
    spans: list[tuple[Entity, int, int]] = []  # entity, first passage row, passage count
    for e in entities:
        parts = split_passages(e.content)
        if parts:
            spans.append((e, len(texts), len(parts)))
            texts.extend(_passage_text(e, p) for p in parts)
    if not texts:
        return
    vecs = await ctx.embed(texts, "passage")
    for e, v in zip(entities, vecs):
        e.embedding = np.ascontiguousarray(v)
    for e, at, n in spans:
        e.passage_embeddings = np.ascontiguousarray(vecs[at : at + n])
