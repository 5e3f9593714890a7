"""Advice that is right: a disk that fills mid-stage (one line, what to free, the rerun resumes), the disk refusal's
figures and suggestions, val sets read before an export's work, the "init from" column."""

import errno
import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from tiny_experiment import write_experiment

import distill.run.disk
import distill.train.tracking
from distill.cli import main
from distill.config.schema import dump_config, load_config
from distill.data import write_verification_bin
from distill.run.disk import DiskSpaceError, check_disk, estimate
from distill.run.summary import write_summary
from distill.utils.errors import DataFormatError


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"distill {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ the disk fills mid-stage

@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    """(experiment file, the student.pt of an uninterrupted run): gen1 alone (no teacher), 16 px, 4 steps, a
    checkpoint at step 2 and 4, a log line every step."""
    tmp = tmp_path_factory.mktemp("full")
    exp = write_experiment(tmp / "x.yaml", tmp / "faces", side=16, teacher=None, baseline=False, generations=1,
                           tracking={"wandb": "disabled"}, train={"checkpoint_every": 2})
    assert main(["run", str(exp), "--out", str(tmp / "whole"), "--no-progress"]) == 0
    return exp, tmp / "whole" / "gen1" / "student.pt"


class _FullDisk:
    """A file whose write, once `full(data)` says so, puts half of what it is given on disk, then finds the disk
    full."""

    def __init__(self, f, full=lambda _data: True):
        self.f, self.full = f, full

    def write(self, data):
        if not self.full(data):
            return self.f.write(data)
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _assert_resumes_to_the_same_student(exp, out, reference, capsys):
    assert main(["run", str(exp), "--out", str(out), "--no-progress"]) == 0  # the disk has room again
    assert f"gen1: resuming from {out / 'gen1' / 'last.pt'} at step 2/4" in capsys.readouterr().out
    assert sha256(out / "gen1" / "student.pt") == sha256(reference)


def test_a_disk_full_at_the_metrics_append_is_one_line_and_the_rerun_resumes(student_run, tmp_path, monkeypatch,
                                                                              capsys):
    exp, reference = student_run
    out = tmp_path / "run"

    def full_at_step_3(path, mode="r", **kwargs):  # the line of step 3: after the checkpoint of step 2
        f = open(path, mode, **kwargs)
        return _FullDisk(f, lambda line: json.loads(line)["step"] == 3) if mode == "a" else f

    monkeypatch.setattr(distill.train.tracking, "open", full_at_step_3, raising=False)
    assert main(["run", str(exp), "--out", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys, "run")
    assert line.startswith(f"distill run: error: {out / 'gen1'}: the disk filled while writing metrics.jsonl (")
    assert f"the run directory {out} holds" in line and line.endswith("it resumes from the last checkpoint")
    lines = (out / "gen1" / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 2]  # no half line of step 3
    assert all(x.endswith("\n") for x in lines)
    monkeypatch.undo()
    _assert_resumes_to_the_same_student(exp, out, reference, capsys)


def test_a_disk_full_at_a_checkpoint_is_one_line_and_the_rerun_resumes(student_run, tmp_path, monkeypatch, capsys):
    """torch.save meets the full disk inside its own writer and raises a RuntimeError ('unexpected pos'): the line
    still says what happened."""
    exp, reference = student_run
    out = tmp_path / "run"
    save = torch.save

    def full_at_step_4(obj, f, *args, **kwargs):
        if getattr(f, "name", "").endswith("last.pt.tmp") and obj.get("step") == 4:
            return save(obj, _FullDisk(f), *args, **kwargs)
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_step_4)
    assert main(["run", str(exp), "--out", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys, "run")
    assert line.startswith(f"distill run: error: {out / 'gen1'}: the disk filled while writing last.pt (")
    assert torch.load(out / "gen1" / "last.pt", weights_only=True)["step"] == 2  # the checkpoint before: intact
    assert not (out / "gen1" / "last.pt.tmp").exists()
    monkeypatch.undo()
    _assert_resumes_to_the_same_student(exp, out, reference, capsys)


def test_the_disk_full_line_names_only_what_the_rerun_never_reads(student_run, tmp_path):
    """A finished stage's last.pt goes, unless a stage still to run takes its head from it; so do the folders
    --restart-stage set aside and temporary files."""
    exp, reference = student_run
    run = tmp_path / "run"
    shutil.copytree(reference.parent.parent, run)
    (run / "gen1.restarted-20260101-000000").mkdir()
    (run / "gen1.restarted-20260101-000000" / "last.pt").write_bytes(b"x" * 5000)
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "gen2" / "last.pt"))
    cfg = load_config(str(exp), ["generations=2"])
    line = str(distill.run.disk.disk_full_error(cfg, str(run), err, counts=(72, 12)))
    assert line.startswith(f"{run / 'gen2'}: the disk filled while writing last.pt (")
    assert "the rest of the run needs about" in line
    assert re.search(r"safe to delete, as the rerun never reads them: gen1/last.pt \([\d.]+ [KM]B: the training "
                     r"state of the finished stage gen1\), gen1.restarted-20260101-000000 \(5.0 KB: ", line), line
    cfg = load_config(str(exp), ["generations=2", "init_head_from_previous=true"])  # gen2's head from gen1/last.pt
    line = str(distill.run.disk.disk_full_error(cfg, str(run), err, counts=(72, 12)))
    assert "gen1/last.pt" not in line and "gen1.restarted-20260101-000000" in line


# ------------------------------------------------------------------------------ the disk refusal

@pytest.fixture
def trained_teacher(tmp_path):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16, generations=1,
                           tracking={"wandb": "disabled"})
    return load_config(str(exp))


MB = re.compile(r"([\d.]+) (B|KB|MB|GB)")
UNIT = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def _refusal(cfg, tmp_path, monkeypatch, free: int, images: int = 72) -> str:
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(distill.run.disk.shutil, "disk_usage", lambda _p: usage._replace(free=free))
    with pytest.raises(DiskSpaceError) as caught:
        check_disk(cfg, str(tmp_path / "run"), images, 12)
    return str(caught.value)


def test_the_disk_refusal_states_a_total_that_is_the_sum_of_its_parts(trained_teacher, tmp_path, monkeypatch):
    cfg = trained_teacher
    est = estimate(cfg, str(tmp_path / "run"), 72, 12)
    assert est["needed"] == sum(n for _, n in est["items"]) + est["peak"][1] + est["logs"]
    line = _refusal(cfg, tmp_path, monkeypatch, free=est["needed"] // 2)
    total, parts = re.search(r"this run will write about ([\d.]+ [KM]?B) \((.*)\), but", line).groups()
    figures = [float(n) * UNIT[u] for n, u in MB.findall(parts)]
    assert len(figures) == len(est["items"]) + 2  # each item, the checkpoint being replaced, the logs
    value = float(total.split()[0]) * UNIT[total.split()[1]]
    assert abs(sum(figures) - value) <= 0.05e6 * len(figures), (sum(figures), value)  # each figure rounds to 0.1 MB
    assert f"Free at least {distill.run.disk.human(est['needed'] - est['needed'] // 2)} on that disk" in line
    # the cache is a few KB: dropping it cannot make this run fit, so it is not offered
    assert "teacher.cache: false" not in line and "baseline: false" not in line


def test_the_disk_refusal_offers_only_the_settings_that_make_the_run_fit(trained_teacher, tmp_path, monkeypatch):
    cfg = trained_teacher
    est = estimate(cfg, str(tmp_path / "run"), 72, 12)
    saved = {setting: n for setting, _, n in est["options"]}
    # without the baseline the run needs `saved` bytes less: a disk short of less than that is offered it
    line = _refusal(cfg, tmp_path, monkeypatch, free=est["needed"] - saved["baseline: false"] + 1)
    assert "or set baseline: false (drops the baseline stage" in line
    big = estimate(cfg, str(tmp_path / "run"), 2_000_000, 12)  # a cache of 2M images: 256 MB
    cache = {setting: n for setting, _, n in big["options"]}["teacher.cache: false"]
    line = _refusal(cfg, tmp_path, monkeypatch, free=big["needed"] - cache // 2, images=2_000_000)
    assert re.search(r"or set teacher.cache: false \(drops the teacher cache .*: 281.6 MB\)$", line), line
    assert "baseline: false" not in line  # it saves a few MB of the 140 MB missing


# ------------------------------------------------------------------------------ compare --export, init from

def test_compare_export_reads_the_val_sets_before_any_export(tmp_path):
    from distill.deploy.run_export import plan_export

    val = tmp_path / "val.bin"
    write_verification_bin(val, [b"\xff\xd8 not a real jpeg"] * 4, [True, False])
    val.write_bytes(val.read_bytes()[:-7])  # truncated
    cfg = load_config(str(write_experiment(tmp_path / "x.yaml", tmp_path / "faces", side=16,
                                           data={"val": [str(val)]})))
    run = tmp_path / "run"
    run.mkdir()
    dump_config(cfg, str(run / "experiment.yaml"))
    with pytest.raises(DataFormatError, match=rf"{run}: data.val {val}: truncated .*nothing was exported"):
        plan_export([{"run_dir": str(run), "experiment": "tiny", "stages": []}], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_init_from_shows_the_path_in_the_run_or_the_file_name(trained_teacher, tmp_path):
    run = tmp_path / "run"
    loaded = str(tmp_path / "models" / "r100" / "backbone.pth")
    results = [{"stage": "teacher", "generation": 0, "init_from": loaded, "params": 1, "gflops": 1.0},
               {"stage": "gen1", "generation": 1, "init_from": None, "params": 1, "gflops": 1.0},
               {"stage": "gen2", "generation": 2, "init_from": str(run / "gen1" / "student.pt"), "params": 1,
                "gflops": 1.0}]
    run.mkdir()
    write_summary(trained_teacher, str(run), results)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in (run / "summary.md").read_text().splitlines()
            if line.startswith("| ") and "---" not in line]
    assert [(r[0], r[2]) for r in rows[1:]] == [("teacher", "backbone.pth"), ("gen1", "-"),
                                                ("gen2", os.path.join("gen1", "student.pt"))]


def test_a_full_disk_met_outside_the_toolkits_writers_is_one_line(tmp_path, monkeypatch, capsys):
    """(Injected: an OSError of a full disk from a library the command calls.)"""
    import distill.run.compare

    def full(_dirs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.json"))

    monkeypatch.setattr(distill.run.compare, "load_runs", full)
    assert main(["compare", str(tmp_path)]) == 2
    assert one_error_line(capsys, "compare").startswith(
        f"distill compare: error: could not write {tmp_path / 'x.json'} (No space left on device: {tmp_path} has ")


def test_the_cache_allocation_keeps_its_own_refusal(trained_teacher, tmp_path):
    """The teacher cache is allocated whole before its first row: its refusal knows what the cache needs and says
    teacher.cache: false; the run's disk-full line does not replace it."""
    from distill.cli.run import _disk_full_advice
    from teachers.cache_file import CacheSpaceError

    with pytest.raises(CacheSpaceError, match="cannot allocate the teacher cache"):
        with _disk_full_advice(trained_teacher, str(tmp_path / "run")):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise CacheSpaceError("x: cannot allocate the teacher cache (No space left on device)") from None


def test_a_resume_gives_a_last_metrics_line_its_lost_newline_back(tmp_path):
    """A whole line whose newline never reached the disk: kept, and the next line starts on a line of its own."""
    tracker = distill.train.tracking.Tracker(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}')
    tracker.truncate_after(2)
    tracker.log({"train/loss": 1.0}, 3)
    assert [r["step"] for r in distill.train.tracking.read_metrics(str(tmp_path))] == [1, 2, 3]
def test_export_reads_its_check_bins_before_any_export(tmp_path, capsys):
    from distill.models.files import save_student
    from distill.models.registry import create_model

    save_student(tmp_path / "student.pt", create_model("vargfacenet", input_size=16, multiplier=0.25,
                                                       last_channels=32, units=(1, 1, 1), embedding_size=16),
                 "vargfacenet")
    val = tmp_path / "val.bin"
    write_verification_bin(val, [b"\xff\xd8 not a real jpeg"] * 4, [True, False])
    val.write_bytes(val.read_bytes()[:-7])  # truncated
    out = tmp_path / "o.onnx"
    assert main(["export", str(tmp_path / "student.pt"), str(out), "--check-bin", str(val)]) == 2
    assert one_error_line(capsys, "export").startswith(f"distill export: error: --check-bin {val}: truncated (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt", "val.bin"]  # no .onnx, no partial file
