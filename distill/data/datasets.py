"""Training sets as torch Datasets: one item contract for RecordIO and image folders, flip recorded.

Every training set yields `(img, label, index, flipped)`:
- `img`: float32 3×H×W tensor, RGB, normalised (x/255 - 0.5)/0.5 (arcface_torch's input);
- `label`: class id (int); `index`: the item's position in the dataset;
- `flipped`: whether `img` was mirrored left-right.
The flip is drawn from torch's global RNG, which DataLoader seeds per worker from its generator,
so a seeded run draws the same flips. A teacher cache keyed by (index, flipped) can recompute or
look up exactly the view the student saw; `get(index, flip)` returns that view deterministically.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from distill.data.images import decode_chw, to_input_tensor
from distill.utils.errors import UserNote


class FaceDataset(Dataset):
    """Base of the training sets: subclasses implement `load(index) -> (uint8 3×H×W, class id)`."""

    def __init__(self, flip: bool = True, input_size=None):
        self.flip = bool(flip)
        self.input_size = input_size

    def load(self, index: int) -> tuple:
        raise NotImplementedError

    def encoded(self, index: int) -> tuple:
        """`(encoded image bytes, class id)` of item `index`, read but not decoded (data.decode: cuda decodes
        whole batches on the GPU, distill/data/gpu_decode.py). Sets whose images are not stored encoded lack it."""
        raise NotImplementedError(f"{type(self).__name__} does not store encoded images")

    def where(self, index: int) -> str:
        """Names item `index` (file, key, offset) in error messages."""
        return f"{self.source}: image {index}"

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def labels(self) -> np.ndarray:
        """The class id of every item, int64, in index order, read without decoding any image
        (the P×K identity sampler, data.images_per_id, plans batches from them)."""
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return index % n

    def get(self, index: int, flip: bool) -> torch.Tensor:
        """The normalised image tensor at `index`, mirrored when `flip` (no randomness)."""
        chw, _ = self.load(self._check_index(index))
        return to_input_tensor(chw, flip=flip, input_size=self.input_size)

    def item(self, index: int, flip: bool) -> tuple:
        """`(img, label, index, flipped)` with the flip chosen by the caller (the engine's epoch plan)."""
        index = self._check_index(int(index))
        chw, label = self.load(index)
        return to_input_tensor(chw, flip=flip, input_size=self.input_size), label, index, flip

    def __getitem__(self, index: int) -> tuple:
        return self.item(index, self.flip and bool(torch.randint(2, ()).item()))

    def fingerprint(self) -> str:
        """Identifies the images and labels (keys the teacher cache); subclasses hash their index."""
        raise NotImplementedError

    def stored_size(self) -> tuple | None:
        """(H, W) of the first image as stored (decoded once), None for an empty set."""
        return tuple(self.load(0)[0].shape[-2:]) if len(self) else None

    def notes(self) -> list:
        """What the toolkit will do on the user's behalf with this set: today, resizing when the stored images
        differ from `input_size`. Subclasses add what their metadata files say against the data."""
        size = self.stored_size()
        if self.input_size is None or size is None or size == (self.input_size, self.input_size):
            return []
        return [f"{self.source}: images are {size[0]}x{size[1]}, the model takes {self.input_size}x{self.input_size} "
                f"(data.input_size): every image is resized (bicubic) as it is loaded"]

    def warn_notes(self) -> list:
        """`notes()` issued as UserNote warnings (the command line prints each once); returned too."""
        notes = self.notes()
        for note in notes:
            warnings.warn(note, UserNote, stacklevel=2)
        return notes

    source = property(lambda self: type(self).__name__)


class PlannedDataset(Dataset):
    """Items are (index, flip) pairs chosen by the epoch plan (distill/train/epoch_plan.py), so flips never
    depend on workers: item (index, flip) is `dataset.item(index, flip)`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, flip = item
        return self.dataset.item(index, bool(flip))


class RecordIODataset(FaceDataset):
    """insightface/im2rec RecordIO as a training set. `path`: folder with train.rec or the .rec file.
    Item i is image key `RecordIO.keys[i]`; the label comes from that image's own IRHeader."""

    def __init__(self, path, flip: bool = True, input_size=None):
        from distill.data.recordio import RecordIO

        super().__init__(flip=flip, input_size=input_size)
        self.rec = RecordIO(path)

    def __len__(self) -> int:
        return len(self.rec)

    @property
    def num_classes(self) -> int:
        return self.rec.num_classes

    def labels(self) -> np.ndarray:
        """From the identity records (insightface layout: one read per identity), else one header read per image."""
        return self.rec.labels()

    source = property(lambda self: self.rec.rec_path)

    def notes(self) -> list:
        """Besides resizing: insightface's `property` file (`num_ids,height,width`) against the records."""
        notes = super().notes()
        prop = os.path.join(os.path.dirname(self.rec.rec_path), "property")
        try:
            with open(prop, encoding="ascii") as f:
                fields = [int(v) for v in f.read().strip().split(",")]
        except (OSError, ValueError, UnicodeDecodeError):
            return notes  # optional; an unreadable one is ignored as insightface ignores it
        size = self.stored_size()
        if len(fields) >= 3 and size is not None and tuple(fields[1:3]) != size:
            notes.append(f"{prop} says images are {fields[1]}x{fields[2]}, but they are {size[0]}x{size[1]}: the "
                         f"images are used as they are; correct the property file")
        if fields and self.rec.identity_keys is not None and fields[0] != self.num_classes:
            notes.append(f"{prop} says {fields[0]} identities, but the header record of {self.rec.rec_path} has "
                         f"{self.num_classes}: the header is used (it sizes the classifier); correct the property file")
        return notes

    def fingerprint(self) -> str:
        """SHA-256 of train.idx plus the .rec size: any re-pack or edit of the index changes it."""
        import hashlib
        import os

        h = hashlib.sha256()
        with open(self.rec.idx_path, "rb") as f:
            h.update(f.read())
        h.update(str(os.path.getsize(self.rec.rec_path)).encode())
        return h.hexdigest()

    def encoded(self, index: int) -> tuple:
        """`(JPEG/PNG bytes of the record's payload, class id)`: one read, no decode."""
        key = int(self.rec.keys[index])
        head, data = self.rec.record(key)  # one read gives both the label and the image
        return data, self.rec.class_of(key, head)

    def where(self, index: int) -> str:
        key = int(self.rec.keys[index])
        return f"{self.rec.rec_path}: key {key} (record at byte {self.rec.offset(key)})"

    def load(self, index: int) -> tuple:
        data, label = self.encoded(index)
        return decode_chw(data, self.where(index)), label

    def __repr__(self) -> str:
        return f"RecordIODataset({self.rec!r}, flip={self.flip}, input_size={self.input_size})"
