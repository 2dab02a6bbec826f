"""The shape of ``src/steadyclip``: small modules, short functions, imports that only go downward.

Read from the source with ``ast``, nothing is imported. Limits: a module has at most
400 lines; a function or method at most 80 (the whole ``def``: from its ``def`` line to
its last, signature and docstring included, decorators not). Import cycles are looked
for twice: between modules, and between packages (each subpackage such as
``steadyclip.batch`` is one node, nested packages included; a top-level module such as
``steadyclip.model.loading`` is a node of its own, since the top level holds every layer from
``errors`` up to ``engine``). Every ``import steadyclip...`` / ``from steadyclip...
import`` counts wherever it stands - a lazy import inside a function is still a
dependency - and relative imports are resolved. Imports under ``if TYPE_CHECKING:`` count
too: a module that names a class in a hint depends on it (the cure is to pass a smaller thing
defined below both). Only ``importlib`` calls by name (the lazy public names of
``steadyclip/__init__``) are not seen. At most 12 modules lie loose at the top of the package;
the rest live in the layer packages.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "steadyclip"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package (a package is its ``__init__``)."""
    out: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MAX_LOOSE_MODULES = 12


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The steadyclip modules ``module`` imports, type-only imports included (resolved to names in ``known``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from steadyclip.x import y`: y is a submodule of x, or a name defined in x.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph with each subpackage of steadyclip collapsed into one node (top-level modules stay)."""

    def node(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 or module in _SUBPACKAGES else module

    out: dict[str, set[str]] = {node(m): set() for m in graph}
    for module, deps in graph.items():
        out[node(module)] |= {node(d) for d in deps} - {node(module)}
    return out


_SUBPACKAGES = {".".join(p.relative_to(SRC).parts[:-1]) for p in PACKAGE.glob("*/__init__.py")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted, biggest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found, key=lambda c: (-len(c), c))


def _describe(cycle: list[str], graph: dict[str, set[str]]) -> str:
    members = set(cycle)
    edges = [f"{a} -> {b}" for a in cycle for b in sorted(graph[a] & members)]
    return f"{{{', '.join(cycle)}}}: " + "; ".join(edges)


def test_no_module_is_over_400_lines() -> None:
    long = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    over = sorted(f"{name} ({n} lines)" for name, n in long.items() if n > MAX_MODULE_LINES)
    assert not over, f"modules over {MAX_MODULE_LINES} lines (each has two jobs; split it): " + ", ".join(over)


def test_no_function_is_over_80_lines() -> None:
    over = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1  # `def` line to last line
                if n > MAX_FUNCTION_LINES:
                    over.append(f"{name}:{node.lineno} {node.name} ({n} lines)")
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(sorted(over))


def test_no_import_cycle_between_modules() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles between modules (move the shared piece one layer down):\n" + "\n".join(
        _describe(c, graph) for c in cycles)


def test_no_import_cycle_between_packages() -> None:
    graph = _package_graph(_graph())
    cycles = _cycles(graph)
    assert not cycles, "import cycles between packages:\n" + "\n".join(_describe(c, graph) for c in cycles)


def test_at_most_12_modules_lie_loose_at_the_top() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, f"{len(loose)} modules at the top of steadyclip: {loose}"


def test_the_layers_import_only_downward() -> None:
    """_util < numerics < model < engine < the front ends (batch, server, doctor, cli)."""
    order = ["steadyclip._util", "steadyclip.numerics", "steadyclip.model", "steadyclip.engine"]
    graph = _package_graph(_graph())
    upward = [f"{a} -> {b}" for a in order for b in sorted(graph[a]) if b in order and order.index(b) > order.index(a)]
    fronts = {"steadyclip.batch", "steadyclip.server", "steadyclip.doctor", "steadyclip.cli"}
    upward += [f"{a} -> {b}" for a in order for b in sorted(graph[a] & fronts)]
    assert not upward, "imports that go up a layer: " + ", ".join(upward)


def test_the_cycle_finder_finds_cycles_and_counts_type_only_imports(tmp_path: Path) -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    # No module cycle, but a package one: batch.runner -> engine -> batch.table.
    modules = {"steadyclip.batch.runner": {"steadyclip.engine"}, "steadyclip.engine": {"steadyclip.batch.table"},
               "steadyclip.batch.table": set()}
    assert _cycles(modules) == []
    assert _cycles(_package_graph(modules)) == [["steadyclip.batch", "steadyclip.engine"]]
    mod = tmp_path / "m.py"
    mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from steadyclip import engine\n"
                   "else:\n    import steadyclip.errors\n\ndef f():\n    from . import loading\n")
    known = {"steadyclip", "steadyclip.engine", "steadyclip.errors", "steadyclip.loading", "steadyclip.m"}
    assert _imports("steadyclip.m", mod, known) == {"steadyclip.engine", "steadyclip.errors", "steadyclip.loading"}
