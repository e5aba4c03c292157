"""PostgresStorageBackend: what is particular to it (the shared behaviour is the contract suite).

Runs against the session's PostgreSQL + pgvector server (tests/pg_server.py).
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import umi
from umi.storage.base import SearchFilters, Source
from umi.storage.postgres import PostgresStorageBackend
from umi.storage.text import bm25_scores, document_terms
from umi.types import Entity, EvolutionRelation

pytestmark = pytest.mark.postgres


@pytest.fixture
def backend(postgres_url: str, pg_schema: str):
    b = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, pool_size=4, dim=8)
    yield b
    b.close()


def _ent(i: int, dim: int = 8, seed: int = 0, **kw) -> Entity:
    rng = np.random.default_rng(seed * 100_003 + i)
    return Entity(kw.pop("entity_type", "person"), kw.pop("name", f"Person {i}"), kw.pop("content", f"fact number {i}"),
                  embedding=rng.normal(size=dim).astype(np.float32), created_at=kw.pop("created_at", 1_000 + i), **kw)


def _exact_top(ents: list[Entity], q: np.ndarray, k: int) -> list[str]:
    m = np.stack([e.embedding for e in ents]).astype(np.float64)
    qq = q.astype(np.float64)
    s = (m @ qq) / (np.linalg.norm(m, axis=1) * np.linalg.norm(qq))
    return [ents[i].id for i in sorted(range(len(ents)), key=lambda i: (-s[i], ents[i].id))[:k]]


# --- connect ---------------------------------------------------------------------------


def test_connect_rejects_bad_arguments(postgres_url: str) -> None:
    with pytest.raises(TypeError):
        PostgresStorageBackend.connect(123)  # type: ignore[arg-type]
    with pytest.raises(umi.InvalidConfigError, match="empty"):
        PostgresStorageBackend.connect("  ")
    with pytest.raises(umi.InvalidConfigError, match="schema"):
        PostgresStorageBackend.connect(postgres_url, schema="x; DROP TABLE y")
    with pytest.raises(umi.InvalidConfigError, match="table_prefix"):
        PostgresStorageBackend.connect(postgres_url, table_prefix="a-b")
    with pytest.raises(umi.InvalidConfigError, match="pool_size must be between 1 and 256, got 0"):
        PostgresStorageBackend.connect(postgres_url, pool_size=0)
    with pytest.raises(TypeError):
        PostgresStorageBackend.connect(postgres_url, pool_size=True)
    with pytest.raises(umi.InvalidConfigError, match="dim must be between 1 and 16000"):
        PostgresStorageBackend.connect(postgres_url, dim=0)
    with pytest.raises(umi.InvalidConfigError, match="not a valid PostgreSQL connection string"):
        PostgresStorageBackend.connect("host=127.0.0.1 port")


def test_connect_to_nothing_raises_storage_error_quickly() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(umi.StorageError, match="could not connect to PostgreSQL within 2"):
        PostgresStorageBackend.connect(f"postgresql://u@127.0.0.1:{port}/x", connect_timeout_secs=2)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg_pool", None)
    with pytest.raises(umi.BackendNotInstalledError) as info:
        PostgresStorageBackend.connect("postgresql://u@127.0.0.1:1/x")
    assert info.value.extra == "postgres"
    assert "umi[postgres]" in str(info.value)
    assert isinstance(info.value, umi.StorageError)


def test_newer_schema_version_is_refused(postgres_url: str, pg_schema: str) -> None:
    import psycopg

    PostgresStorageBackend.connect(postgres_url, schema=pg_schema).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'INSERT INTO "{pg_schema}".umi_migrations VALUES (99, %s, 0)', ("from the future",))
    with pytest.raises(umi.SchemaVersionError) as info:
        PostgresStorageBackend.connect(postgres_url, schema=pg_schema)
    assert (info.value.found, info.value.supported) == (99, 2)


def test_dim_is_fixed_once(postgres_url: str, pg_schema: str) -> None:
    b = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, dim=8)
    assert b.dim == 8
    assert b.schema_version == 2
    with pytest.raises(umi.ValidationError, match="4 dimensions but the store holds 8-d"):
        b.upsert([_ent(1, dim=4)])
    b.close()
    with pytest.raises(umi.InvalidConfigError, match="holds 8-d vectors; it cannot be opened with dim=16"):
        PostgresStorageBackend.connect(postgres_url, schema=pg_schema, dim=16)
    again = PostgresStorageBackend.connect(postgres_url, schema=pg_schema)
    assert again.dim == 8
    again.close()


def test_prefixes_isolate_stores_in_one_schema(postgres_url: str, pg_schema: str) -> None:
    a = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, table_prefix="a_")
    b = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, table_prefix="b_")
    a.upsert([_ent(1)])
    assert (a.count(), b.count(), a.generation, b.generation) == (1, 0, 1, 0)
    a.close()
    b.close()


def test_closed_backend_raises(backend: PostgresStorageBackend) -> None:
    backend.close()
    backend.close()
    with pytest.raises(umi.StorageError, match="closed"):
        backend.count()
    with pytest.raises(umi.StorageError, match="closed"):
        backend.upsert([_ent(1)])


# --- values ------------------------------------------------------------------------------


def test_exact_round_trip_of_awkward_values(backend: PostgresStorageBackend) -> None:
    e = Entity("note", "nul \x00 name", "content with \x00 and \x01 and 'quotes' \\ ü🙂",
               metadata={"i": 1, "f": 1.0, "b": True, "n": None, "s": "a\x00b", "big": 10**18, "e": 1e300,
                         "tiny": 5e-324, "neg0": -0.0},
               embedding=np.array([1e-38, -3.4e38, 0.1, 1.0, 1e-45, 3.4e38, -0.0, 7.0], np.float32), event_time=-5, created_at=7)
    backend.upsert([e])
    got = backend.get(e.id)
    assert got == e
    assert [type(got.metadata[k]) for k in ("i", "f", "b", "n", "big")] == [int, float, bool, type(None), int]
    assert got.embedding.dtype == np.float32 and np.array_equal(got.embedding, e.embedding)
    assert backend.find_by_name("NUL \x00  name") == [e]
    src = Source.for_text("text \x00 with nul", 3, {"k": "v\x00"})
    backend.add_source(src)
    assert backend.get_source(src.id) == src


def test_metadata_filter_keeps_types_apart(backend: PostgresStorageBackend) -> None:
    ents = [_ent(i, metadata={"v": v}) for i, v in enumerate([1, 1.0, True, "1", None, 0.0, -0.0, False, 0])]
    backend.upsert(ents)
    for v in [1, 1.0, True, "1", None, 0.0, False, 0]:
        want = sorted(e.id for e in ents if SearchFilters(metadata={"v": v}).matches(e))
        got = sorted(e.id for e in backend.list(SearchFilters(metadata={"v": v}), limit=100))
        assert got == want, v
        assert backend.count(SearchFilters(metadata={"v": v})) == len(want)


def test_time_range_without_bounds_still_needs_the_time(backend: PostgresStorageBackend) -> None:
    with_t = _ent(1, event_time=50)
    without = _ent(2)
    backend.upsert([with_t, without])
    f = SearchFilters(time_range=(None, None), time_field="event_time")
    assert [e.id for e in backend.list(f)] == [with_t.id]
    assert backend.count(SearchFilters(time_range=(-(2**70), 2**70), time_field="event_time")) == 1
    assert backend.count(SearchFilters(time_range=(2**70, None))) == 0


# --- search --------------------------------------------------------------------------------


def test_vector_search_is_exact_below_the_threshold(backend: PostgresStorageBackend) -> None:
    ents = [_ent(i) for i in range(120)]
    backend.upsert(ents)
    q = np.random.default_rng(10**9).normal(size=8).astype(np.float32)
    got = backend.search_vector(q, 10)
    assert [i for i, _ in got] == _exact_top(ents, q, 10)
    m = np.stack([e.embedding for e in ents]).astype(np.float64)
    q64 = q.astype(np.float64)
    by_id = {e.id: i for i, e in enumerate(ents)}
    for eid, score in got:
        v = m[by_id[eid]]
        assert score == pytest.approx(float(v @ q64 / np.linalg.norm(v) / np.linalg.norm(q64)), abs=1e-12)
    # a stored vector finds itself with similarity 1 (to the last bit)
    assert backend.search_vector(ents[7].embedding, 1) == [(ents[7].id, 1.0)]


def test_hnsw_path_with_selective_filter_falls_back_to_exact(postgres_url: str, pg_schema: str) -> None:
    import psycopg

    # A table this small is scanned, not searched by index, unless sequential scans are made dear.
    url = postgres_url + "?options=-c%20enable_seqscan%3Doff"
    b = PostgresStorageBackend.connect(url, schema=pg_schema, exact_search_rows=1, ef_search=40)
    ents = [_ent(i, entity_type="note" if i % 50 == 0 else "person") for i in range(400)]
    b.upsert(ents)
    assert b.build_vector_index() is True  # also started in the background by the commit
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'ANALYZE "{pg_schema}".umi_entities')
        plan = "\n".join(r[0] for r in conn.execute(
            f'EXPLAIN SELECT id FROM "{pg_schema}".umi_entities ORDER BY embedding <=> %s::vector LIMIT 5',
            ("[" + ",".join(["0.5"] * 8) + "]",)).fetchall())
    assert "umi_entities_embedding_hnsw" in plan
    q = np.random.default_rng(3).normal(size=8).astype(np.float32)
    notes = [e for e in ents if e.entity_type == umi.EntityType.NOTE]
    got = b.search_vector(q, 10, SearchFilters(entity_types=("note",)))
    assert [i for i, _ in got] == _exact_top(notes, q, 8)  # only 8 notes: every one, in exact order
    top = b.search_vector(q, 5)
    assert [i for i, _ in top][:1] == _exact_top(ents, q, 1)
    b.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta", "engineers", "acme", "x1"]),
                              min_size=0, max_size=8), min_size=1, max_size=12),
       query=st.lists(st.sampled_from(["alpha", "beta", "engineer", "acme", "zeta"]), min_size=1, max_size=4),
       superseded=st.sets(st.integers(0, 11)), deleted=st.sets(st.integers(0, 11)))
def test_bm25_equals_the_reference_bit_for_bit(postgres_url: str, docs: list[list[str]], query: list[str],
                                               superseded: set[int], deleted: set[int]) -> None:
    import pg_server

    schema = pg_server.get_server().new_schema_name()
    b = PostgresStorageBackend.connect(postgres_url, schema=schema, pool_size=1)
    try:
        ents = [Entity("note", f"doc{i}", " ".join(words), created_at=i) for i, words in enumerate(docs)]
        b.upsert(ents)
        for i in sorted(superseded):
            if i < len(ents):
                b.supersede(ents[i].id, 10_000)
                ents[i].valid_to = 10_000
        for i in sorted(deleted):
            if i < len(ents):
                b.delete(ents[i].id)
        ents = [e for i, e in enumerate(ents) if i not in deleted]
        assert _term_table(b) == _real_df(b)  # the IDF's df, kept by every commit, is exact
        text = " ".join(query)
        ref = bm25_scores(text, [(e.id, *document_terms(e.name, e.content)) for e in ents])
        for f in (SearchFilters(), SearchFilters(include_superseded=True)):
            want = sorted(((i, s) for i, s in ref.items() if f.matches(next(e for e in ents if e.id == i))),
                          key=lambda p: (-p[1], p[0]))[:5]
            assert b.search_text(text, 5, f) == want
    finally:
        b.close()


# --- transactions and concurrency ------------------------------------------------------------


def test_transaction_rolls_back_everything_and_generation_stays(backend: PostgresStorageBackend) -> None:
    a = _ent(1)
    backend.upsert([a])
    gen = backend.generation
    with pytest.raises(umi.StorageError, match="RuntimeError: boom"), backend.transaction():
        backend.upsert([_ent(2)])
        backend.supersede(a.id, 5_000)
        backend.add_source(Source.for_text("t", 1))
        assert backend.count() == 1  # the block sees its own writes
        raise RuntimeError("boom")
    assert (backend.count(), backend.get(a.id).valid_to, backend.generation) == (1, None, gen)
    assert backend.find_source_by_hash(Source.for_text("t", 1).text_hash) is None
    assert [h.op for h in backend.history(a.id)] == ["create"]


def test_nested_failure_dooms_the_outer_block(backend: PostgresStorageBackend) -> None:
    with pytest.raises(umi.StorageError, match="a write inside it failed"), backend.transaction():
        backend.upsert([_ent(1)])
        try:
            with backend.transaction():
                backend.upsert([_ent(2)])
                raise ValueError("inner")
        except ValueError:
            pass
    assert backend.count() == 0


def test_noop_writes_do_not_bump_the_generation(backend: PostgresStorageBackend) -> None:
    e = _ent(1)
    backend.upsert([e])
    gen = backend.generation
    assert backend.delete("no-such-id") is False
    assert backend.supersede("no-such-id", 5) is False
    backend.add_source(Source.for_text("s", 1))
    g2 = backend.generation
    backend.add_source(Source.for_text("s", 2))  # the first record of a text is kept
    assert (backend.generation, g2) == (g2, gen + 1)
    assert backend.find_source_by_hash(Source.for_text("s", 1).text_hash).created_at == 1


def _opposite_order_writers(b: PostgresStorageBackend, x: Entity, y: Entity) -> list[BaseException | None]:
    """Two threads write x then y, and y then x, each in one transaction, meeting in the middle."""
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException | None] = [None, None]

    def run(slot: int, first: Entity, second: Entity) -> None:
        try:
            with b.transaction():
                b.upsert([first])
                barrier.wait()  # both hold their first lock now; each then asks for the other's
                b.upsert([second])
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors[slot] = exc
            barrier.abort()

    ts = [threading.Thread(target=run, args=(0, x, y)), threading.Thread(target=run, args=(1, y, x))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return errors


def test_deadlock_is_retried_by_replaying_the_block(backend: PostgresStorageBackend) -> None:
    x, y = _ent(1), _ent(2)
    errors = _opposite_order_writers(backend, x, y)
    assert errors == [None, None]
    assert backend.count() == 2
    # each thread wrote each entity once: four history records, numbered without gaps
    assert [h.seq for h in backend.history(x.id)] == [1, 2]
    assert [h.seq for h in backend.history(y.id)] == [1, 2]
    assert backend.generation == 2


def test_deadlock_past_max_retries_raises_storage_error(postgres_url: str, pg_schema: str) -> None:
    b = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, max_retries=0, dim=8)
    x, y = _ent(1), _ent(2)
    errors = _opposite_order_writers(b, x, y)
    failed = [e for e in errors if e is not None]
    assert len(failed) == 1  # Postgres aborts one of the two; the other commits both entities
    assert isinstance(failed[0], umi.StorageError)
    assert "gave up after 1 attempts: DeadlockDetected kept recurring (max_retries=0)" in str(failed[0])
    assert b.count() == 2
    assert b.generation == 1
    b.close()


def test_concurrent_writers_keep_history_and_stats_exact(backend: PostgresStorageBackend) -> None:
    import psycopg

    shared = [_ent(i) for i in range(5)]

    def worker(w: int) -> None:
        for round_ in range(4):
            backend.upsert(list(reversed(shared)) if w % 2 else shared)
            backend.upsert([_ent(100 * (w + 1) + round_)])

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert backend.count() == 5 + 16
    for e in shared:
        assert [h.seq for h in backend.history(e.id)] == list(range(1, 17))
    with psycopg.connect(backend._pool.conninfo, autocommit=True) as conn:
        t = backend._names.table("entities").as_string(conn)
        s = backend._names.table("state").as_string(conn)
        real = conn.execute(f"SELECT count(*), coalesce(sum(doc_len), 0) FROM {t}").fetchone()
        kept = conn.execute(f"SELECT n_docs, total_len FROM {s}").fetchone()
    assert tuple(real) == tuple(kept)
    assert _term_table(backend) == _real_df(backend)


def _real_df(b: PostgresStorageBackend) -> dict[str, int]:
    """Each term's document frequency, counted from the entities themselves."""
    import psycopg

    with psycopg.connect(b._pool.conninfo, autocommit=True) as conn:
        t = b._names.table("entities").as_string(conn)
        return dict(conn.execute(f"SELECT k, count(*) FROM {t}, jsonb_object_keys(term_freqs) k GROUP BY k").fetchall())


def _term_table(b: PostgresStorageBackend) -> dict[str, int]:
    import psycopg

    with psycopg.connect(b._pool.conninfo, autocommit=True) as conn:
        return dict(conn.execute(f"SELECT term, df FROM {b._names.table('terms').as_string(conn)}").fetchall())


def test_relations_need_stored_endpoints(backend: PostgresStorageBackend) -> None:
    a, b = _ent(1), _ent(2)
    backend.upsert([a])
    with pytest.raises(umi.ValidationError, match="which is not stored"):
        backend.add_relations([EvolutionRelation(a.id, b.id, "update")])
    backend.upsert([b])
    r = EvolutionRelation(a.id, b.id, "update", reason="nul\x00 reason", created_at=3)
    backend.add_relations([r])
    assert backend.relations_for(a.id) == [r] == backend.relations_for(b.id)


def test_hnsw_index_is_built_in_the_background_at_the_threshold(postgres_url: str, pg_schema: str) -> None:
    import time

    from umi.storage import _pg_schema

    b = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, dim=8, exact_search_rows=60)
    b.upsert([_ent(i) for i in range(59)])
    with b._pool.connection() as conn:
        assert _pg_schema.hnsw_state(conn, b._names) is None  # below the threshold: no index, exact scans
    b.upsert([_ent(59)])  # the 60th entity: the commit starts the build
    deadline = time.monotonic() + 60
    while b._builder is not None and b._builder.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    with b._pool.connection() as conn:
        assert _pg_schema.hnsw_state(conn, b._names) is True
    b.close()
    # a second process opening the store finds the index and uses it
    again = PostgresStorageBackend.connect(postgres_url, schema=pg_schema)
    assert again._index_valid is True
    again.close()


# --- migrations ------------------------------------------------------------------------------


def _write_v1_store(url: str, schema: str) -> None:
    """A store as umi's schema version 1 wrote it (the SQL of that release, frozen here)."""
    import psycopg
    from psycopg import sql

    from umi.storage import _pg_schema

    with psycopg.connect(url, autocommit=True) as conn:
        names = _pg_schema.TableNames(sql, schema, "umi_")
        _pg_schema.migrate(conn, names, 1, 4, supported=1)
        e = f'"{schema}".umi_'
        conn.execute(f"INSERT INTO {e}entities (id, entity_type, name, name_norm, content, metadata, metadata_json, "
                     "embedding, importance, confidence, created_at, updated_at, event_time, valid_from, valid_to, "
                     "source_id, tsv, term_freqs, doc_len) VALUES "
                     "('e1', 'person', 'Alice', 'alice', 'works at acme', '{}', '{}', '[1,0,0,0]', 0.5, 1.0, 10, 10, "
                     " NULL, NULL, NULL, 's1', array_to_tsvector('{alice,work,acme}'), "
                     " '{\"alice\": 1, \"work\": 1, \"acme\": 1}', 4), "
                     "('e2', 'person', 'Alice', 'alice', 'works at initech', '{}', '{}', '[0,1,0,0]', 0.5, 1.0, 20, 20, "
                     " NULL, NULL, 30, 's1', array_to_tsvector('{alice,work,initech}'), "
                     " '{\"alice\": 1, \"work\": 1, \"initech\": 1}', 4)")
        conn.execute(f"UPDATE {e}state SET generation = 3, n_docs = 2, total_len = 8")
        conn.execute(f"INSERT INTO {e}sources VALUES ('s1', 'h1', 'Alice works at Acme.', 5, '{{}}')")
        conn.execute(f"INSERT INTO {e}relations VALUES ('r1', 'e1', 'e2', 'update', 'moved', 0.9, 20)")
        conn.execute(f"INSERT INTO {e}history VALUES ('e1', 1, 'create', 10, '{{\"id\": \"e1\"}}'), "
                     "('e2', 1, 'create', 20, '{\"id\": \"e2\"}'), ('e2', 2, 'supersede', 30, '{\"id\": \"e2\"}')")


def test_a_version_1_store_opens_and_is_brought_forward(postgres_url: str, pg_schema: str) -> None:
    _write_v1_store(postgres_url, pg_schema)
    b = PostgresStorageBackend.connect(postgres_url, schema=pg_schema)
    try:
        assert (b.schema_version, b.dim, b.generation) == (2, 4, 3)
        everything = SearchFilters(include_superseded=True)
        assert [e.id for e in b.list(everything)] == ["e1", "e2"]
        assert b.get("e2").valid_to == 30
        assert _term_table(b) == _real_df(b) == {"alice": 2, "work": 2, "acme": 1, "initech": 1}
        ref = bm25_scores("acme work", [("e1", {"alice": 1, "work": 1, "acme": 1}, 4),
                                        ("e2", {"alice": 1, "work": 1, "initech": 1}, 4)])
        assert b.search_text("acme work", 5, everything) == sorted(ref.items(), key=lambda p: (-p[1], p[0]))
        assert [h.seq for h in b.history("e2")] == [1, 2]
        assert [r.id for r in b.relations_for("e1")] == ["r1"]
        assert b.get_source("s1").text == "Alice works at Acme."
    finally:
        b.close()
    # opening again is a no-op: nothing is migrated twice
    again = PostgresStorageBackend.connect(postgres_url, schema=pg_schema)
    assert (again.schema_version, again.count(SearchFilters(include_superseded=True))) == (2, 2)
    again.close()
