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
from pathlib import Path

import pytest

import umi
from umi import CoreMemoryFullError, Scope
from umi.sim import FaultInjector, FaultType

ROOT = Path(umi.__file__).resolve().parent.parent


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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
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
