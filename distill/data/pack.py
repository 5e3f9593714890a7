"""Packing an identity-per-folder image tree into insightface RecordIO (behind `distill data pack`)."""

from __future__ import annotations

import os

import numpy as np

from distill.data.align import LandmarkError, align_face
from distill.data.folders import read_file, scan_image_tree
from distill.data.images import JPEG_SOI, decode_chw, encode_jpeg
from distill.data.recordio_writer import write_insightface_rec
from distill.utils.errors import DataFormatError

MAX_COORDINATE = 1e6  # pixels: no photo is a million pixels wide; beyond it a coordinate is damage, not a face


def read_landmark_file(path, src) -> dict:
    """{image path under src: 5 x 2 landmarks} from a text file of lines `relative/path x1 y1 ... x5 y5 [score]`
    (insightface's 5-point layout: left eye, right eye, nose, left and right mouth corner; a trailing
    detector score, as in IJB's *_name_5pts_score.txt, is ignored). Errors name the file and line."""
    found, first_line = {}, {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{path}: cannot read the landmark file "
                              f"({getattr(err, 'strerror', None) or err})") from None
    for lineno, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        if len(tokens) not in (11, 12):
            raise DataFormatError(f"{path}: line {lineno}: {len(tokens) - 1} values after the image name; expected 10 "
                                  f"(x1 y1 ... x5 y5) and optionally a detector score")
        try:
            points = np.array([float(v) for v in tokens[1:11]], dtype=np.float64).reshape(5, 2)
        except ValueError:
            raise DataFormatError(f"{path}: line {lineno}: landmark values must be numbers: "
                                  f"{line.strip()[:120]}") from None
        if not np.isfinite(points).all() or np.abs(points).max() > MAX_COORDINATE:
            raise DataFormatError(f"{path}: line {lineno}: landmark coordinates of {tokens[0]} are not pixel positions "
                                  f"({np.abs(points).max():.3g}; at most {MAX_COORDINATE:.0e}): the file is damaged")
        key = os.path.normpath(os.path.join(os.fspath(src), tokens[0]))
        if key in found and not np.array_equal(found[key], points):
            raise DataFormatError(f"{path}: lines {first_line[key]} and {lineno} give different landmarks for "
                                  f"{tokens[0]}; keep one of them")
        found[key] = points
        first_line.setdefault(key, lineno)
    if not found:
        raise DataFormatError(f"{path}: no landmark lines (expected `relative/path x1 y1 ... x5 y5` per image)")
    return found


def pack_image_tree(src, out, quality: int = 95, progress: bool = False, landmarks=None, size: int = 112) -> dict:
    """Pack `src/<identity>/<image>` into `out/train.rec`, `train.idx`, `property` (insightface layout).

    Classes follow the sorted folder names. JPEG files are stored as they are (no re-encoding loss);
    other formats are encoded to JPEG at `quality`. Every image is decoded once to check it and its
    size: all must share one size, which `property` records.
    `landmarks` (a landmark file, see read_landmark_file): raw photos are aligned first, each onto the ArcFace
    template at `size` x `size` (distill.data.align, as insightface aligns its training sets), and stored
    as JPEG at `quality`; every image needs a line.
    """
    classes, samples = scan_image_tree(src)
    points = read_landmark_file(landmarks, src) if landmarks else None
    if points is not None:
        missing = [p for p, _ in samples if os.path.normpath(p) not in points]
        if missing:
            raise DataFormatError(f"{landmarks}: no landmarks for {len(missing)} of {len(samples)} images, first "
                                  f"{missing[0]}; add a line `{os.path.relpath(missing[0], src)} x1 y1 ... x5 y5` "
                                  f"for each, or remove those images")
        first_hw = (size, size)
    else:
        # property needs the size before the first record is written: read it from the first image.
        first_hw = tuple(decode_chw(read_file(samples[0][0]), samples[0][0]).shape[1:])

    def encoded():
        from tqdm import tqdm

        for path, class_id in tqdm(samples, desc="pack", unit="img", disable=not progress):
            data = read_file(path)
            chw = decode_chw(data, path)
            if points is not None:
                try:
                    face = align_face(chw.permute(1, 2, 0).numpy(), points[os.path.normpath(path)], size)
                except LandmarkError as err:
                    raise LandmarkError(f"{landmarks}: landmarks of {path}: {err}") from None
                yield class_id, encode_jpeg(face, quality=quality)
                continue
            hw = tuple(chw.shape[1:])
            if hw != first_hw:
                raise DataFormatError(
                    f"{path}: image is {hw[0]}x{hw[1]} but the first image was {first_hw[0]}x{first_hw[1]}; "
                    f"a packed dataset holds one image size (align and crop faces to one size first)"
                )
            if data[:2] != JPEG_SOI:
                data = encode_jpeg(chw.permute(1, 2, 0).numpy(), quality=quality)
            yield class_id, data

    n = write_insightface_rec(out, encoded(), num_classes=len(classes), image_size=first_hw)
    return {"images": n, "identities": len(classes), "image_size": first_hw, "out": os.fspath(out)}
