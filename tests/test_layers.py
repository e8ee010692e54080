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


def _circles(graph, modules: set[str]) -> list[list[str]]:
    """The import circles among ``modules``: each strongly connected set of two or more (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module) & modules:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            members = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(members) > 1:
                circles.append(sorted(members))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return circles


def test_no_module_imports_itself_back():
    """The contract above compares siblings; a package's ``__init__`` importing a module that imports the package
    back is a circle too. Imports inside functions and under TYPE_CHECKING count."""
    import grimp

    graph = grimp.build_graph("cpsc_ray", exclude_type_checking_imports=False, cache_dir=None)
    assert _circles(graph, graph.modules) == []


MAX_FUNCTION_LINES = 60  # from `def` to the last line, docstring included
MAX_MODULE_LINES = 400


def test_no_function_or_module_is_longer_than_a_reader_holds():
    import ast

    too_long = []
    for path in sorted((REPO / "cpsc_ray").rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(REPO)
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{where}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{where}:{node.lineno} {node.name}: {lines} lines")
    assert too_long == []
