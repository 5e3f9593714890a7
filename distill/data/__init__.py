"""Face-recognition data without MXNet: insightface RecordIO, verification .bin sets, image folders,
and synthetic face identities written in those same formats."""

import os

from distill.data.datasets import FaceDataset, RecordIODataset
from distill.data.folders import ImageFolderDataset
from distill.data.recordio import RecordIO
from distill.data.recordio_writer import rebuild_index, write_insightface_rec
from distill.data.verification import load_verification_bin, write_verification_bin
from distill.utils.errors import DataFormatError


def open_training_set(path, **kw) -> FaceDataset:
    """RecordIODataset for a `.rec` file or a folder holding `train.rec`, else ImageFolderDataset for an
    identity-per-folder tree. Keyword arguments (flip, input_size) go to the dataset."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".rec") or os.path.isfile(os.path.join(path, "train.rec")):
        return RecordIODataset(path, **kw)
    if os.path.isdir(path):
        return ImageFolderDataset(path, **kw)
    raise DataFormatError(
        f"{path}: not a training set; pass a folder holding train.rec (+ train.idx), a .rec file, "
        f"or a folder with one sub-folder of images per identity"
    )


__all__ = [
    "FaceDataset",
    "ImageFolderDataset",
    "RecordIO",
    "RecordIODataset",
    "load_verification_bin",
    "open_training_set",
    "rebuild_index",
    "write_insightface_rec",
    "write_verification_bin",
]
