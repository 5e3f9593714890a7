"""teacher.shared_cache: runs that load one teacher share its cache and its verification metrics (built once)."""

import json
import os
import shutil

import pytest
import torch
from tiny_experiment import write_experiment

import distill.run.hooks
import distill.run.teacher_stage
from distill.config.schema import load_config
from distill.run.context import silent_logger
from distill.run.experiment import run_experiment
from distill.utils.errors import DistillError

QUIET = {"progress": False, "logger": silent_logger()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny teacher trained once (its backbone.pth) and an experiment file that loads it."""
    tmp = tmp_path_factory.mktemp("one_teacher")
    exp = write_experiment(tmp / "x.yaml", tmp / "faces", side=16, generations=1, baseline=False,
                           tracking={"wandb": "disabled"}, train={"eval_every": 0})
    run_experiment(load_config(str(exp), ["generations=0"]), str(tmp / "teacher"), **QUIET)
    return tmp, exp, str(tmp / "teacher" / "teacher" / "backbone.pth")


def _run(exp, out, checkpoint, shared, *more):
    shared = [f"teacher.shared_cache={shared}"] if shared else []
    cfg = load_config(str(exp), [f"teacher.checkpoint={checkpoint}", *shared, *more])
    return run_experiment(cfg, str(out), **QUIET)


@pytest.fixture(scope="module")
def pooled(trained, tmp_path_factory):
    """The first run that loads the teacher with a shared folder (it fills the folder): (folder, run, its summary).
    Tests that run more into the shared folder work on a copy of it."""
    tmp, exp, checkpoint = trained
    first = tmp_path_factory.mktemp("pooled")
    return first / "pool", first / "a", _run(exp, first / "a", checkpoint, first / "pool")


def test_a_second_run_reuses_the_cache_and_the_teacher_metrics(trained, pooled, tmp_path, monkeypatch):
    tmp, exp, checkpoint = trained
    pool, first_run, first = pooled
    shared = tmp_path / "pool"
    shutil.copytree(pool, shared)
    (folder,) = [shared / d for d in os.listdir(shared)]
    assert not (first_run / "teacher_cache").exists()  # the rows live in the shared folder only
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows_done"] == manifest["key"]["num_samples"]  # finished
    stamp = os.stat(folder / "embeddings.f16").st_mtime_ns

    real = distill.run.teacher_stage.evaluate_sets

    def no_teacher_evaluation(model, *args, **kw):
        assert kw.get("model_name") != "teacher", "the teacher was evaluated again"
        return real(model, *args, **kw)

    monkeypatch.setattr(distill.run.teacher_stage, "evaluate_sets", no_teacher_evaluation)
    second = _run(exp, tmp_path / "b", checkpoint, shared, "seed=1")
    assert json.loads((folder / "manifest.json").read_text())["build"] == manifest["build"]  # not rebuilt
    assert os.stat(folder / "embeddings.f16").st_mtime_ns == stamp
    teacher = [{s["stage"]: s for s in r["stages"]}["teacher"]["metrics"] for r in (first, second)]
    assert teacher[0] == teacher[1] and teacher[0]
    # the same rows and metrics as a run's own cache and evaluation
    monkeypatch.undo()
    own = _run(exp, tmp_path / "c", checkpoint, None)
    assert own["stages"][0]["metrics"] == teacher[0]
    cached = (tmp_path / "c" / "teacher_cache" / "embeddings.f16").read_bytes()
    assert cached == (folder / "embeddings.f16").read_bytes()


def test_another_teacher_gets_its_own_subfolder(trained, pooled, tmp_path):
    tmp, exp, checkpoint = trained
    shared = tmp_path / "pool"
    shutil.copytree(pooled[0], shared)  # the first teacher's folder, as its run left it
    state = torch.load(checkpoint, weights_only=True)
    other = tmp_path / "other.pth"
    torch.save({k: v * 1.01 if v.dim() == 4 else v for k, v in state.items()}, other)  # other conv weights
    _run(exp, tmp_path / "b", other, shared)
    folders = sorted(os.listdir(shared))
    assert len(folders) == 2
    rows = [(shared / f / "embeddings.f16").read_bytes() for f in folders]
    assert rows[0] != rows[1]


def test_a_shared_cache_that_is_a_file_is_refused_before_any_work(trained, tmp_path):
    tmp, exp, checkpoint = trained
    (tmp_path / "pool").write_text("not a folder")
    with pytest.raises(DistillError, match=r"pool: is a file, not a folder"):
        _run(exp, tmp_path / "a", checkpoint, tmp_path / "pool")
    assert not (tmp_path / "a").exists()


def test_the_teachers_ijb_result_is_shared_too(trained, tmp_path, monkeypatch):
    from distill.data.synth_ijb import write_synthetic_ijb

    tmp, exp, checkpoint = trained
    write_synthetic_ijb(tmp_path / "ijb", templates=6)
    shared, ijb = tmp_path / "pool", f"data.ijb.root={tmp_path / 'ijb'}"
    first = _run(exp, tmp_path / "a", checkpoint, shared, ijb)
    real = distill.run.hooks.evaluate_ijb

    def students_only(model, *args, model_name=None, **kw):
        assert model_name != "teacher", "the teacher was evaluated on IJB again"
        return real(model, *args, model_name=model_name, **kw)

    monkeypatch.setattr(distill.run.hooks, "evaluate_ijb", students_only)
    second = _run(exp, tmp_path / "b", checkpoint, shared, ijb, "seed=1")
    got = [{s["stage"]: s for s in r["stages"]} for r in (first, second)]
    assert got[0]["teacher"]["ijb"]["tar_at_far"] == got[1]["teacher"]["ijb"]["tar_at_far"]
    assert "ijb" in got[1]["gen1"]  # the student was evaluated
