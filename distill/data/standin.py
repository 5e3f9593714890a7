"""Random stand-in faces for `--dry-run` and tests: the training-set contract, no files, any size."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


class StandInFaces(torch.utils.data.Dataset):
    """`classes` identities, each a fixed random pattern plus per-image noise, as normalised tensors.

    Same contract as the real training sets: `item(index, flip) -> (img, label, index, flipped)`,
    `get(index, flip)`, `labels()`, `flip`, `num_classes`, `input_size`, `fingerprint()`."""

    def __init__(self, classes: int = 8, per_class: int = 16, size: int = 16, seed: int = 0, flip: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.protos = torch.randn(classes, 3, size, size, generator=g)
        self.noise = 0.6 * torch.randn(classes * per_class, 3, size, size, generator=g)
        self.label_of = torch.arange(classes).repeat_interleave(per_class)
        self.flip, self.input_size, self.num_classes = flip, size, classes

    def __len__(self) -> int:
        return len(self.label_of)

    def labels(self) -> np.ndarray:
        """The class id of every image, int64, in index order (as the real training sets give them)."""
        return self.label_of.numpy().astype(np.int64)

    def get(self, index: int, flip: bool) -> torch.Tensor:
        x = (self.protos[self.label_of[index]] + self.noise[index]).clamp(-1, 1)
        return torch.flip(x, dims=[2]) if flip else x

    def item(self, index: int, flip: bool) -> tuple:
        return self.get(index, flip), int(self.label_of[index]), index, bool(flip)

    def __getitem__(self, index: int) -> tuple:
        return self.item(index, False)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.noise.numpy().tobytes()).hexdigest()


def standin_for_step(batch_size: int, world: int = 1, per_class: int = 2, size: int = 16,
                     min_classes: int = 4) -> StandInFaces:
    """Stand-in faces enough for one global step at any world size: `batch_size` images on each of `world` ranks,
    in whole identities of `per_class` images (so P×K batches of K = per_class find their groups), and at least
    one identity per rank (the margin head's classes are sharded over the ranks)."""
    classes = max(min_classes, world, -(-batch_size * world // per_class))
    return StandInFaces(classes=classes, per_class=per_class, size=size)


def standin_pairs(pairs: int = 10, size: int = 16, seed: int = 0) -> tuple:
    """(images, issame) shaped like a verification .bin: 2*pairs random RGB uint8 images, half same."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2 * pairs)]
    return images, np.arange(pairs) % 2 == 0
