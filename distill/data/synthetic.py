"""Synthetic face datasets: procedural identities written as insightface train.rec/.idx/property plus a held-out .bin.

    out/train.rec, train.idx, property   identities 0..ids-1 (class id = identity index), keys 1..N
    out/synth_val.bin                    `pairs` verification pairs of identities ids..ids+holdout_ids-1,
                                         same and different pairs alternating (every fold balanced)
    out/synth_val_pairs.tsv              where each pair came from: identity and image index of both sides
    out/synth.json                       the parameters; written last, so its presence means "complete"

Every image is a pure function of (seed, identity, image index) (see face_render.py), so the files
are byte-identical for the same parameters however many worker processes render them.
`ensure_synthetic` is the generate-if-missing entry point experiments use.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from distill.data.face_render import RENDERER_VERSION, render_jpegs
from distill.data.recordio_writer import write_insightface_rec
from distill.data.verification import write_verification_bin
from distill.utils.atomic import read_json
from distill.utils.errors import ConfigError

MANIFEST = "synth.json"
VAL_BIN = "synth_val.bin"
VAL_PAIRS = "synth_val_pairs.tsv"
JPEG_QUALITY = 90
_FORMAT = "facedistill-synthetic-faces"
_PAIRS_STREAM = 2  # entropy word after the seed; 0 and 1 draw identities and images (face_identity.py)


def default_holdout_ids(ids: int) -> int:
    """Enough held-out people that different-identity pairs are varied: a tenth of the training ids, at least 10."""
    return max(10, int(ids) // 10)


def synthetic_params(ids=1000, images_per_id=20, size=112, pairs=2000, seed=0, holdout_ids=None) -> dict:
    """The parameters that define a synthetic dataset, checked and completed (these, and only these, go in
    synth.json)."""
    params = {"ids": ids, "images_per_id": images_per_id, "size": size, "pairs": pairs, "seed": seed,
              "holdout_ids": default_holdout_ids(ids) if holdout_ids is None else holdout_ids}
    low = {"ids": 1, "images_per_id": 1, "size": 16, "pairs": 0, "seed": 0, "holdout_ids": 2}
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low[key]:
            raise ConfigError(f"synthetic data: {key} = {value!r}; it must be an integer >= {low[key]}")
        params[key] = int(value)
    if params["pairs"] % 2:
        raise ConfigError(f"synthetic data: pairs = {params['pairs']}; it must be even (half same, half different)")
    return params


def _pool(workers: int):
    # fork: workers start in milliseconds and need nothing re-imported; they only run numpy and PIL.
    method = "fork" if sys.platform.startswith("linux") else None
    return multiprocessing.get_context(method).Pool(workers)


def _render(jobs, workers: int):
    """Yield each job's JPEG list, in job order, rendered by `workers` processes (or inline for 1)."""
    if workers <= 1:
        yield from map(render_jpegs, jobs)
        return
    with _pool(workers) as pool:
        yield from pool.imap(render_jpegs, jobs)


def plan_pairs(params: dict) -> list:
    """[(identity_a, image_a, identity_b, image_b, same)] for the held-out set. Pair k uses images 2k and
    2k+1, so every image in the .bin is a distinct rendering; same and different pairs alternate so that
    each of the protocol's 10 contiguous folds is balanced."""
    rng = np.random.default_rng([params["seed"], _PAIRS_STREAM])
    first, n = params["ids"], params["holdout_ids"]
    out = []
    for k in range(params["pairs"]):
        if k % 2 == 0:
            a = b = first + int(rng.integers(n))
        else:
            a, b = (first + int(i) for i in rng.choice(n, 2, replace=False))
        out.append((a, 2 * k, b, 2 * k + 1, k % 2 == 0))
    return out


def generate(out_dir, ids=1000, images_per_id=20, size=112, pairs=2000, seed=0, holdout_ids=None,
             workers=None, progress=False) -> dict:
    """Render and write a synthetic dataset into `out_dir` (layout in the module docstring); return the manifest.

    `workers`: rendering processes (default: the CPUs this process may use). Prefer `ensure_synthetic`,
    which writes into a temporary folder and renames it, so a reader never sees a half-written dataset.
    """
    from tqdm import tqdm

    params = synthetic_params(ids, images_per_id, size, pairs, seed, holdout_ids)
    workers = len(os.sched_getaffinity(0)) if workers is None and hasattr(os, "sched_getaffinity") else workers
    workers = max(1, int(workers or os.cpu_count() or 1))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The manifest vouches for the files: it goes first and comes back last, so an interrupted run
    # over an older dataset never leaves new files under the old parameters.
    (out / MANIFEST).unlink(missing_ok=True)
    seed, size, k = params["seed"], params["size"], params["images_per_id"]

    # One job per identity keeps each identity's geometry built once and its images contiguous.
    train_jobs = [(seed, size, JPEG_QUALITY, [(i, j) for j in range(k)]) for i in range(params["ids"])]

    def train_samples():
        bar = tqdm(total=params["ids"] * k, desc="synth train", unit="img", disable=not progress)
        for identity, jpegs in enumerate(_render(train_jobs, workers)):
            bar.update(len(jpegs))
            for data in jpegs:
                yield identity, data
        bar.close()

    n_images = write_insightface_rec(out, train_samples(), num_classes=params["ids"], image_size=size)

    plan = plan_pairs(params)
    if plan:
        items = [item for a, ia, b, ib, _ in plan for item in ((a, ia), (b, ib))]
        chunk = 64
        jobs = [(seed, size, JPEG_QUALITY, items[i:i + chunk]) for i in range(0, len(items), chunk)]
        images = []
        for jpegs in tqdm(_render(jobs, workers), total=len(jobs), desc="synth pairs", unit="chunk",
                          disable=not progress):
            images += jpegs
        write_verification_bin(out / VAL_BIN, images, [p[4] for p in plan])
        with open(out / VAL_PAIRS, "w", encoding="ascii", newline="\n") as f:
            f.write("identity_a\timage_a\tidentity_b\timage_b\tissame\n")
            f.writelines(f"{a}\t{ia}\t{b}\t{ib}\t{int(same)}\n" for a, ia, b, ib, same in plan)

    manifest = {
        "format": _FORMAT,
        "renderer_version": RENDERER_VERSION,
        "jpeg_quality": JPEG_QUALITY,
        "params": params,
        "images": n_images,
        "train_identities": [0, params["ids"]],
        "holdout_identities": [params["ids"], params["ids"] + params["holdout_ids"]],
        "files": ["train.rec", "train.idx", "property"] + ([VAL_BIN, VAL_PAIRS] if plan else []),
    }
    # No timing in the manifest: every file of a dataset, this one included, is a function of the parameters.
    with open(out / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


def read_manifest(out_dir):
    """The synth.json of `out_dir`, or None when there is none or it cannot be read."""
    manifest = read_json(Path(out_dir) / MANIFEST)
    return manifest if isinstance(manifest, dict) and manifest.get("format") == _FORMAT else None


def synthetic_is_current(out_dir, **params) -> bool:
    """True when `out_dir` holds a complete dataset written with these parameters by this renderer."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        return False
    return (manifest.get("params") == synthetic_params(**params)
            and manifest.get("renderer_version") == RENDERER_VERSION
            and manifest.get("jpeg_quality") == JPEG_QUALITY
            and all((Path(out_dir) / name).is_file() for name in manifest.get("files", [])))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_interrupted(out: Path) -> None:
    """Remove what a killed generation left beside `out`: its hidden `.<name>.partial-<pid>` folder, and
    the `.<name>.old-<pid>` copy of the previous dataset (put back in place if `out` itself is gone)."""
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        for kind in ("partial", "old"):
            prefix = f".{out.name}.{kind}-"
            if not entry.name.startswith(prefix) or not entry.name[len(prefix):].isdigit():
                continue
            if _pid_alive(int(entry.name[len(prefix):])):
                continue  # a generation still running
            if kind == "old" and not out.exists():
                os.replace(entry, out)  # killed between the two renames: the previous dataset comes back
            else:
                shutil.rmtree(entry, ignore_errors=True)


def _differs(out: Path, params: dict) -> str:
    """How the dataset in `out` differs from what `params` ask for, for the refusal's message."""
    manifest = read_manifest(out) or {}
    on_disk = {**(manifest.get("params") or {}), "renderer_version": manifest.get("renderer_version")}
    wanted = {**synthetic_params(**params), "renderer_version": RENDERER_VERSION}
    keys = [k for k in wanted if on_disk.get(k) != wanted[k]]
    if not keys:  # same settings, files missing
        return "some of its files are missing"
    return f"on disk {({k: on_disk.get(k) for k in keys})}, data.synthetic asks for {({k: wanted[k] for k in keys})}"


def synthetic_refusal(out_dir, params: dict, replace: bool = False) -> str | None:
    """Why `ensure_synthetic(out_dir, replace=replace, **params)` would refuse to (re)generate, or None when it
    would use or generate the dataset. Reads only: `distill doctor` asks this before a run."""
    out = Path(out_dir)
    if synthetic_is_current(out, **params):
        return None
    ways_out = f"give another data.train, or delete {out} to generate it again"
    if out.exists() and (not out.is_dir() or (read_manifest(out) is None and any(out.iterdir()))):
        return f"{out}: exists and is not a synthetic dataset (no {MANIFEST}); it is never overwritten: {ways_out}"
    if not replace and out.exists() and any(out.iterdir()):
        return (f"{out}: holds a synthetic dataset made with other settings ({_differs(out, params)}); "
                f"distill run never replaces a dataset: {ways_out}")
    return None


def ensure_synthetic(out_dir, workers=None, progress=False, replace=True, **params) -> dict:
    """Make `out_dir` hold the synthetic dataset with `params` (see `generate`); return its manifest.

    A no-op when synth.json already records the same parameters (and renderer version). A missing (or
    empty) folder is generated into a hidden sibling folder and renamed into place, so an interrupted run
    leaves either the old dataset or nothing, never half of one; what a killed generation left behind is
    cleaned up first. An existing dataset with other settings is replaced only with `replace=True` (the
    explicit `distill data synth`); `distill run` passes False and stops with both settings instead.
    A folder that holds something other than a synthetic dataset is never overwritten.
    """
    synthetic_params(**params)  # a bad parameter fails here, before any folder is touched
    out = Path(out_dir)
    clean_interrupted(out)
    if synthetic_is_current(out, **params):
        return read_manifest(out)
    refusal = synthetic_refusal(out, params, replace)
    if refusal:
        raise ConfigError(refusal)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = generate(tmp, workers=workers, progress=progress, **params)
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process (another rank, say) finished the same dataset first: keep theirs.
            if synthetic_is_current(out, **params):
                return read_manifest(out)
            if old.exists() and not out.exists():
                os.replace(old, out)  # put the previous dataset back rather than lose it
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return manifest
