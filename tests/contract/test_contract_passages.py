"""The storage contract for passage vectors (long facts): a fact is found by the best of its own
vector and its passages' vectors, once, under the same filters, and forgetting it forgets them."""

from __future__ import annotations

import numpy as np
import pytest
from contract_helpers import ent, vec

from umi.errors import StorageError, ValidationError
from umi.storage.base import SearchFilters, StorageBackend


@pytest.fixture
def store(backend: StorageBackend) -> StorageBackend:
    return backend


def ids(pairs: list[tuple[str, float]]) -> list[str]:
    return [i for i, _ in pairs]


def long_fact(**kw: object) -> object:
    """A fact whose own vector points along x; its two passages along z and w."""
    return ent("Report", "a long report ... and the detail at its end", emb=vec(1, 0, 0, 0),
               passage_embeddings=np.array([[0, 0, 1, 0], [0, 0, 0, 1]], np.float32), **kw)


def test_a_fact_is_found_by_its_best_passage_once(store: StorageBackend) -> None:
    report = long_fact()
    near = ent("Near", "close to z, not on it", emb=vec(0, 0.3, 1, 0))
    other = ent("Other", "along y", emb=vec(0, 1, 0, 0))
    store.upsert([report, near, other])
    res = store.search_vector(vec(0, 0, 1, 0), 3)
    assert ids(res) == [report.id, near.id, other.id]
    assert res[0][1] == pytest.approx(1.0, abs=1e-6)  # the passage's cosine, not the fact vector's 0
    both = store.search_vector(vec(0, 0, 1, 1), 10)  # both passages match: still one hit
    assert ids(both).count(report.id) == 1
    assert dict(both)[report.id] == pytest.approx(np.sqrt(0.5), abs=1e-6)
    assert ids(store.search_vector(vec(1, 0, 0, 0), 1)) == [report.id]  # its own vector still counts


def test_passages_round_trip_and_are_replaced_with_the_fact(store: StorageBackend) -> None:
    report = long_fact()
    store.upsert([report])
    got = store.get(report.id)
    assert got is not None and got == report
    assert got.passage_embeddings is not None and got.passage_embeddings.shape == (2, 4)
    store.upsert([ent("Report", "a long report ... and the detail at its end", emb=vec(1, 0, 0, 0))])
    assert store.get(report.id).passage_embeddings is None  # type: ignore[union-attr]
    assert dict(store.search_vector(vec(0, 0, 1, 0), 5))[report.id] == pytest.approx(0.0, abs=1e-6)


def test_filters_and_validity_apply_to_passage_hits(store: StorageBackend) -> None:
    report = long_fact(meta={"team": "a"})
    plain = ent("Plain", "b team", emb=vec(0, 1, 0, 0), meta={"team": "b"})
    store.upsert([report, plain])
    assert ids(store.search_vector(vec(0, 0, 1, 0), 5, SearchFilters(metadata={"team": "b"}))) == [plain.id]
    store.supersede(report.id, report.created_at + 1)
    assert report.id not in ids(store.search_vector(vec(0, 0, 1, 0), 5))
    kept = store.search_vector(vec(0, 0, 1, 0), 5, SearchFilters(include_superseded=True))
    assert ids(kept)[0] == report.id and kept[0][1] == pytest.approx(1.0, abs=1e-6)  # superseded keeps them
    store.revive(report.id, report.created_at + 2)
    assert ids(store.search_vector(vec(0, 0, 1, 0), 1)) == [report.id]


def test_forget_and_rollback_leave_no_passage_behind(store: StorageBackend) -> None:
    report = long_fact()
    other = ent("Other", "along y", emb=vec(0, 1, 0, 0))
    store.upsert([other])
    with pytest.raises(StorageError, match="boom"):
        with store.transaction():
            store.upsert([report])
            raise RuntimeError("boom")
    assert ids(store.search_vector(vec(0, 0, 1, 0), 5)) == [other.id]
    store.upsert([report])
    assert store.delete(report.id)
    assert ids(store.search_vector(vec(0, 0, 1, 0), 5)) == [other.id]
    store.upsert([ent("Report", "a long report ... and the detail at its end", emb=vec(1, 0, 0, 0))])
    assert dict(store.search_vector(vec(0, 0, 1, 0), 5))[report.id] == pytest.approx(0.0, abs=1e-6)


def test_passages_are_checked(store: StorageBackend) -> None:
    store.upsert([ent("A", "a", emb=vec(1, 0, 0, 0))])
    bad = long_fact()
    bad.passage_embeddings = np.ones((2, 3), np.float32)  # not the store's dimension
    with pytest.raises(ValidationError, match="dimension"):
        store.upsert([bad])
    bad.embedding = None
    bad.passage_embeddings = np.ones((1, 4), np.float32)
    with pytest.raises(ValidationError, match="need an Entity.embedding"):
        store.upsert([bad])
    assert store.count() == 1
