"""The packages' layering, read off their ``import`` statements (parsed, never executed).

An edge goes from a module to the most specific module of ours it names: ``from pkg import name``
points at ``pkg.name`` when that is a module and at ``pkg`` otherwise; relative imports are resolved.
Every import statement counts, inside functions and ``TYPE_CHECKING`` blocks too: deferring an
import hides a circle from the interpreter, not from a reader. Importing a submodule is not an edge
to its package's ``__init__`` (Python runs it, but the module does not depend on what it re-exports).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"agora": ROOT / "agora" / "src" / "agora", "agora_server": ROOT / "agora_server" / "src" / "agora_server"}

Graph = Mapping[str, set[str]]


def module_files(package: str, directory: Path) -> dict[str, Path]:
    modules = {}
    for path in sorted(directory.rglob("*.py")):
        parts = [package, *path.relative_to(directory).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _known(name: str, modules: Iterable[str]) -> str | None:
    """The longest prefix of the dotted ``name`` that is one of our modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imported_modules(module: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """Our modules that ``module`` (the file at ``path``) imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if _is_package(path) else module.split(".")[:-1]
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(_known(f"{base}.{alias.name}", modules) or _known(base, modules))
    found.discard(None)
    found.discard(module)  # ``from . import x`` inside a package's own ``__init__`` when x is a name
    return found


def import_graph(sources: Mapping[str, Path]) -> dict[str, set[str]]:
    modules = {name: path for package, directory in sources.items() for name, path in module_files(package, directory).items()}
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


@dataclass(frozen=True, order=True)
class ImportCircle:
    modules: tuple[str, ...]
    """Every module of the strongly connected component, sorted: each one reaches every other."""
    example: tuple[str, ...]
    """One circle through the first of them, in import order, the first module repeated at the end."""

    def __str__(self) -> str:
        return f"{', '.join(self.modules)} (e.g. {' → '.join(self.example)})"


def import_cycles(graph: Graph) -> list[ImportCircle]:
    """One circle per strongly connected component of more than one module, or a module that imports itself."""
    cycles = []
    for component in _strongly_connected(graph):
        start = min(component)
        if len(component) > 1 or start in graph.get(start, ()):
            cycles.append(ImportCircle(tuple(sorted(component)), tuple(_cycle_through(start, component, graph))))
    return sorted(cycles)


def _strongly_connected(graph: Graph) -> list[set[str]]:
    """Tarjan's algorithm, iterative so a deep package cannot hit the recursion limit."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def _cycle_through(start: str, component: set[str], graph: Graph) -> list[str]:
    """A shortest path from ``start`` back to itself inside its component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph.get(node, ())):
                if successor not in component or successor in previous:
                    continue
                previous[successor] = node
                if successor == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(previous[path[-1]])
                    return path[::-1]
                following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is in a component without a circle through it")


def test_no_import_circle():
    cycles = import_cycles(import_graph(SOURCES))
    assert not cycles, "import circles:\n" + "\n".join(map(str, cycles))


def test_the_library_never_imports_the_application():
    graph = import_graph(SOURCES)
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items() if module.split(".")[0] == "agora_server"
        for target in targets if target.split(".")[0] == "agora"
    )
    assert not upward, "agora_server must not import agora:\n" + "\n".join(upward)


def test_the_graph_holds_both_packages():
    graph = import_graph(SOURCES)
    # a wrong root would find no module and pass every check above
    assert "agora_server.server.worker" in graph and "agora.config" in graph
    assert "agora_server.models.config" in graph["agora_server.models.stages"]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c", "a"]]),
        ({"a": {"a"}}, [["a", "a"]]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}}, [["a", "b", "a"], ["c", "d", "c"]]),
        # a shortcut inside one component: the shortest circle through its first module
        ({"a": {"b", "d"}, "b": {"c"}, "c": {"d"}, "d": {"a"}}, [["a", "d", "a"]]),
    ],
)
def test_cycle_finder(graph, expected):
    assert [list(cycle.example) for cycle in import_cycles(graph)] == expected


def test_a_circle_names_every_module_of_its_component():
    (cycle,) = import_cycles({"a": {"b", "d"}, "b": {"c"}, "c": {"d"}, "d": {"a"}, "e": {"a"}})
    assert cycle.modules == ("a", "b", "c", "d")
    assert str(cycle) == "a, b, c, d (e.g. a → d → a)"


def _write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_edges_follow_submodules_relative_and_deferred_imports(tmp_path):
    _write(tmp_path / "pkg", {
        "__init__.py": "from pkg.sub import thing\n",
        "sub/__init__.py": "",
        "sub/thing.py": "from . import other\n",
        "sub/other.py": "def later():\n    from ..sub import thing\n",
        "top.py": "import pkg.sub.other as o\nfrom pkg import sub\nfrom pkg import VALUE\nimport torch\n",
    })
    graph = import_graph({"pkg": tmp_path / "pkg"})
    assert graph == {
        "pkg": {"pkg.sub.thing"},
        "pkg.sub": set(),
        "pkg.sub.thing": {"pkg.sub.other"},
        "pkg.sub.other": {"pkg.sub.thing"},
        "pkg.top": {"pkg.sub.other", "pkg.sub", "pkg"},
    }
    assert import_cycles(graph) == [ImportCircle(("pkg.sub.other", "pkg.sub.thing"), ("pkg.sub.other", "pkg.sub.thing", "pkg.sub.other"))]
