"""Four processes write one Postgres store at once; a fifth sees everything they acknowledged.

Each writer opens its own PostgresStorageBackend (all racing through the migrations at
start), then (a) ``remember``s texts through ``umi.Memory`` with the Sim LLM and embedder,
some texts shared by every writer, and (b) writes entities, a source and relations through
the backend in explicit transactions, again with entities shared by every writer. Every
entity id a writer got back from a committed call is *acknowledged*. The fifth process then
checks that each acknowledged entity is stored exactly once and is found by search.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import multiprocessing.synchronize
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.postgres

WRITERS = 4
TEXTS_PER_WRITER = 6
TXS_PER_WRITER = 8
DIM = 32
SHARED_TEXTS = ["Acme Corp is headquartered in Lisbon.", "Bob plays the cello every Sunday."]


def _vector(key: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")  # the same in every process
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


def _writer(url: str, schema: str, w: int, out: str) -> None:
    import umi
    from umi.storage.base import Source
    from umi.types import Entity, EvolutionRelation

    backend = umi.PostgresStorageBackend.connect(url, schema=schema, dim=DIM, pool_size=2)
    mem = umi.Memory(storage=backend, llm=umi.SimLLMProvider(seed=7),
                     embedder=umi.SimEmbeddingProvider(seed=7, dim=DIM))
    acked: list[str] = []
    texts = [f"Writer {w} note {i}: project Zephyr{w}x{i} ships on day {i}." for i in range(TEXTS_PER_WRITER)]
    for i, text in enumerate(texts):
        acked += [e.id for e in mem.remember_sync(text).entities]
        if i % 3 == 0:
            for shared in SHARED_TEXTS:  # every writer tells these; they race on the same ids
                acked += [e.id for e in mem.remember_sync(shared).entities]
    for t in range(TXS_PER_WRITER):
        mine = [Entity("project", f"Batch{w}-{t}-{j}", f"batch {w} {t} {j} quasar", created_at=1_000 + t,
                       embedding=_vector(f"{w}/{t}/{j}")) for j in range(3)]
        common = Entity("topic", "Shared topic", f"shared fact {t}", created_at=500 + t,
                        embedding=_vector(f"shared/{t}"))
        with backend.transaction():
            backend.upsert([*mine, common])
            backend.add_source(Source.for_text(f"writer {w} batch {t}", 1_000 + t))
            backend.add_relations([EvolutionRelation(mine[0].id, mine[1].id, "extend", created_at=1_000 + t)])
        acked += [e.id for e in (*mine, common)]
    mem.close()
    Path(out).write_text(json.dumps(acked))


def _reader(url: str, schema: str, out: str) -> None:
    import umi
    from umi.storage.base import SearchFilters

    backend = umi.PostgresStorageBackend.connect(url, schema=schema, pool_size=1)
    everything = SearchFilters(include_superseded=True)
    ids = [e.id for e in backend.iter_all(batch=50)]
    text_hits = [i for i, _ in backend.search_text("quasar", 10_000, everything)]
    vec_hits = {}
    for w in range(WRITERS):
        for t in (0, TXS_PER_WRITER - 1):
            key = f"{w}/{t}/0"
            got = backend.search_vector(_vector(key), 1, everything)
            vec_hits[key] = got[0] if got else None
    Path(out).write_text(json.dumps({"ids": ids, "count": backend.count(everything), "text_hits": text_hits,
                                     "vec_hits": vec_hits, "generation": backend.generation}))
    backend.close()


def test_four_writers_one_reader(postgres_url: str, pg_schema: str, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"w{w}.json") for w in range(WRITERS)]
    procs = [ctx.Process(target=_writer, args=(postgres_url, pg_schema, w, outs[w])) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    acked = [json.loads(Path(o).read_text()) for o in outs]
    assert all(len(a) >= TEXTS_PER_WRITER + TXS_PER_WRITER * 4 for a in acked)

    reader_out = str(tmp_path / "reader.json")
    r = ctx.Process(target=_reader, args=(postgres_url, pg_schema, reader_out))
    r.start()
    r.join(120)
    assert r.exitcode == 0
    seen = json.loads(Path(reader_out).read_text())

    every_acked = {i for a in acked for i in a}
    assert len(seen["ids"]) == len(set(seen["ids"]))  # nothing stored twice
    assert every_acked <= set(seen["ids"])  # nothing acknowledged is missing
    assert seen["count"] == len(seen["ids"])
    # the shared facts were written by all four writers and are stored once each
    from umi.types import entity_id_for

    shared = {entity_id_for("topic", "Shared topic", f"shared fact {t}") for t in range(TXS_PER_WRITER)}
    assert shared <= every_acked and all(seen["ids"].count(i) == 1 for i in shared)
    quasar = sorted(set(seen["text_hits"]))
    assert len(quasar) == WRITERS * TXS_PER_WRITER * 3

    for key, hit in seen["vec_hits"].items():
        w, t, j = key.split("/")
        assert hit is not None and hit[0] == entity_id_for("project", f"Batch{w}-{t}-{j}",
                                                           f"batch {w} {t} {j} quasar")
        assert hit[1] == pytest.approx(1.0, abs=1e-9)
    # every committed write moved the shared generation counter
    assert seen["generation"] >= WRITERS * TXS_PER_WRITER


def _core_writer(url: str, schema: str, go: "multiprocessing.synchronize.Event", done: "multiprocessing.synchronize.Event") -> None:
    import umi
    from umi.types import Scope

    backend = umi.PostgresStorageBackend.connect(url, schema=schema, pool_size=1)
    agent = Scope(user_id="ann", agent_id="helper")
    backend.set_core_block(agent, "persona", "written by the other process", 0.7, 1)
    done.set()
    assert go.wait(60)
    backend.remove_core_block(agent, "persona", 2)
    backend.set_core_block(agent, "human", "Ann moved to Porto", 0.4, 3)
    backend.close()


def test_a_core_block_written_by_one_process_is_read_by_another(postgres_url: str, pg_schema: str) -> None:
    import umi
    from umi.types import Scope

    reader = umi.PostgresStorageBackend.connect(postgres_url, schema=pg_schema, pool_size=1)
    agent = Scope(user_id="ann", agent_id="helper")
    assert reader.core_blocks(agent) == []  # read once before the other process writes: nothing cached
    ctx = multiprocessing.get_context("spawn")
    go, done = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_core_writer, args=(postgres_url, pg_schema, go, done))
    p.start()
    try:
        assert done.wait(120)
        assert [(b.name, b.content, b.importance) for b in reader.core_blocks(agent)] == [
            ("persona", "written by the other process", 0.7)]
        go.set()
        p.join(120)
        assert p.exitcode == 0
        assert [(b.name, b.content, b.position) for b in reader.core_blocks(agent)] == [
            ("human", "Ann moved to Porto", 0)]
        assert [h.op for h in reader.core_history(agent)] == ["set", "remove", "set"]
    finally:
        go.set()
        p.join(10)
        reader.close()
