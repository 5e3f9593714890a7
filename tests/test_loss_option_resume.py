"""A stage resumes under the loss options it started with: last.pt records every term's options (defaults
included, distill/train/state.py); a last.pt written before that record existed resumes each term under the
defaults of that version (distill.compat.LEGACY_LOSS_DEFAULTS) with one note; an option the config now sets to
another value than the stage started with is refused, naming its key, before anything trains.

A loss registered here stands in for the losses whose defaults change (adadistill's train_centres changes what the
optimizer holds, as `trained` does here), so the tests do not depend on when those defaults change."""

import logging

import pytest
import torch
from tiny import TinyFaces, stop_at_first_checkpoint, tiny_config
from torch import nn

import distill.compat
import teachers
from distill.losses.registry import register_loss, unregister_loss
from distill.train.engine import StageSpec, run_stage
from distill.utils.checkpoint import safe_torch_load
from distill.utils.errors import CheckpointError

PROBE = "option_probe"
TEACHER = {"arch": "vargfacenet", "embedding_size": 32, "multiplier": 0.5, "last_channels": 64, "units": [1, 1, 1],
           "input_size": 16, "cache": False}  # as small as the student: the loss, not the teacher, is the point


def _probe(trained_default: bool, power_default: int):
    class Probe(nn.Module):
        """|s − t|^power, scaled by a parameter that trains only when `trained` (what the optimizer holds)."""

        def __init__(self, trained: bool = trained_default, power: int = power_default):
            super().__init__()
            self.power = power
            self.scale = nn.Parameter(torch.ones(()), requires_grad=trained)

        def forward(self, student, teacher):
            return self.scale * (student - teacher.detach()).abs().pow(self.power).mean()

    return Probe


@pytest.fixture
def probe(monkeypatch):
    """Registers the probe loss as `now(trained, power)` registers it again with other defaults; before this
    record existed its defaults were trained: true, power: 3 (LEGACY_LOSS_DEFAULTS)."""
    monkeypatch.setitem(distill.compat.LEGACY_LOSS_DEFAULTS, PROBE, {"trained": True, "power": 3})

    def now(trained=False, power=2):
        register_loss(_probe(trained, power), PROBE)

    now()
    yield now
    unregister_loss(PROBE)


def _stage(term: dict):
    cfg = tiny_config(distill={"terms": [{"loss": PROBE, "alpha": 1.0, **term}]}, teacher=TEACHER,
                      train={"batch_size": 8, "lr_batch_size": 8, "max_steps": 2, "checkpoint_every": 1,
                             "log_every": 1})
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=1.0, generation=1)
    torch.manual_seed(5)
    return cfg, spec, teachers.build_teacher(cfg.teacher.spec())


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _run(cfg, spec, teacher, out) -> list:
    """Run (or resume) the stage in `out` to its end; the lines it logged."""
    lines, log = _Lines(), logging.Logger("test_loss_option_resume")
    log.addHandler(lines)
    run_stage(cfg, spec, str(out), TinyFaces(), {}, teacher=teacher, progress=False, logger=log)
    return lines.lines


def test_a_stage_stopped_before_the_record_resumes_under_the_old_defaults(probe, tmp_path, monkeypatch):
    cfg, spec, teacher = _stage({"power": 2})  # power set in the config: it ran with 2 then too
    probe(trained=True, power=3)  # the code of before: its defaults (the optimizer holds the probe's scale)
    _run(cfg, spec, teacher, tmp_path / "whole")
    stop_at_first_checkpoint(cfg, spec, tmp_path / "stage", monkeypatch, teacher=teacher)
    last = tmp_path / "stage" / "last.pt"
    old = safe_torch_load(last)
    del old["loss_options"]  # as that code wrote it
    torch.save(old, last)

    probe()  # the code of now: trained false by default
    lines = _run(cfg, spec, teacher, tmp_path / "stage")
    notes = [line for line in lines if "note" in line]
    assert notes == [f"gen1: note: term {PROBE} resumes with the options it started with, trained true (its last.pt "
                     f"predates the record of loss options: the defaults of the code that wrote it; the defaults are "
                     f"now: trained false); to train it under the current defaults, rerun with --restart-stage gen1"]
    resumed, whole = safe_torch_load(last), safe_torch_load(tmp_path / "whole" / "last.pt")
    assert resumed["loss_options"] == {PROBE: {"trained": True, "power": 2}}  # what it ran with, recorded now
    assert resumed["step"] == 2 and all(torch.equal(resumed["model"][k], whole["model"][k]) for k in whole["model"])
    assert torch.equal(resumed["objective"]["distill_loss.scale"], whole["objective"]["distill_loss.scale"])
    assert not torch.equal(resumed["objective"]["distill_loss.scale"], torch.ones(()))  # it trained throughout


def test_a_changed_option_is_refused_and_a_changed_default_keeps_the_started_value(probe, tmp_path, monkeypatch):
    cfg, spec, teacher = _stage({"power": 2})
    stop_at_first_checkpoint(cfg, spec, tmp_path / "stage", monkeypatch, teacher=teacher)
    last = tmp_path / "stage" / "last.pt"
    assert safe_torch_load(last)["loss_options"] == {PROBE: {"trained": False, "power": 2}}  # defaults included
    before = last.read_bytes()

    changed, _, _ = _stage({"power": 3})
    with pytest.raises(CheckpointError) as err:
        _run(changed, spec, teacher, tmp_path / "stage")
    assert str(err.value) == (f"{last}: cannot resume: key 'distill.terms[0].power' is 3, the stage started with 2; "
                              f"set it back to 2, or rerun with --restart-stage gen1 (which keeps the old stage "
                              f"folder aside)")
    assert last.read_bytes() == before  # nothing trained

    probe(trained=True)  # a later version changes a default the config leaves unset: the stage keeps its own
    lines = _run(cfg, spec, teacher, tmp_path / "stage")
    assert [line for line in lines if "note" in line] == [
        f"gen1: note: term {PROBE} resumes with the options it started with, trained false (recorded in its "
        f"last.pt; the defaults are now: trained true); to train it under the current defaults, rerun with "
        f"--restart-stage gen1"]
    assert safe_torch_load(last)["loss_options"] == {PROBE: {"trained": False, "power": 2}}
