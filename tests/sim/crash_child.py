"""Child process of tests/sim/test_crash.py: writes to a DuckDB store until it is killed.

Usage: ``python crash_child.py DB START MODE``. Opens the store (recovering whatever the
previous child left), prints ``READY <index_load_status>``, then runs transactions
forever. Before each one it prints ``TRY <json>`` (what the transaction will do) and,
after it commits, ``ACK <batch>``. Every line is flushed before the next step, so the
parent knows exactly which writes were acknowledged. ``MODE`` is ``write`` (commit
only), ``save`` (also save the vector index cache several times after every commit, so
most kills land inside index saves) or ``torn:N`` (save after every commit, and kill
itself with SIGKILL at the N-th ``os.fsync`` of an index save: deterministically inside
a save, before or after its rename).
"""

from __future__ import annotations

import json
import sys

import numpy as np

DIM = 16


def vector(batch: int, j: int) -> np.ndarray:
    return np.random.default_rng(batch * 10 + j).standard_normal(DIM).astype(np.float32)


def plan(batch: int, acked: list[list[str]]) -> dict:
    """What batch ``batch`` does: new entities, a relation and a supersession among them, a
    source, and every fifth batch the deletion of an entity of an earlier acknowledged batch."""
    n = 2 + batch % 2
    names = [f"b{batch}-{j}" for j in range(n)]
    delete = acked[-1][-1] if batch % 5 == 4 and acked else None
    return {"batch": batch, "names": names, "delete": delete}


def _kill_at_fsync(n: int) -> None:
    """Index saves fsync their temp file, rename it, then fsync the directory (DuckDB syncs in
    C++, not through os.fsync): the n-th call of an index save dies (the commit log's directory
    sync, when it starts its file, is not counted)."""
    import os
    import signal

    real = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        if sys._getframe(2).f_globals.get("__name__") == "umi.storage._commit_log":
            real(fd)
            return
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        real(fd)

    os.fsync = fsync  # type: ignore[assignment]


def say(line: str) -> None:
    """One line, one write: a kill never leaves half an acknowledgement that looks whole."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    path, start, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from umi.storage.base import Source
    from umi.storage.duckdb import DuckDBStorageBackend
    from umi.types import Entity, EvolutionRelation

    store = DuckDBStorageBackend.connect(path, dim=DIM)
    if mode.startswith("torn:"):
        _kill_at_fsync(int(mode[5:]))
    say(f"READY {store.index_load_status}")
    acked: list[list[str]] = []
    batch = start
    while True:
        p = plan(batch, acked)
        ents = [Entity("note", name, f"crash test fact {name} with words", embedding=vector(batch, j),
                       metadata={"batch": batch}, created_at=1_700_000_000_000 + batch)
                for j, name in enumerate(p["names"])]
        p["ids"] = [e.id for e in ents]
        say(f"TRY {json.dumps(p)}")
        with store.transaction():
            store.upsert(ents)
            store.add_relations([EvolutionRelation(ents[0].id, ents[1].id, "update",
                                                   created_at=1_700_000_000_000 + batch)])
            store.supersede(ents[0].id, 1_700_000_000_000 + batch + 1)
            store.add_source(Source.for_text(f"batch {batch}", 1_700_000_000_000 + batch))
            if p["delete"] is not None:
                store.delete(p["delete"], at=1_700_000_000_000 + batch)
        say(f"ACK {batch}")
        if mode == "save":
            for _ in range(5):  # most of the time goes to saving: kills land inside saves
                store.save_index()
        elif mode.startswith("torn:"):
            store.save_index()
        acked.append(p["ids"])
        batch += 1


if __name__ == "__main__":
    main()
