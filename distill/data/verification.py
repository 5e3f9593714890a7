"""Read and write insightface verification sets (`lfw.bin`, ...) through a restricted unpickler."""

from __future__ import annotations

import os
import pickle


def write_verification_bin(path, encoded_images, issame) -> None:
    """Write a `.bin` as insightface's tools do today: a protocol-4 pickle of (list[bytes], list[bool]).
    Pair k is images 2k and 2k+1. Writing a pickle is safe; only loading one can run code."""
    images = [bytes(b) for b in encoded_images]
    flags = [bool(s) for s in issame]
    if len(images) != 2 * len(flags):
        raise ValueError(f"{len(flags)} pairs need {2 * len(flags)} images, got {len(images)}")
    path = os.fspath(path)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        pickle.dump((images, flags), f, protocol=4)
    os.replace(tmp, path)
