"""A large index whose HNSW graph is missing builds it on a thread; searches stay exact meanwhile,
and writes made during the build end up in the graph."""

import numpy as np

from umi import index as index_mod
from umi.index import VectorIndex


def clustered(n, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact(vecs, ids, q, k):
    scores = vecs @ q
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))[:k]
    return [ids[i] for i in order]


def test_first_search_is_exact_and_the_graph_arrives_with_later_writes(monkeypatch):
    monkeypatch.setattr(index_mod, "BACKGROUND_BUILD_MIN", 500)
    n = 3000
    vecs = clustered(n)
    ids = [f"id{i:05d}" for i in range(n)]
    idx = VectorIndex(32, hnsw_threshold=1000, seed=3)
    idx.add(ids, vecs)
    q = vecs[7]
    assert [i for i, _ in idx.search(q, 10)] == exact(vecs, ids, q, 10)  # exact while building
    assert not idx.graph_built or idx.wait_for_graph(0)
    # writes while the build may still run: a replacement, a removal and new ids
    idx.add(["id00007"], vecs[8:9])
    idx.remove(["id00008"])
    extra = clustered(200, seed=9)
    idx.add([f"new{i:03d}" for i in range(200)], extra)
    assert idx.wait_for_graph(timeout=120)
    assert idx.graph_built and idx.path_for() == "hnsw"
    got = [i for i, _ in idx.search(extra[5], 5)]
    assert got[0] == "new005"
    assert "id00008" not in [i for i, _ in idx.search(vecs[8], 20)]
    top = idx.search(vecs[8], 1)[0]
    assert top[0] == "id00007" and abs(top[1] - 1.0) < 1e-5  # the replaced vector is in the graph


def test_clear_discards_a_running_build(monkeypatch):
    monkeypatch.setattr(index_mod, "BACKGROUND_BUILD_MIN", 500)
    vecs = clustered(2000, seed=1)
    idx = VectorIndex(32, hnsw_threshold=1000)
    idx.add([f"a{i}" for i in range(2000)], vecs)
    idx.search(vecs[0], 3)
    idx.clear()
    assert idx.wait_for_graph(timeout=120)
    assert not idx.graph_built and len(idx) == 0
    assert idx.search(vecs[0], 3) == []


def test_duckdb_build_vector_index_waits_for_the_graph(tmp_path):
    from umi import Entity
    from umi.storage.duckdb import DuckDBStorageBackend

    vecs = clustered(300, seed=4)
    with DuckDBStorageBackend.connect(str(tmp_path / "g.duckdb"), dim=32, hnsw_threshold=100) as st:
        assert st.build_vector_index() is False  # empty: below the threshold
        st.upsert([Entity("note", f"n{i}", f"fact {i}", embedding=vecs[i]) for i in range(300)])
        assert st.build_vector_index() is True
        assert st._cache.index.graph_built
        assert st.search_vector(vecs[42], 1)[0][1] > 0.999
