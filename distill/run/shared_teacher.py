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
      .lock                            held while a run builds or reads-and-extends the folder (others wait)

Where the folder lives is not part of the teacher's identity: the rows are a function of the key alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os

from distill.utils.atomic import atomic_write_json, ensure_writable, read_json, unwritable

METRICS = "teacher_metrics.json"


def shared_folder(root: str, key: dict) -> str:
    """The subfolder of `root` for a cache key (teachers.cache_key.cache_key)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return os.path.join(root, digest)


@contextlib.contextmanager
def held(folder: str):
    """The folder's lock for the block, waiting while another run holds it (a run building the same cache)."""
    ensure_writable(folder, "teacher.shared_cache")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise unwritable(folder, err, "teacher.shared_cache") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
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
    """Record the teacher's metrics of each set under its file's sha256 (other sets' entries stay)."""
    known = _read(folder)
    known.update({files[name]: value for name, value in metrics.items() if name in files})
    atomic_write_json(os.path.join(folder, METRICS), known)
