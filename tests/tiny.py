"""Tiny in-memory face-like data and configs for fast engine tests (not a test module)."""

import hashlib

import torch

from distill.config import ExperimentConfig, build_config


class TinyFaces(torch.utils.data.Dataset):
    """`classes` identities, each a fixed random 3x16x16 pattern plus per-image noise (deterministic).

    Follows the training-set contract: item(index, flip) -> (img, label, index, flipped), get(index, flip),
    flip, num_classes, input_size, fingerprint()."""

    def __init__(self, classes=8, per_class=16, size=16, seed=0, flip=True, nan_index=None, delay=0.0):
        g = torch.Generator().manual_seed(seed)
        self.protos = torch.randn(classes, 3, size, size, generator=g)
        self.noise = 0.6 * torch.randn(classes * per_class, 3, size, size, generator=g)
        self.labels = torch.arange(classes).repeat_interleave(per_class)
        self.flip, self.input_size, self.nan_index, self.delay = flip, size, nan_index, delay
        self.num_classes = classes

    def __len__(self):
        return len(self.labels)

    def get(self, index, flip):
        x = (self.protos[self.labels[index]] + self.noise[index]).clamp(-1, 1)
        if index == self.nan_index:
            x = torch.full_like(x, float("nan"))
        return torch.flip(x, dims=[2]) if flip else x

    def item(self, index, flip):
        if self.delay:
            import time
            time.sleep(self.delay)
        return self.get(index, flip), int(self.labels[index]), index, bool(flip)

    def fingerprint(self):
        return hashlib.sha256(self.noise.numpy().tobytes()).hexdigest()


TINY_STUDENT = dict(arch="vargfacenet", embedding_size=32, multiplier=0.5, last_channels=64, units=[1, 1, 1])


def tiny_config(**sections) -> ExperimentConfig:
    raw = {
        "name": "tiny", "seed": 0, "deterministic": True,
        "data": {"train": "in-memory", "input_size": 16, "num_workers": 0},
        "student": dict(TINY_STUDENT),
        "margin": {"margin": "arcface", "s": 16.0, "m": 0.3},
        "train": {"batch_size": 16, "lr": 0.05, "lr_batch_size": 16, "max_steps": 12, "log_every": 2,
                  "checkpoint_every": 4, "warmup_epochs": 0.0},
        "teacher": {"kind": "iresnet", "depth": 18, "input_size": 16, "embedding_size": 32},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(raw)
