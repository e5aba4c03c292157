"""The hand-written stubs of the compiled module match the module (mypy.stubtest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import umi._native._arena as arena

ALLOWLIST = Path(__file__).parent / "stubtest_allowlist.txt"
MYPY_INI = Path(__file__).parent / "stubtest_mypy.ini"


def test_native_module_is_compiled():
    assert Path(arena.__file__).suffix in {".so", ".pyd"}


def test_stubtest_passes(tmp_path):
    # Check the stub against the *installed* module: run outside the source tree (which has no
    # compiled extension when umi is installed normally), with a config that reports errors in the
    # stub only, not in the rest of umi or in third-party packages without stubs.
    cmd = [sys.executable, "-m", "mypy.stubtest", "umi._native._arena", "--mypy-config-file", str(MYPY_INI)]
    if ALLOWLIST.exists():
        cmd += ["--allowlist", str(ALLOWLIST)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_stub_and_py_typed_ship_with_the_package():
    import umi._native

    native_dir = Path(umi._native.__file__).parent
    assert (native_dir / "_arena.pyi").is_file()
    assert (native_dir.parent / "py.typed").is_file()
