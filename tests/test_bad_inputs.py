"""Mistakes the config already shows are refused before any work, by
`distill run` and `distill doctor` alike, each as one line naming the key (exit 2 / a FAIL line), nothing trained,
no experiment.yaml left behind; the corrected command then succeeds in the same --out.

Outputs checked before the long work, files read, ranges, caches; the one-line probe across the commands and the
benchmark scripts is tests/test_probe.py."""

import pytest
import yaml
from tiny_experiment import tiny_experiment, write_experiment

from distill.cli import main

# (overrides, the key the message names, what it says)
LATE_CAUGHT = [
    (["teacher.train.batch_size=0"], "teacher.train.batch_size", "must be positive"),
    (["teacher.train.batch_size=-8"], "teacher.train.batch_size", "must be positive"),
    (["teacher.train.lr=-0.1"], "teacher.train.lr", "must be positive"),
    (["train.epochs=-1"], "train.epochs", "must be positive"),
    (["train.epochs=0"], "train.epochs", "recorded as finished untrained"),
    (["teacher.train.epochs=-2"], "teacher.train.epochs", "must be positive"),
    (["train.momentum=1.5"], "train.momentum", "in [0, 1)"),
    (["teacher.train.weight_decay=-1"], "teacher.train.weight_decay", ">= 0"),
    (["train.warmup_epochs=5", "train.epochs=2", "train.max_steps=null"], "train.warmup_epochs",
     "less than train.epochs"),
    (["train.max_steps=0"], "train.max_steps", "at least 1"),
    (["train.clip_grad=0"], "train.clip_grad", "positive"),
    (["teacher.train.lr_batch_size=0"], "teacher.train.lr_batch_size", "must be positive"),
    (["train.log_every=0"], "train.log_every", "must be positive"),
    (["train.threads=0"], "train.threads", "at least 1"),
    (["train.decay_epochs=[-1]"], "train.decay_epochs", "a list of epochs >= 0"),
    (["distill.loss=ekd", "data.images_per_id=24"], "data.images_per_id", "gives one identity per batch"),
    (["teacher.embedding_size=64"], "teacher's embeddings are 64-d", "distill.project: linear"),
    (["data.decode=cuda"], "data.decode", "set data.decode: cpu"),
]


@pytest.mark.parametrize("overrides, key, says", LATE_CAUGHT, ids=[" ".join(c[0]) for c in LATE_CAUGHT])
def test_a_mistake_the_config_shows_stops_run_and_doctor_before_any_work(tmp_path, capsys, overrides, key, says):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"})
    out = tmp_path / "run"
    assert main(["run", str(exp), "--out", str(out), "--no-progress", *overrides]) == 2
    err = capsys.readouterr().err
    assert key in err and says in err and "Traceback" not in err
    assert not out.exists()  # nothing trained or recorded: the run directory is left as it was (absent)
    code = main(["doctor", str(exp), "--out", str(out), *overrides])
    report = capsys.readouterr()
    assert code in (1, 2) and key in report.out + report.err and "ready:" not in report.out
    assert "Traceback" not in report.out + report.err


def test_ijb_images_missing_stop_the_run_before_the_teacher_trains(tmp_path, capsys):
    root = tmp_path / "ijb"
    assert main(["data", "synth-ijb", str(root), "--templates", "4"]) == 0
    capsys.readouterr()
    victim = sorted((root / "loose_crop").iterdir())[0]
    victim.unlink()
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"},
                           data={"ijb": {"root": str(root), "target": "IJBC"}})
    out = tmp_path / "run"
    assert main(["run", str(exp), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.ijb" in err and victim.name in err and "are missing" in err
    assert not (out / "teacher").exists() and not (out / "experiment.yaml").exists()


def test_after_a_refused_run_the_corrected_command_succeeds_in_the_same_out(tmp_path, capsys):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"},
                           generations=0, baseline=False)
    out = tmp_path / "run"
    assert main(["run", str(exp), "--out", str(out), "--no-progress", "teacher.train.lr=-0.1"]) == 2
    assert main(["run", str(exp), "--out", str(out), "--no-progress"]) == 0
    assert (out / "teacher" / "result.json").exists()


def test_a_sweep_whose_second_point_has_a_bad_teacher_lr_is_refused_before_the_first_trains(tmp_path, capsys):
    base = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"})
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": "x.yaml", "name": "g", "grid": {"teacher.train.lr": [0.1, -0.1]}}))
    assert main(["sweep", str(grid), "--out", str(tmp_path / "sweep"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "teacher.train.lr" in err and "must be positive" in err and "Traceback" not in err
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").rglob("result.json"))
    assert tiny_experiment(tmp_path)["teacher"]["train"]["lr"] == 0.1 and base.exists()


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "set"
    assert main(["data", "synth-ijb", str(root), "--templates", "4"]) == 0
    return root


def _ijb(root, *more):
    return ["ijb", "vargfacenet", "--root", str(root), "--input-size", "16", "--workers", "0", "--threads", "1",
            *more]


@pytest.mark.parametrize("option, target, says", [
    ("--plot", "missing-folder/roc.png", "the folder"),
    ("--scores", ".", "is a folder; give a file name"),
    ("--cache", "missing-folder/c.npy", "does not exist"),
])
def test_ijb_outputs_are_checked_before_any_image_is_embedded(ijb_root, tmp_path, monkeypatch, capsys, option,
                                                              target, says):
    import distill.cli.ijb as ijb_cli
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ijb_cli, "_model_features", lambda *a, **k: pytest.fail("embedded before the check"))
    assert main(_ijb(ijb_root, option, target)) == 2
    err = capsys.readouterr().err
    assert option in err and says in err and "Traceback" not in err


def test_a_truncated_ijb_feature_cache_is_refused_naming_it(ijb_root, tmp_path, capsys):
    cache = tmp_path / "c.npy"
    assert main(_ijb(ijb_root, "--cache", str(cache))) == 0
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    capsys.readouterr()
    assert main(_ijb(ijb_root, "--cache", str(cache))) == 2
    err = capsys.readouterr().err
    assert f"--cache {cache}: damaged" in err and "delete it" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, says", [
    (["export", "vargfacenet", "missing.onnx", "--int8-margin", "-1"], "--int8-margin -1.0: must be a number"),
    (["export", "vargfacenet", "out.onnx", "--input-size", "8"], "--input-size 8: must be at least 16"),
    (["compare", "nowhere", "--int8-margin", "-2"], "--int8-margin -2.0: must be a number"),
])
def test_option_ranges_agree_across_commands(tmp_path, monkeypatch, capsys, argv, says):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_synth_ijb_into_a_file_and_deep_or_long_keys_are_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["data", "synth-ijb", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"})
    for override, says in ((".".join(["a"] * 2000) + "=1", "levels deep"),
                           ("data.train=" + "n" * 300, "a path longer than the OS allows")):
        assert main(["run", str(exp), "--out", str(tmp_path / "run"), override]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_images_per_id_beyond_every_identity_gets_a_note(tmp_path):
    from tiny import TinyFaces

    from distill.config.schema import load_config
    from distill.run.experiment import _note_identity_groups
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"})
    cfg = load_config(str(exp), ["data.images_per_id=24"])  # TinyFaces: 16 images of each identity
    note = _note_identity_groups(cfg, TinyFaces())
    assert "no identity of" in note and "more than 16 images" in note
    assert _note_identity_groups(load_config(str(exp), ["data.images_per_id=4"]), TinyFaces()) is None


def test_an_empty_ijb_pair_file_is_one_clear_error_without_a_numpy_warning(ijb_root, tmp_path, capsys):
    import shutil
    import warnings

    from distill.data.ijb import read_ijb_meta
    from distill.utils.errors import DataFormatError
    root = tmp_path / "ijb"
    shutil.copytree(ijb_root, root)
    pairs = next((root / "meta").glob("*_template_pair_label.txt"))
    pairs.write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with pytest.raises(DataFormatError, match="no template pairs listed"):
            read_ijb_meta(str(root), "IJBC")


def test_landmark_files_refuse_duplicates_and_absurd_coordinates_naming_the_lines(ijb_root, tmp_path):
    import shutil

    import numpy as np

    from distill.data.align import LandmarkError, estimate_similarity
    from distill.data.ijb import read_ijb_meta
    from distill.data.pack import read_landmark_file
    from distill.utils.errors import DataFormatError
    good = "a/1.jpg 38 51 73 51 56 71 41 92 70 92"
    path = tmp_path / "marks.txt"
    path.write_text(f"{good}\nb/2.jpg 38 51 73 51 56 71 41 92 70 92\n{good.replace('38', '39')}\n")
    with pytest.raises(DataFormatError, match=r"lines 1 and 3 give different landmarks for a/1.jpg"):
        read_landmark_file(str(path), tmp_path)
    path.write_text(f"{good}\n{good}\n")  # the same line twice: harmless, accepted
    assert len(read_landmark_file(str(path), tmp_path)) == 1
    path.write_text("a/1.jpg 1e30 51 73 51 56 71 41 92 70 92\n")
    with pytest.raises(DataFormatError, match=r"line 1: landmark coordinates of a/1.jpg are not pixel positions"):
        read_landmark_file(str(path), tmp_path)
    with pytest.raises(LandmarkError, match="far outside any image"):  # not "all 5 reference points coincide"
        estimate_similarity(np.array([[1e30, 51], [73, 51], [56, 71], [41, 92], [70, 92]]),
                             np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]))
    root = tmp_path / "ijb"
    shutil.copytree(ijb_root, root)
    marks = next((root / "meta").glob("*_name_5pts_score.txt"))
    lines = marks.read_text().splitlines()
    tokens = lines[2].split()
    lines[2] = " ".join([tokens[0], "1e30", *tokens[2:]])
    marks.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=rf"{marks.name}:3: image {tokens[0]} has coordinates far outside"):
        read_ijb_meta(str(root), "IJBC")


def test_an_export_killed_mid_way_leaves_nothing_the_next_export_does_not_remove(tmp_path, monkeypatch):
    import distill.models.files
    from distill.deploy.export import export_model
    from distill.utils.errors import DistillError, UserNote
    out = tmp_path / "student.onnx"
    leftovers = [tmp_path / "student.onnx.tmp", tmp_path / "student.int8.onnx.tmp.pre.onnx"]
    for path in leftovers:  # what kill -9 during `export --int8` leaves
        path.write_bytes(b"x" * 1000)

    def stop(*_, **__):
        raise DistillError("stop here")
    monkeypatch.setattr(distill.models.files, "load_model", stop)
    with pytest.warns(UserNote, match="a partial file an interrupted export left behind"):
        with pytest.raises(DistillError, match="stop here"):
            export_model("student.pt", out, int8=True, calibrate=str(tmp_path))
    assert not any(p.exists() for p in leftovers)


def test_compare_export_of_another_run_with_the_same_name_is_written_beside_never_over(tiny_finished_run, tmp_path):
    import json
    import shutil

    from distill.deploy.run_export import plan_export
    from distill.utils.errors import UserNote
    _, run, _ = tiny_finished_run
    other = tmp_path / "other-run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("*.pt", "*.pth", "*.npy"))
    out = tmp_path / "dep"
    experiment = json.loads((run / "summary.json").read_text())["experiment"]
    first = plan_export([{"run_dir": str(run), "experiment": experiment}], str(out))
    assert first[0]["name"] == experiment
    (out / experiment / "export_summary.json").write_text(json.dumps({"run_dir": str(run)}))  # what export wrote
    again = plan_export([{"run_dir": str(run), "experiment": experiment}], str(out))
    assert again[0]["name"] == experiment  # the same run: its own folder, refreshed
    with pytest.warns(UserNote, match=rf"holds the export of {run}"):
        beside = plan_export([{"run_dir": str(other), "experiment": experiment}], str(out))
    assert beside[0]["name"] == f"{experiment}-2" and json.loads(
        (out / experiment / "export_summary.json").read_text())["run_dir"] == str(run)


def test_a_case_key_the_grid_also_sweeps_is_refused(tmp_path, capsys):
    write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"})
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": "x.yaml", "grid": {
        "case": [{"name": "fast", "train.lr": 0.5}, {"name": "slow"}], "train.lr": [0.1, 0.2]}}))
    assert main(["sweep", str(grid), "--print"]) == 2
    err = capsys.readouterr().err
    assert "grid.case 'fast' sets train.lr, which grid also sweeps" in err and "Traceback" not in err


def test_earlier_rounds_code_in_yaml_or_checkpoints_is_refused_before_any_work(tmp_path, capsys):
    import os

    import torch
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"})
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(exp.read_text() + "\nhook: !!python/object/apply:os.system [\"echo owned\"]\n")
    assert main(["run", str(tagged), "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(tagged) in err and "Traceback" not in err and "owned" not in err
    evil = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "hook": os.system}, evil)
    assert main(["run", str(exp), "--out", str(tmp_path / "b"), "--no-progress", f"teacher.checkpoint={evil}",
                 "teacher.train=null"]) == 2
    err = capsys.readouterr().err
    assert "evil.pth" in err and "refused to load" in err and "Traceback" not in err
    assert not (tmp_path / "b" / "baseline").exists()


def test_a_sweep_runs_the_preflight_checks_of_every_point_before_the_first_trains(tmp_path, capsys):
    write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"})
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": "x.yaml", "name": "g", "grid": {"data.decode": ["cpu", "cuda"]}}))
    assert main(["sweep", str(grid), "--out", str(tmp_path / "sweep"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "point g-data.decode=cuda:" in err and "set data.decode: cpu" in err
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").rglob("result.json"))


@pytest.mark.parametrize("command", ["run", "run --dry-run", "cache build"])
def test_an_out_that_is_a_file_is_refused_before_anything_is_written(tmp_path, capsys, command):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, tracking={"wandb": "disabled"})
    afile = tmp_path / "afile"
    afile.write_text("mine")
    words = command.split()
    assert main([*words, str(exp), "--out", str(afile)] + (["--no-progress"] if words[0] == "run" else [])) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
    assert afile.read_text() == "mine"


def test_compare_export_into_a_file_is_refused(tiny_finished_run, tmp_path, capsys):
    _, run, _ = tiny_finished_run
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["compare", str(run), "--export", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and afile.read_text() == "mine"


@pytest.mark.parametrize("damage", ["manifest", "rows"])
def test_a_damaged_teacher_cache_is_rebuilt_with_one_note(tmp_path, damage):
    import torch
    from tiny import TinyFaces, tame

    import teachers
    from teachers.cache import build_cache
    torch.manual_seed(0)
    teacher = tame(teachers.build_teacher({"arch": "iresnet18", "input_size": 16, "embedding_size": 8}))
    first = build_cache(teacher, TinyFaces(classes=2, per_class=4), str(tmp_path), progress=False)
    rows = first.emb.copy()
    if damage == "manifest":
        (tmp_path / "manifest.json").write_text('{"key": ')  # cut short by a crash
    else:
        data = (tmp_path / "embeddings.f16").read_bytes()
        (tmp_path / "embeddings.f16").write_bytes(data[: len(data) // 2])  # a truncated file
    from distill.run.context import run_logger

    notes = []
    again = build_cache(teacher, TinyFaces(classes=2, per_class=4), str(tmp_path), progress=False,
                        logger=run_logger(notes.append))
    rebuilt = [n for n in notes if "rebuilding" in n]
    assert len(rebuilt) == 1 and ("unreadable" in rebuilt[0] if damage == "manifest" else "file size" in rebuilt[0])
    assert (again.emb == rows).all()  # the same rows again
