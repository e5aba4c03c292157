"""Tokenizer and BM25 constants shared by every backend.

Every backend tokenises name + content with :func:`tokenize`, so keyword search
means the same thing everywhere:

* NFKC-normalised and case-folded,
* split on Unicode word characters (``\\w+``: letters, digits, underscore, any script),
* English stop words dropped (a short list: articles, pronouns, auxiliaries),
* single ASCII letters dropped (``"don't"`` gives ``"don"``, not ``"t"``),
* a light plural stemmer (``companies -> company``, ``engineers -> engineer``,
  ``classes -> class``; ``-ss``, ``-us``, ``-is`` words are left alone),
* tokens cut to :data:`TOKEN_CHARS_MAX` characters.

Scripts without spaces (Chinese, Japanese) are split only at non-word characters,
so a run of ideographs is one token.

BM25 uses ``k1 = 1.2``, ``b = 0.75`` and the non-negative IDF
``ln(1 + (N - df + 0.5) / (df + 0.5))``; ``N``, ``df`` and the average document
length are over every stored entity (current and superseded), and filters choose
which entities are scored. Each distinct query term counts once.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Iterable

__all__ = [
    "BM25_K1",
    "BM25_B",
    "STOP_WORDS",
    "TOKEN_CHARS_MAX",
    "tokenize",
    "query_terms",
    "term_frequencies",
    "document_terms",
    "bm25_idf",
    "bm25_term_score",
    "bm25_scores",
]

BM25_K1 = 1.2
BM25_B = 0.75
TOKEN_CHARS_MAX = 64

STOP_WORDS = frozenset(
    """
    a an and are as at be been being but by can could did do does for from had has have
    he her hers him his how i if in into is it its itself me my no nor not of on or our
    ours she so such than that the their theirs them then there these they this those to
    too very was we were what when where which while who whom why will with would you
    your yours
    """.split()
)

_WORD = re.compile(r"\w+")


def _stem(tok: str) -> str:
    """Plural suffixes only (Porter step 1a, with ``-ies -> -y``); deliberately light."""
    n = len(tok)
    if n > 4 and tok.endswith("sses"):
        return tok[:-2]
    if n > 4 and tok.endswith("ies"):
        return tok[:-3] + "y"
    if n > 3 and tok.endswith("s") and not tok.endswith(("ss", "us", "is")):
        return tok[:-1]
    return tok


_TERM_OF: dict[str, str] = {}  # raw word -> indexed term ("" = dropped); bounded memo
_TERM_MEMO_MAX = 200_000


def _term(raw: str) -> str:
    if raw in STOP_WORDS or (len(raw) == 1 and raw.isascii() and raw.isalpha()):
        t = ""
    else:
        t = _stem(raw[:TOKEN_CHARS_MAX])
        if t in STOP_WORDS:
            t = ""
    if len(_TERM_OF) >= _TERM_MEMO_MAX:
        _TERM_OF.clear()
    _TERM_OF[raw] = t
    return t


# ASCII fast path: for ASCII text, \w is exactly [A-Za-z0-9_]; every other byte becomes a space
_ASCII_WORDS = bytes(c if (chr(c).isalnum() or c == 95) else 32 for c in range(128)) + bytes([32]) * 128


def _words(text: str) -> list[str]:
    folded = unicodedata.normalize("NFKC", text).casefold()
    if folded.isascii():
        return folded.encode("ascii").translate(_ASCII_WORDS).decode("ascii").split()
    return _WORD.findall(folded)


def tokenize(text: str) -> list[str]:
    """The terms of ``text`` in order (with repeats). See the module docstring for the rules."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    memo = _TERM_OF
    out: list[str] = []
    for raw in _words(text):
        t = memo.get(raw)
        if t is None:
            t = _term(raw)
        if t:
            out.append(t)
    return out


def query_terms(query: str) -> list[str]:
    """Distinct terms of a query, in first-seen order."""
    return list(dict.fromkeys(tokenize(query)))


def term_frequencies(text: str) -> dict[str, int]:
    """term -> count, in first-seen order."""
    tf: dict[str, int] = {}
    for t in tokenize(text):
        tf[t] = tf.get(t, 0) + 1
    return tf


def document_terms(name: str, content: str) -> tuple[dict[str, int], int]:
    """The indexed document of an entity: (term -> tf over name + content, length in terms)."""
    tf = term_frequencies(name + "\n" + content)  # a newline never joins two words
    return tf, sum(tf.values())


def bm25_idf(n_docs: int, df: int) -> float:
    """Non-negative BM25 IDF (Lucene's form)."""
    return math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))


def bm25_term_score(tf: int, doc_len: int, avg_doc_len: float, idf: float) -> float:
    """One term's contribution to one document's BM25 score (the reference formula)."""
    k1, b = BM25_K1, BM25_B
    norm = k1 * (1.0 - b + b * doc_len / avg_doc_len) if avg_doc_len > 0 else k1
    return idf * tf * (k1 + 1.0) / (tf + norm)


def bm25_scores(query: str, docs: Iterable[tuple[str, dict[str, int], int]]) -> dict[str, float]:
    """Reference BM25 over ``(doc_id, term -> tf, doc_len)`` for every doc (tests use it as the model).

    Returns scores for docs containing at least one query term.
    """
    docs = list(docs)
    n = len(docs)
    if n == 0:
        return {}
    avgdl = sum(d[2] for d in docs) / n
    terms = query_terms(query)
    df = {t: sum(1 for d in docs if t in d[1]) for t in terms}
    out: dict[str, float] = {}
    for doc_id, tfs, dl in docs:
        s = 0.0
        hit = False
        for t in terms:
            tf = tfs.get(t, 0)
            if tf:
                hit = True
                s += bm25_term_score(tf, dl, avgdl, bm25_idf(n, df[t]))
        if hit:
            out[doc_id] = s
    return out
