"""A hypothesis state machine over several scopes against a plain-Python model.

Operations: remember, recall, get, forget, forget_scope and core-block writes, each
through a view of one scope (or the unscoped Memory). The model keeps which scope every
stored fact belongs to and each core scope's blocks. After every step, for every view:
the facts it can see (export, count, get) are exactly the model's facts of its scope, and
its core blocks are the model's. Every step also checks that nothing outside the scope it
acted in changed: no other user's fact was created, superseded, revived or removed. Runs
on the Sim memory and on a DuckDB file (which is closed and reopened at the end: the model
must hold after a restart too).
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import umi
from umi import RecallOptions, Scope
from umi.core_memory import KNOWN_LABELS

SCOPES = [
    Scope(user_id="alice"),
    Scope(user_id="bob"),
    Scope(user_id="alice", agent_id="a1"),
    Scope(user_id="alice", session_id="s1"),
    Scope(user_id="bob", agent_id="a1", session_id="s2"),
    Scope(),  # the unscoped Memory: writes unowned facts, sees everything
]
TEXTS = [
    "Alice works at Acme Corp",
    "Alice left Acme and now works at Initech",
    "Alice does not work at Initech",
    "Bob lives in Berlin",
    "Bob moved from Berlin to Paris",
    "Carol has two cats",
    "Carol manages the Apollo project at Acme Corp",
]
QUERIES = ["Alice", "Where does Alice work?", "Berlin", "cats", "Acme Corp"]
LABELS = ["human", "persona", "notes", "todo"]



def exported(m):
    """What ``m.export`` writes, as records."""
    import io
    import json

    buf = io.StringIO()
    m.export_sync(buf)
    return [json.loads(line) for line in buf.getvalue().splitlines()]

def _kw(scope: Scope) -> dict:
    return {k: v for k, v in scope.to_dict().items() if v is not None}


class ScopeMachine(RuleBasedStateMachine):
    backend = "sim"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="umi-scopes-") if self.backend == "duckdb" else None
        self.memory = self._open()
        self.facts: dict[str, Scope] = {}  # live fact id -> its exact scope
        self.statement: dict[str, tuple[str | None, str]] = {}  # fact id -> (source id, content)
        self.blocks: dict[Scope, dict[str, tuple[str, float]]] = {}  # core scope -> label -> (content, importance)

    def _open(self) -> umi.Memory:
        if self.backend == "sim":
            return umi.Memory.sim(seed=11)
        return umi.Memory(f"{self.tmp}/m.duckdb", llm=umi.SimLLMProvider(11), embedder=umi.SimEmbeddingProvider(11))

    def view(self, scope: Scope) -> umi.Memory:
        return self.memory.scoped(**_kw(scope)) if not scope.is_unset else self.memory

    def state(self) -> dict[str, tuple[Scope, int | None]]:
        """Every stored fact, as the unscoped Memory sees it: scope and valid_to."""
        return {d["id"]: (self.memory.get_sync(d["id"]).scope, d["valid_to"])
                for d in exported(self.memory) if d["kind"] == "entity"}

    def assert_only_user_changed(self, before: dict, after: dict, user: str | None) -> None:
        for fid in set(before) | set(after):
            if before.get(fid) != after.get(fid):
                scope = (after.get(fid) or before.get(fid))[0]
                assert scope.user_id == user, f"{fid} of {scope} changed by an operation of user {user!r}"

    # --- archival ----------------------------------------------------------
    @rule(scope=st.sampled_from(SCOPES), text=st.sampled_from(TEXTS))
    def remember(self, scope: Scope, text: str) -> None:
        before = self.state()
        r = self.view(scope).remember_sync(text)
        for e in r.entities:
            assert e.scope == scope
            self.facts[e.id] = scope
            self.statement[e.id] = (e.source_id, e.content)
        for ev in r.evolutions:  # evolution links facts of one user only
            assert self.facts[ev.source_id].user_id == ev.scope.user_id == scope.user_id
        self.assert_only_user_changed(before, self.state(), scope.user_id)

    @rule(scope=st.sampled_from(SCOPES), query=st.sampled_from(QUERIES), superseded=st.booleans())
    def recall(self, scope: Scope, query: str, superseded: bool) -> None:
        hits = self.view(scope).recall_sync(query, RecallOptions(limit=20, include_superseded=superseded))
        for h in hits:
            assert scope.contains(h.scope) and self.facts.get(h.id) == h.scope

    @precondition(lambda self: self.facts)
    @rule(scope=st.sampled_from(SCOPES), pick=st.integers(min_value=0))
    def forget(self, scope: Scope, pick: int) -> None:
        fid = sorted(self.facts)[pick % len(self.facts)]
        owner = self.facts[fid]
        before = self.state()
        assert self.view(scope).forget_sync(fid) == scope.contains(owner)
        if scope.contains(owner):  # the statement goes: every facet of it this view sees
            key = self.statement[fid]
            for other in [f for f, s in self.facts.items() if self.statement[f] == key and scope.contains(s)]:
                del self.facts[other]
        self.assert_only_user_changed(before, self.state(), owner.user_id)

    @rule(scope=st.sampled_from(SCOPES[:5]), session=st.booleans())
    def forget_scope(self, scope: Scope, session: bool) -> None:
        target = Scope(scope.user_id, scope.agent_id, "s1" if session else scope.session_id)
        before = self.state()
        n = self.memory.forget_scope_sync(**_kw(target))
        gone = [fid for fid, s in self.facts.items() if target.contains(s)]
        assert n == len(gone)
        for fid in gone:
            del self.facts[fid]
        if target.session_id is None:  # every core scope inside the target: alice's agents too
            for sc in [sc for sc in self.blocks if target.core.contains(sc)]:
                del self.blocks[sc]
        self.assert_only_user_changed(before, self.state(), target.user_id)

    # --- core memory -------------------------------------------------------
    @rule(scope=st.sampled_from(SCOPES), label=st.sampled_from(LABELS), n=st.integers(0, 40),
          importance=st.sampled_from([0.0, 0.3, 0.5, 1.0]))
    def set_block(self, scope: Scope, label: str, n: int, importance: float) -> None:
        content = f"{label} of {scope.key() or 'nobody'} #{n}"
        self.view(scope).core.set_block(label, content, importance)
        self.blocks.setdefault(scope.core, {})[label] = (content, importance)

    @rule(scope=st.sampled_from(SCOPES), label=st.sampled_from(LABELS))
    def remove_block(self, scope: Scope, label: str) -> None:
        had = label in self.blocks.get(scope.core, {})
        assert self.view(scope).core.remove_block(label) == had
        self.blocks.get(scope.core, {}).pop(label, None)

    @rule(scope=st.sampled_from(SCOPES))
    def clear_blocks(self, scope: Scope) -> None:
        self.view(scope).core.clear()
        self.blocks.pop(scope.core, None)

    # --- what every view sees ----------------------------------------------
    def expected_blocks(self, core_scope: Scope) -> list[tuple[str, str, float]]:
        blocks = self.blocks.get(core_scope, {})
        order = [lb for lb in KNOWN_LABELS if lb in blocks] + [lb for lb in blocks if lb not in KNOWN_LABELS]
        return [(lb, *blocks[lb]) for lb in order]

    @invariant()
    def every_view_sees_exactly_its_scope(self) -> None:
        for scope in SCOPES:
            v = self.view(scope)
            mine = {fid for fid, s in self.facts.items() if scope.contains(s)}
            assert {d["id"] for d in exported(v) if d["kind"] == "entity"} == mine
            assert v.count_sync() == len(mine)
            for fid, s in self.facts.items():
                assert (v.get_sync(fid) is not None) == scope.contains(s)
            assert v.core.blocks() == self.expected_blocks(scope.core)

    def teardown(self) -> None:
        try:
            if self.backend == "duckdb":  # a restart keeps exactly the model's state
                self.memory.close()
                self.memory = self._open()
                self.every_view_sees_exactly_its_scope()
        finally:
            self.memory.close()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)


class DuckDBScopeMachine(ScopeMachine):
    backend = "duckdb"


_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestScopesSim = ScopeMachine.TestCase
TestScopesSim.settings = settings(max_examples=30, stateful_step_count=15, **_common)
TestScopesDuckDB = DuckDBScopeMachine.TestCase
TestScopesDuckDB.settings = settings(max_examples=15, stateful_step_count=15, **_common)


def test_the_model_catches_a_leak(monkeypatch):
    """The machine can fail: a view whose recall ignores its scope is caught."""
    from umi.pipeline import context

    monkeypatch.setattr(context.PipelineContext, "within", lambda self, filters: filters)  # the scope rule, gone
    m = ScopeMachine()
    try:
        m.remember(Scope(user_id="alice"), TEXTS[0])
        with pytest.raises(AssertionError):
            m.recall(Scope(user_id="bob"), "Alice", False)
    finally:
        m.teardown()
