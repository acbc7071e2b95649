"""The shape of the package: the import graph of cfbench/ has no cycle, and the engine imports
no built-in strategy or scenario (only the registry discovers them, by name)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cfbench"
PLUGINS = ("cfbench.strategies", "cfbench.scenarios", "strategies", "scenarios")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
           if not {"strategies", "scenarios"} & set(p.relative_to(PACKAGE).parts)}


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(path: Path, source: str | None = None) -> set[str]:
    """Every module `path` (or `source` standing there) imports, at the top or inside a function
    (not under TYPE_CHECKING, which never runs): ``from cfbench import x`` counts as cfbench.x
    when x is a module."""
    parts = module_name(path).split(".")
    found: set[str] = set()
    todo: list[ast.AST] = [ast.parse(path.read_text() if source is None else source)]
    while todo:
        node = todo.pop()
        if _type_checking(node):
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the package that holds this module
                package = parts[:len(parts) - node.level + (path.stem == "__init__")]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES or child in PLUGINS else base)
    return found


def graph() -> dict[str, set[str]]:
    return {name: {m for m in imported(path) if m in MODULES and m != name}
            for name, path in MODULES.items()}


def test_the_import_graph_of_cfbench_has_no_cycle():
    edges = graph()
    assert "cfbench.cli" in edges and "cfbench.executors" in edges["cfbench.runs"]
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(edges[name]):
            if state.get(other) == "open":
                cycle = path[path.index(other):] + [other]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if other not in state:
                visit(other, [*path, other])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_cfbench_imports_no_built_in_strategy_or_scenario():
    offenders = {name: sorted(m for m in imported(path) if m.startswith(PLUGINS))
                 for name, path in MODULES.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_checker_sees_function_level_and_relative_imports():
    """A cycle through an import inside a function (executors -> cli once) is a cycle too."""
    source = "def f():\n    from cfbench.cli import main\n    from . import sweep\n"
    assert imported(PACKAGE / "executors.py", source) == {"cfbench.cli", "cfbench.sweep"}
    assert imported(PACKAGE / "data" / "__init__.py", "from .cifar import x\n") == \
        {"cfbench.data.cifar"}
