"""A user mistake or a hostile disk gets one clear line (exit 2) or a note, never a traceback or a guess.

One tiny finished run (conftest's tiny_finished_run: teacher, baseline, gen1) is shared; tests that change
it work on a copy.
"""

import errno
import json
import os
import shutil

import pytest
import torch

import distill.run.disk
import distill.utils.atomic
import teachers.cache
from distill.cli import main
from distill.config.schema import load_config
from distill.data import open_training_set
from distill.run.disk import estimate
from teachers.cache import build_cache
from teachers.cache_file import CacheSpaceError, allocate


@pytest.fixture
def finished(tiny_finished_run):
    return tiny_finished_run


@pytest.fixture
def run_copy(finished, tmp_path):
    exp, run, data = finished
    shutil.copytree(run, tmp_path / "run")
    return exp, tmp_path / "run", data


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"distill {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------- damaged files

def test_compare_names_a_damaged_experiment_yaml_on_one_line(run_copy, capsys):
    _, run, _ = run_copy
    (run / "experiment.yaml").write_text("name: [unclosed\n")
    assert main(["compare", str(run)]) == 2
    line = one_error_line(capsys, "compare")
    assert f"{run}/experiment.yaml: not valid YAML (line 2, column 1:" in line
    assert "restore it, or delete it and rerun `distill run`" in line


def test_a_key_given_twice_is_an_error_naming_key_and_lines(tmp_path, capsys):
    exp = tmp_path / "dup.yaml"
    exp.write_text("name: dup\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    assert main(["run", str(exp), "--dry-run"]) == 2
    line = one_error_line(capsys, "run")
    assert f"{exp}: line 5: key 'lr' is given twice in one mapping (first on line 3)" in line


def test_a_truncated_result_json_leaves_the_stage_unfinished_and_says_so(run_copy, capsys):
    exp, run, _ = run_copy
    good = json.loads((run / "gen1" / "result.json").read_text())
    (run / "gen1" / "result.json").write_text((run / "gen1" / "result.json").read_text()[:50])
    assert main(["run", str(exp), "--out", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"gen1: note: {run}/gen1/result.json is damaged (" in out and "treating the stage as unfinished" in out
    assert "baseline: finished earlier, skipped" in out and f"resuming from {run}/gen1/last.pt" in out
    again = json.loads((run / "gen1" / "result.json").read_text())
    assert again["metrics"] == good["metrics"]  # resumed at its last step: the same student, evaluated again


def test_a_corrupt_last_pt_offers_restart_stage_which_keeps_the_old_folder(run_copy, capsys):
    exp, run, _ = run_copy
    (run / "gen1" / "result.json").unlink()
    (run / "gen1" / "last.pt").write_bytes((run / "gen1" / "last.pt").read_bytes()[:3000])
    assert main(["run", str(exp), "--out", str(run), "--no-progress"]) == 2
    line = one_error_line(capsys, "run")
    assert f"{run}/gen1/last.pt: not a readable PyTorch checkpoint (truncated or damaged" in line
    assert (f"delete {run}/gen1/last.pt to start the stage from its beginning, or rerun with --restart-stage "
            f"gen1") in line

    assert main(["run", str(exp), "--out", str(run), "--restart-stage", "gen3"]) == 2
    assert "this experiment's stages are teacher, baseline, gen1; did you mean 'gen1'?" in one_error_line(capsys, "run")
    assert main(["run", str(exp), "--out", str(run), "--restart-stage", "teacher"]) == 2
    assert "gen1 started from teacher's result; restart it too (--restart-stage gen1)" in one_error_line(capsys, "run")

    assert main(["run", str(exp), "--out", str(run), "--no-progress", "--restart-stage", "gen1"]) == 0
    aside = [p for p in run.iterdir() if p.name.startswith("gen1.restarted-")]
    assert len(aside) == 1 and (aside[0] / "last.pt").stat().st_size == 3000  # kept, not deleted
    assert json.loads((run / "gen1" / "result.json").read_text())["stage"] == "gen1"
    assert "gen1.restarted" not in (run / "summary.md").read_text()


# ------------------------------------------------------------------------------------------- devices

def test_a_missing_gpu_stops_run_and_eval_before_any_work(finished, tmp_path, monkeypatch, capsys):
    exp, run, data = finished
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["run", str(exp), "--out", str(tmp_path / "new"), "device=cuda:7"]) == 2
    assert "device 'cuda:7': CUDA is not available (" in one_error_line(capsys, "run")
    assert not (tmp_path / "new" / "experiment.yaml").exists()
    assert main(["eval", str(run / "gen1" / "student.pt"), "--bin", str(data / "synth_val.bin"),
                 "--device", "cuda:7"]) == 2
    assert "--device 'cuda:7': CUDA is not available (" in one_error_line(capsys, "eval")
    assert main(["eval", str(run / "gen1" / "student.pt"), "--bin", str(data / "synth_val.bin"),
                 "--device", "tpu"]) == 2
    assert "--device 'tpu': not a device; use auto, cpu, cuda or cuda:N" in one_error_line(capsys, "eval")
    assert main(["run", str(exp), "--dry-run", "device=gpu"]) == 2
    assert "key 'device' must be auto, cpu, cuda or cuda:N, got 'gpu'" in one_error_line(capsys, "run")


# ---------------------------------------------------------------------------------- guesses -> notes

def test_arch_that_contradicts_a_student_pt_is_an_error(finished, capsys):
    _, run, data = finished
    student = run / "gen1" / "student.pt"
    assert main(["eval", str(student), "--bin", str(data / "synth_val.bin"), "--arch", "r50"]) == 2
    said = one_error_line(capsys, "eval")
    assert f"{student}: --arch r50 given, but this student.pt records arch vargfacenet" in said
    assert main(["eval", str(student), "--bin", str(data / "synth_val.bin"), "--arch", "vargfacenet", "--json"]) == 0


def test_images_of_another_size_get_one_note(finished, capsys):
    _, _, data = finished
    assert main(["eval", "r18", "--input-size", "48", "--bin", str(data / "synth_val.bin"), "--json"]) == 0
    err = capsys.readouterr().err
    assert err.count("note: verification set synth_val: images are 32x32, the model takes 48x48: each is resized") == 1
    assert open_training_set(data, input_size=32).notes() == []
    notes = open_training_set(data, input_size=16).notes()
    assert len(notes) == 1 and "images are 32x32, the model takes 16x16 (data.input_size)" in notes[0]


def test_a_property_file_that_disagrees_with_the_records_is_a_note(finished, tmp_path):
    _, _, data = finished
    copy = tmp_path / "faces"
    shutil.copytree(data, copy)
    real = open_training_set(copy, input_size=32)
    (copy / "property").write_text(f"{real.num_classes},32,32")
    assert open_training_set(copy, input_size=32).notes() == []
    (copy / "property").write_text(f"{real.num_classes + 5},112,112")
    notes = open_training_set(copy, input_size=32).notes()
    assert any("says images are 112x112, but they are 32x32" in n for n in notes)
    assert any(f"says {real.num_classes + 5} identities, but the header record" in n and
               f"has {real.num_classes}" in n for n in notes)


def test_compare_marks_stages_not_started_and_says_when_nothing_finished(finished, tmp_path, capsys):
    exp, run, _ = finished
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(run / "experiment.yaml", fresh / "experiment.yaml")
    assert main(["compare", str(fresh)]) == 0
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| tiny")]
    assert [r.split("|")[2].strip() for r in rows] == ["teacher", "baseline", "gen1"]
    assert all(r.rstrip(" |").endswith("not started") for r in rows)
    assert f"note: {fresh} holds no finished stage yet" in captured.err
    assert main(["compare", str(run)]) == 0
    assert "no finished stage" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ disks and read-only

def _refuse_writes(monkeypatch):
    """A read-only folder (injected: the tests may run as root, which writes anywhere)."""
    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(distill.utils.atomic.tempfile, "mkstemp", denied)


def test_read_only_output_folders_are_named(finished, tmp_path, monkeypatch, capsys):
    exp, run, _ = finished
    _refuse_writes(monkeypatch)
    assert main(["run", str(exp), "--out", str(tmp_path / "ro")]) == 2
    assert f"{tmp_path / 'ro'}: cannot write the run directory (Permission denied)" in one_error_line(capsys, "run")
    assert main(["compare", str(run), "--plot", str(tmp_path / "plots" / "c.png")]) == 2
    assert f"{tmp_path / 'plots'}: cannot write the plot (Permission denied)" in one_error_line(capsys, "compare")
    assert main(["export", str(run / "gen1" / "student.pt"), str(tmp_path / "s.onnx")]) == 2
    assert f"{tmp_path}: cannot write the exported model (Permission denied)" in one_error_line(capsys, "export")
    assert not (tmp_path / "s.onnx").exists()


def test_the_run_refuses_a_disk_too_small_with_the_figures(finished, tmp_path, monkeypatch, capsys):
    exp, _, _ = finished
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(distill.run.disk.shutil, "disk_usage", lambda _p: usage._replace(free=50_000_000))
    assert main(["run", str(exp), "--out", str(tmp_path / "small")]) == 2
    line = one_error_line(capsys, "run")
    assert "this run will write about 354.4 MB (teacher stage (checkpoints) 225.2 MB + teacher cache" in line
    assert "+ a teacher last.pt while it is replaced (last.pt.tmp) 90.1 MB + logs and small files (10% on top)" in line
    assert "has 50.0 MB free. Free at least 304.4 MB on that disk" in line
    assert "teacher.cache: false" not in line  # it would save 9.2 KB of the 304.4 MB missing
    assert not (tmp_path / "small" / "teacher").exists()  # refused before any training


def test_the_estimate_matches_what_a_run_writes(finished, tmp_path):
    exp, run, data = finished
    cfg = load_config(str(exp))
    train = open_training_set(data, input_size=32)
    est = estimate(cfg, str(tmp_path / "new"), len(train), train.num_classes)
    written = sum(p.stat().st_size for p in run.rglob("*") if p.is_file() and ".restarted-" not in str(p))
    counted = sum(n for _, n in est["items"])
    assert 0.9 * written <= counted <= 1.1 * written, (counted, written)
    assert sum(n for _, n in estimate(cfg, str(run), len(train), train.num_classes)["items"]) == 0  # all done


def test_the_cache_file_is_allocated_whole_before_the_first_row(tmp_path):
    path = str(tmp_path / "embeddings.f16")
    allocate(path, 3_000_000, fresh=True)
    st = os.stat(path)
    assert st.st_size == 3_000_000 and st.st_blocks * 512 >= 3_000_000  # not sparse: no SIGBUS later


def test_a_full_disk_is_a_cache_error_before_the_teacher_runs(finished, tmp_path, monkeypatch):
    _, _, data = finished

    class Teacher(torch.nn.Module):
        input_size, embedding_size = 32, 32

        def fingerprint(self):
            return "t"

        def forward(self, x):
            raise AssertionError("the teacher must not run when the cache cannot be allocated")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(teachers.cache.os, "posix_fallocate", full)
    train = open_training_set(data, input_size=32)
    with pytest.raises(CacheSpaceError, match=rf"cannot allocate the teacher cache \(No space left on device\): it "
                                              rf"needs {len(train) * 2 * 32 * 2:,} bytes .* are free.*"
                                              rf"teacher.cache: false"):
        build_cache(Teacher(), train, str(tmp_path / "cache"), progress=False)
