"""Smoke test for an installed umi wheel (run by cibuildwheel's test-command, or by hand).

    python wheels/test_wheel.py

Checks that umi imports from this interpreter's site-packages (not from a source
tree), that ``import umi`` loads no heavy dependency, that the arenas are a compiled
extension module, that the stubs and py.typed ship, exercises both arenas briefly, and
runs one remember/recall through the Sim memory (numba kernels) and through a DuckDB
file (duckdb + pyarrow), so the wheel's declared dependencies are proven to work with
it. Exits non-zero on the first failure.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import tempfile
from pathlib import Path

HEAVY = ("duckdb", "pyarrow", "numba")


def main() -> int:
    # Never test the source tree by accident: drop the script's directory and
    # the working directory from the import path.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() not in (here, here.parent)]

    import umi

    where = Path(umi.__file__).resolve()
    assert where.is_relative_to(Path(sys.prefix).resolve()), (
        f"umi imported from {where}, not from this environment ({sys.prefix})")
    assert "site-packages" in where.parts, f"umi not installed: {where}"
    eager = [m for m in HEAVY if m in sys.modules]
    assert not eager, f"import umi loaded {eager}"

    import umi._native
    from umi._native import _arena

    native = Path(_arena.__file__)
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    assert native.name.endswith(suffixes), f"not a compiled extension: {native}"
    assert native.suffix in (".so", ".pyd"), native
    package_dir = Path(umi._native.__file__).parent
    assert (package_dir / "_arena.pyi").is_file(), "stub _arena.pyi missing from the wheel"
    assert (Path(umi.__file__).parent / "py.typed").is_file(), "py.typed missing from the wheel"

    # CoreMemory: budget, order, escaping.
    core = umi.CoreMemory(max_bytes=1024)
    core.set_block("notes", "a < b & c")
    core.set_block("system", "You are helpful.")
    assert core.labels() == ["system", "notes"]
    xml = core.render()
    assert "a &lt; b &amp; c" in xml and xml.startswith("<core_memory>"), xml
    try:
        core.set_block("big", "x" * 2000)
    except umi.CoreMemoryFullError as err:
        assert err.limit == 1024
    else:
        raise AssertionError("CoreMemoryFullError not raised")

    # WorkingMemory: values, TTL on a fake clock, eviction.
    now = [100.0]
    wm = umi.WorkingMemory(max_entries=2, on_full="evict_lru", clock=lambda: now[0])
    wm.set("a", b"1", ttl_secs=5)
    wm.set("b", b"2")
    assert wm.get("a") == b"1"
    wm.set("c", b"3")  # evicts b, the least recently used
    assert wm.keys() == ["a", "c"], wm.keys()
    now[0] += 5
    assert wm.get("a") is None
    assert wm.incr("n", 41) == 41 and wm.incr("n") == 42

    # The default clock path (C monotonic clock).
    wm2 = umi.WorkingMemory()
    wm2.set("k", b"v")
    assert wm2.get("k") == b"v"

    # Archival memory, in memory (Sim providers, numba kernels) and on a DuckDB file.
    with umi.Memory.sim(seed=7) as memory:
        memory.remember_sync("Alice is a software engineer at Acme Corp.")
        hits = memory.recall_sync("Where does Alice work?")
        assert any("Acme" in e.content for e in hits), hits
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "smoke.duckdb")
        storage = umi.DuckDBStorageBackend.connect(db)
        built = (umi.MemoryBuilder().with_storage(storage)
                 .with_embedder(umi.SimEmbeddingProvider()).build())
        with built as memory:
            memory.remember_sync("Bob lives in Berlin.")
            assert memory.count_sync() >= 1
            assert any("Berlin" in e.content for e in memory.recall_sync("Who lives in Berlin?"))
    assert all(m in sys.modules for m in HEAVY), "the memory ran without its dependencies?"

    print(f"installed umi {umi.__version__} OK: {native.name} ({os.path.dirname(native)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
