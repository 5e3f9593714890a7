"""Identity-per-folder image trees (`root/<identity>/<image>`) as training sets and pack sources."""

from __future__ import annotations

import os

import numpy as np

from distill.data.datasets import FaceDataset
from distill.data.images import decode_chw
from distill.utils.errors import DataFormatError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def scan_image_tree(root) -> tuple:
    """(class names sorted by folder name, [(image path, class id)] in class then path order).

    Each sub-folder of `root` is one identity; its images may sit in nested folders. Hidden
    entries are skipped. A tree with no identity folders or an identity without images is an error:
    an empty class would silently shift or waste a class id.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataFormatError(f"{root}: not a folder; expected root/<identity>/<image files>")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        loose = [e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        hint = (f" It holds {len(loose)} images directly; move each identity's images into its own folder."
                if loose else "")
        raise DataFormatError(f"{root}: no identity folders found; expected root/<identity>/<image files>.{hint}")
    samples, empty = [], []
    for class_id, name in enumerate(names):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [
                os.path.join(dirpath, f) for f in filenames
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not found:
            empty.append(name)
        samples += [(path, class_id) for path in sorted(found)]
    if empty:
        raise DataFormatError(
            f"{root}: {len(empty)} identity folder(s) hold no images ({', '.join(empty[:5])}"
            f"{', ...' if len(empty) > 5 else ''}); image files end in {', '.join(IMAGE_EXTENSIONS)}. "
            f"Remove the empty folders or add their images"
        )
    return names, samples


def read_file(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read image file ({err.strerror or err})") from None


class ImageFolderDataset(FaceDataset):
    """`root/<identity>/<image>` as a training set; class ids follow the sorted folder names.

    Same item contract as RecordIODataset: `(img, label, index, flipped)`, plus `get(index, flip)`,
    `classes` (folder names) and `num_classes`. Images are decoded to RGB on access; one that
    cannot be decoded raises DataFormatError naming its path and index.
    """

    def __init__(self, root, flip: bool = True, input_size=None):
        super().__init__(flip=flip, input_size=input_size)
        self.root = os.fspath(root)
        self.classes, self.samples = scan_image_tree(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def labels(self) -> np.ndarray:
        """The class id of every image (from the folder scan), int64, in index order."""
        return np.fromiter((label for _, label in self.samples), dtype=np.int64, count=len(self.samples))

    source = property(lambda self: self.root)

    def fingerprint(self) -> str:
        """SHA-256 of every image's relative path, class and file size."""
        import hashlib

        h = hashlib.sha256()
        for path, label in self.samples:
            h.update(f"{os.path.relpath(path, self.root)}\t{label}\t{os.path.getsize(path)}\n".encode())
        return h.hexdigest()

    def encoded(self, index: int) -> tuple:
        """`(the image file's bytes, class id)`: one read, no decode."""
        path, label = self.samples[index]
        return read_file(path), label

    def where(self, index: int) -> str:
        return f"{self.samples[index][0]} (image {index} of {self.root})"

    def load(self, index: int) -> tuple:
        data, label = self.encoded(index)
        return decode_chw(data, self.where(index)), label

    def __repr__(self) -> str:
        return f"ImageFolderDataset({self.root!r}, {len(self)} images, {self.num_classes} identities)"
