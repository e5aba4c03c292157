"""The hand-written stubs of the compiled module match the module (mypy.stubtest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import umi._native._arena as arena

ALLOWLIST = Path(__file__).parent / "stubtest_allowlist.txt"


def test_native_module_is_compiled():
    assert Path(arena.__file__).suffix in {".so", ".pyd"}


def test_stubtest_passes():
    cmd = [sys.executable, "-m", "mypy.stubtest", "umi._native._arena"]
    if ALLOWLIST.exists():
        cmd += ["--allowlist", str(ALLOWLIST)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_stub_and_py_typed_ship_with_the_package():
    import umi._native

    native_dir = Path(umi._native.__file__).parent
    assert (native_dir / "_arena.pyi").is_file()
    assert (native_dir.parent / "py.typed").is_file()
