"""The IJB-B / IJB-C test suite as insightface distributes it: its meta files read and checked, its faces aligned.

    ROOT/loose_crop/<image>                      loose crops, one face each
    ROOT/meta/<t>_name_5pts_score.txt            image name, x1 y1 ... x5 y5 (5 landmarks), detector score
    ROOT/meta/<t>_face_tid_mid.txt               image name, template id, media id (same images, same order)
    ROOT/meta/<t>_template_pair_label.txt        template id, template id, label (1 same person, 0 not)

with t = ijbc or ijbb. `read_ijb_meta` reads all three and checks them (a mistake names the file and
line); `AlignedFaces` is the Dataset a DataLoader's workers use to decode and align every image
(distill/data/align.py) and normalise it for the model. Protocol and scoring are in distill/eval/ijb.py.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from distill.data.align import LandmarkError, align_face
from distill.data.images import decode_image, to_input_tensor
from distill.utils.errors import DataFormatError

TARGETS = ("IJBC", "IJBB")
IMAGE_DIR = "loose_crop"
META_DIR = "meta"
META_FILES = {"landmarks": "{t}_name_5pts_score.txt", "templates": "{t}_face_tid_mid.txt",
              "pairs": "{t}_template_pair_label.txt"}
_LANDMARK_VALUES = 11  # x1 y1 ... x5 y5 and the detector score, after the image name


@dataclass
class IJBMeta:
    """What the meta files say, image i being line i of the landmark file."""

    root: str
    target: str
    names: list             # image file names under ROOT/loose_crop
    landmarks: np.ndarray   # (N, 5, 2) float32, x y in the image's pixels
    scores: np.ndarray      # (N,) float32 detector (faceness) scores
    templates: np.ndarray   # (N,) int64 template id of each image
    medias: np.ndarray      # (N,) int64 media id of each image
    pairs: np.ndarray       # (P, 2) int64 template ids of each pair
    labels: np.ndarray      # (P,) int8, 1 for a genuine pair

    @property
    def image_dir(self) -> str:
        return os.path.join(self.root, IMAGE_DIR)

    def path(self, kind: str) -> str:
        return meta_path(self.root, self.target, kind)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self.names[index])


def meta_path(root, target: str, kind: str) -> str:
    return os.path.join(os.fspath(root), META_DIR, META_FILES[kind].format(t=target.lower()))


def check_target(target: str) -> str:
    if str(target).upper() not in TARGETS:
        raise DataFormatError(f"IJB target {target!r}: must be one of {', '.join(TARGETS)}")
    return str(target).upper()


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        where = "" if os.path.isdir(folder) else f" (no folder {folder})"
        raise DataFormatError(f"{path}: {what} not found{where}; --root must be the IJB folder holding "
                              f"{IMAGE_DIR}/ and {META_DIR}/ as insightface distributes it")


def _read_lines(path: str, what: str) -> list:
    _require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not a text file ({err.reason} at byte {err.start}); expected {what}") from None


def _numbers(path: str, lineno: int, line: str, tokens: list, kind, expected: str) -> list:
    try:
        return [kind(t) for t in tokens]
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: expected {expected}; found {line.strip()[:120]!r}") from None


def _read_landmarks(path: str):
    names, values, linenos = [], [], []
    expected = "an image name, 10 landmark coordinates (x1 y1 ... x5 y5) and a detector score"
    for lineno, line in enumerate(_read_lines(path, "the landmark file"), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 1 + _LANDMARK_VALUES:
            raise DataFormatError(f"{path}:{lineno}: {len(tokens) - 1} values after the image name; expected "
                                  f"{_LANDMARK_VALUES} (x1 y1 ... x5 y5 and a detector score): {line.strip()[:120]!r}")
        names.append(tokens[0])
        values.append(_numbers(path, lineno, line, tokens[1:], float, expected))
        linenos.append(lineno)
    if not names:
        raise DataFormatError(f"{path}: no images listed; expected one line per image ({expected})")
    values = np.asarray(values, dtype=np.float32)  # float32 as arcface_torch parses them
    landmarks, scores = values[:, :10].reshape(-1, 5, 2), values[:, 10]
    centred = landmarks.astype(np.float64) - landmarks.mean(axis=1, keepdims=True)
    spread = (centred ** 2).sum(axis=(1, 2))
    absurd = np.abs(np.nan_to_num(landmarks.reshape(len(names), -1), nan=0.0, posinf=0.0, neginf=0.0)).max(1) > 1e6
    bad = ~np.isfinite(values).all(axis=1) | (spread <= 1e-12) | absurd
    if bad.any():
        i = int(np.argmax(bad))
        what = ("NaN or Inf" if not np.isfinite(values[i]).all() else
                "coordinates far outside any image (beyond 1e6 pixels)" if absurd[i] else "5 landmarks at one point")
        raise DataFormatError(f"{path}:{linenos[i]}: image {names[i]} has {what} "
                              f"({values[i].tolist()}); no face can be aligned from it")
    return names, landmarks, scores


def _read_template_media(path: str, names: list, landmark_path: str):
    templates, medias = [], []
    expected = "an image name, a template id and a media id (integers)"
    row = 0
    for lineno, line in enumerate(_read_lines(path, "the template/media file"), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 3:
            raise DataFormatError(f"{path}:{lineno}: {len(tokens)} values; expected 3 ({expected}): "
                                  f"{line.strip()[:120]!r}")
        tid, mid = _numbers(path, lineno, line, tokens[1:], int, expected)
        if row < len(names) and tokens[0] != names[row]:
            raise DataFormatError(f"{path}:{lineno}: image {tokens[0]}, but image {row + 1} of {landmark_path} is "
                                  f"{names[row]}; both files list the same images in the same order")
        templates.append(tid)
        medias.append(mid)
        row += 1
    if row != len(names):
        raise DataFormatError(f"{path}: {row} images, but {landmark_path} lists {len(names)}; both files list the "
                              f"same images in the same order")
    return np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)


def _nonblank_line(path: str, row: int) -> int:
    """Line number of the row-th (0-based) non-blank line: only to name a line in an error."""
    seen = -1
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            seen += bool(line.strip())
            if seen == row:
                return lineno
    return lineno


def _read_pairs(path: str):
    _require_file(path, "the template pair file")
    try:  # numpy's C reader: 15.7M lines in a few seconds; errors are located line by line below
        with warnings.catch_warnings():  # an empty file: the clear error below, not numpy's "Empty input file"
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except (ValueError, UnicodeDecodeError):
        expected = "two template ids and a label (integers)"
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                tokens = line.split()
                if tokens and len(tokens) != 3:
                    raise DataFormatError(f"{path}:{lineno}: {len(tokens)} values; expected 3 ({expected}): "
                                          f"{line.strip()[:120]!r}") from None
                _numbers(path, lineno, line, tokens, int, expected)
        raise DataFormatError(f"{path}: cannot read the template pairs; expected lines of {expected}") from None
    if table.size == 0:
        raise DataFormatError(f"{path}: no template pairs listed; expected lines of two template ids and a label")
    if table.shape[1] != 3:
        raise DataFormatError(f"{path}:1: {table.shape[1]} values per line; expected 3 (two template ids and a label)")
    labels = table[:, 2]
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataFormatError(f"{path}:{_nonblank_line(path, row)}: label {labels[row]}; a pair's label is 1 "
                              f"(same person) or 0 (different people)")
    return table[:, :2].copy(), labels.astype(np.int8)


def read_ijb_meta(root, target: str = "IJBC") -> IJBMeta:
    """Read and check the three meta files of an IJB-B/IJB-C folder; errors name the file and the line."""
    root = os.fspath(root)
    target = check_target(target)
    if not os.path.isdir(root):
        raise DataFormatError(f"{root}: IJB folder not found; --root must hold {IMAGE_DIR}/ and {META_DIR}/")
    landmark_path, template_path, pair_path = (meta_path(root, target, k) for k in META_FILES)
    names, landmarks, scores = _read_landmarks(landmark_path)
    templates, medias = _read_template_media(template_path, names, landmark_path)
    pairs, labels = _read_pairs(pair_path)
    known = np.unique(templates)
    unknown = ~np.isin(pairs, known)
    if unknown.any():
        row, col = (int(v) for v in np.argwhere(unknown)[0])
        raise DataFormatError(f"{pair_path}:{_nonblank_line(pair_path, row)}: template {pairs[row, col]} is not "
                              f"in {template_path} ({int(unknown.any(axis=1).sum())} pairs name unknown templates)")
    return IJBMeta(root=root, target=target, names=names, landmarks=landmarks, scores=scores,
                   templates=templates, medias=medias, pairs=pairs, labels=labels)


def missing_images(meta: IJBMeta) -> np.ndarray:
    """(N,) bool: which listed images are not files under ROOT/loose_crop."""
    image_dir = meta.image_dir
    return np.array([not os.path.isfile(os.path.join(image_dir, name)) for name in meta.names], dtype=bool)


class AlignedFaces(Dataset):
    """Images `indices` of an IJB set, decoded (RGB), aligned to the 112x112 ArcFace template and normalised
    (x/255 - 0.5)/0.5 at the model's input size (resized from 112 when it differs, as distill eval does).

    An item is (image index, 3 x S x S float tensor, error): a file that cannot be read or decoded gives a
    zero tensor and a one-line error naming it, which the caller raises (a DataLoader worker's own
    exception would arrive wrapped in a traceback)."""

    def __init__(self, meta: IJBMeta, input_size: int, indices=None):
        self.image_dir = meta.image_dir
        self.landmark_file = meta.path("landmarks")
        self.names = meta.names
        self.landmarks = meta.landmarks
        self.input_size = int(input_size)
        self.indices = np.arange(len(meta.names)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        index = int(self.indices[k])
        path = os.path.join(self.image_dir, self.names[index])
        try:
            with open(path, "rb") as f:
                data = f.read()
            face = align_face(decode_image(data, where=path), self.landmarks[index])
        except OSError as err:
            return index, self._blank(), f"{path}: cannot read the image ({err.strerror or err})"
        except LandmarkError as err:
            return index, self._blank(), f"{self.landmark_file}: image {self.names[index]}: {err}"
        except DataFormatError as err:
            # decode errors end with advice for RecordIO files; an IJB image is replaced from the download
            message = str(err).split(". The file is corrupt")[0]
            return index, self._blank(), (f"{message}. The image is damaged or not an image: replace it from "
                                          f"the IJB download (or delete it and pass --skip-missing)")
        # a contiguous CHW copy: converting a permuted view to float is ~30x slower with several torch threads
        x = to_input_tensor(torch.from_numpy(np.ascontiguousarray(face.transpose(2, 0, 1))), input_size=self.input_size)
        return index, x, ""

    def _blank(self) -> torch.Tensor:
        return torch.zeros(3, self.input_size, self.input_size)
