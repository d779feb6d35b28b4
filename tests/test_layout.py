"""The house rules of proxy/, checked from the source with `ast` (nothing of the project is imported).

Run: `.venv/bin/pytest tests/test_layout.py -q`

Rules: no import cycles among proxy modules, counting every import (module level, `if TYPE_CHECKING:` blocks
and function-local ones); no module over 600 lines; no function-local import of an in-tree module; no two
modules share a file name; the sans-IO core imports neither asyncio nor aiohttp nor any proxy module outside
the core; every module opens with a docstring. Each checker is also run on small synthetic trees below, so
a check that passes does so because the rule holds, not because the checker sees nothing.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "proxy"
MAX_LINES = 600
CORE = frozenset(f"proxy.{m}" for m in ("model", "parse", "select", "table", "errors", "settings", "changes",
                                          "identities", "upstream_tls", "placement", "zones", "route_index", "checker",
                                          "config", "revdiff", "actions", "parse_match", "upstream_proto"))
CORE_FORBIDDEN = ("asyncio", "aiohttp")
SHARED_NAMES = frozenset({"__init__.py", "__main__.py"})


@dataclass(frozen=True, slots=True)
class Import:
    target: str  # the imported module, resolved to the deepest module of the tree when in-tree
    line: int
    local: bool  # inside a function body


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root (root's directory name is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _walk(node: ast.AST, local: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        yield from _walk(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[Import] = []
    for node, local in _walk(tree):
        if isinstance(node, ast.Import):
            out.extend(Import(alias.name, node.lineno, local) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append(Import(sub if sub in known else base, node.lineno, local))
    return out


def graph(root: Path) -> dict[str, list[Import]]:
    known = modules(root)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def _in_tree(target: str, known: dict[str, list[Import]]) -> str | None:
    """The module of the tree `target` names (import a.b.c of a non-module c counts as a.b), else None."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def find_cycles(root: Path) -> list[list[str]]:
    """One shortest cycle per strongly connected group of modules, as a chain [a, b, ..., a]."""
    g = graph(root)
    edges = {m: sorted({t for i in imps if (t := _in_tree(i.target, g)) is not None}) for m, imps in g.items()}
    # Tarjan's strongly connected components, iteratively (no recursion limit on a big tree).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    group.append(m)
                    if m == node:
                        break
                if len(group) > 1 or node in edges[node]:
                    groups.append(sorted(group))
    cycles = []
    for group in sorted(groups):
        members = set(group)
        first = group[0]
        # Breadth first from `first` back to itself, inside the group: the shortest chain that shows the cycle.
        parents: dict[str, str] = {}
        frontier = [first]
        found = False
        while frontier and not found:
            following = []
            for m in frontier:
                for t in edges[m]:
                    if t == first:
                        chain = [first]
                        back = m
                        while back != first:
                            chain.append(back)
                            back = parents[back]
                        cycles.append([first, *reversed(chain[1:]), first])
                        found = True
                        break
                    if t in members and t not in parents:
                        parents[t] = m
                        following.append(t)
                if found:
                    break
            frontier = following
    return cycles


def oversized(root: Path) -> dict[str, int]:
    out = {}
    for name, path in modules(root).items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            out[name] = lines
    return out


def local_imports(root: Path) -> list[str]:
    g = graph(root)
    found = {(name, i.line, i.target) for name, imps in g.items() for i in imps
             if i.local and _in_tree(i.target, g) is not None}
    return [f"{name}:{line} imports {target}" for name, line, target in sorted(found)]


def shared_names(root: Path) -> dict[str, list[str]]:
    by_name: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        if path.name not in SHARED_NAMES:
            by_name.setdefault(path.name, []).append(str(path.relative_to(root.parent)))
    return {n: paths for n, paths in by_name.items() if len(paths) > 1}


def core_violations(root: Path, core: frozenset[str] = CORE) -> list[str]:
    g = graph(root)
    out = []
    for name in sorted(core & g.keys()):
        for i in g[name]:
            inside = _in_tree(i.target, g)
            if i.target.split(".")[0] in CORE_FORBIDDEN or (inside is not None and inside not in core):
                out.append(f"{name}:{i.line} imports {i.target}")
    return sorted(set(out))


def missing_docstrings(root: Path) -> list[str]:
    return [name for name, path in modules(root).items() if ast.get_docstring(ast.parse(path.read_text())) is None]


def _chains(cycles: list[list[str]]) -> str:
    return "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def _lines(title: str, items: list[str] | dict[str, int] | dict[str, list[str]]) -> str:
    rows = [f"{k}: {v}" for k, v in items.items()] if isinstance(items, dict) else items
    return title + ":\n" + "\n".join(f"  {r}" for r in rows)


# The rules, on proxy/


def test_no_import_cycles() -> None:
    cycles = find_cycles(ROOT)
    assert cycles == [], _chains(cycles)


def test_no_module_over_600_lines() -> None:
    found = oversized(ROOT)
    assert found == {}, _lines(f"modules over {MAX_LINES} lines", found)


def test_no_function_local_imports_of_in_tree_modules() -> None:
    found = local_imports(ROOT)
    assert found == [], _lines("function-local imports of in-tree modules", found)


def test_no_two_modules_share_a_file_name() -> None:
    found = shared_names(ROOT)
    assert found == {}, _lines("file names used by more than one module", found)


def test_sans_io_core_imports_only_the_core() -> None:
    found = core_violations(ROOT)
    assert found == [], _lines("imports of the sans-IO core from outside it", found)


def test_every_module_opens_with_a_docstring() -> None:
    found = missing_docstrings(ROOT)
    assert found == [], _lines("modules without an opening docstring", found)


# The checkers, on synthetic trees


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "proxy"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


DOC = '"""doc."""\n'


def test_checker_finds_a_module_level_cycle_through_a_submodule_import(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": DOC,
        "a.py": DOC + "from proxy.pkg import b\n",  # b is a module: the edge goes to proxy.pkg.b
        "pkg/__init__.py": DOC,
        "pkg/b.py": DOC + "import proxy.c\n",
        "c.py": DOC + "from proxy.a import thing\n",  # thing is a name: the edge goes to proxy.a
        "d.py": DOC + "from proxy import a\n",  # outside the cycle
    })
    assert find_cycles(root) == [["proxy.a", "proxy.pkg.b", "proxy.c", "proxy.a"]]


def test_checker_counts_type_checking_and_function_local_imports(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": DOC,
        "a.py": DOC + "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from proxy.b import B\n",
        "b.py": DOC + "from proxy.a import A\n",
        "c.py": DOC + "def f() -> None:\n    from proxy.d import D\n",
        "d.py": DOC + "from . import c\n",  # relative import, resolved against the package
    })
    assert find_cycles(root) == [["proxy.a", "proxy.b", "proxy.a"], ["proxy.c", "proxy.d", "proxy.c"]]
    assert local_imports(root) == ["proxy.c:3 imports proxy.d"]


def test_checker_counts_a_package_init_and_a_self_import(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": DOC,
        "pkg/__init__.py": DOC + "from proxy.pkg.mod import X\n",
        "pkg/mod.py": DOC + "from proxy.pkg import Y\n",
        "self.py": DOC + "import proxy.self\n",
    })
    assert find_cycles(root) == [["proxy.pkg", "proxy.pkg.mod", "proxy.pkg"], ["proxy.self", "proxy.self"]]


def test_checker_accepts_an_acyclic_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": DOC,
        "a.py": DOC + "import asyncio\nfrom proxy.b import B\n\ndef f() -> None:\n    import json\n",
        "b.py": DOC + "from proxy import c\n",
        "c.py": DOC,
    })
    assert find_cycles(root) == []
    assert local_imports(root) == []  # json is not in the tree


def test_checker_sizes_names_core_and_docstrings(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": DOC,
        "model.py": DOC + "import asyncio.locks\nfrom proxy.table import T\nfrom proxy.admin import api\n",
        "table.py": DOC + "x = 1\n" * MAX_LINES,
        "admin/__init__.py": "",
        "admin/api.py": "# a comment is not a docstring\n",
        "admin/table.py": DOC,
        "admin/__main__.py": DOC,
        "__main__.py": DOC,
    })
    assert oversized(root) == {"proxy.table": MAX_LINES + 1}
    assert shared_names(root) == {"table.py": ["proxy/admin/table.py", "proxy/table.py"]}
    assert core_violations(root, frozenset({"proxy.model", "proxy.table"})) == [
        "proxy.model:2 imports asyncio.locks", "proxy.model:4 imports proxy.admin.api"]
    assert missing_docstrings(root) == ["proxy.admin", "proxy.admin.api"]
