"""Frozen-teacher embeddings computed once (each image and its horizontal flip), memory-mapped float16.

The teacher is the expensive half of distillation (IResNet-100 is 24 GFLOPs an image against the
student's 1). With flipping as the only augmentation, each image has exactly two teacher outputs, so
they are computed once and training reads row `[index, flipped]` instead of running the teacher.

Layout of a cache directory:
    embeddings.f16   raw float16 array, shape (num_samples, 2, dim); [:, 0] original, [:, 1] flipped
    manifest.json    what the rows were computed from (teacher weights hash, dataset fingerprint,
                     preprocessing) and how many rows are done

A manifest that disagrees with the current teacher/dataset/preprocessing marks the cache stale: it is
rebuilt. An interrupted build resumes from the last flushed chunk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from distill.atomic import atomic_write_json
from distill.errors import DataFormatError, DistillError

CACHE_FORMAT = 1


class CacheSpaceError(DistillError, OSError):
    """The teacher cache file cannot be allocated (full disk, read-only folder)."""
PREPROCESSING = {"normalize": "(x/255-0.5)/0.5", "flip": "horizontal", "dtype": "float16"}


def match_input_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a normalised batch to the teacher's input side when the data is stored at another size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def dataset_fingerprint(dataset) -> str:
    fp = getattr(dataset, "fingerprint", None)
    if fp is None:
        raise DataFormatError(f"{type(dataset).__name__} has no fingerprint(); the teacher cache cannot tell "
                              f"whether it is stale (use teacher.cache: false for this dataset)")
    return fp()


def cache_key(teacher, dataset) -> dict:
    return {
        "format": CACHE_FORMAT,
        "teacher": teacher.fingerprint(),
        "dataset": dataset_fingerprint(dataset),
        "preprocessing": {**PREPROCESSING, "teacher_input_size": teacher.input_size,
                          "data_input_size": getattr(dataset, "input_size", None)},
        "num_samples": len(dataset),
        "dim": teacher.embedding_size,
    }


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


class TeacherCache:
    """Read side: `lookup(indices, flipped) -> float32 tensor (B, dim)`."""

    def __init__(self, directory: str, num_samples: int, dim: int):
        self.directory = directory
        self.path = os.path.join(directory, "embeddings.f16")
        self.emb = np.memmap(self.path, dtype=np.float16, mode="r", shape=(num_samples, 2, dim))

    def __len__(self) -> int:
        return self.emb.shape[0]

    def lookup(self, indices: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        rows = self.emb[indices.cpu().numpy(), flipped.cpu().numpy().astype(np.int64)]
        return torch.from_numpy(rows.astype(np.float32))


def _read_manifest(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class _Originals(torch.utils.data.Dataset):
    """Un-flipped images with their index, for the build loader."""

    def __init__(self, dataset, start: int):
        self.dataset, self.start = dataset, start

    def __len__(self):
        return len(self.dataset) - self.start

    def __getitem__(self, i):
        return self.dataset.get(self.start + i, False)


def build_cache(teacher, dataset, directory: str, batch_size: int = 128, num_workers: int = 0,
                device: str = "cpu", progress: bool = True, flush_every: int = 20, log=print) -> TeacherCache:
    """Fill (or reuse, or resume) the cache of `teacher` over `dataset` in `directory`."""
    os.makedirs(directory, exist_ok=True)
    key = cache_key(teacher, dataset)
    n, dim = key["num_samples"], key["dim"]
    manifest_path = os.path.join(directory, "manifest.json")
    emb_path = os.path.join(directory, "embeddings.f16")
    manifest = _read_manifest(manifest_path)
    usable = manifest is not None and manifest.get("key") == key and os.path.exists(emb_path) \
        and os.path.getsize(emb_path) == n * 2 * dim * 2
    if usable and manifest.get("rows_done") == n:
        return TeacherCache(directory, n, dim)
    if usable:
        start = int(manifest["rows_done"])
        log(f"teacher cache: resuming an interrupted build at row {start}/{n}")
    else:
        if manifest is not None:
            stale = [k for k in key if manifest.get("key", {}).get(k) != key[k]]
            log(f"teacher cache: stale (changed: {', '.join(stale) or 'file size'}), rebuilding {directory}")
        start = 0
        manifest = {"key": key, "rows_done": 0}
        atomic_write_json(manifest_path, manifest)  # mark as in-progress before touching the rows
    allocate(emb_path, n * 2 * dim * 2, fresh=not usable)
    mem = np.memmap(emb_path, dtype=np.float16, mode="r+", shape=(n, 2, dim))

    loader = torch.utils.data.DataLoader(_Originals(dataset, start), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    teacher = teacher.to(device)
    row, t0 = start, time.perf_counter()
    bar = tqdm(total=n, initial=start, unit="img", desc="teacher cache", disable=not progress,
               dynamic_ncols=True, leave=False)
    try:
        for i, x in enumerate(loader):
            x = match_input_size(x.to(device), teacher.input_size)
            both = teacher(torch.cat([x, torch.flip(x, dims=[3])]))
            both = both.float().cpu().numpy().reshape(2, len(x), dim).transpose(1, 0, 2)
            if not np.isfinite(both).all():
                raise DataFormatError(f"teacher produced NaN/Inf embeddings for rows {row}..{row + len(x) - 1}")
            peak = float(np.abs(both).max())
            if peak > float(np.finfo(np.float16).max):  # would be stored as inf
                raise DataFormatError(f"teacher embeddings reach {peak:.3g} (rows {row}..{row + len(x) - 1}), beyond "
                                      f"float16's range; is the teacher trained? Use teacher.cache: false to teach online")
            mem[row:row + len(x)] = both.astype(np.float16)
            row += len(x)
            bar.update(len(x))
            if (i + 1) % flush_every == 0:
                mem.flush()
                manifest["rows_done"] = row
                atomic_write_json(manifest_path, manifest)
    finally:
        bar.close()
    mem.flush()
    manifest["rows_done"] = row
    manifest["seconds"] = manifest.get("seconds", 0.0) + time.perf_counter() - t0
    atomic_write_json(manifest_path, manifest)
    del mem
    return TeacherCache(directory, n, dim)
