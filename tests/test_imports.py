"""How the packages hang together: no import cycles between the modules of `distill` and `teachers`,
argparse only in the `distill.cli` package (library modules never import it), and the `distill` command
registers every subcommand, also as `python -m distill.cli`.

The import graph is read from the source (ast), not by importing: an edge A -> B for every import in A
that runs when A is imported (module top level, also inside if/try/with/class bodies, but not inside
functions or `if TYPE_CHECKING:`). `from pkg import name` is an edge to the submodule pkg.name when
there is one, else to pkg itself. Importing a submodule also runs its parent package's __init__; that
implicit edge is not part of the graph.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("distill", "teachers")
CLI = "distill.cli"
COMMAND_NAMES = ("run", "sweep", "eval", "compare", "export", "profile", "cache", "data")
# argparse calls: a library module that makes them is command code, wherever its parser comes from
ARGPARSE_CALLS = {"ArgumentParser", "add_parser", "add_subparsers", "add_argument", "add_argument_group",
                  "add_mutually_exclusive_group", "parse_args", "parse_known_args"}


def _modules() -> dict:
    """Dotted module name -> (path, is_package) for every .py file of PACKAGES."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join(parts)] = (path, is_package)
    return found


MODULES = _modules()


def _is_library(name: str) -> bool:
    return name != CLI and not name.startswith(CLI + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _split_imports(tree: ast.Module) -> tuple:
    """(imports that run when the module is imported, imports inside functions)."""
    top, in_functions = [], []

    def visit(statements, in_function: bool) -> None:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                (in_functions if in_function else top).append(node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, True)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse, in_function)  # the body runs only under a type checker
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        visit([c for c in children if isinstance(c, ast.AST)], in_function)

    visit(tree.body, False)
    return top, in_functions


def _targets(module: str, is_package: bool, node) -> list:
    """The modules of PACKAGES that one import statement names (see the module docstring)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    if node.level:
        base_parts = module.split(".") if is_package else module.split(".")[:-1]
        base_parts = base_parts[:len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    targets = []
    for alias in node.names:
        if f"{base}.{alias.name}" in MODULES:
            targets.append(f"{base}.{alias.name}")
        elif base in MODULES:
            targets.append(base)
    return targets


def _read_graph() -> tuple:
    """(module-level graph {module: {module: line}}, function-level imports [(module, target, line)],
    every import statement {module: [ast nodes]})."""
    graph, hidden, statements = {}, [], {}
    for name, (path, is_package) in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        top, in_functions = _split_imports(tree)
        statements[name] = top + in_functions
        graph[name] = {}
        for node in top:
            for target in _targets(name, is_package, node):
                graph[name].setdefault(target, node.lineno)
        for node in in_functions:
            hidden += [(name, target, node.lineno) for target in _targets(name, is_package, node)]
    return graph, hidden, statements


GRAPH, HIDDEN, STATEMENTS = _read_graph()


def _path(graph: dict, start: str, goal: str) -> list | None:
    """Shortest import chain start -> ... -> goal in `graph` (breadth first), or None."""
    previous, queue = {start: None}, [start]
    for node in queue:
        for nxt in sorted(graph.get(node, ())):
            if nxt == goal:
                chain = [goal, node]
                while previous[chain[-1]] is not None:
                    chain.append(previous[chain[-1]])
                return chain[::-1]
            if nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return None


def _cycles(graph: dict) -> list:
    """One cycle (a list of modules, first == last) per strongly connected component that has one."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(v):  # Tarjan; the graph has a few dozen nodes, recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for component in components:
        if len(component) > 1 or component[0] in graph.get(component[0], ()):
            inside = {v: {w: line for w, line in graph[v].items() if w in component} for v in component}
            cycles.append(_path(inside, component[0], component[0]))
    return cycles


def _describe(chain: list, graph: dict) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(chain, chain[1:])]
    return " -> ".join(steps + [chain[-1]])


def test_the_graph_is_read_from_every_module():
    assert {"distill", "distill.cli", "distill.cli.run", "distill.run.experiment", "teachers"} <= set(MODULES)
    assert "distill.students" in GRAPH["distill"]  # `from distill import students` is an edge to the submodule
    assert "distill.cli.run" in GRAPH["distill.cli.sweep"]


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}
    assert sorted(map(tuple, _cycles(graph))) == [("a", "b", "c", "a"), ("e", "e")]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles_between_modules():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(_describe(c, GRAPH) for c in cycles)


def test_function_level_imports_do_not_hide_cycles():
    """An import inside a function of a library module that closes a cycle (with module-level imports and the
    other function-level ones) only hides the cycle from the module-level graph."""
    hidden_edges = {}
    for module, target, line in HIDDEN:
        if _is_library(module) and target != module and target not in GRAPH[module]:
            hidden_edges.setdefault(module, {}).setdefault(target, line)
    full = {m: {**GRAPH[m], **hidden_edges.get(m, {})} for m in GRAPH}
    found, seen = [], set()
    for module, targets in sorted(hidden_edges.items()):
        for target, line in sorted(targets.items()):
            back = _path(full, target, module)
            if back is not None and frozenset(zip([module] + back, back)) not in seen:
                chain = [module] + back
                seen.add(frozenset(zip(chain, chain[1:])))
                steps = [f"{a} (line {full[a][b]}{', in a function' if b in hidden_edges.get(a, {}) else ''})"
                         for a, b in zip(chain, chain[1:])]
                found.append(" -> ".join(steps + [chain[-1]]))
    assert not found, "function-level imports that close an import cycle:\n" + "\n".join(found)


def test_library_modules_do_not_import_argparse_or_the_commands():
    offences = []
    for module, nodes in STATEMENTS.items():
        if not _is_library(module):
            continue
        path, is_package = MODULES[module]
        for node in nodes:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            targets = _targets(module, is_package, node) if isinstance(node, ast.ImportFrom) else names
            for name in names + targets:
                if name == "argparse" or name.split(".")[0] == "argparse" or name == CLI or name.startswith(CLI + "."):
                    offences.append(f"{module}:{node.lineno} imports {name}")
        calls = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in ARGPARSE_CALLS:
                    calls.setdefault(called, node.lineno)
        if calls:
            offences.append(f"{module}: calls " + ", ".join(f"{c}() (line {n})" for c, n in sorted(calls.items()))
                            + f"; command-line code goes in {CLI}")
    assert not offences, "library modules with command-line code:\n" + "\n".join(sorted(set(offences)))


def test_every_command_module_is_registered():
    import distill.cli

    in_package = {name for name in MODULES if name.startswith(CLI + ".") and name != CLI + ".__main__"}
    assert set(distill.cli.COMMANDS) == in_package


def test_distill_help_lists_every_command(capsys):
    from distill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()}
    assert set(COMMAND_NAMES) <= listed, out


def test_python_m_distill_cli_runs_the_command():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "--help"], capture_output=True, text=True,
                          cwd=Path(REPO), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: distill") and all(name in proc.stdout for name in COMMAND_NAMES)
