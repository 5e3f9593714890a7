"""A run directory's teacher is never reused silently (teachers/prepare.py): the teacher stage and the cache record
the identity of the teacher that made them, `distill run` refuses another one before any work naming the keys
that differ and the ways out, `distill cache build` writes and checks experiment.yaml as `distill run` does, and a
directory written before identities were recorded still resumes, with one note."""

import json
import shutil

import pytest
import torch
from tiny_experiment import write_experiment

from distill.cli import main
from teachers.prepare import IDENTITY_KEY, teacher_identity

# the teacher and one generation on 16 x 16 images: a cache build trains the 4-step teacher and embeds 72 images
SMALL = dict(side=16, generations=1, baseline=False, tracking={"wandb": "disabled"})


def _stages_trained(run) -> set:
    return {p.name for p in run.iterdir() if p.is_dir() and p.name in ("baseline", "gen1")}


@pytest.fixture(scope="module")
def cache_built(tmp_path_factory):
    """(experiment file, run directory after `distill cache build`, data directory), built once."""
    tmp = tmp_path_factory.mktemp("identity")
    exp = write_experiment(tmp / "x.yaml", tmp / "faces", **SMALL)
    assert main(["cache", "build", str(exp), "--out", str(tmp / "run")]) == 0
    return exp, tmp / "run", tmp / "faces"


@pytest.fixture
def copy(cache_built, tmp_path):
    exp, run, data = cache_built
    shutil.copytree(run, tmp_path / "run")
    return exp, tmp_path / "run", data


def test_cache_build_writes_experiment_yaml_and_records_the_teacher(cache_built):
    exp, run, _ = cache_built
    assert (run / "experiment.yaml").exists()
    stage = json.loads((run / "teacher" / "result.json").read_text())
    manifest = json.loads((run / "teacher_cache" / "manifest.json").read_text())
    recorded = stage[IDENTITY_KEY]
    assert manifest["teacher_identity"] == recorded
    assert recorded["teacher (source)"] == "train" and recorded["teacher.train.max_steps"] == 4
    assert recorded["seed"] == 0 and recorded["data.train (contents)"]
    assert not any(k.startswith(("student.", "train.", "distill.")) for k in recorded)  # only what made the teacher


def test_cache_build_then_run_reuses_the_teacher_and_the_cache(copy, capsys):
    exp, run, _ = copy
    cache_bytes = (run / "teacher_cache" / "embeddings.f16").read_bytes()
    build = json.loads((run / "teacher_cache" / "manifest.json").read_text())["build"]
    teacher_result = (run / "teacher" / "result.json").read_text()
    assert main(["run", str(exp), "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "teacher: training" not in out and "rebuilding" not in out
    assert json.loads((run / "teacher_cache" / "manifest.json").read_text())["build"] == build
    assert (run / "teacher_cache" / "embeddings.f16").read_bytes() == cache_bytes
    assert (run / "teacher" / "result.json").read_text() == teacher_result
    assert (run / "gen1" / "result.json").exists()


@pytest.mark.parametrize("without_experiment_yaml", [False, True], ids=["experiment.yaml", "identity only"])
@pytest.mark.parametrize("override,key", [
    (["teacher.train.epochs=3", "teacher.train.lr=0.5"], "teacher.train.lr"),
    (["seed=1"], "seed"),
    (["data.train={copy}"], "data.train"),
])
def test_another_teacher_is_refused_before_any_work(copy, tmp_path, capsys, override, key, without_experiment_yaml):
    """The silent-teacher case and its variants. With experiment.yaml (what cache build now writes) the run
    directory check names the keys; without it (a directory an older cache build made) the teacher's recorded
    identity does."""
    exp, run, data = copy
    if "data.train={copy}" in override:
        shutil.copytree(data, tmp_path / "faces_copy")
        override = [f"data.train={tmp_path / 'faces_copy'}"]
    if without_experiment_yaml:
        (run / "experiment.yaml").unlink()
    before = (run / "experiment.yaml").read_text() if not without_experiment_yaml else None
    assert main(["run", str(exp), *override, "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert key in err and "error:" in err
    if key.startswith("teacher."):
        assert "--restart-stage teacher" in err
    assert _stages_trained(run) == set(), "refused before any work"
    assert json.loads((run / "teacher" / "result.json").read_text())[IDENTITY_KEY]["seed"] == 0
    if before is not None:
        assert (run / "experiment.yaml").read_text() == before
    else:
        assert not (run / "experiment.yaml").exists(), "a refused run leaves no experiment.yaml to block the fix"


def test_restart_stage_teacher_trains_the_new_teacher_and_keeps_the_old_aside(copy, capsys):
    exp, run, _ = copy
    assert main(["run", str(exp), "teacher.train.lr=0.05", "--out", str(run), "--no-progress",
                 "--restart-stage", "teacher"]) == 0
    out = capsys.readouterr().out
    assert "teacher: training" in out
    aside = sorted(p.name for p in run.iterdir() if ".restarted-" in p.name)
    assert [n.split(".")[0] for n in aside] == ["teacher", "teacher_cache"]
    recorded = json.loads((run / "teacher" / "result.json").read_text())[IDENTITY_KEY]
    assert recorded["teacher.train.lr"] == 0.05
    assert json.loads((run / "teacher_cache" / "manifest.json").read_text())["teacher_identity"] == recorded


def _save_teacher(trained, path, nudge):
    """The trained teacher's weights, each float tensor moved by `nudge` (other bytes, same architecture)."""
    state = torch.load(trained, weights_only=True)
    torch.save({k: v + nudge if v.is_floating_point() else v for k, v in state.items()}, path)


def test_a_loaded_teacher_whose_file_changed_is_refused_by_run_and_doctor(cache_built, tmp_path, capsys):
    _, built, data = cache_built
    ckpt = tmp_path / "backbone.pth"
    _save_teacher(built / "teacher" / "backbone.pth", ckpt, 0.0)
    exp = write_experiment(tmp_path / "x.yaml", data, **SMALL)
    loaded = ["teacher.train=null", f"teacher.checkpoint={ckpt}"]
    run = tmp_path / "run"
    assert main(["cache", "build", str(exp), *loaded, "--out", str(run)]) == 0
    assert json.loads((run / "teacher_cache" / "manifest.json").read_text())["teacher_identity"][
        "teacher.checkpoint (contents)"].startswith("sha256 ")
    _save_teacher(built / "teacher" / "backbone.pth", ckpt, 1e-3)  # the same path, other bytes
    capsys.readouterr()
    assert main(["run", str(exp), *loaded, "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "teacher.checkpoint (contents)" in err and "--restart-stage teacher" in err
    assert _stages_trained(run) == set()
    assert main(["doctor", str(exp), *loaded, "--out", str(run)]) == 1
    doctor = capsys.readouterr().out
    assert "FAIL  teacher" in doctor and "teacher.checkpoint (contents)" in doctor


def test_an_old_run_directory_without_identities_resumes_with_one_note(tiny_finished_run, tmp_path, capsys):
    exp, finished, _ = tiny_finished_run
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    result_path, manifest_path = run / "teacher" / "result.json", run / "teacher_cache" / "manifest.json"
    for path, key in ((result_path, IDENTITY_KEY), (manifest_path, "teacher_identity")):
        data = json.loads(path.read_text())
        data.pop(key)
        path.write_text(json.dumps(data))
    assert main(["run", str(exp), "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("record no teacher identity") == 1 and "teacher: training" not in out
    assert "gen1: finished earlier, skipped" in out
    recorded = json.loads(result_path.read_text())[IDENTITY_KEY]
    assert recorded == json.loads(manifest_path.read_text())["teacher_identity"]
    assert main(["run", str(exp), "--out", str(run), "--no-progress"]) == 0
    assert "record no teacher identity" not in capsys.readouterr().out


def test_identity_ignores_how_the_work_is_done(tiny_finished_run):
    """Loader workers, logging, compile: no part of the teacher; its recipe and the data are."""
    from distill.config.schema import load_config

    exp, _, _ = tiny_finished_run
    base = teacher_identity(load_config(str(exp)))
    same = teacher_identity(load_config(str(exp), ["data.num_workers=2", "teacher.train.log_every=1",
                                                   "train.lr=0.5", "generations=3", "distill.alpha=1"]))
    assert same == base
    other = teacher_identity(load_config(str(exp), ["margin.s=32"]))
    assert other != base and other["margin.s"] == 32
