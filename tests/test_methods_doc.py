"""Every registered method has its row in docs/methods.md, and the row names the test that holds it to its source.

Issue 38, "Done when": each distillation loss (distill.losses.registry.DISTILL_LOSSES) and each margin head
(distill.losses.heads.HEADS) is a row of docs/methods.md (a table row whose first cell starts with its name in
backticks, or a `##` section whose heading holds "(`name`"), and that row either
- names a test function, `tests/test_reference….py::test_…`, holding the numbers of its official code, or
- says "no official code" and names the test function that checks our reading of the paper (any tests/ file).
Every `tests/<file>.py::<function>` a row names must exist. The check reads the registries, so a loss registered
without such a row fails here the moment it is registered.
"""

import ast
import re
from pathlib import Path

import torch

from distill.losses.heads import HEADS, register_head, unregister_head
from distill.losses.registry import DISTILL_LOSSES, register_loss, unregister_loss

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
TEST_REF = re.compile(r"tests/(test_\w+\.py)::([\w:]+)")


def entries(text: str, name: str) -> list[str]:
    """The rows of `name`: table rows whose first cell starts with `name` in backticks, and `##` sections (to the
    next `##`) whose heading holds "(`name`"."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| `") and line[2:].split("|", 1)[0].strip().startswith(f"`{name}`"):
            found.append(line)
        elif line.startswith("## ") and f"(`{name}`" in line:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
            found.append("\n".join(lines[i:end]))
    return found


def defined_tests(tests_dir: Path, file: str) -> set[str]:
    """`function` and `Class::method` names of the test functions defined in tests/<file> (empty if no such file)."""
    path = tests_dir / file
    if not path.is_file():
        return set()
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


def problems(names, text: str, tests_dir: Path) -> list[str]:
    """One line per method whose row is missing, names a test that does not exist, or names no test of the kind
    its row calls for (module docstring)."""
    out = []
    for name in sorted(names):
        rows = entries(text, name)
        if not rows:
            out.append(f"{name}: no row or section in docs/methods.md")
            continue
        joined = "\n".join(rows)
        named = set(TEST_REF.findall(joined))
        missing = sorted(f"tests/{f}::{fn}" for f, fn in named if fn not in defined_tests(tests_dir, f))
        if missing:
            out.append(f"{name}: names {', '.join(missing)}, which does not exist")
        existing = {(f, fn) for f, fn in named if fn in defined_tests(tests_dir, f)}
        if "no official code" in joined.lower():
            if not existing:
                out.append(f"{name}: says 'no official code' but names no test function (tests/<file>.py::<test>)")
        elif not any(f.startswith("test_reference") for f, _ in existing):
            out.append(f"{name}: names no tests/test_reference*.py::<test> holding its official code's numbers "
                       f"(or say 'no official code' and name its hand-computed test)")
    return out


def shipped_methods() -> set[str]:
    """The registered losses and heads whose code is in the distill package (a test's own registration, left
    behind by another test module in the same process, is not a method of the project)."""
    losses = {name for name, fn in DISTILL_LOSSES.items() if fn.__module__.startswith("distill.")}
    heads = {name for name, entry in HEADS.items() if entry.factory.__module__.startswith("distill.")}
    return losses | heads


def test_every_registered_loss_and_head_has_a_row_naming_its_test():
    found = problems(shipped_methods(), METHODS.read_text(), ROOT / "tests")
    assert not found, "docs/methods.md:\n" + "\n".join(found)


def test_a_loss_or_head_registered_without_a_row_fails_the_check():
    def undocumented_dummy(student, teacher):
        return (student - teacher).pow(2).mean()

    def undocumented_head(embedding_size, num_classes):
        return torch.nn.Identity()

    for fn in (undocumented_dummy, undocumented_head):
        fn.__module__ = "distill.losses.undocumented"  # as if a new module of the package registered them
    register_loss(undocumented_dummy)
    register_head(undocumented_head)
    try:
        found = problems(shipped_methods(), METHODS.read_text(), ROOT / "tests")
    finally:
        unregister_loss("undocumented_dummy")
        unregister_head("undocumented_head")
    assert "undocumented_dummy: no row or section in docs/methods.md" in found
    assert "undocumented_head: no row or section in docs/methods.md" in found


def test_a_row_must_name_an_existing_test_of_the_kind_it_calls_for(tmp_path):
    (tmp_path / "test_reference_x.py").write_text("def test_pinned():\n    pass\n")
    (tmp_path / "test_x.py").write_text("class TestByHand:\n    def test_by_hand(self):\n        pass\n")
    doc = "\n".join([
        "| `pinned` | paper | official code, pinned: `tests/test_reference_x.py::test_pinned` |",
        "| `typo` | paper | official code, pinned: `tests/test_reference_x.py::test_pined` |",
        "| `hand_only` | paper | official code; hand-computed `tests/test_x.py::TestByHand::test_by_hand` |",
        "| `no_code` | paper | no official code; `tests/test_x.py::TestByHand::test_by_hand` |",
        "| `no_code_no_test` | paper | no official code; tests/test_x.py |",
        "## Something (`sectioned`, its own module)", "Pinned: `tests/test_reference_x.py::test_pinned`.",
        "## Next", "| `other` | `sectioned` in a later cell is not its row |",
    ])
    found = problems(["pinned", "typo", "hand_only", "no_code", "no_code_no_test", "sectioned", "absent"],
                     doc, tmp_path)
    assert [line.split(":")[0] for line in found] == ["absent", "hand_only", "no_code_no_test", "typo", "typo"]
    assert "tests/test_reference_x.py::test_pined, which does not exist" in found[3]
