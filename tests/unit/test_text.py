"""The shared tokenizer and BM25 reference (umi.storage.text)."""

from __future__ import annotations

import math
import re
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from umi.storage.text import (
    BM25_B,
    BM25_K1,
    STOP_WORDS,
    TOKEN_CHARS_MAX,
    bm25_idf,
    bm25_scores,
    bm25_term_score,
    document_terms,
    query_terms,
    term_frequencies,
    tokenize,
)


def test_lowercases_splits_on_word_characters_and_drops_stop_words() -> None:
    assert tokenize("The QUICK brown-fox, of course; jumped!") == ["quick", "brown", "fox", "course", "jumped"]
    assert tokenize("snake_case stays one_token 42x") == ["snake_case", "stay", "one_token", "42x"]
    assert tokenize("") == [] and tokenize("the of and a") == [] and tokenize("...!?") == []


def test_single_ascii_letters_are_dropped_but_digits_and_other_scripts_stay() -> None:
    assert tokenize("don't x 7 é 東") == ["don", "7", "é", "東"]


def test_light_plural_stemming() -> None:
    assert tokenize("companies engineers classes status analysis bus cats") == [
        "company", "engineer", "class", "status", "analysis", "bus", "cat"]
    assert tokenize("is as") == []  # stop words
    assert tokenize("us gas gases") == ["us", "gas", "gase"]  # 3-letter words keep their s; deliberately simple


def test_unicode_is_normalised_and_case_folded() -> None:
    assert tokenize("ＡＬＩＣＥ Straße ﬁne Zoë") == ["alice", "strasse", "fine", "zoë"]
    assert tokenize("Zoe\u0308") == tokenize("Zoë")  # combining diaeresis == precomposed
    assert tokenize("東京タワー に 行く") == ["東京タワー", "に", "行く"]


def test_long_tokens_are_cut() -> None:
    assert tokenize("a" * 500) == ["a" * TOKEN_CHARS_MAX]


def test_type_errors() -> None:
    with pytest.raises(TypeError):
        tokenize(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        document_terms("name", None)  # type: ignore[arg-type]


def _reference_tokenize(text: str) -> list[str]:
    """The documented rules, written the slow obvious way."""
    out = []
    for raw in re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()):
        if raw in STOP_WORDS or (len(raw) == 1 and raw.isascii() and raw.isalpha()):
            continue
        tok = raw[:TOKEN_CHARS_MAX]
        if len(tok) > 4 and tok.endswith("sses"):
            tok = tok[:-2]
        elif len(tok) > 4 and tok.endswith("ies"):
            tok = tok[:-3] + "y"
        elif len(tok) > 3 and tok.endswith("s") and not tok.endswith(("ss", "us", "is")):
            tok = tok[:-1]
        if tok not in STOP_WORDS:
            out.append(tok)
    return out


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_fast_paths_agree_with_the_documented_rules(text: str) -> None:
    assert tokenize(text) == _reference_tokenize(text)


@given(st.text(alphabet="abcdefghij XYZ_,.'-0123456789séS", max_size=60))
def test_ascii_fast_path_agrees_with_the_documented_rules(text: str) -> None:
    assert tokenize(text) == _reference_tokenize(text)


def test_frequencies_documents_and_queries() -> None:
    assert term_frequencies("tea and more tea, teas") == {"tea": 3, "more": 1}
    assert document_terms("Tea Shop", "sells tea") == ({"tea": 2, "shop": 1, "sell": 1}, 4)
    assert document_terms("X", "ab") == ({"ab": 1}, 1)  # name and content never join into one word
    assert query_terms("tea TEA coffee teas") == ["tea", "coffee"]


def test_bm25_formula() -> None:
    assert (BM25_K1, BM25_B) == (1.2, 0.75)
    assert bm25_idf(10, 1) == pytest.approx(math.log(1 + 9.5 / 1.5))
    assert bm25_idf(10, 10) > 0  # never negative
    assert bm25_idf(100, 1) > bm25_idf(100, 50)
    s = bm25_term_score(2, 10, 5.0, 1.0)
    assert s == pytest.approx(2 * 2.2 / (2 + 1.2 * (0.25 + 0.75 * 2)))
    assert bm25_term_score(1, 5, 5.0, 1.0) > bm25_term_score(1, 50, 5.0, 1.0)  # longer docs score lower
    assert bm25_term_score(1, 0, 0.0, 1.0) == pytest.approx(2.2 / 2.2)


def test_bm25_reference_scores() -> None:
    docs = [("a", *document_terms("A", "tea tea")), ("b", *document_terms("B", "coffee")),
            ("c", *document_terms("C", "tea coffee"))]
    scores = bm25_scores("tea", docs)
    assert set(scores) == {"a", "c"} and scores["a"] > scores["c"]
    assert bm25_scores("nothing", docs) == {}
    assert bm25_scores("tea", []) == {}
