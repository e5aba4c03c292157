"""How a test starts a Python child that imports the umi the tests import: the installed package
in CI (whose compiled extension exists), the tree under PYTHONPATH locally. ``python -c`` puts
its working directory first on ``sys.path``, so a child run from the repository root would import
the uncompiled source tree; run it with ``cwd=child_cwd(tmp_path)`` and ``env=child_env()``."""

from __future__ import annotations

import os
from pathlib import Path

import umi

UMI_ROOT = str(Path(umi.__file__).resolve().parent.parent)


def child_env() -> dict[str, str]:
    """The environment, with the directory holding the imported ``umi`` first on PYTHONPATH."""
    rest = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([UMI_ROOT, rest]) if rest else UMI_ROOT}
