"""docs/errors.md lists every error the toolkit raises for people, each with its fix, in step with the code."""

from tools import error_catalog


def test_the_doc_lists_exactly_the_errors_the_code_raises():
    code = error_catalog.extract()
    doc = error_catalog.read_doc()
    missing = [f"{f}: {c} {t!r}" for f, c, t in code if (f, c, t) not in doc]
    stale = [f"{f}: {c} {t!r}" for f, c, t in doc if (f, c, t) not in set(code)]
    how = "run `python -m tools.error_catalog`, then write the fix of each new entry in docs/errors.md"
    assert not missing, f"raised in the code, not in docs/errors.md ({how}):\n" + "\n".join(missing)
    assert not stale, f"in docs/errors.md, no longer raised by the code ({how}):\n" + "\n".join(stale)


def test_every_error_in_the_doc_has_a_fix():
    empty = [f"{f}: {c} {t!r}" for (f, c, t), fix in error_catalog.read_doc().items() if not fix.strip()]
    assert not empty, "docs/errors.md entries without a fix:\n" + "\n".join(empty)


def test_the_catalogue_reads_messages_as_the_code_writes_them():
    entries = error_catalog.extract()
    assert len(entries) > 150
    assert ("distill/config/files.py", "ConfigError",
            "{key_node.start_mark.name}: line {key_node.start_mark.line + 1}: key {key!r} is given twice in one "
            "mapping (first on line {first}); keep one of them") in entries
    assert ("distill/run/lock.py", "RunDirectoryLocked",
            "another distill run (pid {who.get('pid', '?')}, host {who.get('host', '?')}) is using {directory}; "
            "wait for it to finish, or give another --out") in entries
    # a subclass defined outside errors.py counts (DiskSpaceError is a DistillError through disk.py)
    assert any(f == "distill/run/disk.py" and c == "DiskSpaceError" for f, c, _ in entries)
    # errors built by a helper and raised elsewhere (`raise unwritable(...)`), or raised through a class passed in
    assert ("distill/utils/atomic.py", "WriteError",
            "{path}: cannot write {what} ({reason}); give a folder you can write to (or free disk space) and rerun"
            ) in entries
    assert any(f == "distill/utils/atomic.py" and c == "error" and "could not write {name}" in t for f, c, t in entries)
    assert any(f == "distill/utils/checkpoint.py" and c == "UnsafeFileError" for f, c, _ in entries)
