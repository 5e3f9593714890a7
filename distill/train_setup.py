"""One stage's device, mixed precision, learning rate and schedule, from its TrainConfig (timm's schedulers)."""

from __future__ import annotations

import torch
from timm.scheduler import create_scheduler_v2

from distill.config import TrainConfig
from distill.errors import DistillError


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver on this machine"


def resolve_device(device: str | None, key: str = "device") -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` (this process's GPU; torchrun sets it from
    LOCAL_RANK) or `cuda:N`; a GPU that is not there is a DistillError naming `key` (checked before any work)."""
    device = device or "auto"
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise DistillError(f"{key} {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise DistillError(f"{key} {device!r}: only cpu and cuda devices are supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DistillError(f"{key} {device!r}: CUDA is not available ({_no_cuda_reason()}); use cpu (or auto)")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise DistillError(f"{key} {device!r}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                           f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''}); use one of those or cpu")
    return parsed if parsed.index is not None else torch.device("cuda", torch.cuda.current_device())


def use_channels_last(train: TrainConfig, device: torch.device) -> bool:
    """train.channels_last, or by default (null) on CUDA: NHWC convolutions are the fast path of tensor cores."""
    return device.type == "cuda" if train.channels_last is None else bool(train.channels_last)


def amp_settings(train: TrainConfig, device: torch.device):
    """(autocast dtype or None, whether a GradScaler is needed). `auto` is bf16 on CUDA and off on CPU
    (CPU autocast rarely pays); an explicit bf16/fp16 is honoured on any device."""
    if train.amp == "off" or (train.amp == "auto" and device.type != "cuda"):
        return None, False
    if train.amp == "fp16":
        return torch.float16, True
    return torch.bfloat16, False


def scaled_lr(train: TrainConfig, world: int) -> float:
    """lr is given for a total batch of lr_batch_size and scales linearly with the real total batch."""
    return train.lr * train.batch_size * world * train.accumulate / train.lr_batch_size


def create_scheduler(optimizer, train: TrainConfig, total_steps: int, steps_per_epoch: float):
    """timm scheduler stepped per optimizer update: epochs in the config become update counts here."""
    warmup = int(round(train.warmup_epochs * steps_per_epoch))
    common = dict(num_epochs=total_steps, warmup_epochs=warmup, min_lr=train.min_lr, warmup_lr=train.min_lr or 1e-6,
                  step_on_epochs=False, updates_per_epoch=1)
    if train.scheduler == "poly":
        # arcface_torch's warmup-poly: the decay starts where the warmup ends (timm's warmup_prefix), so the
        # lr at the end of the warmup is the full lr and reaches min_lr at the last step
        poly = {**common, "num_epochs": max(1, total_steps - warmup), "warmup_prefix": True}
        sched, _ = create_scheduler_v2(optimizer, sched="poly", decay_rate=train.poly_power, **poly)
    elif train.scheduler == "cosine":
        sched, _ = create_scheduler_v2(optimizer, sched="cosine", **common)
    else:
        milestones = [int(round(e * steps_per_epoch)) for e in train.decay_epochs]
        sched, _ = create_scheduler_v2(optimizer, sched="multistep", decay_milestones=milestones,
                                       decay_rate=train.decay_rate, **common)
    return sched
