"""Face alignment as insightface does it: a 5-point similarity transform onto the ArcFace template, then a warp.

    M = estimate_similarity(landmarks, ARCFACE_TEMPLATE)   # skimage SimilarityTransform.estimate
    face = warp_affine(image, M, 112)                     # cv2.warpAffine(image, M, (112, 112), borderValue=0)

Both steps are written here with numpy only (no OpenCV or scikit-image): `estimate_similarity` is
Umeyama's least-squares similarity (rotation, uniform scale, translation; never a reflection), the
computation `skimage.transform.SimilarityTransform.estimate` makes; `warp_affine` samples like OpenCV's
bilinear warp (source coordinates rounded to 1/32 pixel, integer weights, outside pixels black) and
gives OpenCV 4.10's pixels exactly. Landmarks and pixel coordinates use OpenCV's convention: (x, y),
pixel centres at integers.
"""

from __future__ import annotations

import numpy as np

from distill.utils.errors import DataFormatError

# The five ArcFace reference points (left eye, right eye, nose tip, left and right mouth corner, as
# seen in the image) for a 112x112 crop. arcface_torch's eval_ijbc.py writes them for the 112x96
# layout and adds 8 to x; these are the shifted values.
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041]], dtype=np.float64)
ARCFACE_SIZE = 112

# OpenCV's warpAffine (up to 4.10) computes source coordinates in 1/2^AB_BITS pixel and rounds them to
# 1/2^INTER_BITS before interpolating with weights in those steps.
_INTER_BITS, _AB_BITS = 5, 10
_INTER_STEPS, _AB_SCALE, _SHIFT = 1 << _INTER_BITS, 1 << _AB_BITS, _AB_BITS - _INTER_BITS


class LandmarkError(DataFormatError):
    """Landmarks from which no similarity transform can be estimated (coincident, NaN, wrong shape)."""


def estimate_similarity(src, dst) -> np.ndarray:
    """The similarity transform (2x3, float64) that maps the points `src` onto `dst` in least squares.

    Umeyama (1991): centre both point sets, take the SVD of their cross-covariance; the rotation is
    U·diag(1, ±1)·Vᵀ with the sign chosen so that it is a rotation (never a reflection), the scale is
    the singular values (signed the same way) summed over the spread of `src`. With collinear but
    distinct points the rotation is still unique and the transform is returned, as scikit-image does;
    coincident points (no spread) or non-finite values raise LandmarkError."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise LandmarkError(f"landmarks of shape {src.shape} cannot be matched to reference points of shape "
                            f"{dst.shape}: expected two (N, 2) arrays of (x, y) points, N >= 2")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise LandmarkError(f"landmarks contain NaN or Inf: {src.tolist()}")
    if np.abs(src).max() > 1e6:  # no image is a million pixels wide: damage, not a face
        raise LandmarkError(f"landmark coordinates of {np.abs(src).max():.3g} are far outside any image: "
                            f"{src.tolist()}")
    n = len(src)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_spread = float((src_c ** 2).sum() / n)  # total variance of src, the scale's denominator
    dst_spread = float((dst_c ** 2).sum() / n)
    # relative to the points' magnitude: 1e-12 of it is rounding error, not a face
    size = max(1.0, float(np.abs(src).max()), float(np.abs(dst).max()))
    if src_spread <= (1e-12 * size) ** 2 or dst_spread <= (1e-12 * size) ** 2:
        which = "landmarks" if src_spread <= (1e-12 * size) ** 2 else "reference points"
        raise LandmarkError(f"all {n} {which} coincide ({(src if which == 'landmarks' else dst)[0].tolist()}); "
                            f"a similarity transform needs points that are spread out")
    cov = dst_c.T @ src_c / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # U·Vᵀ would be a reflection: flip the weakest axis
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float(s @ d) / src_spread
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rotation
    m[:, 2] = dst_mean - m[:, :2] @ src_mean
    if not np.isfinite(m).all() or abs(np.linalg.det(m[:, :2])) < 1e-12:
        raise LandmarkError(f"landmarks {src.tolist()} give a singular transform {m.tolist()}")
    return m


def invert_affine(m) -> np.ndarray:
    """The inverse of a 2x3 affine transform, as a 2x3 array (the arithmetic of OpenCV's invertAffineTransform)."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (2, 3) or not np.isfinite(m).all():
        raise LandmarkError(f"an affine transform is a finite 2x3 matrix; got shape {m.shape}: {m.tolist()}")
    (a, b, c), (d, e, f) = m.tolist()
    det = a * e - b * d
    if abs(det) < 1e-12:
        raise LandmarkError(f"the transform {m.tolist()} is singular (determinant {det:g}) and cannot be inverted")
    r = 1.0 / det
    a2, b2, d2, e2 = e * r, -b * r, -d * r, a * r
    return np.array([[a2, b2, -a2 * c - b2 * f], [d2, e2, -d2 * c - e2 * f]])


def _source_coordinates(inv: np.ndarray, size: int):
    """Integer pixel and 1/32-pixel fraction of the source point of every destination pixel, computed as
    OpenCV's warpAffine does: per-column and per-row terms rounded to 1/1024 pixel separately, summed,
    then rounded down to 1/32 (with half a step added first)."""
    grid = np.arange(size, dtype=np.float64)
    limit = 2 ** 31 - 1  # saturate_cast<int>

    def fixed(v):
        return np.clip(np.rint(v * _AB_SCALE), -limit - 1, limit).astype(np.int64)

    half_step = _AB_SCALE // _INTER_STEPS // 2
    xs = (fixed(inv[0, 1] * grid + inv[0, 2])[:, None] + half_step + fixed(inv[0, 0] * grid)[None, :]) >> _SHIFT
    ys = (fixed(inv[1, 1] * grid + inv[1, 2])[:, None] + half_step + fixed(inv[1, 0] * grid)[None, :]) >> _SHIFT
    return xs >> _INTER_BITS, xs & (_INTER_STEPS - 1), ys >> _INTER_BITS, ys & (_INTER_STEPS - 1)


def warp_affine(image, m, size: int) -> np.ndarray:
    """Warp `image` (H x W or H x W x C) by the 2x3 transform `m` (source -> destination pixel coordinates)
    into a size x size image, as `cv2.warpAffine(image, m, (size, size), borderValue=0)`.

    Each destination pixel (x, y) takes the source at m⁻¹·(x, y, 1), interpolated bilinearly; source
    pixels outside the image count as 0, so the border fades to black over one pixel and is black beyond.
    Like OpenCV up to 4.10 (the versions insightface's published IJB numbers were made with), the source
    point is rounded to 1/32 pixel and uint8 pixels are interpolated in integers, rounded half up: the
    result is identical to OpenCV 4.10's. OpenCV 4.11 and later interpolate at the exact point, which
    moves a pixel of a sharp edge by a few grey levels. Float images come back as float32."""
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise DataFormatError(f"cannot warp an array of shape {img.shape}: expected H x W or H x W x C")
    size = int(size)
    h, w = img.shape[:2]
    x0, fx, y0, fy = _source_coordinates(invert_affine(m), size)
    # far-away points are clipped to where both neighbours are still outside: the same black, no overflow
    x0, y0 = np.clip(x0, -2, w), np.clip(y0, -2, h)
    pixels = img.reshape(h, w, -1)
    integer = img.dtype == np.uint8
    work = np.int32 if integer else np.float32

    def sample(ys, xs):
        inside = ((xs >= 0) & (xs < w) & (ys >= 0) & (ys < h))[..., None]
        values = pixels[np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)].astype(work)
        return np.where(inside, values, work(0))

    # weights in 1/32 steps: (32 - f, f) along each axis, 1/1024 for the product
    wx1, wy1 = fx[..., None].astype(work), fy[..., None].astype(work)
    wx0, wy0 = _INTER_STEPS - wx1, _INTER_STEPS - wy1
    total = (wy0 * (wx0 * sample(y0, x0) + wx1 * sample(y0, x0 + 1))
             + wy1 * (wx0 * sample(y0 + 1, x0) + wx1 * sample(y0 + 1, x0 + 1)))
    if integer:
        out = np.clip((total + _INTER_STEPS ** 2 // 2) >> (2 * _INTER_BITS), 0, 255).astype(np.uint8)
    else:
        out = (total / np.float32(_INTER_STEPS ** 2)).astype(np.float32)
    return out.reshape((size, size) + img.shape[2:])


def align_face(image, landmarks, size: int = ARCFACE_SIZE) -> np.ndarray:
    """The size x size x 3 uint8 face crop of `image` (H x W x 3 uint8) whose 5 landmarks (5 x 2, x y)
    land on the ArcFace template; other sizes scale the template by size/112."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataFormatError(f"align_face takes an H x W x 3 uint8 image; got shape {image.shape}, {image.dtype}")
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise LandmarkError(f"expected 5 (x, y) landmarks, got an array of shape {landmarks.shape}")
    m = estimate_similarity(landmarks, ARCFACE_TEMPLATE * (size / ARCFACE_SIZE))
    return warp_affine(image, m, size)
