"""User story (stop 23, trust): a vector whose float32 norm overflows is refused at the door.

An embedding with values near float32's maximum (3e38) was stored as given: its squared norm
overflows float32, so the index-cache check at open (a float32 norm of the stored vector) raised
a RuntimeWarning "overflow encountered in dot", found the cache "disagreeing" and rebuilt the
vector index at every reopen. Such a vector comes from no embedder (cosine similarity ignores
length). It is now refused wherever a vector enters — an Entity, a storage write, an embedding
provider's answer — with a typed error naming the limit (``umi._validate.VECTOR_NORM_MAX``), so
every float32 computation over stored vectors stays finite. A vector just under the limit is
stored, found, and its store reopens from the index cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import umi
from umi._validate import VECTOR_NORM_MAX
from umi.storage.base import SearchFilters
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

T0 = 1_700_000_000_000
DIM = 8
HUGE = [3e38, 3e38, 1e38, 0.0, 0.0, 0.0, 0.0, 0.0]  # every value a float32; the norm is not


def _ordinary(n: int) -> list[Entity]:
    rng = np.random.default_rng(3)
    return [Entity("person", f"name {i}", f"fact number {i}", embedding=rng.standard_normal(DIM).astype(np.float32),
                   created_at=T0 + i) for i in range(n)]


def test_an_entity_whose_vector_norm_overflows_float32_is_refused_with_the_limit() -> None:
    with pytest.raises(umi.ValidationError, match=r"Entity\.embedding .*norm.*1e\+19"):
        Entity("person", "Alice", "Alice likes tea.", embedding=np.array(HUGE, np.float32))
    with pytest.raises(umi.ValidationError, match=r"Entity\.embedding .*norm"):  # a passage row too
        Entity("person", "Alice", "Alice likes tea.", embedding=np.ones(DIM, np.float32),
               passage_embeddings=[np.ones(DIM, np.float32), np.array(HUGE, np.float32)])


def test_a_store_refuses_an_entity_given_such_a_vector_after_it_was_made(tmp_path: Path) -> None:
    """Entity is a plain dataclass: a vector set after construction is checked at the storage door."""
    with DuckDBStorageBackend.connect(tmp_path / "s.duckdb") as b:
        e = _ordinary(1)[0]
        e.embedding = np.array(HUGE, np.float32)
        with pytest.raises(umi.ValidationError, match=r"entities\[0\]\.embedding .*norm"):
            b.upsert([e])
        assert b.count(SearchFilters(include_superseded=True)) == 0  # nothing was written


class _Huge(umi.SimEmbeddingProvider):
    """An embedder that answers one text with a vector whose float32 norm overflows."""

    def embed(self, texts: Any, *, kind: Any = "passage") -> np.ndarray:
        out = np.array(super().embed(texts, kind=kind), np.float32)
        for i, t in enumerate(texts):
            if "tea" in t:
                out[i] = np.array(HUGE[:1] * self.dim, np.float32)
        return out


def test_an_embedder_answering_such_a_vector_is_an_embedding_error_and_no_such_vector_is_kept(tmp_path: Path) -> None:
    """The provider's answer is checked like any embedding failure: the fact is kept without a
    vector (keyword search finds it), and the result says why; reopened, the index loads from its
    cache. Was: the vector was stored, and every reopen rebuilt the index."""
    path = tmp_path / "m.duckdb"
    with umi.Memory(path, embedder=_Huge(seed=1, dim=DIM)) as m:
        m.remember_sync("Alice works at Acme.")
        told = m.remember_sync("Alice likes tea.")
        assert any("EmbeddingError" in w and "L2 norm of at most 1e+19" in w for w in told.warnings)
        tea = told.entities[0].id
        stored = m.storage.get(tea)
        assert stored is not None and stored.embedding is None
    for _ in range(2):
        with umi.Memory(path, embedder=_Huge(seed=1, dim=DIM)) as m:
            assert m.storage.index_load_status == "loaded"
            assert tea in [h.id for h in m.recall_sync("tea")]


def test_a_vector_just_under_the_limit_is_kept_found_and_its_index_cache_is_used_at_reopen(tmp_path: Path) -> None:
    """Remember (storage upsert) a fact with a vector of norm just under VECTOR_NORM_MAX, close,
    reopen twice: no warning (warnings are errors here), the index loads from its cache both times
    and the vector search finds the fact first."""
    big = np.zeros(DIM, np.float32)
    big[:3] = np.float32(VECTOR_NORM_MAX * 0.999 / np.sqrt(3))
    ents = _ordinary(40)
    ents[7] = Entity("person", "Big", "a fact with a very long vector", embedding=big, created_at=T0 + 7)
    path = tmp_path / "s.duckdb"
    with DuckDBStorageBackend.connect(path, hnsw_threshold=10) as b:  # the HNSW graph, saved at close
        b.upsert(ents)
    for _ in range(2):
        with DuckDBStorageBackend.connect(path, hnsw_threshold=10) as b:
            assert b.index_load_status == "loaded"  # was (values near 3e38): "rebuilt", at every open
            hits = b.search_vector(big / np.linalg.norm(big.astype(np.float64)), 3)
            assert hits[0][0] == ents[7].id and hits[0][1] == pytest.approx(1.0, abs=1e-5)
            got = b.get(ents[7].id)
            assert got is not None and np.array_equal(got.embedding, big)  # stored as given
