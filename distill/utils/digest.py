"""A file's contents as a digest, read once per process while the file is unchanged.

`file_state(path)` is what "unchanged" means here: (absolute path, size, mtime_ns, inode), or None when the file
cannot be stat'ed. `file_sha256(path)` is the SHA-256 of the file's bytes, kept per file state, so a checkpoint,
an ONNX model or an IJB meta file read by several stages of one process is hashed once.
"""

from __future__ import annotations

import hashlib
import os

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
