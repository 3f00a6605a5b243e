"""The package's import structure: no import cycles, every module importable in a fresh interpreter, and internal
imports at module top outside `lorafleet/cli/` (where lazy imports keep `lorafleet --help` fast).

The graph is read from the source with `ast`, so it also covers imports inside functions, which only run later and
would hide a cycle from a plain import test.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers.cli import REPO

PACKAGE = "lorafleet"

# Internal imports inside functions outside lorafleet/cli/, "module:function" -> why it cannot be at module top.
# Keep it short: an entry needs a measured cost or a cycle that cannot be designed away.
LAZY_IMPORTS_ALLOWED: dict[str, str] = {}


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package under `root`."""
    found = {}
    for path in (root / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """(import node, enclosing function name or None) for every import that runs (not under `if TYPE_CHECKING:`)."""

    def visit(nodes, function):
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                yield from visit(node.orelse, function)
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node, function
            inner = node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            yield from visit(ast.iter_child_nodes(node), function or inner)

    yield from visit([tree], None)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> set[str]:
    """The package's modules an import statement names (resolved to the longest existing module)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        return {resolve(a.name) for a in node.names if a.name.split(".")[0] == PACKAGE} - {None}
    if node.level:
        base = (module if is_package else module.rpartition(".")[0]).split(".")
        base = base[: len(base) - node.level + 1]
        full = ".".join(base + ([node.module] if node.module else []))
    else:
        full = node.module or ""
    if full.split(".")[0] != PACKAGE:
        return set()
    # `from a.b import c` imports the submodule a.b.c when there is one, else the name c of a.b.
    return {resolve(f"{full}.{a.name}" if f"{full}.{a.name}" in modules else full) for a in node.names} - {None}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions.

    Importing `a.b.c` runs `a/__init__` and `a/b/__init__` first, so those count as imported too, except the packages
    that contain the importing module (they are already being imported: `a/b/__init__` importing its own `a.b.c` is
    not a cycle, `a.b.c` importing `a.b` is).
    """
    modules = _modules(root)
    graph = {}
    for module, path in modules.items():
        deps = set()
        for node, _ in _imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, module, path.name == "__init__.py", modules):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    ancestor = ".".join(parts[:i])
                    if i < len(parts) and (module == ancestor or module.startswith(ancestor + ".")):
                        continue
                    deps.add(ancestor)
        deps.discard(module)
        graph[module] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a closed path, first module repeated at the end) per strongly connected group of modules."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v):  # Tarjan's algorithm; the package's graph is a few dozen modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for group in groups:
        # A shortest path from the group's first module back to itself, inside the group (breadth first).
        start = min(group)
        paths, queue, cycle = {start: [start]}, [start], None
        while cycle is None:
            v = queue.pop(0)
            for w in sorted(graph[v] & group):
                if w == start:
                    cycle = paths[v] + [start]
                    break
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        cycles.append(cycle)
    return sorted(cycles)


def lazy_internal_imports(root: Path, exempt: str = f"{PACKAGE}.cli") -> dict[str, int]:
    """"module:function" -> line of every import of the package inside a function, outside package `exempt`."""
    modules = _modules(root)
    found = {}
    for module, path in sorted(modules.items()):
        if module == exempt or module.startswith(f"{exempt}."):
            continue
        for node, function in _imports(ast.parse(path.read_text(), str(path))):
            if function and _targets(node, module, path.name == "__init__.py", modules):
                found.setdefault(f"{module}:{function}", node.lineno)
    return found


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_graph_finds_cycles_through_functions_and_parent_packages(tmp_path):
    # The checks below pass on an empty graph too: first show that this reading of the source sees real cycles.
    _write_package(tmp_path, {
        "lorafleet/__init__.py": "",
        "lorafleet/a/__init__.py": "from lorafleet.a import inner  # a package importing its own module: fine\n",
        "lorafleet/a/inner.py": "from . import sibling\n",
        "lorafleet/a/sibling.py": "X = 1\n",
        "lorafleet/b.py": "def late():\n    from lorafleet.c import Y\n",
        "lorafleet/c.py": "import lorafleet.b\nY = 2\n",
        "lorafleet/d.py": "from lorafleet.a.sibling import X\n",
        "lorafleet/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lorafleet.d\n",
    })
    graph = import_graph(tmp_path)
    assert graph["lorafleet.a"] == {"lorafleet.a.inner"}
    assert graph["lorafleet.a.inner"] == {"lorafleet.a.sibling"}  # not its own package
    assert graph["lorafleet.d"] == {"lorafleet.a", "lorafleet.a.sibling"}  # the parent package runs first
    assert graph["lorafleet.e"] == set()  # type-checking imports never run
    assert find_cycles(graph) == [["lorafleet.b", "lorafleet.c", "lorafleet.b"]]
    assert lazy_internal_imports(tmp_path) == {"lorafleet.b:late": 2}


def test_no_import_cycles():
    graph = import_graph(REPO)
    # A sanity check that the real package was read: the driver imports the spec.
    assert "lorafleet.spec" in graph["lorafleet.train.driver"], graph["lorafleet.train.driver"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module-level and function-level imports):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_internal_imports_are_at_module_top_outside_the_cli():
    lazy = lazy_internal_imports(REPO)
    unexplained = {where: line for where, line in lazy.items() if where not in LAZY_IMPORTS_ALLOWED}
    assert not unexplained, (
        "lorafleet.* imported inside a function outside lorafleet/cli/ (move to module top, or justify in "
        "LAZY_IMPORTS_ALLOWED):\n" + "\n".join(f"  {where} (line {line})" for where, line in unexplained.items())
    )
    stale = sorted(set(LAZY_IMPORTS_ALLOWED) - set(lazy))
    assert not stale, f"LAZY_IMPORTS_ALLOWED lists imports that are gone: {stale}"


def test_every_module_imports_in_a_fresh_interpreter():
    script = textwrap.dedent(
        """
        import importlib, pkgutil, traceback
        import lorafleet

        failed, seen = {}, []

        def broken_package(name):
            failed[name] = traceback.format_exc(limit=-3)

        for info in pkgutil.walk_packages(lorafleet.__path__, "lorafleet.", onerror=broken_package):
            if info.name.rpartition(".")[2] == "__main__":
                continue  # runs the CLI
            try:
                importlib.import_module(info.name)
                seen.append(info.name)
            except Exception:
                failed[info.name] = traceback.format_exc(limit=-3)
        for name, error in failed.items():
            print(f"FAILED {name}\\n{error}")
        print(f"imported {len(seen)}")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FAILED" not in result.stdout, result.stdout[-6000:]
    # Every source module but the CLI's __main__ was found and imported.
    expected = {m for m in import_graph(REPO) if m != PACKAGE and not m.endswith(".__main__")}
    assert f"imported {len(expected)}" in result.stdout, (sorted(expected), result.stdout[-2000:])


def test_no_test_module_imports_another():
    # Shared code lives in tests/helpers/ and fixtures in tests/conftest.py: importing a test module would run its
    # tests' module setup twice and make pytest collect fixtures from a module it does not own.
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node, _ in _imports(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            offenders += [
                f"{path.relative_to(REPO)}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest"
            ]
    assert not offenders, "\n".join(offenders)
