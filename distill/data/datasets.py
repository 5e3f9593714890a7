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

import torch
from torch.utils.data import Dataset

from distill.data.images import decode_chw, to_input_tensor


class FaceDataset(Dataset):
    """Base of the training sets: subclasses implement `load(index) -> (uint8 3×H×W, class id)`."""

    def __init__(self, flip: bool = True, input_size=None):
        self.flip = bool(flip)
        self.input_size = input_size

    def load(self, index: int) -> tuple:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
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

    def fingerprint(self) -> str:
        """SHA-256 of train.idx plus the .rec size: any re-pack or edit of the index changes it."""
        import hashlib
        import os

        h = hashlib.sha256()
        with open(self.rec.idx_path, "rb") as f:
            h.update(f.read())
        h.update(str(os.path.getsize(self.rec.rec_path)).encode())
        return h.hexdigest()

    def load(self, index: int) -> tuple:
        key = int(self.rec.keys[index])
        head, data = self.rec.record(key)  # one read gives both the label and the image
        label = self.rec.class_of(key, head)
        return decode_chw(data, f"{self.rec.rec_path}: key {key} (record at byte {self.rec.offset(key)})"), label

    def __repr__(self) -> str:
        return f"RecordIODataset({self.rec!r}, flip={self.flip}, input_size={self.input_size})"
