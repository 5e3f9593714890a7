"""`teacher.shared_cache: FOLDER`: one frozen teacher's cache and verification metrics, made once for many runs.

A sweep of many points against one teacher (a study's seeds, losses and controls) would otherwise embed the
training set and evaluate the teacher once per run directory, most of a short distillation point's time. With
`teacher.shared_cache` every run that loads the same teacher weights over the same training data (and
preprocessing and autocast) uses one subfolder of FOLDER:

    FOLDER/<key>/               key: a hash of the cache key (teachers/cache_key.py: the teacher's weights, the
                                dataset's fingerprint, preprocessing, autocast); a different teacher or data has
                                another subfolder, so nothing is ever overwritten by a different teacher
      embeddings.f16, manifest.json    the cache (teachers/cache.py; reused, resumed or rebuilt as in a run directory)
      teacher_metrics.json             the teacher's verification metrics per set, keyed by the set file's sha256
      .lock                            held while a run builds or reads-and-extends the cache (others wait;
                                       under torchrun rank 0 holds it for the job: `held`)
      .metrics.lock                    held while a run records its metrics in teacher_metrics.json

Where the folder lives is not part of the teacher's identity: the rows are a function of the key alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time

import distill.utils.dist as ddp
from distill.utils.atomic import WriteError, atomic_write_json, ensure_writable, read_json, unwritable
from distill.utils.errors import DistillError

METRICS = "teacher_metrics.json"
POLL_SECONDS = 5.0  # how often the ranks of a run waiting for the folder's lock ask rank 0 whether it has it now


def shared_folder(root: str, key: dict) -> str:
    """The subfolder of `root` for a cache key (teachers.cache_key.cache_key)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(root, digest)


def _open_lock(folder: str, name: str) -> int:
    """An open descriptor of the folder's lock file `name` (the folder made first; one that cannot be is named)."""
    ensure_writable(folder, "teacher.shared_cache")  # creates it, or names why it cannot be written
    try:
        return os.open(os.path.join(folder, name), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise unwritable(folder, err, "teacher.shared_cache") from None


def _try_lock(fd: int) -> bool:
    """Take the lock of `fd` if it is free; False while another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        raise WriteError(f"cannot lock the teacher.shared_cache folder ({err.strerror or err})") from None
    return True


@contextlib.contextmanager
def held(folder: str, log=None, poll_seconds: float | None = None):
    """The folder's lock for the block, waiting while another run holds it (a run building the same cache, which
    may take hours). Every rank of a torchrun job enters it; rank 0 takes the lock for all.

    No rank waits for the lock inside one collective, which would outlast the process group's timeout: rank 0
    only tries the lock, and every `poll_seconds` (POLL_SECONDS) all ranks learn from it in a short exchange
    whether it holds it now; `log` gets one line while they wait. A folder rank 0 cannot lock stops every rank."""
    fd, got, noted = None, False, False
    try:
        while True:
            err = None
            if ddp.rank() == 0:
                try:
                    fd = _open_lock(folder, ".lock") if fd is None else fd
                    got = _try_lock(fd)
                except DistillError as e:
                    err = e
            state = ddp.from_rank0(got if err is None else (type(err), str(err)))
            if err is not None:
                raise err
            if isinstance(state, tuple):  # rank 0 stopped: the others stop with its message
                raise state[0](state[1])
            if state:
                break
            if not noted and log is not None:
                log.info(f"teacher cache: waiting for {folder}'s lock, held by another run")
                noted = True
            time.sleep(POLL_SECONDS if poll_seconds is None else poll_seconds)
        yield folder
    finally:
        if fd is not None:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextlib.contextmanager
def _metrics_held(folder: str):
    """The lock of the folder's teacher_metrics.json (its own, not the cache's: a run records metrics while another
    builds the cache); held by a run for one read and one write, so waiting for it is short."""
    fd = _open_lock(folder, ".metrics.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(folder: str) -> dict:
    data = read_json(os.path.join(folder, METRICS), {})  # none yet, or damaged: evaluated again and rewritten
    return data if isinstance(data, dict) else {}


def cached_metrics(folder: str, files: dict) -> dict | None:
    """{set name: metrics} for `files` ({set name: sha256 of its file}) when every set was evaluated before."""
    known = _read(folder)
    found = {name: known.get(digest) for name, digest in files.items()}
    return None if any(v is None for v in found.values()) else found


def ijb_files(ijb_cfg) -> dict:
    """The `files` of cached_metrics/keep_metrics for a teacher's IJB result (`data.ijb`): one entry keyed by the
    sha256 of each of its meta files, so another IJB set (or a changed one) is evaluated again."""
    from distill.data.ijb import META_FILES, meta_path
    from distill.utils.digest import file_sha256

    return {"ijb": "ijb " + " ".join(file_sha256(meta_path(ijb_cfg.root, ijb_cfg.target, kind)) for kind in META_FILES)}


def keep_metrics(folder: str, files: dict, metrics: dict) -> None:
    """Record the teacher's metrics of each set under its file's sha256 (other sets' entries stay; another run's
    record made meanwhile too: read and written under the metrics lock)."""
    with _metrics_held(folder):
        known = _read(folder)
        known.update({files[name]: value for name, value in metrics.items() if name in files})
        atomic_write_json(os.path.join(folder, METRICS), known)
