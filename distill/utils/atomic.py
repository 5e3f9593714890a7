"""The one atomic writer: a file is replaced whole or not at all (temporary file, fsync, rename).

Every file the toolkit writes in place of an older one (checkpoints, student.pt, result/summary JSON,
experiment.yaml, metrics logs, W&B ids, verification sets, RecordIO indexes) goes through
`atomic_open`, so a crash, a kill or a full disk never leaves a half-written file behind: readers see
the old file or the new one. A failure removes the temporary file, keeps the old file and raises a
`WriteError` that names the path and what to do. `full_disk(err)` finds a full disk (or quota) behind such an error,
naming the file (its `filename`), so that a command can add what to free (distill/run/disk.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

from distill.utils.errors import DistillError


class WriteError(DistillError, OSError):
    """A file could not be written (full disk, read-only folder); the previous file, if any, is intact."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def full_disk(err: BaseException | None) -> OSError | None:
    """The full-disk (or exhausted quota) OSError behind `err`: `err` itself, or an error it was raised from or
    while handling (torch.save reports a full disk as a RuntimeError raised while handling the OSError of its
    write); None when the failure is something else. The writers here set its `filename` to the file written."""
    for _ in range(16):  # the chain is short; a cycle cannot hang us
        if err is None:
            return None
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err
        err = err.__cause__ or err.__context__
    return None


def human(n: float) -> str:
    """A byte count as people read it: '512 B', '354.4 MB' (decimal units, as disk tools show them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def free_space(path) -> str:
    """'FOLDER has N MB free' for the folder of `path` ('' when it cannot be measured)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"{folder} has {human(free)} free"


@contextmanager
def atomic_open(path, mode: str = "w", what: str | None = None, error: type = WriteError, **open_kwargs):
    """`with atomic_open(path, "wb") as f: ...` writes `path` atomically. `what` names the file in the error
    message (default: its name); `error` is the exception class raised on failure.

    Besides OSError, a RuntimeError inside the block counts as a failed write: torch.save reports a full
    disk as `RuntimeError: ... failed writing file`."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        try:
            os.remove(tmp)
        except OSError:
            pass
        name = what or os.path.basename(path)
        kept = (f"the previous {os.path.basename(path)} is intact" if os.path.exists(path)
                else f"no previous {name} existed")
        full = full_disk(err)
        if full is not None:  # torch.save's RuntimeError says "unexpected pos": name the cause instead
            full.filename = path
            room = free_space(path)
            reason = (full.strerror or os.strerror(full.errno)) + (f": {room}" if room else "")
        else:
            reason = getattr(err, "strerror", None) or str(err).splitlines()[0][:200]
        how = "Free disk space there" if full is not None else "Free disk space (or make the folder writable)"
        raise error(f"{path}: could not write {name} ({reason}); {kept}. {how} and rerun the same command to "
                    f"resume.") from None


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path, obj) -> None:
    """Write a JSON file (manifest, result, summary) so readers see the old file or the new, never half."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)


def read_json(path, default=None):
    """The JSON in `path`, or `default` when the file is missing, unreadable or damaged: the readers of what
    atomic_write_json wrote that rebuild or ignore a file they cannot read (manifests, metrics, lock holders)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return default


def unwritable(path, err: OSError, what: str) -> WriteError:
    """The WriteError for a folder or file that cannot be created or written (read-only, full, missing parent)."""
    reason = getattr(err, "strerror", None) or str(err)
    return WriteError(f"{path}: cannot write {what} ({reason}); give a folder you can write to (or free disk "
                      f"space) and rerun")


def ensure_writable(folder, what: str) -> None:
    """Create `folder` if needed and prove a file can be written in it, before any work goes into it."""
    folder = os.fspath(folder) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise WriteError(f"{folder}: is a file, not a folder; give a folder (new or existing) for {what}")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise unwritable(folder, err, what) from None


def check_output_file(path, option: str) -> None:
    """Before the long work that ends in writing `path` (a file named by `option`): it is not a folder, its folder
    exists and takes a file. A WriteError names the option and what to do."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise WriteError(f"{option} {path}: is a folder; give a file name (e.g. {os.path.join(path, 'out')}"
                         f"{os.path.splitext(path)[1] or ''})")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise WriteError(f"{option} {path}: the folder {folder} does not exist; create it or give a path in an "
                         f"existing folder (checked before any work)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise WriteError(f"{option} {path}: cannot write in {folder} ({getattr(err, 'strerror', None) or err}); "
                         f"give a folder you can write to") from None
