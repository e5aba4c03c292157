"""The DuckDB commit log under SIGKILL at every step it takes (tests/integration/
test_commit_log_adversary.py pins the bugs found; this sweeps the crash points).

A child runs a fixed story on a DuckDB store — journaled remembers, forgets by key between
them (which move the log into the tables and cut it back), a checkpoint, a compact, a clean
close and a second session — and kills itself (SIGKILL) before or after the N-th step of the
log: a record's write, a sync, a cut (ftruncate), a removal, a move into the tables. For every
N the reopened store (read_only, then writable) must hold exactly what was acknowledged: each
remembered fact once (one history record), each forgotten fact gone, the call in flight whole
or absent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="SIGKILL is POSIX")

CHILD = r"""
import os, signal, sys
import numpy as np
import umi.storage._commit_log as cl
import umi.storage._duckdb_io as io
from umi.storage.duckdb import DuckDBStorageBackend
from umi.types import Entity

where, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = [0]
kill_at = [0]
fd_out = [None]


def say(line):
    os.write(fd_out[0], (line + "\n").encode())


def point():
    seen[0] += 1
    if seen[0] == kill_at[0]:
        os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name):
    real = getattr(owner, name)

    def step(*a, **k):
        point()
        r = real(*a, **k)
        point()
        return r

    setattr(owner, name, step)


for owner, name in ((cl, "_write_all"), (cl, "_sync"), (cl, "remove_log"), (io, "move_in")):
    wrap(owner, name)
real_truncate = os.ftruncate


def ftruncate(fd, n):  # (the log's cuts: DuckDB's own are not Python calls)
    point()
    real_truncate(fd, n)
    point()


cl.os.ftruncate = ftruncate


def fact(i):
    return Entity("note", f"n{i}", f"crash fact {i} walrus{i}", embedding=np.full(4, i + 1, np.float32) + np.arange(4),
                  created_at=1 + i)


def remember(b, i):
    say(f"TRY add {i}")
    b.upsert([fact(i)])
    say(f"ACK add {i}")


def forget(b, i):
    say(f"TRY del {i}")
    b.delete(fact(i).id)
    say(f"ACK del {i}")


def story(path):
    b = DuckDBStorageBackend.connect(path, dim=4)
    for i in range(4):
        remember(b, i)
    forget(b, 1)
    remember(b, 4)
    remember(b, 5)
    b.checkpoint()
    remember(b, 6)
    forget(b, 5)
    remember(b, 7)
    assert b.compact()
    remember(b, 8)
    remember(b, 9)
    b.close()
    b = DuckDBStorageBackend.connect(path)
    remember(b, 10)
    forget(b, 0)
    remember(b, 11)
    print("POINTS", seen[0], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


for k in range(first, last + 1):  # a worker forked for each kill point (umi imported once)
    pid = os.fork()
    if pid == 0:
        kill_at[0] = k
        fd_out[0] = os.open(os.path.join(where, f"k{k}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        story(os.path.join(where, f"k{k}.duckdb"))
        os._exit(3)
    _, status = os.waitpid(pid, 0)
    print("EXIT", k, status, flush=True)
"""


def fact_id(i: int) -> str:
    return Entity("note", f"n{i}", f"crash fact {i} walrus{i}", created_at=1 + i).id


def run(tmp_path: Path, first: int, last: int) -> str:
    """Run the story once for each kill point ``first .. last`` (0: killed only at its end);
    the child's output."""
    from child_process import child_env

    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(first), str(last)], capture_output=True,
                          text=True, timeout=600, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for k in range(first, last + 1):  # every worker was killed (none ended on its own, or raised)
        assert f"EXIT {k} {signal.SIGKILL}\n" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


def lines_of(tmp_path: Path, k: int) -> list[str]:
    out = tmp_path / f"k{k}.log"
    return out.read_text().splitlines() if out.exists() else []


def expected(lines: list[str]) -> tuple[set[int], set[int]]:
    """(the facts that must be stored, those that may be: the call in flight)."""
    live: set[int] = set()
    maybe: set[int] = set()
    for line in lines:
        what, op, i = line.split()
        n = int(i)
        if what == "TRY":
            maybe = {n}
            continue
        maybe = set()
        (live.add if op == "add" else live.discard)(n)
    return live, maybe


def check(path: Path, lines: list[str]) -> None:
    live, maybe = expected(lines)
    for read_only in (True, False):
        with DuckDBStorageBackend.connect(path, read_only=read_only) as b:
            got = {int(e.name[1:]) for e in b.list(limit=1000)}
            assert live - maybe <= got <= live | maybe, (read_only, sorted(got), sorted(live), maybe)
            assert b.count() == len(got)
            for n in got:
                e = b.get(fact_id(n))
                assert e is not None and e.content == f"crash fact {n} walrus{n}"
                assert np.array_equal(e.embedding, np.full(4, n + 1, np.float32) + np.arange(4))
                assert [h.op for h in b.history(fact_id(n))] == ["create"]
                assert b.search_text(f"walrus{n}", 3)[0][0] == fact_id(n)
            for n in set(range(12)) - got:
                assert b.get(fact_id(n)) is None and b.search_text(f"walrus{n}", 3) == []


def test_a_kill_at_any_step_of_the_commit_log_loses_nothing_acknowledged(tmp_path: Path) -> None:
    points = int(run(tmp_path, 0, 0).split("POINTS")[1].split()[0])
    assert points > 50  # (the story takes every kind of step: see the child)
    assert expected(lines_of(tmp_path, 0)) == ({2, 3, 4, 6, 7, 8, 9, 10, 11}, set())
    check(tmp_path / "k0.duckdb", lines_of(tmp_path, 0))
    run(tmp_path, 1, points)
    for k in range(1, points + 1):
        check(tmp_path / f"k{k}.duckdb", lines_of(tmp_path, k))


MEMORY_CHILD = r"""
import os, signal, sys
from umi import Memory
from umi.providers.sim import SimEmbeddingProvider

m = Memory(sys.argv[1], embedder=SimEmbeddingProvider(7, 16))
first = m.remember_sync("Alice works at Acme in Lisbon")
m.remember_sync("Bob likes chess and tea")
print("FORGOT", m.forget_sync(first.entities[0].id), flush=True)  # by key: the log moves in first
m.remember_sync("Carol lives in Porto")  # in the log only when the process dies
print("ACK", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_memory_killed_after_remember_forget_remember_keeps_each_and_stores_none_twice(tmp_path: Path) -> None:
    from child_process import child_env
    from umi import Memory
    from umi.providers.sim import SimEmbeddingProvider

    db = tmp_path / "m.duckdb"
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(db)], capture_output=True, text=True,
                          timeout=300, env=child_env(), cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL and "ACK" in proc.stdout, proc.stderr
    m = Memory(db, embedder=SimEmbeddingProvider(7, 16))
    try:
        store = m._engine.storage  # type: ignore[attr-defined]
        before = sorted((e.entity_type.value, e.name, e.content) for e in store.list())
        assert not any("Alice" in c for _, _, c in before)  # forgotten stays forgotten
        assert {c for _, _, c in before} == {"Bob likes chess and tea", "Carol lives in Porto"}
        for text in ("Bob likes chess and tea", "Carol lives in Porto"):  # remembered again: not stored twice
            m.remember_sync(text)
        assert sorted((e.entity_type.value, e.name, e.content) for e in store.list()) == before
    finally:
        m.close()
