"""Core memory that persists: per ``Scope(user_id, agent_id)``, loaded on open, written through.

Restart (close, reopen) and SIGKILL (a child process killed right after ``set_block``
returned) both bring back the blocks, their order and importance exactly; a write over
the budget, or one the store refuses, leaves nothing behind, in the store or in process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import umi
from umi import CoreMemoryFullError, Scope
from umi.sim import FaultInjector, FaultType
from child_process import child_env


def open_memory(path, **kw):
    kw.setdefault("config", umi.MemoryConfig(core_memory_bytes=2048))
    return umi.Memory(str(path), llm=umi.SimLLMProvider(3), embedder=umi.SimEmbeddingProvider(3), **kw)


BLOCKS = [
    ("notes", "first custom block", 0.25),
    ("human", "Prefers <short> answers & examples.", 0.9),
    ("system", "You are a careful assistant.", 1.0),
    ("todo", "ship v2", 0.333333),
    ("persona", "Patient.", 0.5),
]


def fill(core):
    for label, content, importance in BLOCKS:
        core.set_block(label, content, importance)


def test_blocks_order_and_importance_survive_a_restart(tmp_path):
    path = tmp_path / "core.duckdb"
    with open_memory(path, user_id="ann", agent_id="bot") as m:
        fill(m.core)
        m.core.set_block("notes", "replaced in place", 0.75)  # keeps its position
        m.core.remove_block("todo")
        m.core.set_block("todo", "ship v3")  # removed and set again: now last
        before = m.core.blocks()
        rendered = (m.core.render(), m.core.render("markdown"))
        used = m.core.used_bytes
    with open_memory(path, user_id="ann", agent_id="bot") as m:
        assert m.core.blocks() == before
        assert [b[0] for b in before] == ["system", "persona", "human", "notes", "todo"]
        assert m.core.get_importance("todo") == 0.5 and m.core.get_importance("notes") == 0.75
        assert (m.core.render(), m.core.render("markdown")) == rendered and m.core.used_bytes == used
        assert isinstance(m.core, umi.CoreMemory)
        # the session does not matter for core memory; the agent does
        assert m.scoped(session_id="s1").core is m.core
        assert len(m.scoped(session_id="s1").core) == 5
    with open_memory(path, user_id="ann") as m:
        assert len(m.core) == 0  # Scope(ann) is not Scope(ann, bot)
    with open_memory(path) as admin:
        assert admin.scoped(user_id="ann", agent_id="bot").core.blocks() == before


def test_core_history_records_every_write(tmp_path):
    with open_memory(tmp_path / "h.duckdb", user_id="ben") as m:
        m.core.set_block("human", "likes tea", 0.4)
        m.core.set_block("human", "likes coffee", 0.6)
        m.core.remove_block("human")
        assert m.core.remove_block("human") is False  # nothing there: nothing stored
        m.core.set_block("goals", "learn Rust")
        m.core.clear()
        hist = m.core_history_sync()
        assert [(r.op, r.name) for r in hist if r.op != "clear"] == [
            ("set", "human"), ("set", "human"), ("remove", "human"), ("set", "goals")]
        assert hist[-1].op == "clear"
        assert [(r.content, r.importance) for r in m.core_history_sync("human")][:2] == [
            ("likes tea", 0.4), ("likes coffee", 0.6)]
        assert all(r.scope == Scope(user_id="ben") for r in hist)
        assert m.scoped(session_id="x").core_history_sync() == hist
        assert m.scoped(agent_id="other").core_history_sync() == []


def test_over_budget_write_raises_and_stores_nothing(tmp_path):
    path = tmp_path / "budget.duckdb"
    with open_memory(path, user_id="cy") as m:
        m.core.set_block("human", "x" * 1000)
        with pytest.raises(CoreMemoryFullError) as ei:
            m.core.set_block("facts", "y" * 1100)
        assert ei.value.over_by == 52 and ei.value.limit == 2048
        with pytest.raises(CoreMemoryFullError):
            m.core.set_block("human", "z" * 2049)  # a replacement over budget keeps the old block
        assert m.core.get_block("human") == "x" * 1000 and "facts" not in m.core
        assert [r.op for r in m.core_history_sync()] == ["set"]
    with open_memory(path, user_id="cy") as m:
        assert m.core.blocks() == [("human", "x" * 1000, 0.5)]


def test_a_write_the_store_refuses_leaves_the_arena_as_it_was():
    faults = FaultInjector(seed=5, probabilities={})
    with umi.Memory.sim(seed=5, faults=faults, user_id="dee") as m:
        m.core.set_block("human", "likes tea", 0.4)
        faults.set_probability(FaultType.STORAGE_WRITE_FAIL, 1.0)
        with pytest.raises(umi.StorageError):
            m.core.set_block("human", "likes coffee", 0.9)
        with pytest.raises(umi.StorageError):
            m.core.set_block("goals", "new block")
        with pytest.raises(umi.StorageError):
            m.core.remove_block("human")
        with pytest.raises(umi.StorageError):
            m.core.clear()
        assert m.core.blocks() == [("human", "likes tea", 0.4)]
        faults.set_probability(FaultType.STORAGE_WRITE_FAIL, 0.0)
        m.core.reload()
        assert m.core.blocks() == [("human", "likes tea", 0.4)]


def test_stored_blocks_over_a_smaller_budget_refuse_to_open(tmp_path):
    path = tmp_path / "shrink.duckdb"
    with open_memory(path, config=umi.MemoryConfig(core_memory_bytes=4096)) as m:
        m.core.set_block("human", "h" * 3000)
    with pytest.raises(umi.InvalidConfigError, match="core_memory_bytes=2048"):
        open_memory(path)


CHILD = textwrap.dedent("""
    import sys
    import umi
    m = umi.Memory(sys.argv[1], user_id="fay", agent_id="bot", llm=umi.SimLLMProvider(3),
                   embedder=umi.SimEmbeddingProvider(3))
    m.core.set_block("persona", "Calm and exact.", 0.8)
    m.core.set_block("notes", "written just before the kill", 0.125)
    sys.stdout.write("ACK\\n")
    sys.stdout.flush()
    sys.stdin.read()  # wait to be killed, store open, nothing closed
""")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_block_acknowledged_before_sigkill_is_there_after_reopen(tmp_path):
    path = tmp_path / "kill.duckdb"
    env = {**child_env(), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                             cwd=tmp_path)  # `-c` puts the cwd first: never the repo's uncompiled umi/
    try:
        line = child.stdout.readline()
        assert line == "ACK\n", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for f in (child.stdin, child.stdout, child.stderr):
            f.close()
    with open_memory(path, user_id="fay", agent_id="bot") as m:
        assert m.core.blocks() == [("persona", "Calm and exact.", 0.8),
                                   ("notes", "written just before the kill", 0.125)]


def test_working_memory_is_per_scope_and_in_process(tmp_path):
    path = tmp_path / "wm.duckdb"
    with open_memory(path) as m:
        a, b = m.scoped(user_id="gus"), m.scoped(user_id="hal")
        a.working.set("k", b"gus")
        assert b.working.get("k") is None and m.scoped(user_id="gus").working.get("k") == b"gus"
    with open_memory(path, user_id="gus") as m:
        assert m.working.get("k") is None  # a session cache: never stored


def _duckdb_hits(path, needles):
    """(table, column, needle, count) for every needle found in any VARCHAR column of any table
    of the DuckDB file, read through DuckDB itself."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        hits = []
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()]
        assert {"core_blocks", "core_history", "entities", "history"} <= set(tables)
        for t in tables:
            cols = [r[0] for r in con.execute(
                "SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND data_type = 'VARCHAR'",
                [t]).fetchall()]
            for c in cols:
                for needle in needles:
                    q = f'SELECT count(*) FROM "{t}" WHERE strpos("{c}", ?) > 0'
                    n = con.execute(q, [needle]).fetchall()[0][0]
                    if n:
                        hits.append((t, c, needle, n))
        return hits
    finally:
        con.close()


def test_forget_scope_forgets_the_users_core_memory_in_every_agent_scope(tmp_path):
    """forget_scope(user_id="u") leaves nothing of u's core memory anywhere: not the blocks of
    Scope(u) nor of u's agents, not their history (a replaced block's old content included), not
    the arenas of core memories this process holds; v's blocks and history stay exactly."""
    path = tmp_path / "forget-core.duckdb"
    u_text = ["Ursula-persona-xq1", "Ursula-agent-xq2", "Ursula-old-xq3", "Ursula-other-xq4"]
    with open_memory(path) as admin:
        u, u_a1, v = admin.scoped(user_id="u"), admin.scoped(user_id="u", agent_id="a1"), admin.scoped(user_id="v")
        v_a1 = admin.scoped(user_id="v", agent_id="a1")
        u.core.set_block("persona", u_text[0], 0.9)
        u_a1.core.set_block("human", u_text[2], 0.5)
        u_a1.core.set_block("human", u_text[1], 0.7)  # the old content is only in the core history now
        admin.scoped(user_id="u", agent_id="a2").core.set_block("notes", u_text[3])
        admin.scoped(user_id="u", agent_id="a2").core.remove_block("notes")  # history only
        v.core.set_block("persona", "Victor persona", 0.6)
        v_a1.core.set_block("human", "Victor likes tea", 0.4)
        u.remember_sync("Ursula works at Acme.")
        v.remember_sync("Victor works at Initech.")
        v_before = [(s.core.blocks(), s.core_history_sync()) for s in (v, v_a1)]
        assert any(u_text[2] in h.content for h in u_a1.core_history_sync() if h.content)
        assert admin.forget_scope_sync(user_id="u") >= 1  # u's facts
        for s in (u, u_a1, admin.scoped(user_id="u", agent_id="a2")):
            assert s.core.blocks() == [] and s.core_history_sync() == [], s
        assert u.core is admin.scoped(user_id="u").core and len(u_a1.core) == 0  # the held arenas are empty
        assert [(s.core.blocks(), s.core_history_sync()) for s in (v, v_a1)] == v_before
        assert u.count_sync() == 0 and v.count_sync() >= 1
        u_a1.core.set_block("human", "fresh start")  # the scope works again, with a fresh history
        assert [(h.seq, h.op) for h in u_a1.core_history_sync()] == [(1, "set")]
        u_a1.core.clear()
        assert admin.forget_scope_sync(user_id="u", agent_id="a1") == 0  # no facts; the clear's history goes
        assert u_a1.core_history_sync() == []
    assert _duckdb_hits(path, u_text + ["Ursula", "fresh start"]) == []
    assert _duckdb_hits(path, ["Victor persona", "Victor likes tea"]) != []  # the scan finds what is there
    with open_memory(path) as admin:  # reopen: still gone; v's core memory came back whole
        for agent in (None, "a1", "a2"):
            s = admin.scoped(user_id="u", agent_id=agent)
            assert s.core.blocks() == [] and s.core_history_sync() == [], agent
        assert admin.scoped(user_id="v").core.blocks() == v_before[0][0]
        assert admin.scoped(user_id="v", agent_id="a1").core.blocks() == v_before[1][0]
        assert admin.scoped(user_id="v", agent_id="a1").core_history_sync() == v_before[1][1]


def test_a_dropped_view_lets_its_core_go_and_a_new_view_loads_it_again(tmp_path):
    """A server naming many users keeps no arena per user it ever saw: a core memory lives while
    a view (or a caller) holds it; the next view of that scope loads the same blocks back."""
    import gc
    import weakref

    with open_memory(tmp_path / "many.duckdb") as admin:
        held = admin.scoped(user_id="kept").core
        held.set_block("human", "kept in hand")
        gone = []
        for i in range(50):
            view = admin.scoped(user_id=f"u{i}")
            view.core.set_block("human", f"user number {i}")
            gone.append(weakref.ref(view.core))
            del view
        gc.collect()
        assert [r() for r in gone] == [None] * 50  # nothing keeps the dropped scopes' arenas
        assert admin.scoped(user_id="kept").core is held  # one object per scope while held
        again = admin.scoped(user_id="u7").core
        assert again.get_block("human") == "user number 7" and again.blocks() == [("human", "user number 7", 0.5)]
        # forget_scope still empties a core held in hand, and a reloaded one sees nothing
        admin.forget_scope_sync(user_id="kept")
        assert len(held) == 0 and len(admin.scoped(user_id="kept").core) == 0
