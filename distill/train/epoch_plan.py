"""The epoch plan: the order of samples and their flips as a pure function of (seed, epoch).

Planned here rather than drawn inside DataLoader workers, so a run resumed from last.pt at step k sees
exactly the batches an uninterrupted run would (distill/train/engine.py), on any number of workers.
`plan_epoch` shuffles the images; `plan_identity_epoch` (data.images_per_id) builds P×K batches of
identity groups for batch-level distillation losses. Both deal global batches out across DDP ranks.
"""

from __future__ import annotations

import numpy as np
import torch


def plan_epoch(n: int, batch_size: int, seed: int, epoch: int, flip: bool, rank: int = 0, world: int = 1) -> list:
    """This rank's batches of one epoch: lists of (index, flip); full global batches only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    flips = torch.randint(0, 2, (n,), generator=g) if flip else torch.zeros(n, dtype=torch.int64)
    glob = batch_size * world
    batches = []
    for b in range(n // glob):
        part = order[b * glob + rank * batch_size: b * glob + (rank + 1) * batch_size]
        batches.append(list(zip(part.tolist(), flips[part].tolist(), strict=True)))
    return batches


def plan_identity_epoch(labels, batch_size: int, images_per_id: int, seed: int, epoch: int, flip: bool,
                        rank: int = 0, world: int = 1, grouped_fraction: float = 1.0) -> list:
    """This rank's batches of one epoch under P×K identity sampling (data.images_per_id = K): each batch is
    P = batch_size / K groups of K images, as lists of (index, flip) laid out group after group.

    A pure function of (labels, seed, epoch) like `plan_epoch`, so resume stays exact. The epoch's images are
    shuffled, grouped by identity (random order inside each identity) and cut into chunks of K; an identity's
    last `count % K` images (all of them when it has fewer than K) are its leftovers. The leftovers of all
    identities are strung together, identity after identity in a random order, and cut into chunks of K too:
    such a merged chunk holds runs of two or more identities (each run < K images, one identity's run
    contiguous), and an identity's leftovers lie in at most two merged chunks. So identities with fewer than K
    images take part too (unless they fall in the dropped tail below, which the random order moves every
    epoch). The chunks are shuffled and dealt out P per batch, P × world per global batch (rank r takes chunks
    [r·P, (r+1)·P) of it: whole groups per rank). Chunks are shuffled independently, so a batch can hold two
    chunks of one identity (rare with many identities; always the case when there are fewer than P).

    Dropped per epoch: the last `leftovers % K` (< K) leftover images plus the chunks that do not fill a global
    batch; together fewer than batch_size × world images, the same bound as `plan_epoch`. The epoch has
    exactly `len(labels) // (batch_size × world)` batches, as `plan_epoch` (the K-chunks number len // K).

    `grouped_fraction` < 1 (data.grouped_fraction) mixes: each batch holds G = round(fraction × batch_size / K) groups,
    then batch_size − G·K single images. The first G·(batches) chunks stay groups; the images of the others are
    shuffled and dealt out one by one, so every image still comes once an epoch.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n, k = len(labels), int(images_per_id)
    if k < 1 or batch_size % k:
        raise ValueError(f"images_per_id {k} must be >= 1 and divide batch_size {batch_size}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    shuffled = torch.randperm(n, generator=g).numpy()
    flips = torch.randint(0, 2, (n,), generator=g).numpy() if flip else np.zeros(n, dtype=np.int64)
    _, identity = np.unique(labels, return_inverse=True)  # dense identity numbers 0..ids-1
    identity = identity.reshape(-1)
    counts = np.bincount(identity)
    leftover_rank = torch.randperm(len(counts), generator=g).numpy()  # the order leftovers are strung in
    grouped = shuffled[np.argsort(identity[shuffled], kind="stable")]  # identity by identity, shuffled within
    within = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)  # position inside its identity
    in_full_chunk = within < np.repeat(counts - counts % k, counts)
    leftovers = grouped[~in_full_chunk]
    leftovers = leftovers[np.argsort(leftover_rank[identity[leftovers]], kind="stable")]
    chunks = np.concatenate([grouped[in_full_chunk].reshape(-1, k),
                             leftovers[:len(leftovers) // k * k].reshape(-1, k)])
    chunks = chunks[torch.randperm(len(chunks), generator=g).numpy()]
    if grouped_fraction < 1:
        return _mixed(chunks, batch_size, k, grouped_fraction, flips, g, rank, world)
    per_batch = batch_size // k
    per_global = per_batch * world
    batches = []
    for b in range(len(chunks) // per_global):
        part = chunks[b * per_global + rank * per_batch: b * per_global + (rank + 1) * per_batch].reshape(-1)
        batches.append(list(zip(part.tolist(), flips[part].tolist(), strict=True)))
    return batches


def _mixed(chunks, batch_size: int, k: int, fraction: float, flips, g, rank: int, world: int) -> list:
    """plan_identity_epoch's batches of G groups of K then single images (see there)."""
    groups = int(round(fraction * batch_size / k))
    count = chunks.size // (batch_size * world)  # global batches this epoch
    kept = chunks[:count * world * groups].reshape(count, world, groups * k)
    singles = chunks[count * world * groups:].reshape(-1)
    singles = singles[torch.randperm(len(singles), generator=g).numpy()]
    rest = batch_size - groups * k
    singles = singles[:count * world * rest].reshape(count, world, rest)
    batches = []
    for b in range(count):
        part = np.concatenate([kept[b, rank], singles[b, rank]])
        batches.append(list(zip(part.tolist(), flips[part].tolist(), strict=True)))
    return batches


class StagePlan:
    """A DataLoader batch sampler over a whole stage: the planned batches from micro-batch `start` on, epoch
    after epoch, `count` of them. One sampler for the stage (not one loader per epoch) lets loader workers
    persist across epochs and keep prefetching over the epoch boundary. `plan(epoch)` gives an epoch's
    batches (plan_epoch or plan_identity_epoch, bound to this rank), `per_epoch` how many are used of each."""

    def __init__(self, plan, per_epoch: int, start: int, count: int):
        self.plan, self.per_epoch, self.start, self.count = plan, per_epoch, start, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        micro, end = self.start, self.start + self.count
        while micro < end:
            epoch, pos = divmod(micro, self.per_epoch)
            for batch in self.plan(epoch)[pos:min(self.per_epoch, pos + end - micro)]:
                yield batch
                micro += 1


def stage_loader(planned, plan, per_epoch: int, start: int, count: int, data, seed: int, pin_memory: bool,
                 collate_fn=None):
    """The stage's one DataLoader (distill/train/engine.py) over `planned` (a PlannedDataset, or gpu_decode's
    EncodedPlanned with its collate_fn): `data` is the DataConfig (num_workers, prefetch_factor; workers
    persist for the whole stage). Worker seeds come from a generator of their own: creating the loader draws
    nothing from the global RNG, which exact resume depends on."""
    workers = data.num_workers
    extra = dict(persistent_workers=True, prefetch_factor=data.prefetch_factor) if workers > 0 else {}
    return torch.utils.data.DataLoader(planned, batch_sampler=StagePlan(plan, per_epoch, start, count),
                                       num_workers=workers, pin_memory=pin_memory, collate_fn=collate_fn,
                                       generator=torch.Generator().manual_seed(seed), **extra)
