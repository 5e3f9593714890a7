"""The catalogue of errors raised for people (docs/errors.md), read from the source and kept in step with it.

Every `raise SomeError(message)` in `distill/` and `teachers/` whose class is one of the toolkit's
DistillError subclasses is an entry: its file, its class and its message as written in the code (an
f-string shown with its `{placeholders}`; a message built elsewhere is shown as the expression that
builds it). docs/errors.md lists each entry with the fix; tests/test_errors_doc.py fails when the doc
names a message the code no longer raises, when the code raises one the doc lacks, or when a fix is
empty. `python -m tools.error_catalog` rewrites the doc: entries in code order, the fixes already
written kept, new entries added with an empty fix for a person to write.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("distill", "teachers")
DOC = ROOT / "docs" / "errors.md"
HEADER = """# Errors and what to do about them

Every error facedistill raises on purpose, for a mistake in what it was given (an experiment file, a
command-line argument, a data file, a checkpoint) or a fault around it (a full disk, a locked run
directory). The command line prints each as one line, `distill <command>: error: <message>`, and exits
with status 2 (`distill doctor` shows several at once and exits 1). Anything else, printed with a
traceback, is a bug: please report it.

Messages are shown as the code writes them: `{...}` stands for what is filled in (a path, a key, a
value). The list is generated from the source and checked by `tests/test_errors_doc.py`; after changing
a message run `python -m tools.error_catalog` and write the fix of any new entry.
"""

_ENTRY = re.compile(r"^- \*\*([^*]+)\*\* `` (.*) ``$")
_FIX = re.compile(r"^  Fix: (.*)$")
_SECTION = re.compile(r"^## `(.+)`$")


def _error_classes() -> set:
    """Names of DistillError and its subclasses defined anywhere in the sources (by reading, not importing)."""
    bases, names = {}, {"DistillError"}
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
    changed = True
    while changed:
        changed = False
        for name, parents in bases.items():
            if name not in names and any(p in names for p in parents):
                names.add(name)
                changed = True
    return names


def _files() -> list:
    return sorted(p for src in SOURCES for p in (ROOT / src).rglob("*.py"))


def template(node) -> str:
    """The message as written: an f-string with its placeholders, a literal, or the expression building it."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            else:
                conversion = f"!{chr(value.conversion)}" if value.conversion > 0 else ""
                spec = f":{template(value.format_spec)}" if value.format_spec is not None else ""
                parts.append("{" + ast.unparse(value.value) + conversion + spec + "}")
        return "".join(parts)
    return "(built as) " + ast.unparse(node) if node is not None else "(no message)"


# Python's own exceptions, raised for programming errors (never for a person's input) and not catalogued
_BUILTIN = {name for name in dir(__builtins__ if isinstance(__builtins__, dict) else __builtins__.__dict__)
            if name.endswith(("Error", "Exception"))} | {n for n in dir(__import__("builtins")) if n.endswith("Error")}


def _message_call(node, classes: set):
    """(class name, message node) when `node` builds an error for people: a call of one of the toolkit's error
    classes (raised or returned by a helper that makes them), or any non-builtin callable given a message
    string (`error(...)` passed in, `type(err)(...)`); else None."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    message = node.args[0] if node.args else None
    if name in classes:
        return name, message
    if name not in _BUILTIN and isinstance(message, (ast.JoinedStr, ast.Constant)) and \
            isinstance(getattr(message, "value", ""), (str, type(None))) and not isinstance(func, ast.Attribute):
        return ast.unparse(func), message
    return None


def extract() -> list:
    """[(file relative to the repository, class name, message template)] in code order, duplicates once:
    every `raise` of a message error, and every `return` of one (helpers that build errors for a raise)."""
    classes = _error_classes()
    seen, entries = set(), []
    for path in _files():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise):
                found = _message_call(node.exc, classes)
            elif isinstance(node, ast.Return) and isinstance(node.value, ast.Call):
                found = _message_call(node.value, classes)
                found = found if found and found[0] in classes else None  # returned: only real error classes
            else:
                continue
            if found is None:
                continue
            name, message = found
            text = " ".join(template(message).split())
            key = (rel, name, text)
            if key not in seen:
                seen.add(key)
                entries.append((node.lineno, key))
    order = {f: i for i, f in enumerate(dict.fromkeys(k[0] for _, k in entries))}
    return [k for _, k in sorted(entries, key=lambda e: (order[e[1][0]], e[0]))]


def read_doc(path: Path = DOC) -> dict:
    """{(file, class, template): fix} from docs/errors.md."""
    out, section, last = {}, None, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := _SECTION.match(line):
            section = m.group(1)
        elif (m := _ENTRY.match(line)) and section:
            last = (section, m.group(1), m.group(2))
            out[last] = ""
        elif (m := _FIX.match(line)) and last:
            out[last] = m.group(1).strip()
            last = None
    return out


def render(entries: list, fixes: dict) -> str:
    lines, section = [HEADER], None
    for key in entries:
        if key[0] != section:
            section = key[0]
            lines += ["", f"## `{section}`", ""]
        lines.append(f"- **{key[1]}** `` {key[2]} ``")
        lines.append(f"  Fix: {fixes.get(key, '')}".rstrip())
    return "\n".join(lines) + "\n"


def carry_moved(entries: list, fixes: dict) -> dict:
    """A message that moved to another file (code regrouped) keeps its fix: matched by class and message."""
    by_message = {(cls, text): fix for (_, cls, text), fix in fixes.items() if fix}
    return {**{k: by_message[k[1:]] for k in entries if not fixes.get(k) and k[1:] in by_message}, **fixes}


def main() -> int:
    entries = extract()
    fixes = carry_moved(entries, read_doc() if DOC.exists() else {})
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(entries, fixes), encoding="utf-8")
    missing = [k for k in entries if not fixes.get(k)]
    kept = {k[1:] for k in entries}
    gone = [k for k in fixes if k not in set(entries) and k[1:] not in kept]
    print(f"{DOC}: {len(entries)} errors; {len(missing)} without a fix yet; {len(gone)} dropped (no longer raised)")
    for file, cls, text in gone:  # a reworded message: its old fix, to carry over by hand
        print(f"  dropped from {file}: {cls} {text[:100]!r} (fix was: {fixes[(file, cls, text)]!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
