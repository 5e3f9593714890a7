"""Face verification as insightface measures it: embed pairs (with flip), 10-fold accuracy, XNorm, TAR@FAR.

The protocol (docs/formats.md §3) is arcface_torch's `eval/verification.py`, reproduced number for number:
pair feature = l2normalize(E_orig + E_flip) in float64, squared Euclidean distance, "same" when
`dist < threshold` for thresholds `np.arange(0, 4, 0.01)`, 10 contiguous folds sized like sklearn's
KFold, best threshold on the other nine folds (first maximum), accuracy on the held-out fold, mean and
population std. Training reports these same numbers at each evaluation (`evaluate_sets`), and
`distill eval` prints them; nothing here is computed a second way elsewhere.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distill.eval.far import VERIFICATION_FARS, far_key
from distill.utils.device import model_device
from distill.utils.errors import DataFormatError, DistillError, UserNote

THRESHOLDS = np.arange(0, 4, 0.01)  # the exact float64 values insightface compares against
N_FOLDS = 10


class EvaluationError(DistillError, ValueError):
    """A model produced unusable embeddings (NaN/Inf), or a verification set is unusable for the protocol."""


# --------------------------------------------------------------------------- metrics


def _fold_sizes(n: int, n_folds: int) -> np.ndarray:
    # sklearn's KFold(shuffle=False): the first n % n_folds folds hold one extra pair.
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    return sizes


def _row_norms(x) -> np.ndarray:
    """L2 norm of each row, summed in the array's own dtype (float32 is ample for XNorm), float64 out."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x)).astype(np.float64)
    if not np.isfinite(norms).all():  # float32 squares overflow above ~1.8e19: redo those rows in float64
        x64 = np.asarray(x, dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))
    return norms


def pair_distances(emb_orig, emb_flip, chunk_rows: int = 256) -> np.ndarray:
    """Squared Euclidean distance between the pair features l2normalize(E_orig + E_flip), float64.

    Rows 2k and 2k+1 form pair k. insightface copies the network output into a float64 array before
    summing, then normalises with sklearn (row norm via einsum; zero rows stay zero) and takes
    np.sum(np.square(diff), 1): the same operations here, in chunks that stay in the CPU cache
    (the whole float64 array of 6,000 pairs x 512 is 49 MB; one pass at a time over it is 3x slower)."""
    emb_orig, emb_flip = np.asarray(emb_orig), np.asarray(emb_flip)
    chunk_rows += chunk_rows % 2  # chunks must hold whole pairs
    dist = np.empty(emb_orig.shape[0] // 2, dtype=np.float64)
    for start in range(0, emb_orig.shape[0], chunk_rows):
        emb = np.add(emb_orig[start:start + chunk_rows], emb_flip[start:start + chunk_rows], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", emb, emb))
        norms[norms == 0.0] = 1.0
        emb /= norms[:, None]
        diff = np.subtract(emb[0::2], emb[1::2])
        np.square(diff, out=diff)
        dist[start // 2:(start + emb.shape[0]) // 2] = diff.sum(axis=1)
    return dist


def tar_at_far_pairs(dist, issame, far: float) -> dict:
    """TAR at a FAR target over all pairs (no folds), from pair distances: the threshold admitting the most
    genuine pairs while accepting at most floor(far * negatives) impostor pairs (an exact count; not
    distill.eval.ijb.tar_at_fars_roc, which reads the nearest point of a ROC curve).

    With `same = dist < threshold`, that threshold is the (k+1)-th smallest impostor distance, k the
    allowed number of false accepts. Fewer than 1/far impostor pairs cannot measure that FAR at all
    (k would be 0), so tar, far and threshold are then None."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    neg = np.sort(dist[~issame])
    pos = dist[issame]
    n_neg = int(neg.size)
    # the small epsilon keeps e.g. 1e-3 * 3000 = 3.0000000000000004 or 2.9999999999999996 at 3
    allowed = int(np.floor(far * n_neg + 1e-9))
    if allowed < 1:
        return {"tar": None, "far": None, "threshold": None, "negatives": n_neg}
    threshold = float(neg[allowed])
    false_accepts = int(np.count_nonzero(neg < threshold))  # ties at the threshold are rejected
    tar = float(np.count_nonzero(pos < threshold) / pos.size) if pos.size else None
    return {"tar": tar, "far": false_accepts / n_neg, "threshold": threshold, "negatives": n_neg}


VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # insightface's finer grid for calculate_val
VAL_FAR = 1e-3


def _interpolated_threshold(far_train: np.ndarray, far_target: float) -> float:
    """scipy's interp1d(far_train, VAL_THRESHOLDS, kind='slinear')(far_target), as insightface calls it.

    far_train does not decrease along the thresholds and repeats values; interpolation runs between the
    last threshold whose FAR is below the target and the first whose FAR reaches it (what a stable sort
    of the repeated values gives; scipy >= 1.11 refuses repeated x outright, older versions did this).
    Below the lowest FAR there is nothing to interpolate: insightface's bounds error cannot happen, the
    lowest FAR is 0 at threshold 0."""
    hi = int(np.searchsorted(far_train, far_target, side="left"))  # first index with far >= target
    if hi == 0:
        return float(VAL_THRESHOLDS[0])
    lo = hi - 1
    x0, x1 = far_train[lo], far_train[hi]
    y0, y1 = VAL_THRESHOLDS[lo], VAL_THRESHOLDS[hi]
    return float(y0 + (far_target - x0) * (y1 - y0) / (x1 - x0))


def insightface_val(dist, issame, far_target: float = VAL_FAR, n_folds: int = N_FOLDS) -> dict:
    """insightface's `calculate_val`: 10 folds; on the other nine, the threshold where the FAR reaches
    `far_target` (interpolated on the 0.001 grid, 0.0 when the FAR never gets there); on the held-out fold,
    VAL (true accept rate) and FAR at that threshold. Returns val_mean, val_std (population), far_mean.

    This is the "VAL@FAR=1e-3" of insightface's logs. It differs from `tar_at_far_pairs` (all pairs, no
    folds, an exact count of false accepts): both are reported, each under its own name."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    sizes = _fold_sizes(issame.size, n_folds)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    val, far = np.zeros(n_folds), np.zeros(n_folds)
    for f in range(n_folds):
        test = np.zeros(issame.size, dtype=bool)
        test[bounds[f]:bounds[f + 1]] = True
        neg_train = np.sort(dist[~test & ~issame])
        # FAR at every threshold (dist < threshold accepted): a count by binary search, not a loop
        far_train = np.searchsorted(neg_train, VAL_THRESHOLDS, side="left") / max(neg_train.size, 1)
        threshold = _interpolated_threshold(far_train, far_target) if far_train.max() >= far_target else 0.0
        accept = dist[test] < threshold
        same = issame[test]
        val[f] = np.count_nonzero(accept & same) / max(np.count_nonzero(same), 1)
        far[f] = np.count_nonzero(accept & ~same) / max(np.count_nonzero(~same), 1)
    return {"val_mean": float(np.mean(val)), "val_std": float(np.std(val)), "far_mean": float(np.mean(far)),
            "far_target": far_target}


def verification_metrics(emb_orig, emb_flip, issame, n_folds: int = N_FOLDS) -> dict:
    """insightface's verification numbers from raw embeddings of 2N images (rows 2k, 2k+1 = pair k).

    Returns acc_mean, acc_std (population std over folds), threshold (mean of the per-fold best
    thresholds), xnorm (mean L2 norm of every raw embedding, orig and flip), tar_at_far
    ({far_key(far): {...}} for far in VERIFICATION_FARS: '1e-3', '1e-4'; see `tar_at_far_pairs`),
    insightface_val (insightface's own 10-fold VAL@FAR=1e-3, see `insightface_val`), plus pairs and folds."""
    emb_orig = np.asarray(emb_orig)
    emb_flip = np.asarray(emb_flip)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    n = issame.size
    if emb_orig.shape != emb_flip.shape or emb_orig.ndim != 2 or emb_orig.shape[0] != 2 * n:
        raise EvaluationError(
            f"embeddings of shape {emb_orig.shape} (orig) and {emb_flip.shape} (flip) do not fit {n} pairs: "
            f"expected two arrays of shape ({2 * n}, D), rows 2k and 2k+1 being pair k")
    if n < n_folds:
        raise EvaluationError(f"{n} pairs cannot be split into {n_folds} folds; a verification set needs "
                              f"at least {n_folds} pairs")
    norms = np.concatenate([_row_norms(emb_orig), _row_norms(emb_flip)])
    if not np.isfinite(norms).all():  # a NaN or Inf anywhere makes its row's norm NaN or Inf
        raise EvaluationError(f"embeddings of {int((~np.isfinite(norms)).sum())} of {norms.size} images contain "
                              f"NaN or Inf; the accuracy would be meaningless")

    dist = pair_distances(emb_orig, emb_flip)
    # Threshold j predicts "same" for a pair iff dist < THRESHOLDS[j], i.e. iff j >= first[pair], where
    # first = number of thresholds <= dist. searchsorted compares the very float64 values that
    # np.less(dist, threshold) would, so the counts below equal insightface's loop exactly.
    first = np.searchsorted(THRESHOLDS, dist, side="right")
    n_thr = THRESHOLDS.size
    sizes = _fold_sizes(n, n_folds)
    fold = np.repeat(np.arange(n_folds), sizes)
    # hist[f, j, s]: pairs of fold f, genuine flag s, first predicted "same" at threshold j
    hist = np.bincount((fold * (n_thr + 1) + first) * 2 + issame, minlength=n_folds * (n_thr + 1) * 2)
    hist = hist.reshape(n_folds, n_thr + 1, 2)
    accepted = np.cumsum(hist, axis=1)[:, :n_thr, :]  # [f, j, s]: pairs with dist < THRESHOLDS[j]
    neg_in_fold = hist[:, :, 0].sum(axis=1)
    # correct = true accepts + true rejects, per fold and threshold
    correct = accepted[:, :, 1] + (neg_in_fold[:, None] - accepted[:, :, 0])
    correct_train = correct.sum(axis=0, keepdims=True) - correct
    best = np.argmax(correct_train, axis=1)  # first maximum wins, as np.argmax over the train accuracy
    accuracy = np.array([correct[f, best[f]] / sizes[f] for f in range(n_folds)], dtype=np.float64)

    return {
        "acc_mean": float(np.mean(accuracy)),
        "acc_std": float(np.std(accuracy)),
        "threshold": float(np.mean(THRESHOLDS[best])),
        "xnorm": float(norms.mean()),
        "tar_at_far": {far_key(far): tar_at_far_pairs(dist, issame, far) for far in VERIFICATION_FARS},
        "insightface_val": insightface_val(dist, issame, VAL_FAR, n_folds),
        "pairs": int(n),
        "folds": int(n_folds),
    }


# --------------------------------------------------------------------------- embedding


def _resize_short_crop(img: np.ndarray, size: int) -> np.ndarray:
    """mxnet.image.resize_short (bicubic, short side -> size, long side floor-scaled), then centre crop.

    MXNet resized with OpenCV's INTER_CUBIC; torch's bicubic without antialiasing uses the same kernel
    (a=-0.75, half-pixel centres). OpenCV works in fixed point on uint8, so a pixel may differ by a
    level; the result is rounded back to uint8 as MXNet's image was."""
    h, w = img.shape[:2]
    new_h, new_w = (size * h // w, size) if h > w else (size, size * w // h)
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[top:top + size, left:left + size].numpy()


def _to_batch(images, size: int) -> torch.Tensor:
    """uint8 HWC RGB images -> float (B, 3, size, size) normalised (x/255 - 0.5)/0.5."""
    fitted = []
    for img in images:
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise DataFormatError(f"verification image of shape {img.shape} and dtype {img.dtype}: "
                                  f"expected H x W x 3 uint8 RGB")
        # arcface_torch resizes when the width differs; a right-width but non-square image would not
        # fit its batch array either, so it too goes through resize + centre crop
        if img.shape[1] != size or img.shape[0] != size:
            img = _resize_short_crop(img, size)
        fitted.append(img)
    x = torch.from_numpy(np.stack(fitted)).permute(0, 3, 1, 2).float()
    return (x / 255.0 - 0.5) / 0.5


def _show_progress(progress: bool) -> bool:
    return bool(progress) and sys.stderr.isatty()


def embed_pairs(model, images, input_size: int, batch_size: int = 64, device=None, progress: bool = True,
                model_name: str | None = None, set_name: str = "verification set", first_index: int = 0):
    """Raw embeddings of every image and of its horizontal flip: (emb_orig, emb_flip), float32 (2N, D).

    The model runs in eval mode under no_grad (its previous mode is restored), on `device` (default: the
    device its parameters are on). Images are H x W x 3 uint8 RGB; any not input_size x input_size is
    resized as the protocol does. NaN/Inf embeddings raise EvaluationError naming model and set (and the
    image's index in the set: `first_index` is that of images[0])."""
    from tqdm import tqdm

    if not isinstance(input_size, int) or input_size <= 0:
        raise EvaluationError(f"input size {input_size!r} is not a positive integer; pass the model's input "
                              f"side (e.g. --input-size 112)")
    device = torch.device(device) if device is not None else model_device(model)
    model_name = model_name or type(model).__name__
    was_training = model.training
    model.eval()
    origs, flips = [], []
    try:
        with torch.no_grad():
            starts = range(0, len(images), batch_size)
            for start in tqdm(starts, desc=f"embed {set_name}", unit="batch",
                              disable=not _show_progress(progress) or len(starts) < 2, leave=False):
                x = _to_batch(images[start:start + batch_size], input_size).to(device)
                origs.append(model(x).float().cpu())
                flips.append(model(torch.flip(x, dims=[3])).float().cpu())
    finally:
        model.train(was_training)
    emb_orig = torch.cat(origs).numpy()
    emb_flip = torch.cat(flips).numpy()
    bad = ~(np.isfinite(emb_orig).all(axis=1) & np.isfinite(emb_flip).all(axis=1))
    if bad.any():
        raise EvaluationError(
            f"model {model_name} produced NaN/Inf embeddings for {int(bad.sum())} of {bad.size} images of "
            f"{set_name} (first: image {first_index + int(np.argmax(bad))}); the weights are probably diverged or "
            f"corrupt: check the checkpoint, or lower the learning rate if this happens during training")
    return emb_orig, emb_flip


def _load_set(source):
    if isinstance(source, (str, os.PathLike)):
        from distill.data import load_verification_bin
        return load_verification_bin(source)
    images, issame = source
    return images, np.asarray(issame, dtype=bool)


def set_name_of(path) -> str:
    """A set is named after its .bin file: .../lfw.bin -> 'lfw'."""
    return Path(path).stem


def resize_note(what: str, images, input_size: int) -> str | None:
    """What happens to a set's images that are not input_size x input_size (None when they are)."""
    if not len(images) or not isinstance(input_size, int):
        return None
    h, w = np.asarray(images[0]).shape[:2]
    if (h, w) == (input_size, input_size):
        return None
    return (f"{what}: images are {h}x{w}, the model takes {input_size}x{input_size}: each is resized as "
            f"insightface does (short side to {input_size}, bicubic, centre crop)")


def size_note(what: str, images, input_size: int) -> str | None:
    """resize_note as a UserNote (printed once by the command line)."""
    note = resize_note(what, images, input_size)
    if note:
        warnings.warn(note, UserNote, stacklevel=2)
    return note


def evaluate_sets(model, bins: dict, input_size: int, batch_size: int = 64, device=None,
                  progress: bool = True, model_name: str | None = None, split_ranks: bool = False) -> dict:
    """{set name: verification_metrics} for each set; a set is a .bin path or (images, issame).

    Training calls this at every evaluation; pass already-loaded (images, issame) there so the .bin
    files are decoded once. `split_ranks`: every rank of a torchrun job calls it, embeds its share of each
    set's images (whole batches: distill/eval/spread.py) and gets the metrics of the whole set, the same
    numbers as one process computes alone."""
    results = {}
    for name, source in bins.items():
        images, issame = _load_set(source)
        if len(images) != 2 * len(issame):
            raise DataFormatError(f"verification set {name}: {len(images)} images for {len(issame)} pairs "
                                  f"(expected two images per pair)")
        size_note(f"verification set {name}", images, input_size)
        if split_ranks:
            emb_orig, emb_flip = _embed_split(model, images, input_size, batch_size, device, progress,
                                              model_name, name)
        else:
            emb_orig, emb_flip = embed_pairs(model, images, input_size, batch_size=batch_size, device=device,
                                             progress=progress, model_name=model_name, set_name=name)
        try:
            results[name] = verification_metrics(emb_orig, emb_flip, issame)
        except EvaluationError as err:
            raise EvaluationError(f"verification set {name}: {err}") from None
    return results


def _embed_split(model, images, input_size, batch_size, device, progress, model_name, set_name):
    """embed_pairs of every image, each rank embedding its share and every rank getting all of them."""
    from distill.eval.spread import gather_rows

    def embed(start, stop):
        return embed_pairs(model, images[start:stop], input_size, batch_size=batch_size, device=device,
                           progress=progress, model_name=model_name, set_name=set_name, first_index=start)

    parts = [value for _, _, value in gather_rows(embed, len(images), batch_size, f"verification set {set_name}")
             if value is not None]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
