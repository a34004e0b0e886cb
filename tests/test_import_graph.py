"""The application's layers, read from the source: commands/ sit on engine/ and render/, no command module
imports another, engine/ imports neither commands nor rendering, render/ imports no command, and no two
modules of pbs_cli import each other through any chain (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pbs_cli

PACKAGE = Path(pbs_cli.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module of pbs_cli that ``path`` imports, at its top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the pbs_cli modules it imports (a package's own __init__ above it left out)."""
    sources = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imported(path) if m in sources and m != name and not name.startswith(m + ".")}
            for name, path in sources.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_circle_and_nothing_in_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_walker_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "pbs_cli.options" in graph["pbs_cli.commands.prefill"]  # top level, relative
    assert "pbs_cli.engine.prefill_job" in graph["pbs_cli.commands.prefill"]  # inside a function
    assert "pbs_cli.engine.mask_analysis" in graph["pbs_cli.engine.mask_views"]  # inside a function


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_no_command_imports_another():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("pbs_cli.commands.")) for m, deps in graph.items()
                 if m.startswith("pbs_cli.commands.")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_engine_and_render_do_not_reach_up():
    graph = import_graph()
    upward = {m: sorted(d for d in deps if d.startswith(("pbs_cli.commands", "pbs_cli.app"))
                        or (m.startswith("pbs_cli.engine") and d.startswith("pbs_cli.render")))
              for m, deps in graph.items() if m.startswith(("pbs_cli.engine", "pbs_cli.render"))}
    assert {m: d for m, d in upward.items() if d} == {}
