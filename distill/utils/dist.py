"""torch.distributed in one place: joining the process group, this process's rank and the world size,
and rank-0-first for files every rank needs (synthetic data, the teacher cache, an exported backbone).

Without torchrun (or before the group is initialised) the process is rank 0 of a world of 1, so every
helper works unchanged in a single process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the process group; 0 without one (a RANK variable alone does not make a
    process a non-zero rank: it would then never write its checkpoints)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def rank0_first(fn):
    """Run `fn` on rank 0, then on the other ranks (which find its files ready: synthetic data, cache)."""
    if not is_distributed():
        return fn()
    if dist.get_rank() == 0:
        out = fn()
        dist.barrier()
        return out
    dist.barrier()
    return fn()


def from_rank0(value):
    """Rank 0's `value` on every rank (a picklable object); the value itself without a process group."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
