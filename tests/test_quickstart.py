"""The embedded default experiment: an IResNet teacher (arcface_torch's family) distilled into VarGFaceNet,
and its born-again contrast."""

import dataclasses
from pathlib import Path

from distill.cli import main
from distill.config.schema import load_config
from distill.run.plan import plan_stages

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
BORN_AGAIN = REPO / "experiments" / "quickstart_born_again.yaml"


def test_quickstart_teacher_is_an_iresnet_trained_as_stage_0_frozen_and_cached():
    cfg = load_config(str(QUICKSTART))
    t = cfg.teacher
    assert t.arch == "iresnet18" and t.onnx is None and t.checkpoint is None
    assert t.train is not None and t.cache  # trained here (stage 0), then cached for the students
    assert t.embedding_size == cfg.student.embedding_size and t.input_size == cfg.data.input_size
    assert cfg.student.arch == "vargfacenet" and cfg.distill.loss == "equivalent_angular" and cfg.distill.alpha == 7
    # the stage names and files the quickstart has always had
    assert [s.name for s in plan_stages(cfg, "runs/quickstart")] == ["baseline", "gen1", "gen2"]
    assert cfg.name == "quickstart" and cfg.data.train == "data/quickstart"


def test_quickstart_dry_run_passes_with_the_iresnet_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(QUICKSTART), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: teacher ok (iresnet18, 128-d at 32px)" in out
    # the run plan (distill/run/plan.py) before the two-step stages: what `distill run` would execute
    assert "dry run: the plan of runs/quickstart:\n  1. teacher: train iresnet18 (" in out
    assert "\n  2. teacher_cache: " in out
    assert "\n  5. gen2: train vargfacenet from runs/quickstart/gen1/student.pt" in out
    assert out.index("the plan of") < out.index("dry run: teacher ok")
    assert "gen2 ok (2 steps, vargfacenet at 32px)" in out and "dry run passed" in out
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()  # nothing generated or kept


def test_born_again_variant_differs_only_in_its_teacher():
    qs, ba = load_config(str(QUICKSTART)), load_config(str(BORN_AGAIN))
    assert ba.name == "quickstart_born_again" and ba.teacher.arch == "vargfacenet"
    assert ba.teacher.model == {**ba.student.model_kwargs(32)}  # the student's own architecture
    assert ba.teacher.train.epochs == 2 * ba.train.epochs  # better only through its budget
    assert dataclasses.replace(ba.teacher.train, epochs=qs.teacher.train.epochs) == qs.teacher.train
    for section in ("data", "student", "margin", "distill", "train"):
        assert getattr(ba, section) == getattr(qs, section), section
    assert (ba.baseline, ba.generations, ba.seed) == (qs.baseline, qs.generations, qs.seed)
