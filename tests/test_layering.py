"""The layering: how the packages hang together, read from the source (ast), not by importing it:

- layering: distill.data, distill.models, distill.losses and teachers import nothing of
  distill.train, distill.run, distill.deploy or distill.cli: every import statement counts, also those
  inside functions and under `if TYPE_CHECKING:` (`layering_violations`);
- no import cycles between the modules of `distill` and `teachers` (`import_cycles`), and no import inside a
  function of a library module that closes one;
- dependencies go one way between packages (`package_cycles`): the packages of PACKAGE_GROUPS and each
  top-level module of distill (distill itself, distill.compat, distill.registry ...) never import each other,
  directly or round a longer loop; every import statement counts, also inside functions and under
  `if TYPE_CHECKING:`;
- no module over MAX_LINES lines (`long_modules`);
- argparse only in the `distill.cli` package: library modules never import it (`command_line_code`), and the
  command modules import only the standard library and light modules at their top level
  (`heavy_command_imports`), so `distill --help` imports neither torch nor timm;

What importing the code costs at run time (the command, `import distill`, ONNX code) is tests/test_imports.py.

Each rule is a function of a source tree root (a folder holding distill/ and teachers/) returning its findings,
so a test plants one violation per rule in a copy of the tree and sees it reported.

The import graph has an edge A -> B for every import in A that runs when A is imported (module top level,
also inside if/try/with/class bodies, but not inside functions or `if TYPE_CHECKING:`). `from pkg import
name` is an edge to the submodule pkg.name when there is one, else to pkg itself. Importing a submodule also
runs its parent package's __init__; that implicit edge is not part of the graph (the light-module rule
follows it).
"""

from __future__ import annotations

import ast
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

PACKAGES = ("distill", "teachers")
CLI = "distill.cli"
COMMAND_NAMES = ("run", "sweep", "eval", "compare", "export", "profile", "cache", "data")
# argparse calls: a library module that makes them is command code, wherever its parser comes from
ARGPARSE_CALLS = {"ArgumentParser", "add_parser", "add_subparsers", "add_argument", "add_argument_group",
                  "add_mutually_exclusive_group", "parse_args", "parse_known_args"}
LOWER_LAYERS = ("distill.data", "distill.models", "distill.losses", "teachers")
UPPER_LAYERS = ("distill.train", "distill.run", "distill.deploy", "distill.cli")
# the packages between which dependencies go one way; a top-level module of distill is a group of its own
PACKAGE_GROUPS = ("distill.config", "distill.models", "teachers", "distill.run", "distill.train", "distill.losses",
                  "distill.data", "distill.eval", "distill.deploy", "distill.utils", "distill.cli")
MAX_LINES = 600  # a guard against modules that hold several concepts; split by concept, never to pass the count
ONNX_CODE = ("onnx", "onnxruntime", "distill.deploy", "teachers.onnx")  # and their submodules


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


# ------------------------------------------------------------------------------------------ reading a tree

def _modules(root: Path) -> dict:
    """Dotted module name -> (path, is_package) for every .py file of PACKAGES under root."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join(parts)] = (path, is_package)
    return found


def _is_library(name: str) -> bool:
    return not _within(name, (CLI,))


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


def _imported_names(module: str, is_package: bool, node) -> list:
    """Every dotted name one import statement names: `import a.b` -> a.b; `from a import b` -> a, a.b
    (relative imports resolved against `module`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base_parts = module.split(".") if is_package else module.split(".")[:-1]
        base_parts = base_parts[:len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _targets(modules: dict, module: str, is_package: bool, node) -> list:
    """The modules of PACKAGES that one import statement names (see the module docstring)."""
    names = _imported_names(module, is_package, node)
    if isinstance(node, ast.Import):
        return [name for name in names if name in modules]
    base, targets = names[0], []
    for name in names[1:]:
        if name in modules:
            targets.append(name)
        elif base in modules:
            targets.append(base)
    return targets


@dataclass
class Tree:
    root: Path
    modules: dict      # module -> (path, is_package)
    graph: dict        # module-level imports {module: {module: line}}
    hidden: list       # imports inside functions [(module, target, line)]
    statements: dict   # {module: [import statements that run on import or in a function]}
    every: dict        # {module: [every import statement, also under TYPE_CHECKING]}
    lines: dict        # {module: number of lines}


_PARSED: dict = {}  # (path, mtime, size) -> (text, syntax tree): each rule reads a tree; a file is parsed once
_TREES: dict = {}   # (root, every file's (path, mtime, size)) -> Tree


def _parse(path: Path) -> tuple:
    """(text, syntax tree) of one file, parsed again only when it changed."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED:
        text = path.read_text(encoding="utf-8")
        _PARSED[key] = text, ast.parse(text, filename=str(path))
    return _PARSED[key]


def read_tree(root) -> Tree:
    """The tree under root, read again when any of its files changed, appeared or went."""
    root = Path(root)
    modules = _modules(root)
    key = (str(root), tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p, _ in modules.values()))
    if key not in _TREES:
        _TREES[key] = _read_tree(root, modules)
    return _TREES[key]


def _read_tree(root: Path, modules: dict) -> Tree:
    graph, hidden, statements, every, lines = {}, [], {}, {}, {}
    for name, (path, is_package) in modules.items():
        text, tree = _parse(path)
        lines[name] = len(text.splitlines())
        top, in_functions = _split_imports(tree)
        statements[name] = top + in_functions
        every[name] = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))),
                             key=lambda n: n.lineno)
        graph[name] = {}
        for node in top:
            for target in _targets(modules, name, is_package, node):
                graph[name].setdefault(target, node.lineno)
        for node in in_functions:
            hidden += [(name, target, node.lineno) for target in _targets(modules, name, is_package, node)]
    return Tree(root, modules, graph, hidden, statements, every, lines)


TREE = read_tree(REPO)
MODULES, GRAPH, HIDDEN, STATEMENTS = TREE.modules, TREE.graph, TREE.hidden, TREE.statements


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
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(chain, chain[1:], strict=False)]
    return " -> ".join(steps + [chain[-1]])


# ------------------------------------------------------------------------------------------ the rules

def layering_violations(root) -> list:
    """'module:line imports name' for every import of an upper layer by a lower one (any import statement)."""
    tree = read_tree(root)
    found = []
    for module, nodes in tree.every.items():
        if not _within(module, LOWER_LAYERS):
            continue
        is_package = tree.modules[module][1]
        for node in nodes:
            names = [n for n in _imported_names(module, is_package, node) if _within(n, UPPER_LAYERS)]
            if names:
                found.append(f"{module}:{node.lineno} imports {max(names, key=len)}")
    return found


def import_cycles(root) -> list:
    """One described chain per import cycle of the module-level graph."""
    tree = read_tree(root)
    return [_describe(c, tree.graph) for c in _cycles(tree.graph)]


def _group(module: str) -> str:
    """The package group of a module: its package of PACKAGE_GROUPS, else the module (a top-level one)."""
    return next((p for p in PACKAGE_GROUPS if _within(module, (p,))), module)


def package_graph(root) -> dict:
    """{group: {imported group: 'module:line imports target'}} over every import statement (the first in module
    order names each edge)."""
    tree = read_tree(root)
    graph = {}
    for module, nodes in sorted(tree.every.items()):
        is_package = tree.modules[module][1]
        edges = graph.setdefault(_group(module), {})
        for node in nodes:
            for target in _targets(tree.modules, module, is_package, node):
                if _group(target) != _group(module):
                    edges.setdefault(_group(target), f"{module}:{node.lineno} imports {target}")
    return graph


def package_cycles(root) -> list:
    """One described loop per set of package groups that import each other (directly or round a loop):
    'A -> B (a.x:3 imports b.y) -> A (b.z:7 imports a.w)'."""
    graph = package_graph(root)
    found = []
    for chain in _cycles(graph):
        found.append(" -> ".join([chain[0]] + [f"{b} ({graph[a][b]})" for a, b in zip(chain, chain[1:], strict=False)]))
    return found


def long_modules(root, limit: int = MAX_LINES) -> list:
    """'path: N lines' for every module over `limit` lines."""
    tree = read_tree(root)
    return [f"{tree.modules[m][0].relative_to(tree.root)}: {n} lines" for m, n in sorted(tree.lines.items())
            if n > limit]


def command_line_code(root) -> list:
    """Library modules that import argparse or distill.cli, or make argparse calls."""
    tree = read_tree(root)
    offences = []
    for module, nodes in tree.statements.items():
        if not _is_library(module):
            continue
        path, is_package = tree.modules[module]
        for node in nodes:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            targets = _targets(tree.modules, module, is_package, node) if isinstance(node, ast.ImportFrom) else names
            for name in names + targets:
                if name.split(".")[0] == "argparse" or _within(name, (CLI,)):
                    offences.append(f"{module}:{node.lineno} imports {name}")
        calls = {}
        for node in ast.walk(_parse(path)[1]):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in ARGPARSE_CALLS:
                    calls.setdefault(called, node.lineno)
        if calls:
            offences.append(f"{module}: calls " + ", ".join(f"{c}() (line {n})" for c, n in sorted(calls.items()))
                            + f"; command-line code goes in {CLI}")
    return sorted(set(offences))


def heavy_command_imports(root) -> list:
    """Top-level imports of the distill.cli modules that are neither the standard library nor light modules:
    a light module imports, at its top level and through its parent packages' __init__, only the standard
    library and light modules."""
    tree = read_tree(root)
    verdicts = {}

    def heavy_imports(module: str) -> list:
        """(line, name) of the top-level imports of `module` that are not light."""
        is_package = tree.modules[module][1]
        found = []
        for node in _split_imports(_parse(tree.modules[module][0])[1])[0]:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            names = _imported_names(module, is_package, node)
            if names[0].split(".")[0] not in PACKAGES:
                found += [(node.lineno, names[0])] if names[0].split(".")[0] not in sys.stdlib_module_names else []
                continue
            found += [(node.lineno, t) for t in _targets(tree.modules, module, is_package, node) if not light(t)]
        return found

    def light(module: str) -> bool:
        if module not in verdicts:
            verdicts[module] = True  # a cycle back here decides nothing
            parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
            verdicts[module] = not heavy_imports(module) and all(light(p) for p in parents if p in tree.modules)
        return verdicts[module]

    checked = ["distill"] + [m for m in sorted(tree.modules) if _within(m, (CLI,))]  # `distill`: their package
    return [f"{module}:{line} imports {name} (not light)" for module in checked for line, name in heavy_imports(module)]


# ------------------------------------------------------------------------------------------ the real tree

def test_the_graph_is_read_from_every_module():
    assert {"distill", "distill.cli", "distill.cli.run", "distill.run.experiment", "teachers"} <= set(MODULES)
    assert "distill.models.files" in GRAPH["distill.models"]  # `from pkg import name`: to the submodule
    assert "distill.utils.errors" in GRAPH["distill"]  # `from module import name`: to the module
    assert "distill.cli.run" in GRAPH["distill.cli.sweep"]


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}
    assert sorted(map(tuple, _cycles(graph))) == [("a", "b", "c", "a"), ("e", "e")]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles_between_modules():
    cycles = import_cycles(REPO)
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(cycles)


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
        for target, _line in sorted(targets.items()):
            back = _path(full, target, module)
            if back is not None and frozenset(zip([module] + back, back, strict=False)) not in seen:
                chain = [module] + back
                seen.add(frozenset(zip(chain, chain[1:], strict=False)))
                steps = [f"{a} (line {full[a][b]}{', in a function' if b in hidden_edges.get(a, {}) else ''})"
                         for a, b in zip(chain, chain[1:], strict=False)]
                found.append(" -> ".join(steps + [chain[-1]]))
    assert not found, "function-level imports that close an import cycle:\n" + "\n".join(found)


def test_lower_layers_do_not_import_the_upper_ones():
    found = layering_violations(REPO)
    assert not found, (f"{', '.join(LOWER_LAYERS)} must not import {', '.join(UPPER_LAYERS)} (also inside "
                       f"functions):\n" + "\n".join(found))


def test_packages_do_not_import_each_other():
    found = package_cycles(REPO)
    assert not found, ("packages that import each other (dependencies go one way; a shared piece goes down to the "
                       "package both may import, a legacy spelling to distill/compat.py):\n" + "\n".join(found))


def test_package_groups_cover_the_tree():
    assert {_group(m) for m in MODULES} >= set(PACKAGE_GROUPS) | {"distill", "distill.compat", "distill.registry"}
    assert _group("teachers.prepare") == "teachers" and _group("distill.run.plan") == "distill.run"


def test_no_module_is_over_the_line_limit():
    found = long_modules(REPO)
    assert not found, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(found)


def test_library_modules_do_not_import_argparse_or_the_commands():
    offences = command_line_code(REPO)
    assert not offences, "library modules with command-line code:\n" + "\n".join(offences)


def test_command_modules_import_only_light_modules_at_top_level():
    found = heavy_command_imports(REPO)
    assert not found, ("distill.cli modules import the library inside their handlers (distill --help must not "
                       "load torch); a library constant in help text: distill.cli.help_values:\n" + "\n".join(found))


def test_each_rule_reports_a_planted_violation(tmp_path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    images = tmp_path / "distill" / "data" / "images.py"
    n = len(images.read_text(encoding="utf-8").splitlines())
    with images.open("a", encoding="utf-8") as f:
        f.write("\n\ndef _planted():\n    from distill.train import engine\n    return engine\n")
    (tmp_path / "distill" / "utils" / "planted_long.py").write_text("x = 0\n" * (MAX_LINES + 1))
    cost = tmp_path / "distill" / "models" / "cost.py"
    cost.write_text(cost.read_text(encoding="utf-8") + "\nimport argparse  # noqa: E402\n", encoding="utf-8")
    (tmp_path / "distill" / "run" / "planted_a.py").write_text("from distill.run import planted_b  # noqa\n")
    (tmp_path / "distill" / "run" / "planted_b.py").write_text("import distill.run.planted_a  # noqa\n")
    (tmp_path / "distill" / "cli" / "planted_cmd.py").write_text("import numpy  # noqa\n"
                                                                 "from distill.models import cost  # noqa\n")

    def new(check):
        before = check(REPO)
        return [x for x in check(tmp_path) if x not in before]

    assert new(layering_violations) == [f"distill.data.images:{n + 4} imports distill.train.engine"]
    [loop] = new(package_cycles)  # the planted import closes a loop through distill.data and distill.train
    assert f"-> distill.train (distill.data.images:{n + 4} imports distill.train.engine) -> " in loop, loop
    assert loop.split(" ")[0] == loop.split(" -> ")[-1].split(" ")[0], loop  # a loop: it ends where it starts
    assert new(long_modules) == [f"{Path('distill/utils/planted_long.py')}: {MAX_LINES + 1} lines"]
    assert [x for x in new(command_line_code) if x.startswith("distill.models.cost:")] == \
        [f"distill.models.cost:{len(cost.read_text().splitlines())} imports argparse"]
    assert new(import_cycles) == ["distill.run.planted_a (line 1) -> distill.run.planted_b (line 1) -> "
                                  "distill.run.planted_a"]
    assert new(heavy_command_imports) == ["distill.cli.planted_cmd:1 imports numpy (not light)",
                                          "distill.cli.planted_cmd:2 imports distill.models.cost (not light)"]


# ------------------------------------------------------------------------------------------ the command
