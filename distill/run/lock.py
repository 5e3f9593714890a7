"""One writer per run directory: an exclusive OS file lock on `<run dir>/.lock` for the whole run.

Two `distill run` (or `distill sweep` points, or `distill cache build`) processes on one directory would
both write last.pt.tmp and interleave metrics.jsonl; the second one stops at once, naming the first.
The lock is `flock` on an open file: the operating system drops it when the holding process exits or is
killed, so a stale lock from a killed run never blocks the rerun (the file itself stays; its pid/host
line is read only while someone holds the lock). Under torchrun, rank 0 takes the lock for the job and
the other ranks share its claim (they learn rank 0's outcome, so every rank stops with the same message).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import contextmanager

from distill.utils.atomic import WriteError, ensure_writable, read_json, unwritable
from distill.utils.dist import from_rank0, rank
from distill.utils.errors import DistillError
from distill.utils.layout import RunLayout


class RunDirectoryLocked(DistillError):
    """Another process holds the run directory's lock."""


def _holder(path: str) -> dict:
    return read_json(path, {})


def _acquire(directory: str):
    """The open, locked file descriptor of `directory`'s lock; RunDirectoryLocked when another process has it."""
    path = RunLayout(directory).lock
    ensure_writable(directory, "the run directory")  # (a file where the folder should be: named as such)
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise unwritable(directory, err, "the run directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        who = _holder(path)
        raise RunDirectoryLocked(f"another distill run (pid {who.get('pid', '?')}, host {who.get('host', '?')}) is "
                                 f"using {directory}; wait for it to finish, or give another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    return fd


@contextmanager
def run_directory_lock(directory: str):
    """Hold `directory`'s lock for the duration of the block (rank 0 for a torchrun job)."""
    fd, error = None, None
    if rank() == 0:
        try:
            fd = _acquire(directory)
        except (RunDirectoryLocked, WriteError) as err:
            error = (type(err).__name__, str(err))
    error = from_rank0(error)  # torchrun: every rank learns whether rank 0 holds the lock (none hangs later)
    if error is not None:
        raise {"WriteError": WriteError}.get(error[0], RunDirectoryLocked)(error[1])
    try:
        yield
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def lock_holder(directory: str) -> dict | None:
    """{"pid", "host"} of the process holding `directory`'s lock now, or None when it is free (reads only:
    the probe takes the lock for an instant and never creates the file)."""
    path = RunLayout(directory).lock
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path) or {"pid": "?", "host": "?"}
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return None
