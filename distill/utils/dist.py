"""torch.distributed in one place: joining the process group, this process's rank and the world size, and the
waits between ranks (rank-0-first for files every rank needs: synthetic data, the teacher cache, an exported
backbone; rank 0's value on every rank; every rank's value on every rank).

Without torchrun (or before the group is initialised) the process is rank 0 of a world of 1, so every
helper works unchanged in a single process.

The waits go through gloo on the CPU, never through NCCL: NCCL's watchdog aborts a rank whose collective has not
finished within the timeout, and a wait is exactly where a rank sits idle while rank 0 works alone. On GPUs the
default group is `cuda:nccl,cpu:gloo` and the waits use a gloo group of their own (made once, beside it): a
barrier on the default group would run as a one-element NCCL all-reduce on the bound GPU (dist.barrier picks the
group's `bound_device_id`), whatever its caller meant.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from distill.utils.device import resolve_device
from distill.utils.errors import ConfigError, DistillError

# Long enough for the longest step one rank does alone while the others wait (config `dist.timeout_minutes`).
# The longest of those left is generating a synthetic training set on rank 0: experiments/synthetic_r100.yaml
# (2,000 identities x 24 images + 6,000 pairs at 112 px, ~60,000 images) renders at ~650 images/s on ONE CPU core
# (measured on a 1,440-image sample of the same size, distill/data/synthetic.py generate, workers=1), ~1.5 min;
# rank 0 uses every core it has. 30 minutes leaves a factor of ~20 for slow disks and busy hosts while a rank that
# really hangs is still reported the same hour. Evaluations and cache builds are spread over the ranks and run on
# the GPU; a rank-0 step that can take longer must not be a wait (or the key raised for it).
DEFAULT_TIMEOUT_MINUTES = 30.0

_WAIT_GROUP = None  # the gloo group the waits use when the default group is not gloo; None: the default group


def _uses_cuda(device: str, world: int) -> bool:
    """Whether the ranks train on GPUs (`device` as the config gives it, checked by the one resolver:
    distill.utils.device.resolve_device); `cuda:N` with several ranks refused."""
    if (device or "auto") == "auto":
        return torch.cuda.is_available()
    parsed = resolve_device(device)  # a device, cpu or cuda, a GPU this machine has
    if parsed.type == "cuda" and torch.device(device).index is not None:
        raise ConfigError(f"key 'device': {device!r} with {world} ranks: every rank would use GPU {parsed.index}; "
                          f"use device: cuda or auto under torchrun, torchrun gives each rank its GPU")
    return parsed.type == "cuda"


def init_distributed(device: str = "auto", timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: gloo when the run's `device` is the CPU (`cpu`, or
    `auto` without CUDA); on GPUs `cuda:nccl,cpu:gloo` bound to this rank's GPU (LOCAL_RANK), with a gloo group for
    the waits. `timeout_minutes` bounds every collective and wait (a rank that waits longer fails with an error)."""
    global _WAIT_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return
    timeout = timedelta(minutes=timeout_minutes)
    if not _uses_cuda(device, world):
        dist.init_process_group("gloo", timeout=timeout)
        _WAIT_GROUP = None
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"key 'device': {device!r}: this is local rank {local_rank} but {count} GPU"
                          f"{'s are' if count != 1 else ' is'} visible; start at most {count} processes per node "
                          f"(torchrun --nproc_per_node) or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    torch.cuda.set_device(local_rank)
    dist.init_process_group("cuda:nccl,cpu:gloo", timeout=timeout, device_id=torch.device("cuda", local_rank))
    _WAIT_GROUP = dist.new_group(backend="gloo", timeout=timeout)


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
    """Every rank waits here for the others (through gloo, bounded by dist.timeout_minutes)."""
    if is_distributed():
        dist.barrier(group=_WAIT_GROUP)


def failure_note(err: BaseException | None) -> str | None:
    """'Type: message' of a rank's failure, as the other ranks are told it; None when it did not fail."""
    return None if err is None else f"{type(err).__name__}: {err}"


def first_failure(err: BaseException | None, notes: list) -> tuple | None:
    """After every rank shared its failure_note (`notes`, rank order): the rank that failed re-raises `err`; the
    others get (rank, note) of the first rank that failed, to raise their own error naming it; None when none did.
    So a rank that stops never leaves the others waiting in a later collective."""
    if err is not None:
        raise err
    return next(((r, note) for r, note in enumerate(notes) if note is not None), None)


def any_failure(err: BaseException | None, collective: bool = True) -> tuple | None:
    """first_failure over every rank's note, shared now (one all-gather; `collective` False: this rank's alone)."""
    note = failure_note(err)
    return first_failure(err, all_gather_objects(note) if collective else [note])


def rank0_first(fn):
    """Run `fn` on rank 0, then on the other ranks (which find its files ready: synthetic data, cache). When it
    raises on rank 0, rank 0 raises its error and the other ranks a DistillError naming it, at once (not after the
    timeout, waiting for a rank that has stopped)."""
    if not is_distributed():
        return fn()
    out, err = None, None
    if dist.get_rank() == 0:
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 - told to every rank, then re-raised (first_failure)
            err = e
    failed = first_failure(err, [from_rank0(failure_note(err))])
    if failed:
        raise DistillError(f"rank 0 stopped before this rank could go on ({failed[1]})")
    return out if dist.get_rank() == 0 else fn()


def from_rank0(value):
    """Rank 0's `value` on every rank (a picklable object); the value itself without a process group."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_WAIT_GROUP, device=torch.device("cpu"))
    return box[0]


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` without a process group."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_WAIT_GROUP)
    return out
