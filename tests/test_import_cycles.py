"""No import cycle in src/: an AST scan of every module's imports (module level, inside functions and under
``if TYPE_CHECKING:`` alike: a cycle hidden in a function is still a cycle between two concepts)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _known(name: str, known: set[str]) -> str | None:
    """The module ``name`` names, or its closest enclosing module of src/ (``a.b.func`` -> ``a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of src/ that ``name`` imports anywhere in its file. ``from package import x`` counts as an
    import of ``package.x`` when that is a module, else of ``package``; a package's own ``__init__`` is not
    counted for imports of its submodules (a lazy ``__getattr__`` in ``__init__`` is no cycle with them)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if node.level:
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in (_known(t, known) for t in targets) if t is not None)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> modules of src/ it imports."""
    modules = _module_names()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected group (breadth-first)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in the strongly connected group {group}")


def _describe(cycles: list[list[str]]) -> str:
    return "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_scan_finds_a_cycle_and_resolves_relative_imports():
    graph = {"p": set(), "p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert import_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    known = set(_module_names())
    model = "sa2va_pipeline.model.sa2va"
    imported = _imports(model, _module_names()[model], known)
    assert {"sa2va_pipeline.model.checkpoint", "sa2va_pipeline.model.processing"} <= imported  # incl. lazy


def test_no_import_cycle_through_the_model_package():
    cycles = import_cycles(import_graph())
    cycles = [c for c in cycles if any(m.startswith("sa2va_pipeline.model") for m in c)]
    assert not cycles, f"import cycles through sa2va_pipeline.model: {_describe(cycles)}"


def test_no_import_cycle_in_src():
    cycles = import_cycles(import_graph())
    assert not cycles, f"import cycles in src/: {_describe(cycles)}"
