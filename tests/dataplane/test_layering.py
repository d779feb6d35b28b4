"""The data plane's layering: no import cycles among its modules (TYPE_CHECKING and function-local imports
count), no function-local import of an in-tree module, each module opens with a docstring and stays small."""

from __future__ import annotations

import ast
from pathlib import Path

import proxy.dataplane

ROOT = Path(proxy.dataplane.__file__).parent
MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py")) if p.stem != "__init__"}


def _imports(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n.split(".")[2] for n in names if n.startswith("proxy.dataplane.") and n.split(".")[2] in MODULES)
    return found


def _edges() -> dict[str, set[str]]:
    return {m: _imports(ast.parse(p.read_text())) - {m} for m, p in MODULES.items()}


def test_no_import_cycles_among_dataplane_modules() -> None:
    edges = _edges()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n):], n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_function_local_imports_of_in_tree_modules() -> None:
    local = []
    for m, p in MODULES.items():
        for f in ast.walk(ast.parse(p.read_text())):
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(f):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("proxy"):
                        local.append((m, node.module))
                    elif isinstance(node, ast.Import) and any(a.name.startswith("proxy") for a in node.names):
                        local.append((m, node.names[0].name))
    assert local == []


def test_each_module_opens_with_a_docstring_and_stays_small() -> None:
    limits = {m: 400 if m == "downstream" else 600 for m in MODULES}
    over = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > limits[m]}
    undocumented = [m for m, p in MODULES.items() if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert (over, undocumented) == ({}, [])


def test_the_bottom_of_the_plane_knows_no_connection_class() -> None:
    edges = _edges()
    assert (edges["pool"], edges["exchange"]) == (set(), {"pool"})
