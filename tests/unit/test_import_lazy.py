"""``import umi`` is cheap: DuckDB, pyarrow and numba load when first used, not at import.

Each check runs in a fresh interpreter (this process has imported everything already).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import sys

import pytest

import umi
from child_process import child_env

HEAVY = ("duckdb", "pyarrow", "numba", "hnswlib", "anthropic", "openai", "psycopg", "lancedb")


def loaded_after(code: str) -> set[str]:
    """Top-level packages among HEAVY that are in sys.modules after running ``code``."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=child_env(), capture_output=True, text=True,
                         timeout=120, check=True, cwd=tempfile.gettempdir())  # `-c` puts the cwd first
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_umi_loads_no_heavy_dependency():
    assert loaded_after("import umi") == set()


def test_arenas_and_errors_need_nothing_heavy():
    code = ("import umi\ncore = umi.CoreMemory()\ncore.set_block('human', 'hi')\n"
            "wm = umi.WorkingMemory()\nwm.set('k', b'v')\nassert umi.CoreMemoryFullError")
    assert loaded_after(code) == set()


def test_sim_memory_never_loads_duckdb_or_pyarrow():
    code = ("import umi\nm = umi.Memory.sim(seed=1)\nm.remember_sync('Alice works at Acme.')\n"
            "assert m.recall_sync('Alice')\nm.close()")
    loaded = loaded_after(code)
    assert "duckdb" not in loaded and "pyarrow" not in loaded
    assert "numba" in loaded  # the vector index's kernels: loaded because they were used


def test_the_duckdb_backend_loads_duckdb_when_asked_for():
    # the probe itself can see a heavy import (so the tests above can fail)
    assert {"duckdb", "pyarrow"} <= loaded_after("import umi\numi.DuckDBStorageBackend")


def test_lazy_names_resolve_to_their_defining_objects():
    from umi.memory import Memory
    from umi.storage.duckdb import DuckDBStorageBackend

    assert umi.Memory is Memory
    assert umi.DuckDBStorageBackend is DuckDBStorageBackend
    assert "Memory" in dir(umi)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        umi.NoSuchThing  # noqa: B018
