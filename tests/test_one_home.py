"""One home for each rule and default, checked on the package's source (statically, like the import graph).

Each test names the one module allowed to write a rule down; a copy anywhere else fails with its place.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from importlib import import_module

from test_import_graph import MODULES, ROOT

AGREEMENT, CONFIG, IMAGEIO, VERSIONS = (f"m2fpkit.runtime.{m}" for m in (
    "agreement", "bundle.config", "imageio", "bundle.versions"))
_TREES = {module: ast.parse(path.read_text(), str(path)) for module, path in sorted(MODULES.items())}


def _nodes() -> Iterator[tuple[str, ast.AST]]:
    for module, tree in _TREES.items():
        for node in ast.walk(tree):
            yield module, node


def _where(module: str, node: ast.AST) -> str:
    return f"{MODULES[module].relative_to(ROOT)}" + (f":{node.lineno}" if hasattr(node, "lineno") else "")


def _found(match: Callable[[ast.AST], bool], home: str) -> list[str]:
    return list(dict.fromkeys(_where(m, n) for m, n in _nodes() if m != home and match(n)))


def _number(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def test_the_agreement_floors_are_defined_once_in_the_bundle_config():
    def floor(node: ast.AST) -> bool:
        if isinstance(node, ast.Assign | ast.AnnAssign) and _number(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            return any(isinstance(t, ast.Name) and "AGREEMENT" in t.id.upper() for t in targets)
        return False

    copies = _found(floor, CONFIG)
    assert not copies, copies
    config = import_module(CONFIG)
    assert 0 < config.GOLDEN_MIN_AGREEMENT <= config.PLAN_MIN_DECISIVE_AGREEMENT <= 1


def test_label_map_agreement_is_computed_only_by_runtime_agreement():
    def equal_share(node: ast.AST) -> bool:  # (a == b).mean() or np.mean(a == b)
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute) or node.func.attr != "mean":
            return False
        operand = node.args[0] if node.args else node.func.value
        return isinstance(operand, ast.Compare) and any(isinstance(op, ast.Eq) for op in operand.ops)

    copies = _found(equal_share, AGREEMENT)
    assert not copies, copies


def test_the_name_grammars_are_written_once():
    fragments = (r"[1-9][0-9]{0,5}", r"[a-z][a-z0-9_-]", r"[0-9]{1,4}\.[0-9]{1,4}")

    def grammar(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and any(
            f in node.value for f in fragments)

    copies = _found(grammar, VERSIONS)
    assert not copies, copies
    versions = import_module(VERSIONS)
    assert versions.is_api_version("1.0") and not versions.is_api_version("v1.0")


def test_preprocess_defaults_are_written_once_in_the_bundle_config():
    defaults = {123.675, 116.28, 103.53, 58.395, 57.12, 57.375, 1333}

    def default(node: ast.AST) -> bool:
        return _number(node) and node.value in defaults  # type: ignore[attr-defined]

    copies = _found(default, CONFIG)
    assert not copies, copies


def test_the_max_aspect_default_is_written_once():
    def literal_default(node: ast.AST) -> bool:
        if isinstance(node, ast.AnnAssign):
            return isinstance(node.target, ast.Name) and node.target.id == "max_aspect" and _number(node.value)
        if isinstance(node, ast.arguments):
            named = [*node.posonlyargs, *node.args][-len(node.defaults):] if node.defaults else []
            pairs = [*zip(named, node.defaults), *zip(node.kwonlyargs, node.kw_defaults)]
            return any(a.arg == "max_aspect" and _number(d) for a, d in pairs)
        return False

    copies = _found(literal_default, "")
    assert not copies, copies
    assert import_module(IMAGEIO).DEFAULT_MAX_ASPECT > 1
