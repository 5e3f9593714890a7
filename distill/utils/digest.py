"""A file's contents as a digest, read once per process while the file is unchanged, and the check of a file a run
reads back against the digest its stage recorded.

`file_state(path)` is what "unchanged" means here: (absolute path, size, mtime_ns, inode), or None when the file
cannot be stat'ed. `file_sha256(path)` is the SHA-256 of the file's bytes, kept per file state, so a checkpoint,
an ONNX model or an IJB meta file read by several stages of one process is hashed once.

A finished stage records the SHA-256 of the files later stages and commands read back (its student.pt, best.pt,
last.pt, the teacher's backbone.pth) in its result.json under RECORD_KEY, {file name: hex digest}.
`check_recorded_file` is what every reader calls before it loads one: a file that is no longer the one recorded is
refused, so nothing is distilled from, started from, evaluated or exported from a file the run did not write.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from distill.utils.errors import CheckpointError
from distill.utils.layout import RESULT as _RESULT

RECORD_KEY = "sha256"  # result.json: {file name in the stage folder: SHA-256 (hex) of its bytes when recorded}

_SHA256: dict = {}  # file_state -> hex digest


def file_state(path: str):
    """(absolute path, size, mtime_ns, inode) of `path`, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino


def file_sha256(path: str) -> str:
    """SHA-256 (hex) of the bytes of `path`, hashed once while its file_state is unchanged."""
    key = file_state(path)
    if key is None or key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if key is None:
            return h.hexdigest()
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def files_sha256(paths) -> dict:
    """{file name: SHA-256} of those of `paths` that exist: what a stage records (RECORD_KEY) of its files."""
    return {os.path.basename(p): file_sha256(p) for p in paths if os.path.isfile(p)}


def named_files_sha256(source: str) -> str | None:
    """SHA-256 (hex) of the file `source` names, or of the files a glob names (each file's name and digest, in
    name order); None when it names no file (the reader reports that)."""
    if not glob.has_magic(source):
        return file_sha256(source) if os.path.isfile(source) else None
    paths = sorted(p for p in glob.glob(source) if os.path.isfile(p))
    if not paths:
        return None
    return hashlib.sha256("".join(f"{os.path.basename(p)} {file_sha256(p)}\n" for p in paths).encode()).hexdigest()


def _stage_record(path: str) -> tuple:
    """(stage name, recorded SHA-256 or None) of `path` from the result.json beside it; (None, None) without one
    that reads (no stage folder, a stage finished before digests were recorded, a damaged result.json)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), _RESULT), encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None, None
    record = result.get(RECORD_KEY) if isinstance(result, dict) else None
    digest = record.get(os.path.basename(path)) if isinstance(record, dict) else None
    if not isinstance(digest, str):
        return None, None
    stage = result.get("stage") if isinstance(result.get("stage"), str) else None
    return stage or os.path.basename(os.path.dirname(os.path.abspath(path))), digest


def check_recorded_file(path: str) -> None:
    """Refuse `path` (a stage's student.pt, best.pt, last.pt or backbone.pth) when its stage's result.json records
    a digest of it and the file's bytes no longer have it: a CheckpointError naming both digests and the way out
    (`--restart-stage <stage>`). A file with no record (not in a stage folder, or written before digests were
    recorded) is not checked."""
    stage, recorded = _stage_record(path)
    if recorded is None or not os.path.isfile(path):
        return
    current = file_sha256(path)
    if current != recorded:
        raise CheckpointError(f"{path}: not the file stage {stage} wrote (its result.json records sha256 {recorded}, "
                              f"the file has sha256 {current}); nothing is trained, evaluated or exported from a "
                              f"file the run did not record: put the original back, or train {stage} again with "
                              f"--restart-stage {stage}")
