"""One filter semantics: every compiled target of ``umi.storage.filters`` agrees with the
Python predicate (the reference), on random entities and random filters.

Targets: the numpy mask over an ``EntityCache`` and the DuckDB SQL of ``to_sql`` over plain
tables (the Postgres SQL is held to the same predicate by the contract suite on a server).
"""

from __future__ import annotations

import duckdb
from contract_helpers import T0
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umi.storage import filters as F
from umi.storage._hotcache import EntityCache
from umi.storage.base import SearchFilters
from umi.types import Entity, Scope

TYPES = ["person", "organization", "note"]
META = [None, True, False, 0, 1, 1.0, 0.0, -0.0, "1", "x", "x' OR 1=1 --"]
SCOPES = [Scope(), Scope("u1"), Scope("u1", "a"), Scope("u1", "a", "s"), Scope("u2"), Scope(agent_id="a")]
SOURCES = [None, "s1", "s2"]

entity_st = st.builds(
    lambda t, n, md, c, ev, vt, sc, src: Entity(t, n, "x", metadata=md, created_at=T0 + c,
                                                 event_time=None if ev is None else T0 + ev,
                                                 valid_to=None if vt is None else T0 + vt, scope=sc, source_id=src),
    st.sampled_from(TYPES), st.sampled_from(["a", "b", "c", "d"]),
    st.dictionaries(st.sampled_from(["k", "j"]), st.sampled_from(META), max_size=2),
    st.integers(0, 20), st.one_of(st.none(), st.integers(0, 20)), st.one_of(st.none(), st.integers(0, 20)),
    st.sampled_from(SCOPES), st.sampled_from(SOURCES))

times = st.one_of(st.none(), st.integers(-1, 21).map(lambda t: T0 + t), st.sampled_from([-(2**70), 2**70]))
filters_st = st.builds(
    SearchFilters,
    entity_types=st.one_of(st.none(), st.lists(st.sampled_from(TYPES), max_size=2).map(tuple)),
    time_range=st.one_of(st.none(), st.tuples(times, times).filter(
        lambda t: None in t or t[0] <= t[1])),  # type: ignore[operator]
    time_field=st.sampled_from(["created_at", "event_time"]),
    metadata=st.one_of(st.none(), st.dictionaries(st.sampled_from(["k", "j"]), st.sampled_from(META), max_size=2)),
    include_superseded=st.booleans(),
    as_of=st.one_of(st.none(), st.integers(-1, 21).map(lambda t: T0 + t)),
    scope=st.sampled_from([None, *SCOPES, Scope("u3")]),
    source_id=st.sampled_from([None, "s1", "s3"]),
)


def _duckdb_tables(ents: list[Entity]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE entities (id VARCHAR, entity_type VARCHAR, created_at BIGINT, event_time BIGINT, "
                "valid_to BIGINT, source_id VARCHAR, user_id VARCHAR, agent_id VARCHAR, session_id VARCHAR)")
    con.execute("CREATE TABLE entity_metadata (entity_id VARCHAR, key VARCHAR, vtype VARCHAR, vtext VARCHAR)")
    for e in ents:
        con.execute("INSERT INTO entities VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [e.id, e.entity_type.value, e.created_at, e.event_time, e.valid_to, e.source_id,
                     *e.scope.as_tuple()])
        for k, v in e.metadata.items():
            con.execute("INSERT INTO entity_metadata VALUES (?, ?, ?, ?)", [e.id, k, *F.meta_key(v)])
    return con


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ents=st.lists(entity_st, max_size=12, unique_by=lambda e: e.id), fs=st.lists(filters_st, min_size=1, max_size=6))
def test_mask_and_duckdb_sql_agree_with_the_predicate(ents: list[Entity], fs: list[SearchFilters]) -> None:
    cache = EntityCache(dim=None, index_factory=lambda d: None)
    cache.put_many(ents)
    con = _duckdb_tables(ents)
    try:
        for f in fs:
            want = sorted(e.id for e in ents if F.matches(f.norm, e))
            assert want == sorted(e.id for e in ents if f.matches(e)) == sorted(
                e.id for e in ents if F.predicate(f)(e))
            m = F.mask(f.norm, cache)
            assert sorted(cache._row_ids[r] for r in range(cache.n) if m[r]) == want, f
            sql, params = F.to_sql(f, "duckdb", alias="e")
            got = sorted(r[0] for r in con.execute(f"SELECT e.id FROM entities e WHERE {sql}", params).fetchall())
            assert got == want, (f, sql, params)
    finally:
        con.close()


def test_to_sql_keeps_values_out_of_the_sql_text() -> None:
    evil = "x'); DROP TABLE entities; --"
    f = SearchFilters(metadata={"k": evil}, scope=Scope("u1", "a"), source_id=evil,
                      entity_types=["person"], time_range=(1, 2), as_of=5)
    for dialect, mark in (("duckdb", "?"), ("postgres", "%s")):
        sql, params = F.to_sql(f, dialect)  # type: ignore[arg-type]
        assert "DROP" not in sql and evil in params
        assert sql.count(mark) == len(params)
    pg, pg_params = F.to_sql(SearchFilters(metadata={"k": 1, "j": "a\x00b"}), "postgres")
    assert pg == "metadata @> %s::jsonb AND valid_to IS NULL"
    assert pg_params == ['{"j":"\\u0001str:a\\u00010b","k":"int:1"}']
    assert F.to_sql(SearchFilters(entity_types=()), "postgres") == ("FALSE", [])
    assert F.to_sql(None, "duckdb") == ("valid_to IS NULL", [])
