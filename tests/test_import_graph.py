"""The package's import graph, read statically from the source: no import cycle, and the layers hold.

Every import of a project module is an edge, wherever it stands: at module level (also in a module-level
``if``/``try``/class body), inside a function, or under ``if TYPE_CHECKING:``. A function-local or
type-only import makes no *load-time* cycle, but it is the usual way to hide one: the two modules still
need each other, so both count, for cycles and for layering. A failure names each edge's kind.

``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; the parent
packages Python initialises on the way are not edges (a package's ``__init__`` importing its own modules
is not a cycle), nor are names a package resolves lazily through ``importlib`` in its ``__getattr__``.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "m2fpkit"


def _package_dirs() -> dict[str, Path]:
    """Package name → directory, as setuptools maps them (pyproject ``package-dir``; the rest nested)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {name: ROOT / path for name, path in setuptools["package-dir"].items()}
    dirs: dict[str, Path] = {}
    for name in setuptools["packages"]:
        if name in mapping:
            dirs[name] = mapping[name]
        else:
            parent, _, leaf = name.rpartition(".")
            dirs[name] = mapping.get(parent, dirs.get(parent, ROOT / parent.replace(".", "/"))) / leaf
    return dirs


def _modules() -> dict[str, Path]:
    """Every module of the installed packages: dotted name → source file."""
    modules: dict[str, Path] = {}
    for package, directory in _package_dirs().items():
        for path in sorted(directory.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


@dataclass
class Imports:
    load: set[str] = field(default_factory=set)  # run when the module loads
    deferred: set[str] = field(default_factory=set)  # inside a function: run when it is called
    type_only: set[str] = field(default_factory=set)  # under `if TYPE_CHECKING:`: never run


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules an import statement names (project modules only; third-party names are kept as is)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    found = {f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known}
    if len(found) < len(node.names):
        found.add(source)
    return found


def _imports(module: str, path: Path, known: set[str]) -> Imports:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.stem == "__init__"
    out = Imports()

    def visit(nodes: list[ast.stmt], bucket: set[str]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                bucket |= _targets(node, module, is_package, known)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.body, out.type_only)
                visit(node.orelse, bucket)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(node.body, out.deferred)
            else:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        visit([child], bucket)
                    elif isinstance(child, ast.excepthandler | ast.match_case):
                        visit(child.body, bucket)

    visit(tree.body, out.load)
    return out


MODULES = _modules()
GRAPH = {name: _imports(name, path, set(MODULES)) for name, path in MODULES.items()}


def _project(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path per strongly connected component of more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_path_through(min(c), c, edges) for c in components]


def _path_through(start: str, component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from ``start`` back to itself inside its component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(edges[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _dependencies(imports: Imports) -> set[str]:
    return imports.load | imports.deferred | imports.type_only


def _breaks(importers: str, forbidden: Callable[[str], bool]) -> list[str]:
    """``importer → imported`` for every import of a module under ``importers`` that ``forbidden`` flags."""
    return [f"{module} → {target}" for module, imports in sorted(GRAPH.items()) if _in(module, importers)
            for target in sorted(_dependencies(imports)) if forbidden(target)]


RUNTIME, BUNDLE, SERVER, EXPORT = (f"{PACKAGE}.{p}" for p in ("runtime", "runtime.bundle", "server", "export"))
ERRORS = f"{RUNTIME}.errors"


def test_the_graph_sees_every_package_and_resolves_relative_imports():
    # the check is only as good as the graph: every package is found, and known edges are there
    assert {f"{BUNDLE}.reader", f"{SERVER}.app", f"{EXPORT}.cli", f"{RUNTIME}.registry.core"} <= set(MODULES)
    assert f"{BUNDLE}.manifest" in GRAPH[f"{BUNDLE}.reader"].load  # `from . import manifest as …`
    assert ERRORS in GRAPH[f"{BUNDLE}.reader"].load  # `from ..errors import …`
    assert f"{RUNTIME}.registry" in GRAPH[f"{SERVER}.app"].load | GRAPH[f"{SERVER}.keys"].load


def _kind(importer: str, imported: str) -> str:
    imports = GRAPH[importer]
    return ("" if imported in imports.load else " (in a function)" if imported in imports.deferred
            else " (TYPE_CHECKING)")


def test_no_import_cycle():
    cycles = _cycles({name: _project(_dependencies(imports)) for name, imports in GRAPH.items()})
    described = [c[0] + "".join(f" →{_kind(a, b)} {b}" for a, b in zip(c, c[1:])) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_the_cycle_finder_reports_a_cycle_path():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(_cycles(edges)) == [["a", "b", "c", "a"], ["e", "e"]]


def test_the_bundle_layer_imports_nothing_else_of_the_project():
    # the one exception tree (runtime/errors.py) is shared by every layer and imports nothing itself
    found = _breaks(BUNDLE, lambda t: t in MODULES and not (_in(t, BUNDLE) or t == ERRORS))
    assert not found, "bundle layer imports:\n" + "\n".join(found)
    assert not _project(_dependencies(GRAPH[ERRORS]))


def test_the_bundle_layer_imports_no_inference_engine():
    found = _breaks(BUNDLE, lambda t: any(_in(t, e) for e in ("onnxruntime", "openvino", "torch", "onnx")))
    assert not found, "bundle layer imports an engine:\n" + "\n".join(found)


def test_the_bundle_layer_never_touches_an_engine_session():
    # checking a graph against config.json needs a session: that is the runtime's (runtime/graph_check.py)
    session_api = {"get_inputs", "get_outputs", "get_modelmeta", "InferenceSession", "SessionOptions"}
    found = [f"{MODULES[module].relative_to(ROOT)}:{node.lineno}: .{node.attr}" for module, path in MODULES.items()
             if _in(module, BUNDLE) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr in session_api]
    assert not found, "bundle layer uses a session:\n" + "\n".join(found)


def test_the_runtime_never_imports_the_server_or_export():
    found = _breaks(RUNTIME, lambda t: _in(t, SERVER) or _in(t, EXPORT))
    assert not found, "runtime imports:\n" + "\n".join(found)


def test_nothing_imports_export_but_export():
    found = _breaks(PACKAGE, lambda t: _in(t, EXPORT))
    found = [f for f in found if not _in(f.split(" → ")[0], EXPORT)]
    assert not found, "export imported from:\n" + "\n".join(found)


_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|toml|json|txt|ya?ml|html|sh))\b")


def test_every_file_path_the_source_names_exists():
    # docstrings and comments that point a reader at a file (a benchmark, a test) must not go stale
    stale = []
    for path in sorted(set(MODULES.values())):
        text = path.read_text()
        for match in _PATH.finditer(text):
            named = match.group(1)
            if not any((base / named).exists() for base in (ROOT, path.parent)):
                stale.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}: {named}")
    assert not stale, "names a file that does not exist:\n" + "\n".join(stale)
