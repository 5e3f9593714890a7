"""The epoch plan: the order of samples and their flips as a pure function of (seed, epoch).

Planned here rather than drawn inside DataLoader workers, so a run resumed from last.pt at step k sees
exactly the batches an uninterrupted run would (distill/engine.py), on any number of workers.
"""

from __future__ import annotations

import torch


class PlannedDataset(torch.utils.data.Dataset):
    """Items are (index, flip) pairs chosen by the epoch plan, so flips never depend on workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, flip = item
        return self.dataset.item(index, bool(flip))


def plan_epoch(n: int, batch_size: int, seed: int, epoch: int, flip: bool, rank: int = 0, world: int = 1) -> list:
    """This rank's batches of one epoch: lists of (index, flip); full global batches only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    flips = torch.randint(0, 2, (n,), generator=g) if flip else torch.zeros(n, dtype=torch.int64)
    glob = batch_size * world
    batches = []
    for b in range(n // glob):
        part = order[b * glob + rank * batch_size: b * glob + (rank + 1) * batch_size]
        batches.append(list(zip(part.tolist(), flips[part].tolist())))
    return batches
