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
non-English text), so each passage is embedded whole, never pooled; a Chinese or Japanese
character counts as a word (those scripts write no spaces). It is small enough that one
sentence still weighs in its passage's vector (with the local embedder, the passage holding
the last sentence of the test's 3,000-word text scores 0.87 against its question, the whole
text's vector 0.78). The fact's own ``embedding`` stays the vector of its whole content: what
evolution detection compares and what stores already hold. Short texts (the common case) get
no passages and cost nothing extra.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..types import Entity
from .context import PipelineContext

__all__ = ["PASSAGE_WORDS", "split_passages", "needs_passages", "embed_entities"]

#: most words in one passage (and a text with more words than this gets passages)
PASSAGE_WORDS = 200

_SENTENCE = re.compile(r"[^.!?\u3002\uff01\uff1f\n]*(?:[.!?\u3002\uff01\uff1f]+|\n+|$)")
_CJK = "\u2e80-\u9fff\uf900-\ufaff"  # CJK ideographs and kana (Korean writes spaces)
#: a word: a run of non-space characters, or one CJK character (those scripts write no spaces)
_WORD = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def _words(text: str) -> int:
    return len(_WORD.findall(text))


def _pieces(text: str) -> list[tuple[str, int]]:
    """(sentence, its words), a sentence longer than PASSAGE_WORDS cut into runs of that many."""
    out: list[tuple[str, int]] = []
    for m in _SENTENCE.finditer(text):
        s = m.group().strip()
        spans = [w.span() for w in _WORD.finditer(s)]
        for i in range(0, len(spans), PASSAGE_WORDS):
            run = spans[i : i + PASSAGE_WORDS]
            out.append((s[run[0][0] : run[-1][1]], len(run)))
    return out


def split_passages(text: str) -> list[str]:
    """The passages of ``text``; ``[]`` when it has at most PASSAGE_WORDS words. Deterministic."""
    if _words(text) <= PASSAGE_WORDS:
        return []
    passages: list[str] = []
    cur: list[tuple[str, int]] = []
    words = 0
    for piece in _pieces(text):
        if cur and words + piece[1] > PASSAGE_WORDS:
            passages.append(" ".join(p for p, _ in cur))
            last = cur[-1]  # the next passage opens with this one's last sentence, when there is room
            cur = [last] if last[1] + piece[1] <= PASSAGE_WORDS else []
            words = sum(n for _, n in cur)
        cur.append(piece)
        words += piece[1]
    passages.append(" ".join(p for p, _ in cur))
    return passages


def _passage_text(e: Entity, passage: str) -> str:
    """What is embedded for one passage: the fact's name, as for its whole content."""
    return f"{e.name}: {passage}"


def rerank_text(e: Entity, qvec: np.ndarray | None) -> str:
    """What a reranker reads of ``e``: its content, or for a long fact the passage whose vector is
    nearest the query's ``qvec``. A reranker reads a few hundred tokens of a text (LocalReranker's
    ``max_tokens``): shown a long content, it would judge the fact by its opening and miss the
    detail the passage search found it for."""
    pv = e.passage_embeddings
    if qvec is None or pv is None:
        return e.content
    parts = split_passages(e.content)
    if len(parts) != pv.shape[0]:  # vectors of another split: the content is all we can trust
        return e.content
    pv = np.asarray(pv, np.float32)
    sims = (pv @ np.asarray(qvec, np.float32)) / np.maximum(np.linalg.norm(pv, axis=1), np.float32(1e-12))
    return parts[int(np.argmax(sims))]


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
