"""Folders are layers (STYLE.md): the import-linter contracts in pyproject.toml hold. Those contracts see every
import statement, including those inside functions, so a lazy import across a boundary breaks them too."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    done = subprocess.run(
        [lint_imports, "--no-cache", "--config", str(REPO / "pyproject.toml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[done.stdout.find("Broken contracts") :] or done.stdout + done.stderr
