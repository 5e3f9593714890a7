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

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from distill.atomic import atomic_write_json
from distill.errors import DataFormatError

CACHE_FORMAT = 1
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
        mem = np.memmap(emb_path, dtype=np.float16, mode="r+", shape=(n, 2, dim))
    else:
        if manifest is not None:
            stale = [k for k in key if manifest.get("key", {}).get(k) != key[k]]
            log(f"teacher cache: stale (changed: {', '.join(stale) or 'file size'}), rebuilding {directory}")
        start = 0
        manifest = {"key": key, "rows_done": 0}
        atomic_write_json(manifest_path, manifest)  # mark as in-progress before touching the rows
        mem = np.memmap(emb_path, dtype=np.float16, mode="w+", shape=(n, 2, dim))

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
