"""IJB-B / IJB-C 1:1 template verification, step for step as arcface_torch's eval_ijbc.py (its default "N1 D1 F2").

1. Every image is aligned (5 landmarks onto the ArcFace template, distill/data/align.py) and embedded
   with its horizontal flip; the image feature is the sum of the two (F2; `flip=False`: the image alone).
2. N1 (`norm_score=True`) keeps the feature's norm as a quality weight: arcface_torch's
   `use_norm_score = True` means *not* normalising. `norm_score=False` normalises each image feature.
   D1 (`detector_score=True`) multiplies it by the detector score of its landmark line.
3. The images of one media (a video's frames) are averaged, the medias of one template summed, and the
   template L2-normalised (one with no feature stays zero, as sklearn's normalize leaves it).
4. A pair's score is the cosine of its two template features.
5. ROC over all pairs as sklearn.metrics.roc_curve computes it (its default drop_intermediate=True
   keeps only the corners); TAR at a FAR is the TPR of the ROC point whose FPR is nearest the FAR
   (on a tie the higher point), AUC the trapezoidal area under the curve.

Results key their FARs as distill.eval.far.far_key writes them ('1e-6' .. '1e-1'); results keyed as
eval_ijbc.py names its columns, str(far) ('1e-06', '0.0001'), are read as those keys
(distill.eval.far.normalise_results).

The numbers are eval_ijbc.py's bit for bit given the same image features: pooling runs in float32 in
its order of additions, scoring in float64 with np.sum, the ROC is sklearn's. Pooling and scoring are
vectorised (np.unique and np.add.at; pair scores in small chunks): with IJB-C's 469,375 image features,
23,124 templates and 15,658,489 pairs, the whole of steps 2-5 took 50 s on a busy 2-core CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from distill.data.ijb import AlignedFaces, IJBMeta
from distill.eval.far import IJB_FARS, far_key
from distill.eval.verification import EvaluationError
from distill.utils.atomic import atomic_open, atomic_write_json
from distill.utils.device import model_device
from distill.utils.digest import file_sha256
from distill.utils.errors import ConfigError, DataFormatError

FEATURE_CACHE_FORMAT = "facedistill.ijb-features/1"
_PAIR_CHUNK = 256  # pairs scored at once (the fastest of the sizes tried: docs/measurements.md)
# Aligned faces of one small IJB set are kept for the process's next model (a run evaluates the teacher and every
# stage, a sweep every point): reading, decoding and aligning are most of a small set's evaluation
# (docs/measurements.md). A set over this many bytes of aligned images is read again.
_KEEP_ALIGNED_BYTES = 256 * 2**20
_aligned: dict = {}  # {key: [(index, images, errors) per batch]}: one set at a time


# --------------------------------------------------------------------------- embedding


def embed_images(model, meta: IJBMeta, input_size: int, indices=None, flip: bool = True, batch_size: int = 128,
                 workers: int = 4, device=None, progress: bool = True, model_name: str | None = None) -> np.ndarray:
    """Image features (N, D) float32 of images `indices` (default all; other rows stay zero): the embedding
    of the aligned face plus that of its mirror image (`flip`), or the face's alone.

    DataLoader workers read, decode and align; the model runs in eval mode under no_grad on `device`
    (default: where its parameters are), face and mirror in one batch. A file that cannot be read or
    decoded raises DataFormatError naming it; NaN/Inf embeddings raise EvaluationError."""
    dataset = AlignedFaces(meta, input_size, indices)
    device = torch.device(device) if device is not None else model_device(model)
    loader = _aligned_batches(meta, dataset, input_size, indices, batch_size, workers, device)
    model_name = model_name or type(model).__name__
    feats = None
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(dataset), unit="img", desc=f"embed {meta.target}", leave=False,
               disable=not (progress and sys.stderr.isatty()))
    try:
        with torch.no_grad():
            for index, x, errors in loader:
                failed = [e for e in errors if e]
                if failed:
                    raise DataFormatError(failed[0] + (f" ({len(failed) - 1} more in this batch)" if len(failed) > 1
                                                       else ""))
                x = x.to(device, non_blocking=True)
                n = x.shape[0]
                out = model(torch.cat([x, x.flip(3)]) if flip else x).float()
                emb = (out[:n] + out[n:] if flip else out).cpu().numpy()
                bad = ~np.isfinite(emb).all(axis=1)
                if bad.any():
                    first = int(index[int(np.argmax(bad))])
                    raise EvaluationError(f"model {model_name} produced NaN/Inf embeddings for {int(bad.sum())} images "
                                          f"of {meta.target} (first: {meta.names[first]}); the weights are probably "
                                          f"diverged or corrupt")
                if feats is None:
                    feats = np.zeros((len(meta.names), emb.shape[1]), dtype=np.float32)
                feats[index.numpy()] = emb
                bar.update(n)
    finally:
        bar.close()
        model.train(was_training)
    if feats is None:
        raise EvaluationError(f"{meta.target}: no image to embed (all {len(meta.names)} are left out)")
    return feats


def _aligned_batches(meta: IJBMeta, dataset, input_size: int, indices, batch_size: int, workers: int, device):
    """The loader's batches; for a set of at most _KEEP_ALIGNED_BYTES of aligned images that read without an error,
    read once a process and kept for the next model (a set of another root, target, size or selection replaces it)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    if len(dataset) * 3 * input_size * input_size * 4 > _KEEP_ALIGNED_BYTES:
        return loader
    key = (os.path.abspath(meta.root), meta.target, tuple(meta.names),
           hashlib.sha256(meta.landmarks.tobytes()).hexdigest(), input_size, batch_size,
           None if indices is None else tuple(int(i) for i in indices))
    if key not in _aligned:
        batches = list(loader)
        if any(e for _, _, errors in batches for e in errors):
            return batches  # the caller names the unreadable file; nothing is kept
        _aligned.clear()
        _aligned[key] = batches
    return _aligned[key]


# --------------------------------------------------------------------------- templates and pairs


def template_features(feats, templates, medias, scores=None, norm_score: bool = True, valid=None, names=None):
    """Template features from image features: (template ids (T,) sorted, features (T, D) float64, unit rows).

    `scores` (N,) multiplies each image feature (D1; None: D0); `norm_score=False` normalises each image
    feature first (N0); `valid` (N,) bool leaves images out (missing files: they count in no media).
    Media = mean of its images, template = sum of its medias, then L2-normalised; a template left
    without images is a zero row. The arithmetic is eval_ijbc.py's, operation for operation: float32 up
    to the template sums (images in file order, medias in id order, added one after another), float64
    from there, so the scores come out bit for bit the same."""
    x = np.array(feats, dtype=np.float32)  # a copy: scaled and normalised in place below
    n = x.shape[0]
    templates, medias = np.asarray(templates), np.asarray(medias)
    if x.ndim != 2 or templates.shape != (n,) or medias.shape != (n,):
        raise DataFormatError(f"features of shape {x.shape} for {templates.shape[0]} images: expected (N, D) "
                              f"with one row per image")
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    names = names if names is not None else [f"image {i}" for i in range(n)]
    finite = np.isfinite(x).all(axis=1)
    if not finite[valid].all():
        i = int(np.flatnonzero(valid & ~finite)[0])
        raise EvaluationError(f"the feature of {names[i]} contains NaN or Inf "
                              f"({int((valid & ~finite).sum())} images); no score would mean anything")
    if not norm_score:
        norms = np.sqrt(np.sum(x ** 2, -1, keepdims=True))
        zero = valid & (norms[:, 0] == 0)
        if zero.any():
            raise EvaluationError(f"the feature of {names[int(np.argmax(zero))]} is all zeros "
                                  f"({int(zero.sum())} images); it cannot be normalised (--no-norm-score)")
        norms[norms == 0] = 1  # left-out images only
        x /= norms
    if scores is not None:
        x *= np.asarray(scores, dtype=np.float32)[:, None]
    template_ids, t_of_image = np.unique(templates, return_inverse=True)
    _, m_of_image = np.unique(medias, return_inverse=True)
    out = np.zeros((template_ids.size, x.shape[1]), dtype=np.float64)
    used = np.flatnonzero(valid)
    if used.size == 0:
        return template_ids, out
    # media = (template, media id): a media id is only unique within its template. Media rows are
    # sorted by template, then media id. np.add.at adds rows one after another in the order given,
    # here file order within a media and media-id order within a template: the order in which
    # np.mean/np.sum along axis 0 add them up in eval_ijbc.py (np.add.reduceat does not).
    key = t_of_image[used].astype(np.int64) * (int(m_of_image.max()) + 1) + m_of_image[used]
    media_keys, media_of_image, counts = np.unique(key, return_inverse=True, return_counts=True)
    media = np.zeros((media_keys.size, x.shape[1]), dtype=np.float32)
    np.add.at(media, media_of_image, x if used.size == n else x[used])
    media /= counts.astype(np.float32)[:, None]
    template_sum = np.zeros_like(out, dtype=np.float32)
    np.add.at(template_sum, media_keys // (int(m_of_image.max()) + 1), media)
    out[:] = template_sum
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))  # sklearn.preprocessing.normalize's row norms
    nonzero = norms > 0
    out[nonzero] /= norms[nonzero, None]
    return template_ids, out


def pair_scores(template_ids, template_feats, pairs, chunk: int = _PAIR_CHUNK) -> np.ndarray:
    """Cosine score (float64) of every pair of template ids (P, 2), given unit template features."""
    pairs = np.asarray(pairs)
    rows = np.searchsorted(template_ids, pairs)
    rows = np.minimum(rows, len(template_ids) - 1)
    unknown = template_ids[rows] != pairs
    if unknown.any():
        row, col = (int(v) for v in np.argwhere(unknown)[0])
        raise DataFormatError(f"pair {row + 1} names template {pairs[row, col]}, which has no images")
    scores = np.empty(len(pairs), dtype=np.float64)
    # small reused buffers: fresh 100k-row gathers (eval_ijbc.py's) spend more time faulting in memory
    # than multiplying; 256 rows stay in cache. The sum is np.sum's (pairwise), as eval_ijbc.py's.
    a = np.empty((chunk, template_feats.shape[1]))
    b = np.empty_like(a)
    for start in range(0, len(pairs), chunk):
        n = min(chunk, len(pairs) - start)
        np.take(template_feats, rows[start:start + n, 0], axis=0, out=a[:n])
        np.take(template_feats, rows[start:start + n, 1], axis=0, out=b[:n])
        np.multiply(a[:n], b[:n], out=a[:n])
        np.sum(a[:n], axis=-1, out=scores[start:start + n])
    return scores


# --------------------------------------------------------------------------- ROC


def roc_curve(labels, scores):
    """(fpr, tpr, thresholds) exactly as sklearn.metrics.roc_curve(labels, scores) with its defaults.

    Thresholds are the distinct scores, highest first; at each, the pairs scoring >= it are accepted.
    drop_intermediate (sklearn's default, which eval_ijbc.py uses) keeps only the points where the
    curve turns: a point is dropped when both the false and the true positives change linearly across
    it. A first point (0, 0) at threshold inf is added."""
    labels = np.asarray(labels).reshape(-1) == 1
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise EvaluationError(f"{labels.size} labels for {scores.size} scores")
    if not np.isfinite(scores).all():
        raise EvaluationError(f"{int((~np.isfinite(scores)).sum())} of {scores.size} scores are NaN or Inf")
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        kind = "genuine (label 1)" if positives == 0 else "impostor (label 0)"
        raise EvaluationError(f"no {kind} pairs among {labels.size}: a ROC needs both kinds")
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # last pair of each distinct score
    tps = np.cumsum(labels, dtype=np.float64)[last]
    fps = 1 + last - tps
    thresholds = scores[last]
    if tps.size > 2:
        corner = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        tps, fps, thresholds = tps[corner], fps[corner], thresholds[corner]
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def roc_auc(fpr, tpr) -> float:
    """Area under the ROC (the trapezoidal rule, as sklearn.metrics.auc on an increasing fpr)."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float((np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0).sum())


def tar_at_fars_roc(fpr, tpr, fars=IJB_FARS) -> dict:
    """{far_key(far): TPR} for each of `fars`, read off a ROC curve as eval_ijbc.py reads it: the curve is
    reversed and the first point whose |fpr - far| is smallest wins, i.e. among equally near points the one
    with the higher FPR and TPR. (Not distill.eval.verification.tar_at_far_pairs, which counts false
    accepts among pair distances exactly and gives None below 1/far impostors.)"""
    fpr, tpr = np.asarray(fpr)[::-1], np.asarray(tpr)[::-1]
    return {far_key(far): float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in fars}


# --------------------------------------------------------------------------- the protocol


def protocol_name(norm_score: bool = True, detector_score: bool = True, flip: bool | None = True) -> str:
    """eval_ijbc.py's test mode: N1/N0 (norm kept / normalised), D1/D0 (detector score), F2 (flip summed)/F0."""
    mode = f"N{int(norm_score)} D{int(detector_score)}"
    return mode if flip is None else mode + (" F2" if flip else " F0")


def verify(meta: IJBMeta, feats, valid=None, norm_score: bool = True, detector_score: bool = True):
    """Score every template pair from image features (N, D) and read the ROC. Returns (result, scores, fpr, tpr):
    result = {tar_at_far: {'1e-6': TAR, ...}, auc, images, templates, pairs, genuine_pairs,
    impostor_pairs, missing_images, empty_templates}; scores (P,) float64 in pair-file order."""
    feats = np.asarray(feats)
    n = len(meta.names)
    if feats.ndim != 2 or feats.shape[0] != n:
        raise DataFormatError(f"features of shape {feats.shape}: {meta.target} lists {n} images; expected ({n}, D), "
                              f"one row per line of {meta.path('landmarks')}, in that order")
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    template_ids, template_feats = template_features(
        feats, meta.templates, meta.medias, scores=meta.scores if detector_score else None,
        norm_score=norm_score, valid=valid, names=meta.names)
    scores = pair_scores(template_ids, template_feats, meta.pairs)
    fpr, tpr, _ = roc_curve(meta.labels, scores)
    empty = int((~template_feats.any(axis=1)).sum())
    genuine = int(meta.labels.sum())
    result = {"tar_at_far": tar_at_fars_roc(fpr, tpr), "auc": roc_auc(fpr, tpr), "images": n,
              "templates": int(template_ids.size), "pairs": int(len(meta.pairs)), "genuine_pairs": genuine,
              "impostor_pairs": int(len(meta.pairs) - genuine), "missing_images": int(n - valid.sum()),
              "empty_templates": empty}
    return result, scores, fpr, tpr


# --------------------------------------------------------------------------- feature files


def feature_cache_key(model_source: str, meta: IJBMeta, flip: bool, input_size: int) -> dict:
    """What cached image features depend on: the model (path and content hash), the image list (its
    landmark file's hash), flip and input size. Pooling flags are not in it: they apply after the cache."""
    is_file = os.path.isfile(model_source)
    return {"format": FEATURE_CACHE_FORMAT,
            "model": os.path.abspath(model_source) if is_file else model_source,
            "model_sha256": file_sha256(model_source) if is_file else None,
            "target": meta.target, "images": len(meta.names),
            "landmarks_sha256": file_sha256(meta.path("landmarks")),
            "flip": bool(flip), "input_size": int(input_size)}


def _sidecar(path) -> str:
    return os.fspath(path) + ".json"


def load_feature_cache(path, key: dict):
    """(features, missing image indices) from a cache written for `key`, or None when there is none yet.
    A cache written for something else (another model, image list, flip or input size) is an error:
    it is never silently replaced, since it may have cost hours."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    sidecar = _sidecar(path)
    if not os.path.isfile(sidecar):
        raise ConfigError(f"--cache {path}: exists but was not written by distill ijb (no {sidecar} beside it); "
                          f"give another --cache path, or pass the file as --features")
    try:
        with open(sidecar, encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{sidecar}: unreadable ({err}); delete {path} and {sidecar} to embed again") from None
    differ = [k for k in key if stored.get(k) != key[k]]
    if differ:
        shown = "; ".join(f"{k}: cached {stored.get(k)!r}, now {key[k]!r}" for k in differ
                          if not k.endswith("sha256")) or "the same file names with other contents"
        changed = ", ".join(differ)
        raise ConfigError(f"--cache {path}: holds features of another setting ({changed} differ: {shown}); "
                          f"give another --cache path, or delete {path} and {sidecar} to embed again")
    try:
        feats = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # truncated or not a .npy: never half-used
        raise DataFormatError(f"--cache {path}: damaged ({str(err).splitlines()[0][:160]}); delete it and "
                              f"{_sidecar(path)} to embed again, or give another --cache path") from None
    if feats.ndim != 2 or feats.shape[0] != key["images"]:
        raise ConfigError(f"--cache {path}: {feats.shape[0]} rows for {key['images']} images; delete it to embed again")
    return feats, np.asarray(stored.get("missing", []), dtype=np.int64)


def save_feature_cache(path, feats, key: dict, missing) -> None:
    """Write the features (.npy) and, beside them, what they were computed from (PATH.json), atomically."""
    with atomic_open(path, "wb", what="IJB feature cache") as f:
        np.save(f, np.asarray(feats, dtype=np.float32))
    atomic_write_json(_sidecar(path), {**key, "missing": [int(i) for i in missing]})


def load_features(path, meta: IJBMeta) -> np.ndarray:
    """External image features (.npy, N x D, rows in the landmark file's order, flip already combined)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--features {path}: file not found")
    try:
        feats = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataFormatError(f"--features {path}: not a .npy array ({str(err).splitlines()[0][:160]})") from None
    n = len(meta.names)
    if feats.ndim != 2 or feats.shape[0] != n or not np.issubdtype(feats.dtype, np.number):
        raise DataFormatError(f"--features {path}: array of shape {feats.shape} ({feats.dtype}); expected ({n}, D) "
                              f"numbers, one row per line of {meta.path('landmarks')}, in that order")
    return feats


def save_scores(path, scores) -> None:
    with atomic_open(path, "wb", what="pair scores") as f:
        np.save(f, np.asarray(scores, dtype=np.float64))
