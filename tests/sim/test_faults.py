"""umi.sim: the fault injector, the clock, the rng, and the Sim storage backend under faults."""

from __future__ import annotations

import numpy as np
import pytest

from umi.errors import InvalidConfigError, StorageError, ValidationError
from umi.sim import SIM_EPOCH_MS, FaultInjector, FaultType, SimClock, SimRng
from umi.storage.base import SearchFilters, Source
from umi.storage.sim import SimStorageBackend
from umi.types import Entity, EvolutionRelation

W = FaultType.STORAGE_WRITE_FAIL
R = FaultType.STORAGE_READ_FAIL


def draws(inj: FaultInjector, ft: FaultType, n: int) -> list[bool]:
    return [inj.should_fail(ft) for _ in range(n)]


# --- FaultInjector ---------------------------------------------------------------------------


def test_every_named_fault_type_exists() -> None:
    assert {ft.name for ft in FaultType} >= {
        "STORAGE_WRITE_FAIL", "STORAGE_READ_FAIL", "STORAGE_LATENCY", "LLM_TIMEOUT", "LLM_RATE_LIMIT",
        "LLM_INVALID_RESPONSE", "EMBEDDING_FAIL", "CRASH", "CLOCK_SKEW"}
    assert FaultType.parse("storage_write_fail") is W
    assert FaultType.parse("STORAGE_WRITE_FAIL") is W
    with pytest.raises(InvalidConfigError, match="unknown fault type"):
        FaultType.parse("disk_on_fire")
    with pytest.raises(TypeError):
        FaultType.parse(3)  # type: ignore[arg-type]


def test_same_seed_same_sequence_and_seeds_differ() -> None:
    a = draws(FaultInjector(7, {W: 0.3}), W, 200)
    b = draws(FaultInjector(7, {W: 0.3}), W, 200)
    c = draws(FaultInjector(8, {W: 0.3}), W, 200)
    assert a == b
    assert a != c
    assert 40 <= sum(a) <= 80  # fixed by the seed: 0.3 of 200, give or take


def test_each_type_draws_from_its_own_stream() -> None:
    alone = draws(FaultInjector(1, {W: 0.5, R: 0.5}), W, 50)
    inj = FaultInjector(1, {W: 0.5, R: 0.5})
    mixed = []
    for _ in range(50):
        inj.should_fail(R)
        mixed.append(inj.should_fail(W))
    assert mixed == alone


def test_probability_bounds_counters_and_force() -> None:
    inj = FaultInjector(0, {"storage_write_fail": 1.0})
    assert draws(inj, W, 5) == [True] * 5
    assert draws(inj, R, 5) == [False] * 5  # unset types never fire
    assert inj.checks[W] == 5 and inj.fired[W] == 5 and inj.checks[R] == 5 and inj.fired[R] == 0
    inj.set_probability(W, 0.0)
    inj.force(W, 2)
    assert draws(inj, W, 4) == [True, True, False, False]
    assert inj.fired[W] == 7
    inj.reset_counts()
    assert inj.checks[W] == 0 and inj.fired[W] == 0
    assert inj.probability(W) == 0.0
    counts = inj.fired
    counts[W] = 99  # a copy
    assert inj.fired[W] == 0


def test_suspended_consumes_no_randomness() -> None:
    plain = draws(FaultInjector(3, {W: 0.5}), W, 30)
    inj = FaultInjector(3, {W: 0.5})
    got = draws(inj, W, 10)
    with inj.suspended():
        assert draws(inj, W, 100) == [False] * 100
    got += draws(inj, W, 20)
    assert got == plain
    assert inj.checks[W] == 30


def test_injector_validation() -> None:
    with pytest.raises(InvalidConfigError, match=r"\[0, 1\]"):
        FaultInjector(0, {W: 1.5})
    with pytest.raises(InvalidConfigError):
        FaultInjector(0, {W: float("nan")})
    with pytest.raises(TypeError):
        FaultInjector(0, {W: "often"})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        FaultInjector("seed")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError):
        FaultInjector(0, latency_ms=-1)
    with pytest.raises(InvalidConfigError):
        FaultInjector(0).force(W, -1)


# --- SimClock and SimRng -----------------------------------------------------------------------


def test_sim_clock() -> None:
    c = SimClock()
    assert c.now_ms() == SIM_EPOCH_MS and c() == SIM_EPOCH_MS / 1000
    assert c.advance(1500) == SIM_EPOCH_MS + 1500
    assert c() == pytest.approx((SIM_EPOCH_MS + 1500) / 1000)
    assert c.jump(-500) == SIM_EPOCH_MS + 1000
    with pytest.raises(ValidationError):
        c.advance(-1)
    with pytest.raises(ValidationError):
        SimClock(start_ms=10).jump(-11)
    with pytest.raises(TypeError):
        c.advance(1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError):
        SimClock(start_ms=-1)


def test_sim_rng() -> None:
    a, b = SimRng(5), SimRng(5)
    assert [a.randint(0, 100) for _ in range(10)] == [b.randint(0, 100) for _ in range(10)]
    assert np.array_equal(a.unit_vectors(3, 4), b.unit_vectors(3, 4))
    assert np.allclose(np.linalg.norm(SimRng(1).unit_vectors(10, 8), axis=1), 1.0, atol=1e-6)
    used = SimRng(9)
    used.random()
    assert used.fork("x").random() == SimRng(9).fork("x").random()  # forks ignore the parent's use
    assert SimRng(9).fork("x").random() != SimRng(9).fork("y").random()
    with pytest.raises(TypeError):
        SimRng(1.5)  # type: ignore[arg-type]


# --- the Sim backend under faults ----------------------------------------------------------------


def ent(i: int, vec: bool = True) -> Entity:
    emb = np.array([1.0, float(i), 0.5], np.float32) if vec else None
    return Entity("note", f"n{i}", f"fact {i} about things", embedding=emb, created_at=SIM_EPOCH_MS + i)


def snapshot(b: SimStorageBackend) -> tuple:
    with b.faults.suspended():  # type: ignore[union-attr]
        every = SearchFilters(include_superseded=True)
        return ([e.to_dict(with_embedding=True) for e in b.list(every, limit=1000)], b.generation,
                b.search_vector(np.ones(3, np.float32), 50, every) if b.dim else [],
                b.search_text("fact things", 50, every),
                [(i, [h.op for h in b.history(i)]) for i in sorted(e.id for e in b.list(every, limit=1000))])


def test_a_write_fault_raises_and_leaves_nothing_half_written() -> None:
    faults = FaultInjector(1)
    b = SimStorageBackend(seed=1, faults=faults)
    b.upsert([ent(0)])
    before = snapshot(b)
    for size in (1, 2, 5, 9):
        faults.force(W)
        with pytest.raises(StorageError, match="injected storage write failure in upsert"):
            b.upsert([ent(100 + i) for i in range(size)])
        assert snapshot(b) == before
    faults.force(W)
    with pytest.raises(StorageError):
        b.delete(ent(0).id)
    faults.force(W)
    with pytest.raises(StorageError):
        b.supersede(ent(0).id, SIM_EPOCH_MS + 5)
    faults.force(W)
    with pytest.raises(StorageError):
        b.add_source(Source.for_text("t", SIM_EPOCH_MS))
    b.upsert([ent(1)])
    faults.force(W)
    with pytest.raises(StorageError):
        b.add_relations([EvolutionRelation(ent(0).id, ent(1).id, "update")])
    assert b.relations_for(ent(0).id) == []
    assert b.get_source(Source.for_text("t", SIM_EPOCH_MS).id) is None
    assert b.get(ent(0).id) is not None and b.get(ent(0).id).valid_to is None  # type: ignore[union-attr]
    assert faults.fired[W] == 8


def test_a_fault_inside_a_transaction_rolls_back_all_of_it() -> None:
    faults = FaultInjector(2)
    b = SimStorageBackend(seed=2, faults=faults)
    b.upsert([ent(0), ent(1)])
    before = snapshot(b)
    with pytest.raises(StorageError, match="injected"):
        with b.transaction():
            b.upsert([ent(2), ent(3)])
            b.supersede(ent(0).id, SIM_EPOCH_MS + 9)
            faults.force(W)
            b.delete(ent(1).id)
    assert snapshot(b) == before
    # caught inside: the transaction still rolls back as a whole
    with pytest.raises(StorageError, match="rolled back"):
        with b.transaction():
            b.upsert([ent(4)])
            faults.force(W)
            try:
                b.upsert([ent(5)])
            except StorageError:
                pass
    assert snapshot(b) == before


def test_a_first_vector_rolled_back_by_a_fault_frees_the_dimension() -> None:
    faults = FaultInjector(0)
    b = SimStorageBackend(faults=faults)
    faults.force(W)
    with pytest.raises(StorageError):
        b.upsert([ent(0), ent(1)])
    assert b.dim is None
    b.upsert([Entity("note", "x", "y", embedding=np.ones(5, np.float32))])
    assert b.dim == 5


def test_read_faults_raise_and_change_nothing() -> None:
    faults = FaultInjector(3)
    b = SimStorageBackend(seed=3, faults=faults)
    b.upsert([ent(0)])
    before = snapshot(b)
    for read in (lambda: b.get(ent(0).id), lambda: b.get_many([ent(0).id]), lambda: b.list(), lambda: b.count(),
                 lambda: b.find_by_name("n0"), lambda: b.search_vector(np.ones(3, np.float32), 3),
                 lambda: b.search_text("fact", 3), lambda: b.history(ent(0).id), lambda: b.relations_for("x"),
                 lambda: b.get_source("x"), lambda: b.find_source_by_hash("x")):
        faults.force(R)
        with pytest.raises(StorageError, match="injected storage read failure"):
            read()
    assert faults.fired[R] == 11
    assert snapshot(b) == before


def test_latency_advances_the_sim_clock_instead_of_sleeping() -> None:
    clock = SimClock(start_ms=1000)
    faults = FaultInjector(4, {FaultType.STORAGE_LATENCY: 1.0}, latency_ms=25)
    b = SimStorageBackend(faults=faults, clock=clock)
    b.upsert([ent(0)])
    b.get(ent(0).id)
    b.count()
    assert clock.now_ms() == 1000 + 3 * 25
    assert faults.fired[FaultType.STORAGE_LATENCY] == 3
    b.delete(ent(0).id)  # at=None: stamped by the Sim clock, never the wall clock
    assert b.history(ent(0).id)[-1].at == 1000 + 4 * 25


def _random_run(seed: int) -> tuple[list[str], dict[str, dict], int]:
    faults = FaultInjector(seed, {W: 0.3})
    b = SimStorageBackend(seed=seed, faults=faults)
    rng = SimRng(seed)
    model: dict[str, Entity] = {}
    outcomes = []
    for step in range(120):
        op = rng.randint(0, 3)
        try:
            if op <= 1:
                batch = [ent(rng.randint(0, 40), vec=rng.bernoulli(0.7)) for _ in range(rng.randint(1, 4))]
                b.upsert(batch)
                model.update({e.id: e for e in batch})
            elif op == 2 and model:
                victim = rng.choice(sorted(model))
                b.delete(victim, at=SIM_EPOCH_MS + step)
                del model[victim]
            else:
                with b.transaction():
                    batch = [ent(rng.randint(0, 40)) for _ in range(2)]
                    b.upsert(batch[:1])
                    b.upsert(batch[1:])
                model.update({e.id: e for e in batch})
            outcomes.append("ok")
        except StorageError:
            outcomes.append("fail")
    assert outcomes.count("fail") == faults.fired[W]
    with faults.suspended():
        stored = {e.id: e.to_dict(with_embedding=True) for e in b.list(SearchFilters(include_superseded=True),
                                                                        limit=1000)}
        for e in model.values():
            if e.embedding is not None:
                assert e.id in {i for i, _ in b.search_vector(e.embedding, 60)}
        assert b.count() == len(model)
    assert stored == {i: e.to_dict(with_embedding=True) for i, e in model.items()}
    return outcomes, stored, b.generation


def test_random_faults_lose_exactly_the_failed_writes_and_replay_identically() -> None:
    first = _random_run(11)
    assert 10 <= first[0].count("fail") <= 60
    assert first[2] == first[0].count("ok")  # one generation per acknowledged write
    assert _random_run(11) == first
    assert _random_run(12)[0] != first[0]


def test_sim_backend_validates_its_arguments() -> None:
    with pytest.raises(TypeError):
        SimStorageBackend(seed="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SimStorageBackend(faults={"storage_write_fail": 1.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SimStorageBackend(clock=lambda: 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        SimStorageBackend(dim=0)


def test_clock_skew_is_consulted_by_the_sim_clock() -> None:
    faults = FaultInjector(9, latency_ms=0, clock_skew_ms=5_000)
    clock = SimClock(start_ms=100_000, faults=faults)
    faults.force(FaultType.CLOCK_SKEW, 3)
    assert [clock.now_ms() for _ in range(4)] == [105_000, 95_000, 105_000, 100_000]
    assert clock.skews == 3 and clock.true_ms() == 100_000
    faults.force(FaultType.CLOCK_SKEW, 1)
    assert clock() == 95.0  # the seconds face skews too (the WorkingMemory clock): 4th skew, behind
    assert faults.fired[FaultType.CLOCK_SKEW] == 4
    with faults.suspended():
        assert clock.now_ms() == 100_000
    early = SimClock(start_ms=1_000, faults=FaultInjector(1, {FaultType.CLOCK_SKEW: 1.0}, clock_skew_ms=5_000))
    assert [early.now_ms(), early.now_ms()] == [6_000, 0]  # never before 0
    with pytest.raises(TypeError):
        SimClock(faults="often")  # type: ignore[arg-type]


def test_crash_points_raise_a_simulated_crash_and_roll_back() -> None:
    from umi.sim import SimulatedCrash, install_crash_points

    faults = FaultInjector(2)
    b = SimStorageBackend(seed=2, faults=faults)
    points = install_crash_points(b, faults)
    assert {"before upsert", "after upsert", "before commit", "after commit"} <= set(points)
    b.upsert([ent(0)])
    before = snapshot(b)
    faults.force(FaultType.CRASH, 1)
    with pytest.raises(SimulatedCrash) as info:
        with b.transaction():
            b.upsert([ent(1)])
    assert info.value.point == "before upsert" and not isinstance(info.value, Exception)
    assert snapshot(b) == before
    # a crash right before the commit rolls the whole transaction back
    checks = faults.checks[FaultType.CRASH]
    with pytest.raises(SimulatedCrash):
        with b.transaction():
            b.upsert([ent(2)])  # before/after upsert: 2 points
            faults.force(FaultType.CRASH, 1)
    assert faults.checks[FaultType.CRASH] == checks + 3
    assert snapshot(b) == before
    # after the commit: durable, though the caller never heard back
    class AtFourth:
        n = 0

        def should_fail(self, fault: object) -> bool:
            self.n += 1
            return self.n == 4  # before upsert, after upsert, before commit, *after commit*

    c = SimStorageBackend(seed=3)
    install_crash_points(c, AtFourth())  # type: ignore[arg-type]
    with pytest.raises(SimulatedCrash) as info:
        with c.transaction():
            c.upsert([ent(3)])
    assert info.value.point == "after commit"
    assert c.get(ent(3).id) is not None
