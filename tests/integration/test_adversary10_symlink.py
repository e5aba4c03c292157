"""Adversary 10: a DuckDB store opened through a symlink.

DuckDB resolves a symlink and keeps its write-ahead log beside the real file; umi named the files
it keeps beside the database (the commit log ``.umilog``, the index caches, a compact's copy) from
the path as given. So, with ``link.duckdb -> real.duckdb``:

- a crash with commits in the log left ``link.duckdb.umilog``; an open by the file's own name did
  not see those acknowledged commits, and once it had written commits of its own, an open through
  the link again applied the log's tail on top of them (its generations happened to follow) and
  dropped the rest as "already in the tables": facts told and acknowledged, lost for good;
- ``compact()`` renamed its new copy over the *symlink*: the real file kept the forgotten text,
  and the link was a link no more.

Now every such file is named from the real path, as DuckDB names its WAL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from umi.storage.duckdb import DuckDBStorageBackend

from child_process import child_env
from logged_store import fact

CHILD = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from logged_store import fact
from umi.storage.duckdb import DuckDBStorageBackend

b = DuckDBStorageBackend.connect(sys.argv[1], dim=4)
for i in range(3):
    b.upsert([fact(i, "symlink")])  # journaled: in the commit log only
    print("ACK", i, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def names(path: Path) -> list[str]:
    with DuckDBStorageBackend.connect(path, dim=4) as b:
        return sorted(e.name for e in b.list())


def test_commits_a_crash_left_through_a_symlink_are_found_by_the_files_own_name(tmp_path: Path) -> None:
    real, link = tmp_path / "real.duckdb", tmp_path / "link.duckdb"
    with DuckDBStorageBackend.connect(real, dim=4) as b:
        b.upsert([fact(100, "symlink")])
    link.symlink_to(real.name)
    p = subprocess.run([sys.executable, "-c", CHILD, str(link), str(Path(__file__).resolve().parent.parent)],
                       cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-400:]
    assert p.stdout.split().count("ACK") == 3
    assert names(real) == ["n0", "n1", "n100", "n2"]  # every acknowledged commit, by the file's own name
    with DuckDBStorageBackend.connect(real, dim=4) as b:
        b.upsert([fact(7, "symlink")])
    assert names(link) == ["n0", "n1", "n100", "n2", "n7"]  # and through the link: the same store
    assert sorted(os.listdir(tmp_path)) == ["link.duckdb", "real.duckdb", "real.duckdb.umiidx",
                                            "real.duckdb.umiterms"]


def test_compact_through_a_symlink_rewrites_the_real_file_and_keeps_the_link(tmp_path: Path) -> None:
    real, link = tmp_path / "real.duckdb", tmp_path / "link.duckdb"
    link.symlink_to(real.name)
    with DuckDBStorageBackend.connect(link, dim=4) as b:
        b.upsert([fact(1, "symlink"), fact(2, "zebraforgotten")])
        b.checkpoint()
        gone = [e.id for e in b.list() if "zebraforgotten" in e.content]
        assert b.delete(gone[0])
        assert b.compact()
        b.upsert([fact(3, "symlink")])
    assert link.is_symlink() and os.readlink(link) == real.name
    assert b"zebraforgotten" not in real.read_bytes()  # forgotten from the file the link names
    assert names(real) == ["n1", "n3"] and names(link) == ["n1", "n3"]
