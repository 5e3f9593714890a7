"""`distill compare RUN --export DIR [--int8]`: every finished stage of a run as ONNX files, evaluated on the
run's val sets (table and export_summary.json); refusals before any work."""

import contextlib
import io
import json
import shutil

import pytest
import torch
import yaml
from tiny_experiment import write_experiment

from distill.cli import main
from distill.config.schema import dump_config, load_config
from distill.data.synthetic import ensure_synthetic
from distill.models.files import save_student
from distill.models.registry import create_model

pytest.importorskip("onnxruntime")

STAGES = ("teacher", "baseline", "gen1")  # finished; gen2 is unfinished
TINY_VARG = {"arch": "vargfacenet", "input_size": 32, "embedding_size": 32, "multiplier": 0.5, "last_channels": 64,
             "units": [1, 1, 1]}
HEAD = ["run", "stage", "file", "size (MB)", "torch acc (%)", "fp32 acc (%)", "int8 file", "int8 size (MB)",
        "int8 acc (%)", "int8 − torch (points)", "status"]


def table_rows(text: str) -> list:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if "---" not in line]


def export_rows(out: str) -> list:
    """The rows of the table printed after 'exported to ...' (the compare table comes first)."""
    assert "\nexported to " in out
    return table_rows(out.split("\nexported to ", 1)[1])


def run_cli(argv) -> tuple:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run directory as `distill run` leaves it, made without training: experiment.yaml, student.pt and
    result.json of teacher (a small registered model), baseline and gen1 (untrained weights), and gen2
    interrupted (a metrics log only). The synthetic data (12 ids at 32x32, 40 val pairs) is real."""
    tmp = tmp_path_factory.mktemp("compare_export")
    data = tmp / "faces"
    ensure_synthetic(data, workers=1, ids=12, images_per_id=6, size=32, pairs=40, seed=0, holdout_ids=8)
    exp = write_experiment(tmp / "x.yaml", data, generations=2, tracking={"wandb": "disabled"}, teacher=TINY_VARG)
    cfg = load_config(str(exp))
    run = tmp / "run"
    run.mkdir()
    dump_config(cfg, str(run / "experiment.yaml"))
    torch.manual_seed(0)
    for name in STAGES:
        (run / name).mkdir()
        if name == "teacher":
            arch, kwargs = cfg.teacher.arch, dict(cfg.teacher.model)
        else:
            arch, kwargs = cfg.student.arch, {**cfg.student.model, "input_size": cfg.data.input_size}
        save_student(run / name / "student.pt", create_model(arch, **kwargs), arch, kwargs)
        (run / name / "result.json").write_text(json.dumps(
            {"stage": name, "generation": STAGES.index(name) - 1 if name != "teacher" else 0, "arch": arch,
             "model_kwargs": kwargs, "params": 0.2, "gflops": 0.01, "train_seconds": 1.0, "metrics": {}}))
    (run / "gen2").mkdir()
    (run / "gen2" / "metrics.jsonl").write_text(json.dumps({"step": 2, "train/loss": 20.0}) + "\n")
    return tmp, run, data


@pytest.fixture(scope="module")
def exported(finished_run):
    tmp, run, data = finished_run
    out = tmp / "deploy"
    code, stdout, stderr = run_cli(["compare", run, "--export", out, "--int8", "--calib-images", 8,
                                    "--int8-calibration", "minmax"])
    assert code == 0, stderr
    return out / "tiny", stdout, stderr


def test_every_finished_stage_is_exported_fp32_and_int8(exported):
    import onnx

    folder, _, _ = exported
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{s}.onnx" for s in STAGES] + [f"{s}.int8.onnx" for s in STAGES] + ["export_summary.json"])
    for stage in STAGES:  # what export_model writes: BatchNorm folded, its metadata; INT8 calibrated on data.train
        fp32 = onnx.load(str(folder / f"{stage}.onnx"))
        assert not [n for n in fp32.graph.node if n.op_type == "BatchNormalization"]
        assert {p.key for p in fp32.metadata_props} >= {"facedistill.batchnorm", "facedistill.normalisation"}
        q = {p.key: p.value for p in onnx.load(str(folder / f"{stage}.int8.onnx")).metadata_props}
        assert q["facedistill.calibration"] == "8 images of faces"
        assert json.loads(q["facedistill.quantization_settings"])["calibration"] == "minmax"  # --int8-calibration
        source = {p.key: p.value for p in fp32.metadata_props}["facedistill.source"]
        assert source.endswith(".pt") and not source.startswith(".")  # the stage's file, never a temporary copy


def test_table_has_the_documented_columns_and_lists_the_unfinished_stage(exported):
    folder, stdout, _ = exported
    rows = export_rows(stdout)
    assert rows[0] == HEAD
    by_stage = {r[1]: dict(zip(HEAD, r, strict=True)) for r in rows[1:]}
    assert list(by_stage) == ["teacher", "baseline", "gen1", "gen2"]
    summary = json.loads((folder / "export_summary.json").read_text())
    for stage in STAGES:
        row, entry = by_stage[stage], {s["stage"]: s for s in summary["stages"]}[stage]
        assert row["status"] == "exported" and row["run"] == "tiny"
        assert row["file"] == f"tiny/{stage}.onnx" and row["int8 file"] == f"tiny/{stage}.int8.onnx"
        assert row["size (MB)"] == f"{(folder / f'{stage}.onnx').stat().st_size / 1e6:.2f}"
        assert row["int8 size (MB)"] == f"{(folder / f'{stage}.int8.onnx').stat().st_size / 1e6:.2f}"
        assert row["torch acc (%)"] == f"{100 * entry['torch']['acc_mean']:.2f}"
        assert row["int8 acc (%)"] == f"{100 * entry['files']['int8']['acc_mean']:.2f}"
        assert row["int8 − torch (points)"] == f"{-entry['int8_loss_points']:+.2f}"  # the README's sign
    assert by_stage["gen2"]["status"] == "not exported (unfinished)" and by_stage["gen2"]["file"] == "-"


def test_summary_json_numbers_match_an_independent_evaluation(exported, finished_run):
    from distill.data import load_verification_bin
    from distill.eval.verification import embed_pairs, verification_metrics
    from distill.models.files import load_student
    from teachers.onnx import OnnxTeacherModel

    folder, _, _ = exported
    _, run, data = finished_run
    summary = json.loads((folder / "export_summary.json").read_text())
    assert set(summary) >= {"run", "run_dir", "experiment", "int8", "calibrate", "val_sets", "stages"}
    assert summary["val_sets"] == ["synth_val"] and summary["calibrate"] == str(data) and summary["int8"] is True
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["gen2"]["status"] == "not exported (unfinished)" and stages["gen2"]["files"] == {}
    gen1 = stages["gen1"]
    assert set(gen1) >= {"stage", "status", "files", "torch", "int8_loss_points"}
    assert set(gen1["files"]) == {"fp32", "int8"}
    for f in gen1["files"].values():
        assert set(f) >= {"path", "size_mb", "acc_mean", "per_set"}
    assert gen1["files"]["int8"]["size_mb"] == (folder / "gen1.int8.onnx").stat().st_size / 1e6
    images, issame = load_verification_bin(str(data / "synth_val.bin"))
    expected = {}
    for label, model in (("int8", OnnxTeacherModel(str(folder / "gen1.int8.onnx"), providers=["CPUExecutionProvider"])),
                         ("torch", load_student(str(run / "gen1" / "student.pt"))[0])):
        orig, flip = embed_pairs(model, images, 32, progress=False)
        expected[label] = verification_metrics(orig, flip, issame)["acc_mean"]
    assert gen1["files"]["int8"]["acc_mean"] == pytest.approx(expected["int8"], abs=1e-9)
    assert gen1["torch"]["acc_mean"] == pytest.approx(expected["torch"], abs=1e-9)
    assert gen1["int8_loss_points"] == pytest.approx(100 * (expected["torch"] - expected["int8"]), abs=1e-6)


def test_unwritable_dir_is_refused_before_any_export(finished_run, tmp_path, monkeypatch):
    import distill.deploy.export

    _, run, _ = finished_run

    def no_export(*args, **kwargs):
        raise AssertionError("export_model called although DIR cannot be written")

    monkeypatch.setattr(distill.deploy.export, "export_model", no_export)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a folder below a file cannot be made, even by root
    code, stdout, stderr = run_cli(["compare", run, "--export", blocker / "deploy", "--int8"])
    assert code == 2 and "cannot write the exported models" in stderr and str(blocker) in stderr
    assert stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_missing_training_set_names_it_and_asks_for_calibrate(finished_run, tmp_path):
    _, run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    raw = yaml.safe_load((copy / "experiment.yaml").read_text())
    raw["data"]["train"] = str(tmp_path / "gone")
    (copy / "experiment.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    code, _, stderr = run_cli(["compare", copy, "--export", tmp_path / "deploy", "--int8"])
    assert code == 2 and str(tmp_path / "gone") in stderr and "--calibrate" in stderr
    assert not (tmp_path / "deploy").exists()


def test_a_run_without_finished_stages_has_nothing_to_export(finished_run, tmp_path):
    _, run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for stage in STAGES:
        (copy / stage / "result.json").unlink()
    code, _, stderr = run_cli(["compare", copy, "--export", tmp_path / "deploy"])
    assert code == 2 and "nothing to export" in stderr and str(copy) in stderr
    assert not (tmp_path / "deploy").exists()


def test_compare_without_export_is_unchanged_and_export_options_need_it(finished_run):
    _, run, _ = finished_run
    code, stdout, _ = run_cli(["compare", run])
    assert code == 0 and "exported to" not in stdout
    assert table_rows(stdout)[0][:2] == ["run", "stage"] and "file" not in table_rows(stdout)[0]
    code, _, stderr = run_cli(["compare", run, "--int8"])
    assert code == 2 and "--export" in stderr
    code, _, stderr = run_cli(["compare", run, "--int8-calibration", "minmax"])
    assert code == 2 and "--int8-calibration go with --export" in stderr


def test_rerun_replaces_the_files_by_rename(exported, finished_run, tmp_path):
    folder, _, _ = exported
    _, run, _ = finished_run
    shutil.copytree(folder, tmp_path / "deploy" / "tiny")
    before = {p.name: p.stat().st_ino for p in (tmp_path / "deploy" / "tiny").iterdir()}
    code, stdout, stderr = run_cli(["compare", run, "--export", tmp_path / "deploy"])
    assert code == 0, stderr
    after = {p.name: p.stat().st_ino for p in (tmp_path / "deploy" / "tiny").iterdir()}
    assert set(after) == set(before)  # no temporary file left; the INT8 files of the first run stay
    for stage in STAGES:
        assert after[f"{stage}.onnx"] != before[f"{stage}.onnx"]  # a new file moved into place
    assert json.loads((tmp_path / "deploy" / "tiny" / "export_summary.json").read_text())["int8"] is False
    assert export_rows(stdout)[0] == [h for h in HEAD if "int8" not in h]


def test_a_missing_val_set_is_skipped_with_a_note(finished_run, tmp_path):
    _, run, data = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for stage in ("teacher", "baseline"):  # gen1 alone finished: one quick export
        (copy / stage / "result.json").unlink()
    raw = yaml.safe_load((copy / "experiment.yaml").read_text())
    raw["data"]["val"] = [str(tmp_path / "lfw.bin"), str(data / "synth_val.bin")]
    (copy / "experiment.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    code, stdout, stderr = run_cli(["compare", copy, "--export", tmp_path / "deploy"])
    assert code == 0, stderr
    assert f"verification set {tmp_path / 'lfw.bin'} (data.val) not found" in stderr
    summary = json.loads((tmp_path / "deploy" / "tiny" / "export_summary.json").read_text())
    assert summary["val_sets"] == ["synth_val"] and summary["missing_val"] == [str(tmp_path / "lfw.bin")]
    assert [s["status"] for s in summary["stages"]] == ["not exported (unfinished)"] * 2 + ["exported"] \
        + ["not exported (unfinished)"]
    assert sorted(p.name for p in (tmp_path / "deploy" / "tiny").iterdir()) == ["export_summary.json", "gen1.onnx"]
