"""The teacher cache's one file on disk (teachers/cache.py): allocated whole before the first row is written, so a
full disk is a clear error before any work and never a SIGBUS under a memory map, then written by byte range
(each process its own rows)."""

from __future__ import annotations

import errno
import os
import shutil

from distill.utils.errors import DistillError


class CacheSpaceError(DistillError, OSError):
    """The teacher cache file cannot be allocated (full disk, read-only folder)."""
def allocate(path: str, nbytes: int, fresh: bool) -> None:
    """Give `path` all of its `nbytes` on disk before the first row is written (`fresh`: start from an empty
    file). A memory map over a sparse file dies with SIGBUS, no message, when the disk fills under it; a
    fully allocated file cannot run out, and a full disk is this error, before any work."""
    try:
        with open(path, "wb" if fresh else "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                _write_zeros(f, nbytes)  # a filesystem without fallocate: write the blocks out
            except AttributeError:  # pragma: no cover - no posix_fallocate (macOS, Windows)
                _write_zeros(f, nbytes)
    except OSError as err:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise CacheSpaceError(f"{path}: cannot allocate the teacher cache ({err.strerror or err}): it needs "
                              f"{nbytes:,} bytes ({nbytes / 1e9:.2f} GB), {free:,} bytes ({free / 1e9:.2f} GB) are "
                              f"free. Free disk space, put the run on a larger disk (--out), or set "
                              f"teacher.cache: false to run the teacher online") from None


def _write_zeros(f, nbytes: int, chunk: int = 1 << 24) -> None:
    f.seek(0, os.SEEK_END)
    done = f.tell()  # keep rows already written (a resumed build)
    zeros = bytes(chunk)
    while done < nbytes:
        n = min(chunk, nbytes - done)
        f.write(zeros[:n])
        done += n
    f.flush()
    os.fsync(f.fileno())


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        k = os.pwrite(fd, view, offset)
        view, offset = view[k:], offset + k
