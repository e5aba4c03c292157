"""The deterministic simulation driver: one seed -> one workload, one fault schedule, one trace.

``run(seed, steps)`` builds a :class:`umi.sim.SimWorld` whose fault probabilities are drawn
from the seed (every ``FaultType`` can fire: storage write/read failures and latency, LLM
timeouts, rate limits and invalid answers, embedding failures, clock skew, crashes), opens
one or two Memories on it (several writers on one store), and runs a random workload —
remember, remember_many (when the API has it), recall, forget, core-block writes, clock
moves, clean close + reopen, and the crashes the injector decides — checking every
invariant after every step:

1. no acknowledged write lost: every fact an acknowledged ``remember`` stored is still
   there (same type, name and content) until an acknowledged ``forget`` removes it;
2. nothing half-written: a call that failed left the store exactly as it was (entities,
   vectors, history, relations, sources, generation); a call cut by a crash committed
   all of its change or none (one generation at most) and every stored entity has its
   history, its source, and relations whose ends exist; nothing is stored that no call
   wrote; an acknowledged remember added exactly the facts it returned and superseded only
   the facts its relations name;
3. no superseded fact returned by default: every recall hit is current in the store;
4. budgets held: a recall returns at most ``limit`` facts; core memory never exceeds its
   byte budget, and a refused core write changes nothing (checked against a model);
5. the index agrees with storage: the vector index holds exactly the stored vectors, each
   finds itself; keyword search finds each sampled fact; ``count`` equals the rows;
6. no scope sees another's data: each operation runs as an *actor* drawn from the seed — the
   unscoped (admin) Memory, user ``alice``, user ``bob``, or ``alice``'s agent ``planner`` in
   session ``s1`` — through a ``Memory.scoped`` view; the model keeps each fact's scope. After
   every step every view of every writer sees exactly its scope: ``count`` equals the model's
   visible facts, ``get`` of another scope's ids is None (of its own, the fact), a recall
   through a view returns only its scope's facts, ``history``/``relations`` of another
   scope's id are empty, and its core blocks equal the model of its ``Scope(user, agent)``;
   a write is stamped with its view's scope; and an operation through one user's view
   changed nothing (facts, vectors, history, relations) of another user or the unscoped data.

A violation raises :class:`InvariantViolation` whose message starts with the seed and the
step, and says how to replay: ``UMI_SIM_SEED=<seed> pytest tests/sim/test_simulation.py -k replay``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import umi
from umi.errors import CoreMemoryFullError, UmiError
from umi.sim import FaultInjector, FaultType, SimRng, SimulatedCrash, SimWorld
from umi.pipeline.remember import normalize_content
from umi.storage.base import SearchFilters
from umi.types import Scope

EVERY = SearchFilters(include_superseded=True)
CORE_BYTES = 1024

PEOPLE = ["Alice", "Bob", "Carol", "Dan"]
ORGS = ["Acme", "Initech", "Globex", "Umbrella"]
CITIES = ["Berlin", "Paris", "Munich", "Tokyo"]
HOBBIES = ["chess", "climbing", "opera", "sushi"]

#: who an operation runs as: the unscoped (admin) Memory, two users, and an agent/session of one
ACTORS = [Scope(), Scope(user_id="alice"), Scope(user_id="bob"),
          Scope(user_id="alice", agent_id="planner", session_id="s1")]
ACTOR_WEIGHTS = [0.25, 0.30, 0.25, 0.20]
CORE_SCOPES = sorted({a.core for a in ACTORS}, key=lambda s: s.as_tuple().__repr__())


class InvariantViolation(AssertionError):
    pass


@dataclass
class Report:
    seed: int
    steps: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    actors: dict[str, int] = field(default_factory=dict)  # steps run as each actor (ACTORS)
    fired: dict[str, int] = field(default_factory=dict)
    checks: int = 0
    crashes: int = 0
    trace: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()[:16]


def _text(rng: SimRng) -> str:
    p, o, c, h = rng.choice(PEOPLE), rng.choice(ORGS), rng.choice(CITIES), rng.choice(HOBBIES)
    o2, c2 = rng.choice(ORGS), rng.choice(CITIES)
    return rng.choice([
        f"{p} works at {o}",
        f"{p} left {o} and now works at {o2}",
        f"{p} lives in {c}",
        f"{p} moved from {c} to {c2}",
        f"{p} no longer lives in {c}",
        f"{p} loves {h}",
        f"{p} does not like {h} anymore",
        f"{p} manages Project {h.title()} at {o}",
        f"My friend {p} is a doctor in {c}",
        f"{p} is not a doctor",
    ])


def _query(rng: SimRng) -> str:
    p = rng.choice(PEOPLE)
    return rng.choice([f"Where does {p} work?", p, rng.choice(ORGS), f"Who lives in {rng.choice(CITIES)}?",
                       rng.choice(HOBBIES), f"What does {p} like?"])


def _faults(seed: int, rng: SimRng, scale: float) -> FaultInjector:
    def p(*choices: float) -> float:
        return min(1.0, rng.choice(choices) * scale)

    return FaultInjector(seed, {
        FaultType.STORAGE_WRITE_FAIL: p(0.0, 0.02, 0.08),
        FaultType.STORAGE_READ_FAIL: p(0.0, 0.01, 0.04),
        FaultType.STORAGE_LATENCY: p(0.0, 0.1, 0.3),
        FaultType.LLM_TIMEOUT: p(0.0, 0.03, 0.1),
        FaultType.LLM_RATE_LIMIT: p(0.0, 0.03, 0.1),
        FaultType.LLM_INVALID_RESPONSE: p(0.0, 0.03, 0.1),
        FaultType.EMBEDDING_FAIL: p(0.0, 0.03, 0.1),
        FaultType.CRASH: p(0.0, 0.005, 0.015),
        FaultType.CLOCK_SKEW: p(0.0, 0.05, 0.2),
    }, latency_ms=rng.choice([5, 50, 500]), clock_skew_ms=rng.choice([1_000, 60_000, 3_600_000]))


# --- what the store holds -------------------------------------------------------------------


@dataclass
class State:
    entities: dict[str, tuple]  # id -> (type, name, content, valid_to, source_id, has_vector, updated_at, scope)
    vectors: dict[str, bytes]
    history: dict[str, int]  # id -> number of history records (forgotten ids too)
    relations: dict[str, tuple]
    sources: dict[str, bool]  # source id -> present
    generation: int

    def key(self) -> tuple:
        return (sorted(self.entities.items()), sorted(self.vectors.items()), sorted(self.history.items()),
                sorted(self.relations.items()), sorted(self.sources.items()), self.generation)


class Driver:
    def __init__(self, seed: int, steps: int, *, fault_scale: float = 1.0, writers_max: int = 2) -> None:
        self.seed = seed
        self.steps = steps
        self.rng = SimRng(seed).fork("driver")
        self.faults = _faults(seed, SimRng(seed).fork("faults"), fault_scale)
        self.world = SimWorld(seed, self.faults, dim=32,
                              config=umi.MemoryConfig(core_memory_bytes=CORE_BYTES))
        self.writers: list[Any] = []
        self.writers_max = writers_max
        self.report = Report(seed)
        # the model: what acknowledged calls promise
        self.acked: dict[str, tuple[str, str, str]] = {}  # id -> (type, name, content)
        self.forgotten: set[str] = set()
        self.ever_ids: set[str] = set()
        self.source_ids: set[str] = set()
        self.core_model: list[dict[Scope, dict[str, str]]] = []  # per writer: core scope -> label -> content
        self.views: list[list[Any]] = []  # per writer: its view of each actor (ACTORS order)
        self.core_persisted = callable(getattr(self.world.store, "core_blocks", None))
        # The forget contract of the storage branch (delete drops the entity's relations; main
        # keeps them): with it, a relation to a forgotten fact is a violation too.
        self.forget_drops_relations = callable(getattr(self.world.store, "delete_source", None))
        self.step = 0

    # --- plumbing ----------------------------------------------------------------------
    def fail(self, what: str) -> None:
        raise InvariantViolation(
            f"seed={self.seed} step={self.step}: {what}\n"
            f"replay: UMI_SIM_SEED={self.seed} UMI_SIM_STEPS={self.steps} "
            f"pytest tests/sim/test_simulation.py -k replay\n"
            f"last ops: {self.report.trace[-5:]}")

    def note(self, line: str) -> None:
        self.report.trace.append(f"{self.step}:{line}")

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def open_writer(self) -> None:
        with self.faults.suspended():  # opening (views and their core blocks loaded) is not under test
            m = self.world.open()
            views = [m if a.is_unset else m.scoped(**self._kw(a)) for a in ACTORS]
            model: dict[Scope, dict[str, str]] = {}
            for a, v in zip(ACTORS, views):
                model[a.core] = ({label: content for label, content, _ in v.core.blocks()}
                                 if self.core_persisted else {})
        self.writers.append(m)
        self.views.append(views)
        self.core_model.append(model)

    @staticmethod
    def _kw(a: Scope) -> dict[str, str]:
        return {k: v for k, v in zip(("user_id", "agent_id", "session_id"), a.as_tuple()) if v is not None}

    def drop_writer(self, w: int) -> None:
        self.writers.pop(w)
        self.core_model.pop(w)
        self.views.pop(w)

    def state(self) -> State:
        s = self.world.store
        with self.faults.suspended():
            ents = list(s.iter_all())
            entities = {e.id: (e.entity_type.value, e.name, e.content, e.valid_to, e.source_id,
                               e.embedding is not None, e.updated_at, e.scope) for e in ents}
            vectors = {e.id: e.embedding.tobytes() for e in ents if e.embedding is not None}
            self.ever_ids |= set(entities)
            history = self._history_counts(s)
            relations = {}
            for i in entities:
                for r in s.relations_for(i):
                    relations[r.id] = (r.source_id, r.target_id, r.evolution_type.value)
            self.source_ids |= {e[4] for e in entities.values() if e[4]}
            sources = {sid: s.get_source(sid) is not None for sid in sorted(self.source_ids)}
            return State(entities, vectors, history, relations, sources, s.generation)

    def _history_counts(self, s: Any) -> dict[str, int]:
        """Records per entity over the whole history table — ids never committed included, so a
        history row a rollback left behind is seen."""
        iter_history = getattr(s, "iter_history", None)
        if callable(iter_history):  # the export contract (storage branch)
            counts: dict[str, int] = {}
            for h in iter_history():
                counts[h.entity_id] = counts.get(h.entity_id, 0) + 1
            return counts
        table = getattr(s, "_history", None)  # main's Sim store: its history table
        if isinstance(table, dict):
            return {i: len(recs) for i, recs in table.items()}
        return {i: len(s.history(i)) for i in sorted(self.ever_ids)}  # pragma: no cover

    # --- invariants after every step ---------------------------------------------------
    def check(self, before: State, after: State, outcome: str, op: str, result: Any) -> None:
        r = self.report
        r.checks += 1
        ents = after.entities
        # 1. no acknowledged write lost
        for eid, (etype, name, content) in self.acked.items():
            if eid in self.forgotten:
                continue
            got = ents.get(eid)
            if got is None:
                self.fail(f"acknowledged fact {eid} ({name}: {content!r}) is lost")
            if got[:3] != (etype, name, content):
                self.fail(f"acknowledged fact {eid} changed: {got[:3]} != {(etype, name, content)}")
        # 2. nothing half-written
        for eid, e in ents.items():
            if after.history.get(eid, 0) < 1:
                self.fail(f"stored fact {eid} ({e[1]}: {e[2]!r}) has no history")
            if e[4] is not None and not after.sources.get(e[4], False):
                self.fail(f"stored fact {eid} refers to source {e[4]}, which is not stored")
            if e[5] != (eid in after.vectors):
                self.fail(f"fact {eid}: vector flag and vector disagree")
        for rid, (src, dst, _) in after.relations.items():
            dangling = {src, dst} - set(ents)
            if dangling and (self.forget_drops_relations or not dangling <= self.forgotten):
                self.fail(f"relation {rid} has an end that is not stored ({src} -> {dst})")
        if outcome == "failed" and after.key() != before.key():
            self.fail(f"{op} failed but the store changed: {self._diff(before, after)}")
        if op in ("recall",) and after.key() != before.key():
            self.fail(f"a recall changed the store: {self._diff(before, after)}")
        if outcome == "crashed":
            if after.generation - before.generation > 1:
                self.fail(f"{op} was cut by a crash but committed {after.generation - before.generation} times")
            if after.generation == before.generation and after.key() != before.key():
                self.fail(f"{op} was cut by a crash before committing, yet the store changed: "
                          f"{self._diff(before, after)}")
        if outcome == "ok" and op in ("remember", "remember_many"):
            new = set(ents) - set(before.entities)
            told = {e.id for res in result for e in res.entities}
            # A restated superseded fact is revived (current again, not new) and returned;
            # every other returned fact is new, and nothing new goes unreturned.
            if not new <= told:
                self.fail(f"{op} returned facts {sorted(told)} but stored {sorted(new)}")
            for i in sorted(told - new):
                if i not in before.entities or i not in ents or ents[i][3] is not None:
                    self.fail(f"{op} returned fact {i}, which is neither new nor a current stored fact")
            named = {ev.source_id for res in result for ev in res.evolutions if ev.evolution_type.supersedes}
            retired = {i for i in before.entities if before.entities[i][3] is None
                       and i in ents and ents[i][3] is not None}
            if not retired <= named:
                self.fail(f"{op} superseded {sorted(retired - named)} without a relation saying so")
        unknown = set(ents) - set(self.acked) - self._in_doubt
        if unknown:
            self.fail(f"{len(unknown)} stored facts no call wrote: {sorted(unknown)[:3]}")
        # 4. core budgets (6. and each view's core holds exactly its Scope(user, agent)'s blocks)
        for views, model in zip(self.views, self.core_model):
            for a, m in zip(ACTORS, views):
                if m.core.used_bytes > m.core.max_bytes:
                    self.fail(f"core memory holds {m.core.used_bytes} bytes over max_bytes={m.core.max_bytes}")
                have = {label: content for label, content, _ in m.core.blocks()}
                if have != model[a.core]:
                    self.fail(f"core memory of {a} holds {sorted(have.items())[:3]}, "
                              f"the model {sorted(model[a.core].items())[:3]}")
        # 5. index agrees with storage
        self._check_index(after)
        # 6. no scope sees another's data
        self._check_scopes(before, after, outcome, op, result)

    _in_doubt: set[str] = set()

    def _diff(self, a: State, b: State) -> str:
        out = []
        for name in ("entities", "vectors", "history", "relations", "sources"):
            x, y = getattr(a, name), getattr(b, name)
            added = sorted(set(y) - set(x))
            gone = sorted(set(x) - set(y))
            changed = sorted(k for k in set(x) & set(y) if x[k] != y[k])
            if added or gone or changed:
                out.append(f"{name}: +{added[:2]} -{gone[:2]} ~{changed[:2]}")
        if a.generation != b.generation:
            out.append(f"generation {a.generation} -> {b.generation}")
        return "; ".join(out)

    def _check_index(self, st: State) -> None:
        s = self.world.store
        with self.faults.suspended():
            if s.count(EVERY) != len(st.entities):
                self.fail(f"count() says {s.count(EVERY)} but {len(st.entities)} facts are stored")
            if st.vectors:
                q = np.ones(self.world.dim, np.float32) / np.sqrt(self.world.dim)
                hits = s.search_vector(q, len(st.vectors) + 10, EVERY)
                got = [i for i, _ in hits]
                if sorted(got) != sorted(st.vectors):
                    self.fail(f"the vector index holds {len(got)} vectors, storage {len(st.vectors)}: "
                              f"missing {sorted(set(st.vectors) - set(got))[:2]}, "
                              f"phantom {sorted(set(got) - set(st.vectors))[:2]}")
                for eid in self.rng.sample(sorted(st.vectors), min(3, len(st.vectors))):
                    v = np.frombuffer(st.vectors[eid], np.float32)
                    top = s.search_vector(v, 1, EVERY)
                    if not top or top[0][1] < 0.999:
                        self.fail(f"the vector of {eid} does not find itself: {top}")
            for eid in self.rng.sample(sorted(st.entities), min(2, len(st.entities))):
                content = st.entities[eid][2]
                if not any(ch.isalnum() for ch in content):
                    continue
                found = [i for i, _ in s.search_text(content, len(st.entities) + 10, EVERY)]
                if eid not in found:
                    self.fail(f"keyword search for {content!r} does not find {eid}")

    def _check_scopes(self, before: State, after: State, outcome: str, op: str, result: Any) -> None:
        ents = after.entities
        actor = ACTORS[self.actor]
        if outcome == "ok" and op in ("remember", "remember_many"):
            new = set(ents) - set(before.entities)
            for i in sorted(new):
                if ents[i][7] != actor:
                    self.fail(f"{op} through the view of {actor} stored {i} with scope {ents[i][7]}")
        # an operation through one user's view changes nothing of another user (or the unscoped data)
        if actor.user_id is not None and op in ("remember", "remember_many", "recall", "forget", "core"):
            others = lambda st: {i for i, e in st.entities.items() if e[7].user_id != actor.user_id}  # noqa: E731
            keep_b, keep_a = others(before), others(after)
            if keep_b != keep_a or any(before.entities[i] != ents[i] or before.vectors.get(i) != after.vectors.get(i)
                                       or before.history.get(i) != after.history.get(i) for i in keep_b):
                self.fail(f"{op} through the view of {actor} changed another user's facts: "
                          f"{self._diff(before, after)}")
            rel = lambda st: {k: v for k, v in st.relations.items() if v[0] in keep_b or v[1] in keep_b}  # noqa: E731
            if rel(before) != rel(after):
                self.fail(f"{op} through the view of {actor} changed another user's relations")
        if not self.writers:
            return
        rng = self.rng
        w = rng.randint(0, len(self.writers) - 1)
        with self.faults.suspended():
            for a, v in zip(ACTORS, self.views[w]):
                mine = sorted(i for i, e in ents.items() if a.contains(e[7]))
                theirs = sorted(set(ents) - set(mine))
                n = v.count_sync()
                if n != len(mine):
                    self.fail(f"the view of {a} counts {n} facts; its scope holds {len(mine)}")
                for i in rng.sample(theirs, min(2, len(theirs))):
                    if v.get_sync(i) is not None:
                        self.fail(f"the view of {a} gets {i} of scope {ents[i][7]}: it sees another scope's fact")
                    if v.history_sync(i):
                        self.fail(f"the view of {a} sees the history of {i} of scope {ents[i][7]}")
                    # a relation of the view's own (a same-user evolution: an agent's fact
                    # superseding its user's) may name another scope's id; nothing else may
                    for r in v.relations_sync(i):
                        other = r.target_id if r.source_id == i else r.source_id
                        if not a.contains(r.scope) or other not in mine:
                            self.fail(f"the view of {a} sees relation {r.id} of {i} of scope {ents[i][7]}")
                for i in rng.sample(mine, min(2, len(mine))):
                    got = v.get_sync(i)
                    if got is None or got.id != i:
                        self.fail(f"the view of {a} cannot get {i}, a fact of its own scope")
            # one recall through one view per step: every hit is the view's
            i = rng.randint(1, len(ACTORS) - 1)
            a, v = ACTORS[i], self.views[w][i]
            hits = v.recall_sync(_query(rng), umi.RecallOptions(limit=8, include_superseded=rng.bernoulli(0.5)))
            for e in hits:
                if e.id in ents and not a.contains(ents[e.id][7]):
                    self.fail(f"a recall through the view of {a} returned {e.id} ({e.content!r}) of scope "
                              f"{ents[e.id][7]}: it sees another scope's fact")

    # --- the workload ------------------------------------------------------------------
    def run(self) -> Report:
        self._in_doubt = set()
        self.open_writer()
        try:
            for self.step in range(self.steps):
                self.one_step()
        finally:
            for m in self.writers:
                try:
                    with self.faults.suspended():
                        self.world.close(m)
                except UmiError:
                    pass
            self.world.shutdown()
        r = self.report
        r.steps = self.steps
        r.crashes = self.world.crashed
        r.fired = {ft.value: n for ft, n in self.faults.fired.items()}
        return r

    def one_step(self) -> None:
        rng = self.rng
        w = rng.randint(0, len(self.writers) - 1)
        pick, acc, self.actor = rng.random(), 0.0, len(ACTORS) - 1
        for i, wt in enumerate(ACTOR_WEIGHTS):
            acc += wt
            if pick < acc:
                self.actor = i
                break
        m = self.views[w][self.actor]  # the operation runs through this actor's view
        roll = rng.random()
        has_many = callable(getattr(m, "remember_many_sync", None))
        if roll < 0.34:
            op, args = "remember", (_text(rng),)
        elif roll < 0.40 and has_many:
            op, args = "remember_many", ([_text(rng) for _ in range(rng.randint(1, 3))],)
        elif roll < 0.58:
            op, args = "recall", (_query(rng), rng.randint(1, 8), rng.bernoulli(0.2))
        elif roll < 0.68:
            pool = sorted(set(self.acked) - self.forgotten)
            target = rng.choice(pool) if pool and rng.bernoulli(0.9) else f"missing-{rng.randint(0, 9)}"
            op, args = "forget", (target,)
        elif roll < 0.82:
            op, args = "core", self._core_args(rng)
        elif roll < 0.88:
            op, args = "tick", (rng.choice([1, 1000, 60_000, 86_400_000]),)
        elif roll < 0.94:
            op, args = "reopen", ()
        elif roll < 0.97 and len(self.writers) < self.writers_max:
            op, args = "writer+", ()
        else:
            op, args = "writer-", ()
        self.count(self.report.ops, op)
        self.count(self.report.actors, str(ACTORS[self.actor].as_tuple()))
        before = self.state()
        outcome, result = self.apply(w, m, op, args)
        self.count(self.report.outcomes, f"{op}:{outcome}")
        self.note(f"{op}{args!r}@{self.actor}->{outcome}:{self._summary(result)}")
        if outcome == "crashed":
            self.world.crash(self.writers[w])
            self.drop_writer(w)
            after = self.state()
            # cut by the crash, unacknowledged: whatever it did is in doubt, whole or not at all
            # ... and what it committed is durable from now on: it must not vanish later either.
            for eid in set(after.entities) - set(before.entities):
                self._in_doubt.add(eid)
                self.acked[eid] = after.entities[eid][:3]
            if op == "forget" and args[0] not in after.entities:
                # a forget commits whole or not at all: its statement is gone with it
                self.forgotten |= set(before.entities) - set(after.entities)
            if not self.writers:
                self.open_writer()
        else:
            after = self.state()
        if outcome == "ok" and op in ("remember", "remember_many"):
            for res in result:
                for e in res.entities:
                    self.acked[e.id] = (e.entity_type.value, e.name, e.content)
                    self.forgotten.discard(e.id)
        if outcome == "ok" and op == "forget":
            self._check_forget(before, after, args[0], result)
        if outcome == "ok" and op == "recall":
            self._check_recall(after, args, result)
        self.check(before, after, outcome, op, result)

    def _check_forget(self, before: State, after: State, target: str, result: Any) -> None:
        """``forget(id)`` removes the *statement* (every facet with the target's source and
        normalised content, superseded ones too) and revives exactly what only those facets had
        superseded; nothing else changes."""
        gone = set(before.entities) - set(after.entities)
        actor = ACTORS[self.actor]
        visible = target in before.entities and actor.contains(before.entities[target][7])
        if result and not visible:
            self.fail(f"forget({target}) through the view of {actor} forgot a fact of another scope "
                      f"({before.entities[target][7] if target in before.entities else 'not stored'})")
        if not result:
            if visible:
                self.fail(f"forget({target}) returned {result!r} but the fact was stored")
            if after.key() != before.key():
                self.fail(f"forget({target}) forgot nothing but the store changed: {self._diff(before, after)}")
            return
        if target not in before.entities:
            self.fail(f"forget({target}) returned {result!r} for a fact that was not stored")
        t = before.entities[target]
        statement = {target} if t[4] is None else {
            i for i, e in before.entities.items() if e[4] == t[4] and normalize_content(e[2]) == normalize_content(t[2])}
        if gone != statement:
            self.fail(f"forget({target}) removed {sorted(gone)} but its statement is {sorted(statement)}")
        revived = {i for i, e in after.entities.items() if e[3] is None and before.entities[i][3] is not None}
        by_gone = {src for src, dst, _ in before.relations.values() if dst in gone}
        if not revived <= by_gone:
            self.fail(f"forget({target}) revived {sorted(revived - by_gone)}, which it had not superseded")
        for rid, (src, dst, _) in before.relations.items():
            if (src in gone or dst in gone) and rid in after.relations:
                self.fail(f"forget({target}) kept relation {rid} ({src} -> {dst})")
        self.forgotten |= gone

    def _core_args(self, rng: SimRng) -> tuple:
        label = rng.choice(["system", "persona", "human", "notes", "scratch"])
        kind = rng.choice(["set", "set", "set", "remove", "clear"])
        size = rng.choice([0, 10, 200, 600, 1100])
        return (kind, label, f"{label} " + "x" * size)

    def apply(self, w: int, m: Any, op: str, args: tuple) -> tuple[str, Any]:
        try:
            if op == "remember":
                return "ok", [m.remember_sync(args[0])]
            if op == "remember_many":
                return "ok", list(m.remember_many_sync(args[0]))
            if op == "recall":
                q, limit, all_ = args
                opts = umi.RecallOptions(limit=limit, include_superseded=all_)
                return "ok", m.recall_sync(q, opts)
            if op == "forget":
                return "ok", m.forget_sync(args[0])
            if op == "core":
                return self._core(w, m, *args)
            if op == "tick":
                self.world.clock.advance(args[0])
                return "ok", None
            if op == "reopen":
                with self.faults.suspended():
                    self.world.close(self.writers[w])
                self.drop_writer(w)
                self.open_writer()
                return "ok", None
            if op == "writer+":
                self.open_writer()
                return "ok", None
            if op == "writer-":
                if len(self.writers) > 1:
                    with self.faults.suspended():
                        self.world.close(self.writers[w])
                    self.drop_writer(w)
                return "ok", None
        except SimulatedCrash as exc:
            return "crashed", exc.point
        except UmiError as exc:
            return "failed", type(exc).__name__
        raise AssertionError(op)  # pragma: no cover

    def _core(self, w: int, m: Any, kind: str, label: str, content: str) -> tuple[str, Any]:
        model = self.core_model[w][ACTORS[self.actor].core]
        if kind == "set":
            try:
                m.core.set_block(label, content)
            except CoreMemoryFullError:
                need = sum(len(c.encode()) for k, c in model.items() if k != label) + len(content.encode())
                if need <= CORE_BYTES:
                    self.fail(f"core refused {need} bytes under max_bytes={CORE_BYTES}")
                return "refused", None
            model[label] = content
        elif kind == "remove":
            existed = m.core.remove_block(label)
            if existed != (label in model):
                self.fail(f"remove_block({label!r}) returned {existed}; the model says {label in model}")
            model.pop(label, None)
        else:
            m.core.clear()
            model.clear()
        return "ok", None

    def _check_recall(self, st: State, args: tuple, hits: Any) -> None:
        _, limit, all_ = args
        actor = ACTORS[self.actor]
        for e in hits:
            if e.id in st.entities and not actor.contains(st.entities[e.id][7]):
                self.fail(f"a recall through the view of {actor} returned {e.id} ({e.content!r}) "
                          f"of scope {st.entities[e.id][7]}: it sees another scope's fact")
        if len(hits) > limit:
            self.fail(f"recall(limit={limit}) returned {len(hits)} facts")
        for e in hits:
            stored = st.entities.get(e.id)
            if stored is None:
                self.fail(f"recall returned {e.id}, which is not stored")
            if not all_ and (e.valid_to is not None or stored[3] is not None):
                self.fail(f"recall returned superseded fact {e.id} ({e.name}: {e.content!r}) by default")

    @staticmethod
    def _summary(result: Any) -> str:
        if isinstance(result, list):
            parts = []
            for x in result:
                if hasattr(x, "entities"):
                    parts.append(",".join(sorted(e.id[:8] for e in x.entities)))
                elif hasattr(x, "id"):
                    parts.append(x.id[:8])
            return "|".join(parts)
        return repr(result)


def run(seed: int, steps: int = 60, **kw: Any) -> Report:
    return Driver(seed, steps, **kw).run()
