"""Tiny in-memory face-like data and configs for fast engine tests (not a test module)."""

import time

import torch

from distill.config.schema import ExperimentConfig, build_config
from distill.data.standin import StandInFaces


class TinyFaces(StandInFaces):
    """Stand-in faces that can also poison one image with NaN or slow every item down."""

    def __init__(self, classes=8, per_class=16, size=16, seed=0, flip=True, nan_index=None, delay=0.0):
        super().__init__(classes, per_class, size, seed, flip)
        self.nan_index, self.delay = nan_index, delay

    def get(self, index, flip):
        x = super().get(index, flip)
        return torch.full_like(x, float("nan")) if index == self.nan_index else x

    def item(self, index, flip):
        if self.delay:
            time.sleep(self.delay)
        return super().item(index, flip)


TINY_STUDENT = dict(arch="vargfacenet", embedding_size=32, multiplier=0.5, last_channels=64, units=[1, 1, 1])


def tiny_config(**sections) -> ExperimentConfig:
    raw = {
        "name": "tiny", "seed": 0, "deterministic": True,
        "data": {"train": "in-memory", "input_size": 16, "num_workers": 0},
        "student": dict(TINY_STUDENT),
        "margin": {"margin": "arcface", "s": 16.0, "m": 0.3},
        "train": {"batch_size": 16, "lr": 0.05, "lr_batch_size": 16, "max_steps": 12, "log_every": 2,
                  "checkpoint_every": 4, "warmup_epochs": 0.0},
        "teacher": {"arch": "iresnet18", "input_size": 16, "embedding_size": 32},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(raw)


def tame(model):
    """An untrained IResNet with arcface_torch's init (conv std 0.1) overflows to inf past a few dozen
    blocks, and fp16 sooner; re-initialise its convs small so its outputs stay finite."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
            m.weight.data.mul_(0.2)
    return model


def stop_at_first_checkpoint(cfg, spec, out, monkeypatch, teacher=None, cache=None) -> None:
    """Run one stage in `out` and stop it (KeyboardInterrupt) right after its first last.pt is written."""
    import pytest

    import distill.train.engine
    from distill.train.engine import run_stage

    real = distill.train.engine.save_state

    def stop_after_first(st):
        real(st)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(distill.train.engine, "save_state", stop_after_first)
        with pytest.raises(KeyboardInterrupt):
            run_stage(cfg, spec, str(out), TinyFaces(), {}, teacher=teacher, cache=cache, progress=False)


def whole_and_resumed(cfg, spec, teacher, out, monkeypatch, cache=None) -> tuple:
    """last.pt of one stage trained straight through (out/whole) and of the same stage stopped right after its
    first checkpoint, then rerun to resume it (out/resumed): (whole, at the stop, resumed) checkpoints."""
    from distill.train.engine import run_stage
    from distill.utils.checkpoint import safe_torch_load

    run_stage(cfg, spec, str(out / "whole"), TinyFaces(), {}, teacher=teacher, cache=cache, progress=False)
    stop_at_first_checkpoint(cfg, spec, out / "resumed", monkeypatch, teacher=teacher, cache=cache)
    stopped = safe_torch_load(out / "resumed" / "last.pt")
    run_stage(cfg, spec, str(out / "resumed"), TinyFaces(), {}, teacher=teacher, cache=cache, progress=False)
    return safe_torch_load(out / "whole" / "last.pt"), stopped, safe_torch_load(out / "resumed" / "last.pt")
