"""Crash test: SIGKILL a process writing to a DuckDB store at random (seeded) moments.

Three chains run side by side, each on its own file; every chain restarts its child
(``crash_child.py``) ten times, so each child first recovers what the previous one left
(index cache behind, torn, or never saved). One chain saves the index after every
commit, so kills land inside index saves, and every other child of that chain kills
itself at a seeded ``os.fsync`` of an index save (before or after its rename); one kill
in five comes at a random moment of start-up (opening, catching up, rebuilding) instead
of during writes.

After every kill the store is opened read-only and checked:

* every acknowledged transaction is there in full (entities with their exact vectors,
  supersession, relation, source, deletion);
* the one transaction in flight at the kill is there in full or not at all;
* nothing else is: no unknown entity, and every entity has its history rows, postings
  and metadata rows, and the store opens at the last generation history mentions;
* vector search agrees with storage: every stored vector finds its own entity first and
  a search over everything returns exactly the stored entities with vectors (no phantoms).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from umi.errors import StorageError
from umi.storage.base import SearchFilters, source_id_for
from umi.storage.duckdb import DuckDBStorageBackend
from child_process import child_env

HERE = Path(__file__).resolve().parent
CHILD = HERE / "crash_child.py"
SEED = 20261123
CHAINS = 3
KILLS_PER_CHAIN = 10
DIM = 16

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


def _vector(batch: int, j: int) -> np.ndarray:
    return np.random.default_rng(batch * 10 + j).standard_normal(DIM).astype(np.float32)


class Chain:
    """One database file, killed and restarted ``KILLS_PER_CHAIN`` times."""

    def __init__(self, index: int, path: Path, mode: str) -> None:
        self.index = index
        self.path = path
        self.mode = mode
        self.rng = random.Random(SEED * 10 + index)
        self.acked: list[dict] = []  # acknowledged transactions, in order
        self.in_doubt: list[dict] = []  # tried, not acknowledged (killed in flight)
        self.statuses: list[str] = []
        self.errors: list[str] = []
        self.kills = 0
        self.torn_saves = 0

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(f"chain crashed: {type(exc).__name__}: {exc}")

    def _run(self) -> None:
        env = child_env()
        for restart in range(KILLS_PER_CHAIN):
            start = (restart + 1) * 100_000 + self.index * 10_000_000
            mode = self.mode
            torn = mode == "save" and restart % 2 == 1
            if torn:  # the child kills itself inside an index save
                mode = f"torn:{self.rng.randint(1, 12)}"
            with subprocess.Popen([sys.executable, str(CHILD), str(self.path), str(start), mode],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as child:
                lines: list[str] = []
                reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)  # type: ignore[arg-type]
                reader.start()
                during_startup = self.rng.random() < 0.2
                if torn:
                    try:
                        child.wait(timeout=60)
                    except subprocess.TimeoutExpired:  # pragma: no cover - a hung child
                        pass
                elif during_startup:
                    time.sleep(self.rng.uniform(0.0, 1.5))
                else:
                    deadline = time.monotonic() + 60
                    while not any(line.startswith("READY") for line in lines) and child.poll() is None:
                        if time.monotonic() > deadline:  # pragma: no cover - a hung child
                            break
                        time.sleep(0.005)
                    time.sleep(self.rng.uniform(0.0, 0.6))
                child.send_signal(signal.SIGKILL)
                child.wait()
                reader.join()
                err = child.stderr.read() if child.stderr else ""
                if child.returncode != -signal.SIGKILL:
                    self.errors.append(f"child exited with {child.returncode}: {err[-2000:]}")
                self.kills += 1
                if torn and mode.endswith(("1", "3", "5", "7", "9", "11")):  # died before a rename
                    self.torn_saves += any(p.name.endswith(".tmp") for p in self.path.parent.iterdir())
            self._absorb(lines)
            self.verify()
        # the next writer cleans up what the kills left (temp files of torn index saves)
        DuckDBStorageBackend.connect(self.path).close()
        leftovers = sorted(p.name for p in self.path.parent.iterdir()
                           if p.name.startswith(f".{self.path.name}") and p.name.endswith(".tmp"))
        if leftovers:
            self.errors.append(f"temp files left behind: {leftovers}")
        with DuckDBStorageBackend.connect(self.path, read_only=True) as store:
            if store.index_load_status != "loaded":
                self.errors.append(f"index not loaded after a clean close: {store.index_load_status}")

    def _absorb(self, lines: list[str]) -> None:
        tried: dict[int, dict] = {}
        for line in lines:
            if not line.endswith("\n"):
                continue  # cut short by the kill: not an acknowledgement
            word, _, rest = line.strip().partition(" ")
            if word == "READY":
                self.statuses.append(rest)
            elif word == "TRY":
                p = json.loads(rest)
                tried[p["batch"]] = p
            elif word == "ACK":
                self.acked.append(tried.pop(int(rest)))
        self.in_doubt.extend(tried.values())

    # --- checks ------------------------------------------------------------------------
    def _committed(self, store: DuckDBStorageBackend, p: dict, deleted: set[str]) -> bool | None:
        """True/False when the transaction is wholly there / wholly absent; None when torn.
        ``deleted``: entities a later committed batch deleted — deleting (forgetting) an entity
        also removes every relation it is an end of, so the relation of a batch whose second
        entity was deleted since is gone with it, by contract."""
        a, b = p["ids"][0], p["ids"][1]
        first = store.get(a)
        parts = [
            first is not None and first.valid_to is not None,
            store.get_source(source_id_for(f"batch {p['batch']}")) is not None,
            len(store.history(a)) >= 2,
        ]
        if b not in deleted:
            parts.append(any(r.source_id == a and r.target_id == b for r in store.relations_for(b)))
        parts += [len(store.history(i)) >= 1 for i in p["ids"]]
        if all(parts):
            return True
        if not any(parts):
            return False
        return None

    def verify(self) -> None:
        try:
            store = DuckDBStorageBackend.connect(self.path, read_only=True)
        except StorageError as exc:
            # killed while the very first child was still creating the file: nothing was acknowledged
            if self.acked:
                self.errors.append(f"cannot open the store after a kill: {exc}")
            return
        with store:
            expect_present: dict[str, tuple[int, int]] = {}
            deleted: set[str] = {p["delete"] for p in self.acked if p["delete"]}
            allowed: set[str] = set()
            for p in self.in_doubt:  # a batch in doubt deletes only from its own child's batches
                state = self._committed(store, p, deleted)
                if state is None:
                    self.errors.append(f"batch {p['batch']} was half written")
                allowed.update(p["ids"])
                if state and p["delete"]:
                    deleted.add(p["delete"])
            for p in self.acked:
                if self._committed(store, p, deleted) is not True:
                    self.errors.append(f"acknowledged batch {p['batch']} is not wholly there")
                for j, i in enumerate(p["ids"]):
                    expect_present[i] = (p["batch"], j)
            allowed |= set(expect_present)
            every = SearchFilters(include_superseded=True)
            stored = {e.id: e for e in store.iter_all()}
            for i, (batch, j) in expect_present.items():
                if i in deleted:
                    continue
                e = stored.get(i)
                if e is None or e.embedding is None or not np.array_equal(e.embedding, _vector(batch, j)):
                    self.errors.append(f"acknowledged entity {i} (batch {batch}) is missing or changed")
            for i in deleted:
                if i in stored:
                    self.errors.append(f"deleted entity {i} is still there")
            for r in store.iter_relations():  # a delete removes the relations of what it removed
                if r.source_id not in stored or r.target_id not in stored:
                    self.errors.append(f"relation {r.id} has an end that is not stored")
            unknown = set(stored) - allowed
            if unknown:
                self.errors.append(f"{len(unknown)} entities nobody wrote: {sorted(unknown)[:3]}")
            with_vec = {i for i, e in stored.items() if e.embedding is not None}
            if with_vec:
                hits = store.search_vector(np.ones(DIM, np.float32), 10_000, every)
                if {i for i, _ in hits} != with_vec or len(hits) != len(with_vec):
                    self.errors.append("vector search does not return exactly the stored vectors")
                for i in sorted(with_vec):
                    top = store.search_vector(stored[i].embedding, 1, every)  # type: ignore[arg-type]
                    if not top or top[0][0] != i:
                        self.errors.append(f"the vector of {i} does not find it")
            self.statuses.append(f"reader:{store.index_load_status}")
            generation = store.generation
        self._check_rows(generation)

    def _check_rows(self, generation: int) -> None:
        con = duckdb.connect(str(self.path), read_only=True)
        try:
            q = {
                "entities without history": "SELECT count(*) FROM entities e WHERE NOT EXISTS "
                                            "(SELECT 1 FROM history h WHERE h.entity_id = e.id)",
                "entities whose postings do not add up": "SELECT count(*) FROM entities e WHERE doc_len <> "
                    "(SELECT coalesce(sum(tf), 0) FROM postings p WHERE p.entity_id = e.id)",
                "postings of missing entities": "SELECT count(*) FROM postings p WHERE NOT EXISTS "
                                                "(SELECT 1 FROM entities e WHERE e.id = p.entity_id)",
                "entities without metadata rows": "SELECT count(*) FROM entities e WHERE NOT EXISTS "
                                                  "(SELECT 1 FROM entity_metadata m WHERE m.entity_id = e.id)",
            }
            for what, sql in q.items():
                n = con.execute(sql).fetchall()[0][0]
                if n:
                    self.errors.append(f"{n} {what}")
            # every commit here writes history, so the store opens at the last generation history
            # mentions: in the file, or in an entry of the commit log a read_only open leaves there
            from umi.storage._commit_log import LOG_SUFFIX, read_log

            last = con.execute("SELECT coalesce(max(generation), 0) FROM history").fetchall()[0][0]
            uuid = con.execute("SELECT db_uuid FROM umi_state").fetchall()[0][0]
            last = max([last, *(g for g, _, _ in read_log(str(self.path) + LOG_SUFFIX, uuid)[0])])
            if generation != last:
                self.errors.append(f"the store opened at generation {generation}, history's last is {last}")
        finally:
            con.close()


def test_sigkill_never_loses_an_acknowledged_write(tmp_path: Path) -> None:
    chains = [Chain(i, tmp_path / f"crash{i}.duckdb", "save" if i % 2 else "write") for i in range(CHAINS)]
    threads = [threading.Thread(target=c.run) for c in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in chains:
        assert c.errors == [], (c.index, c.mode, c.errors[:5])
    assert sum(c.kills for c in chains) == CHAINS * KILLS_PER_CHAIN >= 30
    assert sum(len(c.acked) for c in chains) > 0
    assert sum(c.torn_saves for c in chains) > 0  # some kills did leave an index save half done
    statuses = {s for c in chains for s in c.statuses}
    assert statuses <= {"loaded", "caught_up", "rebuilt", "reader:loaded", "reader:caught_up", "reader:rebuilt"}
