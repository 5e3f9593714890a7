"""One stage's device, mixed precision, learning rate and schedule, from its TrainConfig (timm's schedulers)."""

from __future__ import annotations

import torch
from timm.scheduler import create_scheduler_v2

from distill.config import TrainConfig
from distill.errors import DistillError


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise DistillError("device: cuda requested but no CUDA device is available (use device: auto or cpu)")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # torchrun: set from LOCAL_RANK
    return torch.device("cpu")


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
