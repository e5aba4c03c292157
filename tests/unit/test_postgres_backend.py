"""PostgresStorageBackend: what is particular to it (the shared behaviour is the contract suite).

Runs against the session's PostgreSQL + pgvector server (tests/pg_server.py).
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import umi
from umi.storage.base import SearchFilters, Source
from umi.storage.postgres import PostgresStorageBackend
from umi.storage.text import bm25_scores, document_terms
from umi.types import Entity, EvolutionRelation, Scope

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
    assert (info.value.found, info.value.supported) == (99, 4)


def test_dim_is_fixed_once(postgres_url: str, pg_schema: str) -> None:
    b = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, dim=8)
    assert b.dim == 8
    assert b.schema_version == 4
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
               # the largest values a vector may hold: its norm at most umi._validate.VECTOR_NORM_MAX
               embedding=np.array([1e-38, -7e18, 0.1, 1.0, 1e-45, 7e18, -0.0, 7.0], np.float32), event_time=-5, created_at=7)
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


def test_hnsw_path_adds_the_nearest_passage_of_long_facts(postgres_url: str, pg_schema: str) -> None:
    import psycopg

    url = postgres_url + "?options=-c%20enable_seqscan%3Doff"
    b = PostgresStorageBackend.connect(url, schema=pg_schema, exact_search_rows=1, ef_search=40)
    ents = [_ent(i) for i in range(200)]
    q = np.random.default_rng(5).normal(size=8).astype(np.float32)
    far = -q / np.linalg.norm(q)  # the long fact's own vector points away from the question
    long = Entity("note", "Report", "a long report", embedding=far,
                  passage_embeddings=np.stack([np.roll(far, 1), q, np.roll(q, 2)]).astype(np.float32))
    b.upsert([*ents, long])
    assert b.build_vector_index() is True
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'ANALYZE "{pg_schema}".umi_entities')  # the graph is walked only for a table known big
    got = b.search_vector(q, 5)
    assert got[0][0] == long.id and got[0][1] == pytest.approx(1.0, abs=1e-6)  # found by its passage, once
    assert [i for i, _ in got[1:]] == _exact_top(ents, q, 4)
    assert long.id not in [i for i, _ in b.search_vector(q, 5, SearchFilters(entity_types=("person",)))]
    assert b.delete(long.id)
    assert long.id not in [i for i, _ in b.search_vector(q, 5)]
    b.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta", "engineers", "acme", "x1"]),
                              min_size=0, max_size=8), min_size=1, max_size=12),
       query=st.lists(st.sampled_from(["alpha", "beta", "engineer", "acme", "zeta"]), min_size=1, max_size=4),
       superseded=st.sets(st.integers(0, 11)), deleted=st.sets(st.integers(0, 11)),
       users=st.lists(st.sampled_from([None, "ann", "bob"]), min_size=12, max_size=12),
       scan_rows=st.sampled_from([0, 5_000]))
def test_bm25_equals_the_reference_bit_for_bit(postgres_url: str, docs: list[list[str]], query: list[str],
                                               superseded: set[int], deleted: set[int], users: list[str | None],
                                               scan_rows: int) -> None:
    """Unscoped and scoped, through either candidate path of a scoped search (GIN or the scope
    index: KEYWORD_SCAN_ROWS 0 forces GIN), the scores are the reference's doubles."""
    import pg_server

    from umi.storage import postgres as P
    from umi.types import Scope

    schema = pg_server.get_server().new_schema_name()
    b = PostgresStorageBackend.connect(postgres_url, schema=schema, pool_size=1)
    old_scan_rows, P.KEYWORD_SCAN_ROWS = P.KEYWORD_SCAN_ROWS, scan_rows
    try:
        ents = [Entity("note", f"doc{i}", " ".join(words), created_at=i, scope=Scope(user_id=users[i]))
                for i, words in enumerate(docs)]
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
        for f in (SearchFilters(), SearchFilters(include_superseded=True), SearchFilters(scope=Scope(user_id="ann")),
                  SearchFilters(scope=Scope(user_id="bob"), include_superseded=True)):
            want = sorted(((i, s) for i, s in ref.items() if f.matches(next(e for e in ents if e.id == i))),
                          key=lambda p: (-p[1], p[0]))[:5]
            assert b.search_text(text, 5, f) == want
    finally:
        P.KEYWORD_SCAN_ROWS = old_scan_rows
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
        assert (b.schema_version, b.dim, b.generation) == (4, 4, 3)
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
        # everything written before scopes existed is in the unset scope: seen by the unscoped
        # (admin) view, by no user's view
        from umi.types import UNSET_SCOPE, Scope

        assert {e.scope for e in b.list(everything)} == {UNSET_SCOPE}
        assert {h.scope for h in b.iter_history()} == {UNSET_SCOPE}
        assert [s.scope for s in b.iter_sources()] == [UNSET_SCOPE]
        assert [r.scope for r in b.iter_relations()] == [UNSET_SCOPE]
        ann = Scope(user_id="ann")
        assert b.count(SearchFilters(scope=ann, include_superseded=True)) == 0
        assert list(b.iter_sources(ann)) == [] and list(b.iter_history(ann)) == []
        assert b.core_blocks(ann) == [] and b.get_meta("embedder") is None
    finally:
        b.close()
    # opening again is a no-op: nothing is migrated twice
    again = PostgresStorageBackend.connect(postgres_url, schema=pg_schema)
    assert (again.schema_version, again.count(SearchFilters(include_superseded=True))) == (4, 2)
    again.close()


# --- forgetting ------------------------------------------------------------------------------


def _tables_holding(b: PostgresStorageBackend, needle: str) -> list[str]:
    """Every `table.column` of the store's schema whose text, JSON or tsvector holds ``needle``
    (case-insensitive), found by asking Postgres itself about every such column."""
    import psycopg
    from psycopg import sql

    hits = []
    with psycopg.connect(b._pool.conninfo, autocommit=True) as conn:
        cols = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s "
            "AND (data_type IN ('text', 'jsonb', 'json', 'character varying') OR udt_name = 'tsvector') "
            "ORDER BY table_name, column_name", (b._schema,)).fetchall()
        assert len(cols) >= 20  # every table's text columns, not an empty query
        for table, column in cols:
            found = conn.execute(sql.SQL("SELECT count(*) FROM {t} WHERE {c}::text ILIKE %s").format(
                t=sql.Identifier(b._schema, table), c=sql.Identifier(column)), (f"%{needle}%",)).fetchone()[0]
            if found:
                hits.append(f"{table}.{column}")
    return hits


def test_forget_leaves_the_text_in_no_table(backend: PostgresStorageBackend) -> None:
    """A user story: remember (two facts from one text), supersede, relate, forget one fact,
    then the other, then tell the same text again."""
    from umi.types import Scope

    scope = Scope(user_id="alice")
    text = "Alice moved to Zanzibarquux. Alice likes tea."
    src = Source.for_text(text, 1_000, scope=scope)
    secret = Entity("person", "Alice", "Alice moved to Zanzibarquux", source_id=src.id, created_at=1_000,
                    metadata={"where": "Zanzibarquux"}, embedding=np.ones(8, np.float32), scope=scope)
    other = Entity("person", "Alice", "Alice likes tea", source_id=src.id, created_at=1_000,
                   embedding=np.ones(8, np.float32), scope=scope)
    older = Entity("person", "Alice", "Alice lives in Lisbon", created_at=500, scope=scope)
    with backend.transaction():
        backend.add_source(src)
        backend.upsert([older, secret, other])
        backend.supersede(older.id, 1_000)
        backend.add_relations([EvolutionRelation(older.id, secret.id, "update", reason="moved to Zanzibarquux",
                                                 created_at=1_000, scope=scope)])
    backend.upsert([Entity("person", "Alice", "Alice moved to Zanzibarquux", source_id=src.id, created_at=1_000,
                           importance=0.9, embedding=np.ones(8, np.float32), scope=scope)])  # an update: 2 snapshots
    assert "umi_terms.term" in _tables_holding(backend, "zanzibarquux")

    assert backend.delete(secret.id, at=2_000) is True
    # the source still has a fact (`other`), so its text stays; nothing else holds the word
    assert _tables_holding(backend, "zanzibarquux") == ["umi_sources.text"]
    assert [(h.op, dict(h.snapshot)) for h in backend.history(secret.id)] == [
        ("create", {"id": secret.id, "forgotten": True}), ("update", {"id": secret.id, "forgotten": True}),
        ("delete", {"id": secret.id, "forgotten": True})]
    assert backend.relations_for(older.id) == []
    assert backend.get(older.id).valid_to == 1_000  # forget revives nothing by itself
    assert backend.search_text("zanzibarquux", 5, SearchFilters(include_superseded=True)) == []

    assert backend.delete(other.id, at=2_001) is True
    assert _tables_holding(backend, "zanzibarquux") == []
    assert _tables_holding(backend, "likes tea") == []
    assert backend.get_source(src.id) is None and backend.entity_ids_for_source(src.id) == []
    assert _term_table(backend) == _real_df(backend)

    # the same text can be told again: it is a new source with new facts
    backend.add_source(src)
    backend.upsert([secret])
    assert backend.entity_ids_for_source(src.id) == [secret.id]
    assert [h.op for h in backend.history(secret.id)] == ["create", "update", "delete", "create"]


def test_forgetting_the_last_facts_of_a_source_at_once_removes_it(postgres_url: str, pg_schema: str) -> None:
    """Two blocks forget the last two facts of one source at once: the first holds its block open
    after its delete while the second deletes the other fact. Whichever checks last must see the
    other's delete and remove the source text (without a lock on the source, both would still see
    the other's fact, and the text would stay behind with no fact left)."""
    b = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, pool_size=4, dim=8)
    try:
        src = Source.for_text("shared text", 1)
        x, y = _ent(1, source_id=src.id), _ent(2, source_id=src.id)
        b.add_source(src)
        b.upsert([x, y])
        first_deleted = threading.Event()
        errors: list[BaseException] = []

        def first() -> None:
            try:
                with b.transaction():
                    b.delete(x.id)
                    first_deleted.set()
                    time.sleep(0.5)  # the second block runs its delete now
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        def second() -> None:
            try:
                assert first_deleted.wait(30)
                b.delete(y.id)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        ts = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert errors == []
        assert b.count() == 0
        assert b.get_source(src.id) is None
    finally:
        b.close()


# --- scopes ----------------------------------------------------------------------------------


def _scoped(i: int, user: str, **kw) -> Entity:
    from umi.types import Scope

    return _ent(i, scope=Scope(user_id=user), content=kw.pop("content", f"fact number {i} of {user}"), **kw)


def test_one_users_searches_are_answered_through_the_scope_index(postgres_url: str, pg_schema: str) -> None:
    """With many users in one set of tables, the planner reads one user's rows through the
    composite scope index, for the vector search (exact over that user's rows) and for the
    keyword search's candidates, with the backend's own SQL."""
    import psycopg

    from umi.storage import filters as F
    from umi.storage.postgres import _vector_text
    from umi.types import Scope

    users = [f"u{i:03d}" for i in range(60)]
    # 3,000 rows, above exact_search_rows: unscoped searches walk the HNSW graph; one user's 50 rows
    # are below it: that user's searches are exact scans of those rows
    b = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, dim=8, exact_search_rows=1000)
    try:
        b.upsert([_scoped(i, users[i % len(users)]) for i in range(3000)])
        assert b.build_vector_index() is True
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'ANALYZE "{pg_schema}".umi_entities')
        f = SearchFilters(scope=Scope(user_id="u007"))
        where, params = F.to_sql(f, "postgres")
        q = np.random.default_rng(1).normal(size=8).astype(np.float32)
        t = f'"{pg_schema}".umi_entities'
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            vec_plan = "\n".join(r[0] for r in conn.execute(
                f"EXPLAIN SELECT id, embedding FROM {t} WHERE embedding IS NOT NULL AND {where} "
                "ORDER BY (embedding <=> %s::vector) + 0, id LIMIT 26", [*params, _vector_text(q)]).fetchall())
            stmt, stmt_params = b._text_statement("fact number", 10, f)  # the backend's own statement
            text_plan = "\n".join(r[0] for r in conn.execute(
                b._sql.SQL("EXPLAIN (ANALYZE) ") + stmt, stmt_params).fetchall())
        assert "umi_entities_scope" in vec_plan, vec_plan
        # the user's rows are read through the scope index; the GIN branch (every posting of
        # "fact" in the table) never runs
        assert "Bitmap Index Scan on umi_entities_scope" in text_plan, text_plan
        assert all("never executed" in ln for ln in text_plan.splitlines() if "umi_entities_tsv" in ln), text_plan
        assert "(never executed)" in text_plan, text_plan
        # and the answers are that user's, exact, even though the store would use its HNSW graph
        mine = [e for e in b.list(f, limit=1000)]
        assert len(mine) == 50 and all(e.scope == Scope(user_id="u007") for e in mine)
        decided: list[bool] = []
        narrow = b._narrow
        b._narrow = lambda *a: decided.append(narrow(*a)) or decided[-1]  # type: ignore[method-assign]
        assert [i for i, _ in b.search_vector(q, 10, f)] == _exact_top(mine, q, 10)
        b.search_vector(q, 10)
        assert decided == [True, False]  # the user's search was exact; the unscoped one walked the graph
        assert {i for i, _ in b.search_text("fact u007", 100, f)} == {e.id for e in mine}
    finally:
        b.close()


def test_scoped_reads_and_iterators_keep_to_their_view(backend: PostgresStorageBackend,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from umi.storage import postgres as P
    from umi.types import Scope

    monkeypatch.setattr(P, "ITER_BATCH", 3)  # several pages, with ties on created_at across pages
    ents = [_scoped(i, "ann" if i % 3 else "bob", created_at=100 + i // 4) for i in range(20)]
    srcs = [Source.for_text(f"text {i}", 50 + i // 2, scope=e.scope) for i, e in enumerate(ents)]
    rels = [EvolutionRelation(ents[i].id, ents[i + 3].id, "extend", created_at=7, scope=ents[i].scope)
            for i in range(0, 15, 3)]
    with backend.transaction():
        backend.upsert(ents)
        for s in srcs:
            backend.add_source(s)
        backend.add_relations(rels)
    ann = Scope(user_id="ann")
    assert backend.count(SearchFilters(scope=ann)) == sum(1 for e in ents if e.scope == ann)
    got = list(backend.iter_sources(ann))
    assert got == sorted((s for s in srcs if s.scope == ann), key=lambda s: (s.created_at, s.id))
    assert list(backend.iter_sources()) == sorted(srcs, key=lambda s: (s.created_at, s.id))
    assert list(backend.iter_relations(Scope(user_id="bob"))) == sorted(
        (r for r in rels if r.scope.user_id == "bob"), key=lambda r: (r.created_at, r.id))
    hist = list(backend.iter_history(ann))
    assert [(h.entity_id, h.seq) for h in hist] == sorted((e.id, 1) for e in ents if e.scope == ann)
    assert all(h.scope == ann for h in hist)
    assert list(backend.iter_history(Scope(user_id="nobody"))) == []


def test_restore_writes_exactly_the_records_it_is_given(postgres_url: str, pg_schema: str) -> None:
    """An export of one store (every record, every scope) restored into an empty one reads back
    equal, with the same history seqs and no history of its own; BM25 statistics follow."""
    from umi.types import Scope

    a = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, dim=8, table_prefix="a_")
    b = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, dim=8, table_prefix="b_")
    try:
        ents = [_scoped(i, "ann" if i % 2 else "bob") for i in range(12)]
        src = Source.for_text("told once", 1, scope=Scope(user_id="ann"))
        a.add_source(src)
        a.upsert(ents)
        a.upsert([_scoped(1, "ann", importance=0.9)])
        a.supersede(ents[1].id, 5_000)
        a.add_relations([EvolutionRelation(ents[1].id, ents[3].id, "update", created_at=5_000,
                                           scope=Scope(user_id="ann"))])
        a.delete(ents[2].id)
        everything = SearchFilters(include_superseded=True)
        with b.transaction():
            b.restore(a.list(everything, limit=1000), list(a.iter_sources()), list(a.iter_relations()),
                      list(a.iter_history()))
        assert b.list(everything, limit=1000) == a.list(everything, limit=1000)
        assert list(b.iter_history()) == list(a.iter_history())
        assert list(b.iter_relations()) == list(a.iter_relations())
        assert list(b.iter_sources()) == [src]
        assert _term_table(b) == _real_df(b)
        for q in ("fact number", "bob"):
            assert b.search_text(q, 20, everything) == a.search_text(q, 20, everything)
        # a relation to an entity that is neither stored nor restored is refused, and nothing is written
        gen = b.generation
        with pytest.raises(umi.ValidationError, match="which is not stored"):
            b.restore([_ent(99)], [], [EvolutionRelation(_ent(99).id, "missing", "extend")], [])
        assert (b.generation, b.get(_ent(99).id)) == (gen, None)
    finally:
        a.close()
        b.close()


# --- core memory -----------------------------------------------------------------------------


def test_two_backends_on_one_database_see_each_others_core_writes(postgres_url: str, pg_schema: str) -> None:
    from umi.types import Scope

    one = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, pool_size=1)
    two = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, pool_size=1)
    agent = Scope(user_id="ann", agent_id="helper")
    try:
        one.set_core_block(agent, "persona", "You are terse.", 0.8, 10)
        assert [(b.name, b.content, b.importance, b.position) for b in two.core_blocks(agent)] == [
            ("persona", "You are terse.", 0.8, 0)]
        two.set_core_block(agent, "human", "Ann likes tea.", 0.5, 11)
        two.set_core_block(agent, "persona", "You are kind.", 0.9, 12)  # keeps its place
        assert [(b.name, b.content, b.position) for b in one.core_blocks(agent)] == [
            ("persona", "You are kind.", 0), ("human", "Ann likes tea.", 1)]
        # a session's view shares its agent's blocks; another user's agent does not
        assert [b.name for b in one.core_blocks(Scope("ann", "helper", "s1"))] == ["persona", "human"]
        assert one.core_blocks(Scope(user_id="bob", agent_id="helper")) == []
        assert two.remove_core_block(agent, "persona", 13) is True
        assert [(b.name, b.position) for b in one.core_blocks(agent)] == [("human", 0)]
        assert one.clear_core_blocks(agent, 14) == 1
        assert two.core_blocks(agent) == []
        assert [(h.seq, h.op, h.name, h.content) for h in two.core_history(agent)] == [
            (1, "set", "persona", "You are terse."), (2, "set", "human", "Ann likes tea."),
            (3, "set", "persona", "You are kind."), (4, "remove", "persona", None), (5, "clear", "", None)]
        assert [h.seq for h in one.core_history(agent, "human")] == [2, 5]
        assert all(h.scope == agent for h in one.core_history(agent))
    finally:
        one.close()
        two.close()


def test_concurrent_core_writers_keep_positions_and_seqs_dense(backend: PostgresStorageBackend) -> None:
    from umi.types import Scope

    agent = Scope(agent_id="a1")

    def writer(w: int) -> None:
        for i in range(10):
            backend.set_core_block(agent, f"w{w}-b{i}", f"block {i} of writer {w}", 0.5, 100 + i)
            if i % 3 == 2:
                backend.remove_core_block(agent, f"w{w}-b{i - 1}", 200 + i)

    ts = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    blocks = backend.core_blocks(agent)
    assert [b.position for b in blocks] == list(range(len(blocks))) and len(blocks) == 4 * (10 - 3)
    assert [h.seq for h in backend.core_history(agent)] == list(range(1, 4 * 13 + 1))
    for w in range(4):  # each writer's surviving blocks in the order it wrote them
        mine = [b.name for b in blocks if b.name.startswith(f"w{w}-")]
        assert mine == [f"w{w}-b{i}" for i in range(10) if i % 3 != 1]


def test_meta_round_trips_and_is_transactional(backend: PostgresStorageBackend) -> None:
    assert backend.get_meta("embedder") is None
    backend.set_meta("embedder", "sim|sim-v1|8")
    with pytest.raises(umi.StorageError, match="boom"), backend.transaction():
        backend.set_meta("embedder", "other|x|16")
        assert backend.get_meta("embedder") == "other|x|16"
        raise RuntimeError("boom")
    assert backend.get_meta("embedder") == "sim|sim-v1|8"
    gen = backend.generation
    backend.set_meta("embedder", "sim|sim-v1|8")  # unchanged: nothing to commit
    assert backend.generation == gen


# --- one filter semantics ------------------------------------------------------------------------

_F_TYPES = ["person", "organization", "note"]
_F_META = [None, True, False, 0, 1, 1.0, 0.0, -0.0, "1", "x", "x' OR 1=1 --", "nul\x00"]


def _filter_world() -> list[Entity]:
    """60 entities over every filtered field (scopes, sources, metadata types, times, validity)."""
    import random

    from umi.types import Scope

    scopes = [Scope(), Scope("u1"), Scope("u1", "a"), Scope("u1", "a", "s"), Scope("u2"), Scope(agent_id="a")]
    rng = random.Random(5)
    out = []
    for i in range(60):
        md = {k: rng.choice(_F_META) for k in rng.sample(["k", "j"], rng.randint(0, 2))}
        out.append(Entity(rng.choice(_F_TYPES), f"n{i}", f"word{i % 4} shared", metadata=md, created_at=rng.randint(0, 5),
                          event_time=rng.choice([None, 0, 2, 5]), valid_to=rng.choice([None, None, 3, 5]),
                          scope=rng.choice(scopes), source_id=rng.choice([None, "s1", "s2"]),
                          embedding=np.asarray([rng.uniform(-1, 1) for _ in range(8)], np.float32)))
    return out


class _World:
    """A store holding _filter_world() (a short repr: hypothesis prints it with a failing example)."""

    def __init__(self, b: PostgresStorageBackend, ents: list[Entity]) -> None:
        self.b, self.ents = b, ents

    def __repr__(self) -> str:
        return f"<store of _filter_world(): {len(self.ents)} entities>"


@pytest.fixture(scope="module")
def filter_world(postgres_server):
    b = PostgresStorageBackend.connect(postgres_server.url, schema=postgres_server.new_schema_name(), dim=8)
    ents = _filter_world()
    b.upsert(ents)
    yield _World(b, ents)
    b.close()


_f_times = st.one_of(st.none(), st.integers(-1, 6), st.sampled_from([-(2**70), 2**70]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(f=st.builds(
    SearchFilters,
    entity_types=st.one_of(st.none(), st.lists(st.sampled_from(_F_TYPES), max_size=2).map(tuple)),
    time_range=st.one_of(st.none(), st.tuples(_f_times, _f_times).filter(lambda t: None in t or t[0] <= t[1])),
    time_field=st.sampled_from(["created_at", "event_time"]),
    metadata=st.one_of(st.none(), st.dictionaries(st.sampled_from(["k", "j"]), st.sampled_from(_F_META), max_size=2)),
    include_superseded=st.booleans(), as_of=st.one_of(st.none(), st.integers(-1, 6)),
    scope=st.one_of(st.none(), st.sampled_from([Scope("u1"), Scope("u2"), Scope("u3"), Scope("u1", "a"),
                                                Scope(agent_id="a"), Scope()])),
    source_id=st.one_of(st.none(), st.sampled_from(["s1", "s2", "s3"]))))
def test_every_read_applies_the_one_filter_semantics(filter_world, f: SearchFilters) -> None:
    """list, count, find_by_name, search_text and search_vector select exactly the entities the
    Python reference (filters.matches) selects, for random filters over every field."""
    from umi.storage import filters as F

    b, ents = filter_world.b, filter_world.ents
    want = sorted(e.id for e in ents if F.matches(f.norm, e))
    assert sorted(e.id for e in b.list(f, limit=1000)) == want
    assert b.count(f) == len(want)
    assert sorted(i for i, _ in b.search_text("shared", 1000, f)) == want
    assert sorted(i for i, _ in b.search_vector(np.ones(8, np.float32), 1000, f)) == want
    assert [e.id for e in b.find_by_name("n7", filters=f)] == [i for i in want if i == ents[7].id]


def test_reads_before_the_first_vectors_still_work_after(postgres_url: str, pg_schema: str) -> None:
    """The store's first vectors type the embedding column ``vector(dim)``. A read a connection
    ran before (planned with the untyped column) must not fail after with "cached plan must not
    change result type" (it did, on every later read of that connection, once a first write had
    rolled back and another committed: found by the state machine)."""
    store = PostgresStorageBackend.connect(postgres_url, schema=pg_schema, pool_size=1)
    views = [SearchFilters(scope=v, include_superseded=True)
             for v in (Scope("u1"), Scope("u2"), Scope(), Scope("u1", "a"), Scope(agent_id="a"))]

    def read() -> list[list[str]]:
        return [[e.id for e in store.list(f, limit=1000)] for f in views]

    try:
        first = _ent(1, dim=3)
        assert read() == [[]] * 5
        with pytest.raises(umi.StorageError, match="roll back"):
            with store.transaction():
                store.upsert([first])
                raise RuntimeError("roll back")
        assert read() == [[]] * 5
        store.add_source(Source.for_text("text one", 1_000, scope=Scope("u1")))
        assert read() == [[]] * 5
        store.upsert([first])
        assert read() == [[], [], [first.id], [], []]
        assert store.get(first.id).embedding.tolist() == first.embedding.tolist()
    finally:
        store.close()
