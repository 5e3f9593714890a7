"""`distill doctor`: one screen of checks before a long run; reads only; exit 1 when something would fail."""

import shutil

import torch
from tiny_experiment import write_experiment

import distill.run.disk
from distill.cli import main
from distill.run.lock import run_directory_lock

SECTIONS = ["versions", "device", "data.train", "data.val", "data.ijb", "teacher", "disk", "wandb", "run directory"]


def report(capsys) -> dict:
    """{section: [(status, detail), ...]} from the doctor's lines."""
    out = capsys.readouterr().out
    found = {}
    for line in out.splitlines()[1:-1]:
        status, rest = line.split(None, 1)
        section = next(s for s in sorted(SECTIONS, key=len, reverse=True) if rest.startswith(s))
        found.setdefault(section, []).append((status, rest[len(section):].strip()))
    found["_last"] = out.splitlines()[-1]
    return found


def test_a_new_experiment_is_ready_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # a cluster's or CI's setting
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces", tracking={"wandb": "disabled"})
    assert main(["doctor", str(exp), "--out", str(tmp_path / "run")]) == 0
    r = report(capsys)
    assert [s for s in SECTIONS if s in r] == [s for s in SECTIONS if s != "data.ijb"]  # no data.ijb: no line
    assert r["_last"] == "ready: nothing found that would stop this run"
    assert r["versions"][0][1].startswith("python ") and f"torch {torch.__version__}" in r["versions"][0][1]
    assert r["device"][0][1].startswith("cpu (")
    assert r["data.train"] == [("note", f"{tmp_path / 'faces'}: synthetic faces generated on first use "
                                        f"(12 identities x 6 images at 32x32)")]
    assert r["teacher"][0] == ("ok", "iresnet18, 32-d embeddings at 32px, trained here as stage 0 (1 epoch) before "
                                     "the students")
    assert r["disk"][0][0] == "ok" and "teacher cache (72 images x 2 views x 32-d float16)" in r["disk"][0][1]
    assert r["wandb"][0][1].startswith("offline (WANDB_MODE); no upload")  # the environment wins over the config
    assert r["run directory"] == [("ok", f"{tmp_path / 'run'}: new, free")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.yaml"]  # no data generated, no folder made


def test_a_finished_run_reports_what_it_resumes(tiny_finished_run, capsys):
    exp, run, data = tiny_finished_run
    assert main(["doctor", str(exp), "--out", str(run)]) == 0
    r = report(capsys)
    assert r["data.train"][0][0] == "ok" and "72 images of 12 identities, stored 32x32" in r["data.train"][0][1]
    assert r["data.val"] == [("ok", f"{data}/synth_val.bin: 40 pairs (20 same), images 32x32")]
    assert "trained earlier in this run directory" in r["teacher"][0][1]
    assert r["disk"][0][1].startswith("the run will write about 0 B (nothing left to write)")
    assert r["run directory"] == [("ok", f"{run}: free; resumes this experiment (finished: teacher, baseline, gen1)")]


def test_each_blocker_is_a_fail_line_and_exit_1(tiny_finished_run, tmp_path, monkeypatch, capsys):
    exp, run, data = tiny_finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(distill.run.disk.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    shutil.rmtree(copy / "gen1")
    with run_directory_lock(str(copy)):
        assert main(["doctor", str(exp), "--out", str(copy), "device=cuda", "teacher.train=null",
                     "teacher.checkpoint=/nowhere/backbone.pth", "data.val=[/nowhere/lfw.bin]"]) == 1
    r = report(capsys)
    fails = {s: d for s, lines in r.items() if s != "_last" for status, d in lines if status == "FAIL"}
    assert set(fails) == {"device", "data.val", "teacher", "disk", "run directory"}
    assert "device 'cuda': CUDA is not available" in fails["device"]
    assert fails["data.val"] == "verification set /nowhere/lfw.bin does not exist"
    assert ("teacher.checkpoint /nowhere/backbone.pth does not exist; give an existing checkpoint, or a teacher.train "
            "recipe") in fails["teacher"]
    assert "1 student stage (gen1; checkpoints)" in fails["disk"] and "has 1.0 KB free" in fails["disk"]
    assert fails["run directory"].startswith("another distill run (pid ") and str(copy) in fails["run directory"]
    assert r["_last"] == "5 problems would stop this run"


def test_a_dataset_the_run_would_refuse_is_a_fail(tiny_finished_run, capsys):
    exp, run, data = tiny_finished_run
    assert main(["doctor", str(exp), "--out", str(run), "data.synthetic.images_per_id=7"]) == 1
    r = report(capsys)
    assert r["data.train"][0][0] == "FAIL" and "distill run never replaces a dataset" in r["data.train"][0][1]


def test_data_ijb_is_checked_images_included(tiny_finished_run, tmp_path, capsys):
    from distill.data.synth_ijb import write_synthetic_ijb

    exp, run, _ = tiny_finished_run
    write_synthetic_ijb(tmp_path / "IJBC", templates=6, seed=0)
    args = ["doctor", str(exp), "--out", str(run), f"data.ijb.root={tmp_path / 'IJBC'}"]
    assert main(args) == 0
    (status, detail), = report(capsys)["data.ijb"]
    assert status == "ok" and "IJBC" in detail and "evaluated after each stage" in detail
    first = sorted((tmp_path / "IJBC" / "loose_crop").iterdir())[0]
    first.unlink()
    assert main(args) == 1
    (status, detail), = report(capsys)["data.ijb"]
    assert status == "FAIL" and "1 images are missing (first: " in detail
