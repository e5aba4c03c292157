"""kill -9 at Memory level: remember, remember_many, forget, core-block writes, index saves and
``umi import``, with ``KILL_POINTS`` kills in CI (crash_memory_child.py forks the workers).

Two chains, each on its own DuckDB file, each restarted after every kill (the next worker
recovers what the last one left):

* ``memory`` — a Memory remembering, forgetting, writing core blocks (when the store
  persists them) and saving its index. Kills: at the N-th crash point of the run (before or
  after any storage write, transaction commit or index save — N seeded), at the N-th fsync
  of an index save, or at a random moment chosen by the parent.
* ``import`` — ``umi import`` of a 40-line file through the CLI, killed the same ways, then
  re-run to completion: the end state equals a clean import of the same file.

After every kill the store is opened read-only and checked: every acknowledged fact is there
(unless an acknowledged forget removed it) and every acknowledged forget holds; the write in
flight is whole or absent (its facts and source together, with history); nothing is stored
that no call wrote; every fact has history and its source; relations' ends exist; the vector
index holds exactly the stored vectors.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from umi.errors import StorageError
from umi.storage.base import SearchFilters, source_id_for
from umi.storage.duckdb import DuckDBStorageBackend

HERE = Path(__file__).resolve().parent
CHILD = HERE / "crash_memory_child.py"
SEED = 20261130
MEMORY_KILLS = 50
IMPORT_KILLS = 20
KILL_POINTS = MEMORY_KILLS + IMPORT_KILLS
EVERY = SearchFilters(include_superseded=True)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="SIGKILL and fork are POSIX")

sys.path.insert(0, str(HERE))
from crash_memory_child import import_file_lines, text_for  # noqa: E402
from child_process import child_env  # noqa: E402


class Server:
    def __init__(self, **extra_env: str) -> None:
        env = {**child_env(), **extra_env}
        self.proc = subprocess.Popen([sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, bufsize=1)
        assert self._line() == "SERVING"

    def _line(self) -> str:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the fork server died (exit {self.proc.poll()})")
        return line.strip()

    def run(self, db: Path, mode: str, start: int, kill_at: int, log: Path, rng: random.Random) -> int:
        """One worker; returns its wait status. kill_at == 0: kill it at a random moment."""
        self.proc.stdin.write(f"RUN {db} {mode} {start} {kill_at} {log}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        word, pid = self._line().split()
        assert word == "PID"
        if kill_at == 0:
            deadline = time.monotonic() + 30
            while "READY" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.2))
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:  # pragma: no cover - finished first (import)
                pass
        guard = threading.Timer(60, lambda: _kill_quietly(int(pid)))  # a hung worker
        guard.start()
        try:
            word, status = self._line().split()
        finally:
            guard.cancel()
        assert word == "EXIT"
        return int(status)

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(10)
        self.proc.stdout.close()  # type: ignore[union-attr]


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Chain:
    def __init__(self, path: Path, mode: str, rng: random.Random) -> None:
        self.path, self.mode, self.rng = path, mode, rng
        self.log = path.with_suffix(".log")
        self.alive: set[str] = set()  # facts an acknowledged (or durable in-doubt) write stored
        self.gone: set[str] = set()  # facts an acknowledged forget removed
        self.doubt_texts: list[str] = []
        self.doubt_forgets: list[set[str]] = []  # statements a forget in flight at a kill removes
        self.core: dict[str, set[str]] = {}  # label -> contents it may hold
        self.errors: list[str] = []
        self.kills = 0
        self.kinds: dict[str, int] = {}
        self.start = 0
        self.consumed = 0

    def plan(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randint(1, 30 if self.mode == "memory" else 60)
        if r < 0.7 and self.mode == "memory":
            return -self.rng.randint(1, 6)
        return 0

    def once(self, server: Server) -> None:
        kill_at = self.plan()
        self.kinds[("point" if kill_at > 0 else "fsync" if kill_at < 0 else "random")] = \
            self.kinds.get("point" if kill_at > 0 else "fsync" if kill_at < 0 else "random", 0) + 1
        self.start += 1000
        status = server.run(self.path, self.mode, self.start, kill_at, self.log, self.rng)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        finished = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and self.mode == "import"
        if not (killed or finished):
            tail = self.log.read_text()[-1500:] if self.log.exists() else ""
            self.errors.append(f"worker ended with status {status}: {tail}")
        self.kills += killed
        self.absorb()
        self.verify()

    def absorb(self) -> None:
        lines = self.log.read_text().splitlines(keepends=True) if self.log.exists() else []
        fresh, self.consumed = lines[self.consumed:], len(lines)
        tried: dict[tuple[str, str], list[str]] = {}
        for line in fresh:
            if not line.endswith("\n"):
                continue
            parts = line.rstrip("\n").split(" ", 3)
            word = parts[0]
            if word == "ERROR":
                self.errors.append(line.strip())
            if word not in ("TRY", "ACK"):
                continue
            kind, i = parts[1], parts[2]
            rest = parts[3] if len(parts) > 3 else ""
            if word == "TRY":
                tried[(kind, i)] = rest.split(" ") if kind in ("forget", "core") else [rest]
                continue
            entry = tried.pop((kind, i), None)
            if kind in ("remember", "many"):
                ids = json.loads(rest)
                self.alive |= set(ids)
                self.gone -= set(ids)
            elif kind == "forget":
                target, ok = rest.split(" ")
                if ok == "1":  # the whole statement (its facets, logged with the TRY) is gone
                    facets = set(entry[1].split(",")) if entry and len(entry) > 1 else {target}
                    self.alive -= facets
                    self.gone |= facets
            elif kind == "core":
                label, content = rest.split(" ", 1)
                self.core[label] = {content}
        for (kind, i), rest in tried.items():  # in flight at the kill: whole or absent
            if kind == "remember":
                self.doubt_texts.append(json.loads(rest[0]))
            elif kind == "many":
                self.doubt_texts.extend(json.loads(rest[0]))
            elif kind == "forget":  # whole or absent: decided at the next verify
                facets = set(rest[1].split(",")) if len(rest) > 1 else {rest[0]}
                self.doubt_forgets.append(facets)
                self.alive -= facets
            elif kind == "core":
                self.core.setdefault(rest[0], set()).add(" ".join(rest[1:]))

    def verify(self) -> None:
        try:
            store = DuckDBStorageBackend.connect(self.path, read_only=True)
        except StorageError as exc:
            if self.alive:
                self.errors.append(f"cannot open the store after a kill: {exc}")
            return
        with store:
            ents = {e.id: e for e in store.iter_all()}
            for facets in self.doubt_forgets:  # a forget cut by the kill: all of it or none
                there = facets & set(ents)
                if there == facets:
                    self.alive |= facets  # not done: durable, must never vanish
                elif not there:
                    self.gone |= facets
                else:
                    self.errors.append(f"a forget in flight removed {sorted(facets - there)} but kept {sorted(there)}")
            self.doubt_forgets = []
            for i in sorted(self.alive - set(ents)):
                self.errors.append(f"acknowledged fact {i} is lost")
            # an acknowledged forget holds, unless a later write stored the fact again
            doubt_sources = {source_id_for(t) for t in self.doubt_texts}
            file_sources = {source_id_for(json.loads(x)["text"]) for x in import_file_lines()}
            for i, e in ents.items():
                if i in self.gone and e.source_id not in doubt_sources:
                    self.errors.append(f"forgotten fact {i} is back")
                if i not in self.alive and e.source_id not in doubt_sources and e.source_id not in file_sources:
                    self.errors.append(f"fact {i} ({e.content!r}) was written by no call")
                if not store.history(i):
                    self.errors.append(f"fact {i} has no history")
                if e.source_id is None or store.get_source(e.source_id) is None:
                    self.errors.append(f"fact {i} has no stored source")
                for r in store.relations_for(i):
                    for end in (r.source_id, r.target_id):
                        if end not in ents and end not in self.gone:
                            self.errors.append(f"relation {r.id} has an end that is not stored")
            # the write in flight: its facts come with their source, all or nothing
            for t in self.doubt_texts:
                sid = source_id_for(t)
                has_source = store.get_source(sid) is not None
                mine = [i for i, e in ents.items() if e.source_id == sid]
                if mine and not has_source:
                    self.errors.append(f"facts of {t!r} are stored without their source")
                if has_source:  # durable now: must never vanish
                    self.alive |= {i for i in mine if i not in self.gone}
            with_vec = {i for i, e in ents.items() if e.embedding is not None}
            if with_vec:
                hits = store.search_vector(np.ones(16, np.float32), len(with_vec) + 10, EVERY)
                if sorted(i for i, _ in hits) != sorted(with_vec):
                    self.errors.append("the vector index does not hold exactly the stored vectors")
            core_blocks = getattr(store, "core_blocks", None)
            if callable(core_blocks) and self.core:
                from umi.types import Scope  # type: ignore[attr-defined]

                have = {b.name: b.content for b in core_blocks(Scope())}
                for label, allowed in self.core.items():
                    if len(allowed) == 1 and have.get(label) not in allowed:
                        self.errors.append(f"acknowledged core block {label!r} is lost")


def _reference_import(tmp: Path) -> set[tuple[str, bool]]:
    import io

    import umi.cli as cli
    from umi.memory import Memory
    from umi.providers.sim import SimEmbeddingProvider

    db = tmp / "reference.duckdb"
    Path(f"{db}.jsonl").write_text("\n".join(import_file_lines()) + "\n")
    real = cli._memory
    cli._memory = lambda path, *a, **k: Memory(path, embedder=SimEmbeddingProvider(7, 16))  # type: ignore[assignment]
    try:
        assert cli.main(["import", f"{db}.jsonl", "--db", str(db), "--quiet"], out=io.StringIO()) == 0
    finally:
        cli._memory = real
    with DuckDBStorageBackend.connect(db, read_only=True) as s:
        return {(e.id, e.valid_to is None) for e in s.iter_all()}


def test_kill_9_at_memory_level_never_loses_an_acknowledged_write(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    mem_chain = Chain(tmp_path / "mem.duckdb", "memory", random.Random(rng.random()))
    imp_chain = Chain(tmp_path / "imp.duckdb", "import", random.Random(rng.random()))
    Path(f"{imp_chain.path}.jsonl").write_text("\n".join(import_file_lines()) + "\n")
    started = time.monotonic()
    failures: list[str] = []

    def memory_chain() -> None:
        server = Server()
        try:
            for _ in range(MEMORY_KILLS):
                mem_chain.once(server)
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"memory chain: {type(exc).__name__}: {exc}")
        finally:
            server.close()

    def import_chain() -> None:
        server = Server()
        try:
            runs = 0
            while imp_chain.kills < IMPORT_KILLS and runs < IMPORT_KILLS * 3:
                runs += 1
                imp_chain.once(server)
                if imp_chain.log.exists() and "ACK import" in imp_chain.log.read_text().splitlines()[-1]:
                    imp_chain.path.unlink()  # the import finished: start the file over
                    for extra in imp_chain.path.parent.glob(imp_chain.path.name + ".*"):
                        if not extra.name.endswith(".jsonl"):
                            extra.unlink()
            # the last import is re-run to completion: the same end state as a clean import
            final = server.run(imp_chain.path, "import", 0, 10**9, imp_chain.log, rng)
            if not (os.WIFEXITED(final) and os.WEXITSTATUS(final) == 0):
                failures.append(f"the final import ended with status {final}")
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"import chain: {type(exc).__name__}: {exc}")
        finally:
            server.close()

    threads = [threading.Thread(target=memory_chain), threading.Thread(target=import_chain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    elapsed = time.monotonic() - started
    for c in (mem_chain, imp_chain):
        assert c.errors == [], (c.mode, c.errors[:5])
    assert mem_chain.kills == MEMORY_KILLS
    assert imp_chain.kills == IMPORT_KILLS
    with DuckDBStorageBackend.connect(imp_chain.path, read_only=True) as s:
        got = {(e.id, e.valid_to is None) for e in s.iter_all()}
    assert got == _reference_import(tmp_path)
    # not a vacuous run: acknowledged facts survived the kills (how many depends on how far each worker
    # got before a random-moment kill, so on the machine's load: 17-60 seen)
    assert len(mem_chain.alive) > 10
    print(f"\nkill -9: {mem_chain.kills + imp_chain.kills} kills in {elapsed:.1f} s; "
          f"memory chain {mem_chain.kinds}, import chain {imp_chain.kinds}")


@pytest.mark.slow
def test_the_crash_check_catches_an_acknowledgement_sent_too_early(tmp_path: Path) -> None:
    """Proof that the checks can fail: the worker acknowledges each forget before doing it,
    so a kill inside the forget leaves an 'acknowledged' forget undone."""
    chain = Chain(tmp_path / "sab.duckdb", "memory", random.Random(5))
    server = Server(UMI_CRASH_SABOTAGE="ack-forget-early")
    try:
        for _ in range(60):
            chain.once(server)
            if chain.errors:
                break
    finally:
        server.close()
    assert any("forgotten fact" in e and "is back" in e for e in chain.errors), chain.errors[:3]
