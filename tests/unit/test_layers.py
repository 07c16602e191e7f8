"""The package's layers (docs/DESIGN.md) hold: import-linter's contracts from
pyproject.toml, no import cycle between modules, and no pvmig module imported inside a
function (where a cycle would hide)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from support import ROOT

PACKAGES = ("pvmig", "guest", "source_host", "dest_host")
pytestmark = pytest.mark.timeout(120)


def test_the_layer_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                       capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            # (a package's __init__ importing its own modules is no cycle)
            if imported.startswith(module + ".") or module.startswith(imported + "."):
                continue
            path = graph.find_shortest_chain(importer=imported, imported=module)
            if path:
                cycles.append(" -> ".join((module, *path)))
    assert not cycles, "\n".join(cycles)


def _hidden_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["." + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith(".") or name.split(".")[0] in PACKAGES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    return found


def test_no_pvmig_module_is_imported_inside_a_function():
    """Heavy optional libraries (matplotlib, rich) may load late; pvmig's own modules are
    imported at the top, so that the import graph is the one the contracts check."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_proto" not in p.parts]
    hidden = [h for p in files for h in _hidden_imports(p)]
    assert not hidden, "\n".join(hidden)
