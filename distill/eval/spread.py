"""An evaluation spread over the ranks of a torchrun job: each rank embeds its share of a set's images, every rank
gets all the shares, and what is computed from the whole set is computed once.

A rank's share is a contiguous run of whole batches of the one-process batch size (`rank_rows`), so every image is
embedded in the very batch it would be in alone: the embeddings, hence every metric, are the one process's bit for
bit, whatever the number of ranks. Without a process group the one process has every row.

A rank whose part raises stops every rank (`gather_rows`, `on_rank0`): it re-raises its own error, the others a
DistillError naming it, so no rank is left waiting in a collective for one that has already stopped.
"""

from __future__ import annotations

import distill.utils.dist as ddp
from distill.utils.errors import DistillError


def rank_rows(num_rows: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of `rank`: a contiguous run of whole batches (the last batch may be short); a rank of a
    world larger than the number of batches may get none (start == stop)."""
    batches = -(-num_rows // batch_size)
    lo, hi = rank * batches // world_size, (rank + 1) * batches // world_size
    return min(lo * batch_size, num_rows), min(hi * batch_size, num_rows)


def _settle(err: Exception | None, notes: list, what: str) -> None:
    """Every rank stops when any rank failed: the failing one with its own error, the others naming it."""
    failed = ddp.first_failure(err, notes)
    if failed:
        raise DistillError(f"{what} stopped on rank {failed[0]} ({failed[1]})")


def gather_rows(embed, num_rows: int, batch_size: int, what: str) -> list:
    """Every rank: `embed(start, stop)` of its own rows (rank_rows; not called for an empty share), and the
    (start, stop, value) of every rank in rank order (value None for an empty share). Call it on every rank."""
    start, stop = rank_rows(num_rows, batch_size, ddp.rank(), ddp.world_size())
    value, err = None, None
    try:
        value = embed(start, stop) if stop > start else None
    except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
        err = e
    parts = ddp.all_gather_objects((start, stop, None if err else value, ddp.failure_note(err)))
    _settle(err, [note for *_, note in parts], what)
    return [(a, b, v) for a, b, v, _ in parts]


def on_rank0(compute, what: str):
    """`compute()` on rank 0, its value on every rank (the others compute nothing). Call it on every rank."""
    value, err = None, None
    if ddp.rank() == 0:
        try:
            value = compute()
        except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
            err = e
    value, note = ddp.from_rank0((None if err else value, ddp.failure_note(err)))
    _settle(err, [note], what)
    return value
