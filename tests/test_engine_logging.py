"""The train/* scalars in metrics.jsonl: means over the logging window, not the last micro-batch's values."""

import json
import math
import os
import signal

import pytest
import torch
from tiny import TINY_STUDENT, TinyFaces, tiny_config
from torch import nn

from distill.losses.distillation import DistillationObjective
from distill.train.engine import Preempted, StageSpec, run_stage

MODEL_KWARGS = {**{k: v for k, v in TINY_STUDENT.items() if k != "arch"}, "input_size": 16}
TERMS = ("acc", "cos_target", "loss_cls", "loss_kd/equivalent_angular", "loss")


class _Teacher(nn.Module):
    """A fixed random projection standing in for a frozen teacher, so that loss_kd is logged too."""
    input_size = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)  # the same teacher in every run
        self.proj = nn.Linear(3 * 16 * 16, 32)
        self.requires_grad_(False)

    def forward(self, x):
        return self.proj(x.flatten(1))


@pytest.fixture
def recorded(monkeypatch):
    """Every micro-batch's logged terms, in order, as the objective computes them."""
    seen = []
    forward = DistillationObjective.forward

    def recording(self, *args, **kwargs):
        total, logs = forward(self, *args, **kwargs)
        seen.append({k: float(v) for k, v in logs.items()})
        return total, logs

    monkeypatch.setattr(DistillationObjective, "forward", recording)
    return seen


def _train(out, **train):
    cfg = tiny_config(train={"max_steps": 4, "checkpoint_every": 4, **train})
    spec = StageSpec("gen1", "vargfacenet", MODEL_KWARGS, cfg.train, alpha=7.0, generation=1)
    run_stage(cfg, spec, str(out), TinyFaces(), {}, teacher=_Teacher(), progress=False)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _mean(window: list, term: str) -> float:
    return sum(m[term] for m in window) / len(window)


def _assert_window_means(line: dict, window: list):
    assert window, "a log line without micro-batches"
    for term in TERMS:
        assert line[f"train/{term}"] == pytest.approx(_mean(window, term), rel=1e-6, abs=1e-6), term


def test_logged_terms_are_the_mean_over_the_window_not_the_last_micro_batch(tmp_path, recorded):
    lines = _train(tmp_path / "every2", log_every=2)
    assert [x["step"] for x in lines] == [2, 4] and len(recorded) == 4
    for line, window in zip(lines, (recorded[0:2], recorded[2:4]), strict=True):
        _assert_window_means(line, window)
        assert line["train/loss"] != pytest.approx(window[-1]["loss"], rel=1e-4)  # not the last micro-batch's
        assert line["train/loss"] != pytest.approx(window[0]["loss"], rel=1e-4)
        assert math.isfinite(line["train/images_per_s"]) and line["train/images_per_s"] > 0
        assert {"train/lr", "train/epoch"} <= set(line)
    assert lines[0]["train/lr"] > 0 and lines[1]["train/epoch"] == pytest.approx(4 / 8)  # 8 batches an epoch

    # the same deterministic run logging every step: its lines are the single micro-batches, and the
    # log_every=2 lines their pairwise means
    per_step = recorded[:]
    recorded.clear()
    single = _train(tmp_path / "every1", log_every=1)
    assert [x["step"] for x in single] == [1, 2, 3, 4] and recorded == per_step
    for line, value in zip(single, per_step, strict=True):
        _assert_window_means(line, [value])
        assert math.isfinite(line["train/images_per_s"]) and line["train/images_per_s"] > 0
    for line, pair in zip(lines, (single[0:2], single[2:4]), strict=True):
        assert line["train/loss"] == pytest.approx((pair[0]["train/loss"] + pair[1]["train/loss"]) / 2, rel=1e-6)


def test_with_accumulation_a_window_spans_every_micro_batch_of_its_updates(tmp_path, recorded):
    lines = _train(tmp_path, log_every=1, accumulate=2, batch_size=8, max_steps=3, checkpoint_every=3)
    assert [x["step"] for x in lines] == [1, 2, 3] and len(recorded) == 6
    for k, line in enumerate(lines):
        _assert_window_means(line, recorded[2 * k: 2 * k + 2])
        assert line["train/loss"] != pytest.approx(recorded[2 * k + 1]["loss"], rel=1e-4)
        assert math.isfinite(line["train/images_per_s"]) and line["train/images_per_s"] > 0


def test_a_resumed_run_starts_a_fresh_window(tmp_path, recorded, monkeypatch):
    forward = DistillationObjective.forward  # the recording one

    def preempt_at_third(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if len(recorded) == 3:  # SIGUSR1 during step 3: last.pt at step 3, no log line for it
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(DistillationObjective, "forward", preempt_at_third)
    with pytest.raises(Preempted, match="SIGUSR1 received; checkpoint written at step 3"):
        _train(tmp_path, log_every=2)
    assert [x["step"] for x in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [2]
    before = recorded[:]
    recorded.clear()
    lines = _train(tmp_path, log_every=2)
    assert [x["step"] for x in lines] == [2, 4] and len(recorded) == 1
    _assert_window_means(lines[0], before[0:2])
    _assert_window_means(lines[1], recorded)  # step 4 only: step 3 happened before the checkpoint
