"""Fork server for tests/sim/test_crash_memory.py: Memory-level work, killed with SIGKILL.

``python crash_memory_child.py`` imports umi once, then reads commands from stdin::

    RUN <db> <mode> <start> <kill_at> <log>

and for each forks a worker that opens ``db`` and works until it dies, answering
``PID <pid>`` at once and ``EXIT <status>`` when the worker is gone. Forking after the
imports (no thread and no database is open in the server) makes a kill point cost
milliseconds instead of a Python start-up.

Modes: ``memory`` — remember (one text), remember_many (when the API has it), forget of an
acknowledged fact, core-block writes (when the store persists them) and index saves, on a
``umi.Memory`` over DuckDB; ``import`` — ``umi import FILE`` through the CLI's main().

``kill_at``: ``N > 0`` — the worker kills itself (SIGKILL) at its N-th crash point (before
or after a storage write, a transaction commit or an index save); ``-N`` — at the N-th
``os.fsync`` (inside an index save, before or after its rename); ``0`` — never: the parent
kills it at a random moment. Every line the worker logs (``TRY``/``ACK`` …) is one
``os.write`` on an ``O_APPEND`` file, so a kill never leaves half a line that looks whole.
"""

from __future__ import annotations

import json
import os
import signal
import sys

DIM = 16
PEOPLE = ["Alice", "Bob", "Carol", "Dan", "Eve"]
ORGS = ["Acme", "Initech", "Globex"]


def text_for(i: int) -> str:
    p, o = PEOPLE[i % 5], ORGS[i % 3]
    return [f"{p} works at {o} in year {i}", f"{p} lives in City{i}", f"{p} left {o} and now works at Org{i}",
            f"{p} likes topic{i} and sport{i}"][i % 4]


def import_file_lines(n: int = 40) -> list[str]:
    return [json.dumps({"text": text_for(500_000 + i)}) for i in range(n)]


class KillAt:
    """Stands in for a FaultInjector: the N-th crash point kills the process for real."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0

    def should_fail(self, fault: object) -> bool:
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        return False


def _kill_at_fsync(n: int) -> None:
    real = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        real(fd)

    os.fsync = fsync  # type: ignore[assignment]


def statement_of(storage: object, target: str) -> list[str]:
    """The ids ``forget(target)`` removes: the facts sharing its source and normalised content."""
    from umi.pipeline.remember import normalize_content

    e = storage.get(target)  # type: ignore[attr-defined]
    if e is None:
        return []
    if e.source_id is None:
        return [e.id]
    key = normalize_content(e.content)
    facets = storage.get_many(storage.entity_ids_for_source(e.source_id))  # type: ignore[attr-defined]
    return sorted({e.id, *(f.id for f in facets if normalize_content(f.content) == key)})


def worker(db: str, mode: str, start: int, kill_at: int, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def say(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    from umi.sim.world import install_crash_points

    if kill_at < 0:
        _kill_at_fsync(-kill_at)
    killer = KillAt(kill_at) if kill_at > 0 else None

    if mode == "import":
        import io

        import umi.cli as cli
        from umi.providers.sim import SimEmbeddingProvider

        real_memory = cli._memory

        def memory(path: str, *a, **k):  # type: ignore[no-untyped-def]
            from umi.memory import Memory

            m = Memory(path, embedder=SimEmbeddingProvider(7, DIM))
            if killer is not None:
                install_crash_points(m.storage, killer)  # type: ignore[arg-type]
            return m

        cli._memory = memory  # the CLI's own path, with the Sim embedder and crash points
        say("READY")
        say(f"TRY import {start}")
        code = cli.main(["import", f"{db}.jsonl", "--db", db, "--quiet"], out=io.StringIO())
        say(f"ACK import {start} {code}")
        del real_memory
        return

    from umi.memory import Memory
    from umi.providers.sim import SimEmbeddingProvider

    m = Memory(db, embedder=SimEmbeddingProvider(7, DIM))
    if killer is not None:
        install_crash_points(m.storage, killer)  # type: ignore[arg-type]
    has_many = callable(getattr(m, "remember_many_sync", None))
    core_persisted = callable(getattr(m.storage, "set_core_block", None))
    say("READY")
    # Each run starts with a forget (a fact the store holds), so kill points land in forgets
    # as often as in remembers; later forgets take facts this run acknowledged.
    acked: list[str] = sorted(e.id for e in m.storage.list(limit=5))[:1]
    i = start
    while True:
        if acked and (i == start or i % 4 == 3):
            target = acked.pop(0)
            # forget removes the target's whole statement: every fact with its source and
            # normalised content (the facets of one sentence); the parent needs them all
            say(f"TRY forget {i} {target} {','.join(statement_of(m.storage, target)) or target}")
            if os.environ.get("UMI_CRASH_SABOTAGE") == "ack-forget-early":
                say(f"ACK forget {i} {target} 1")  # a lie: acknowledged before it is done
            ok = m.forget_sync(target)
            say(f"ACK forget {i} {target} {int(ok)}")
        if has_many and i % 7 == 6:
            texts = [text_for(i), text_for(i + 100_000)]
            say(f"TRY many {i} {json.dumps(texts)}")
            rs = m.remember_many_sync(texts)
            ids = [e.id for r in rs for e in r.entities]
            say(f"ACK many {i} {json.dumps(ids)}")
        else:
            say(f"TRY remember {i} {json.dumps(text_for(i))}")
            r = m.remember_sync(text_for(i))
            ids = [e.id for e in r.entities]
            say(f"ACK remember {i} {json.dumps(ids)}")
        acked += ids
        if core_persisted and i % 5 == 4:
            label, content = f"b{i % 3}", f"core {i}"
            say(f"TRY core {i} {label} {content}")
            m.core.set_block(label, content)
            say(f"ACK core {i} {label} {content}")
        if i % 3 == 2:
            say(f"TRY save {i}")
            m.storage.save_index()
            say(f"ACK save {i}")
        i += 1


def main() -> None:
    # Everything the workers need, imported once, before any fork; nothing opened.
    import umi.cli  # noqa: F401
    import umi.memory  # noqa: F401
    import umi.providers.sim  # noqa: F401
    import umi.sim.world  # noqa: F401
    import umi.storage.duckdb  # noqa: F401
    from umi.memory import Memory

    # Compile the numba kernels once, here, on the Sim store (no DuckDB, and every thread of
    # the warm-up Memory is gone before the first fork), so no worker pays for it.
    with Memory.sim(seed=1, dim=DIM) as m:
        for i in range(3):
            m.remember_sync(text_for(i))
        m.recall_sync("Alice")
        m.forget_sync(m.storage.list()[0].id)

    out = sys.stdout
    out.write("SERVING\n")
    out.flush()
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] != "RUN":
            continue
        db, mode, start, kill_at, log = parts[1], parts[2], int(parts[3]), int(parts[4]), parts[5]
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                worker(db, mode, start, kill_at, log)
            except BaseException as exc:  # noqa: BLE001 - reported through the log
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(fd, f"ERROR {type(exc).__name__}: {exc}\n".encode()[:2000])
                code = 3
            finally:
                os._exit(code)
        out.write(f"PID {pid}\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(f"EXIT {status}\n")
        out.flush()


if __name__ == "__main__":
    main()
