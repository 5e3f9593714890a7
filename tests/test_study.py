"""The recursive-distillation study in miniature (2 seeds, 1 generation, tiny data): its grid (named cases),
distill compare over it, and docs/results.md's rows and conclusions (experiments/studies/results.py)."""

import importlib.util
import re
from pathlib import Path

import yaml

from distill.cli import main
from distill.run.sweep import expand, load_grid

REPO = Path(__file__).resolve().parents[1]


def _results_module():
    spec = importlib.util.spec_from_file_location("study_results", REPO / "experiments" / "studies" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_study_expands_to_its_documented_arms():
    grid = load_grid(str(REPO / "experiments" / "studies" / "recursive_kd.yaml"))
    names = [p.name for p in expand(grid)]
    assert len(names) == 14 * 3
    for arm in ("scratch-e2", "scratch-e4", "scratch-e6", "scratch-e2-pk4", "r18-equivalent_angular", "r18-ekd",
                "bornagain-adadistill"):
        assert all(f"recursive_kd-{arm}-seed={s}" in names for s in (0, 1, 2))
    ekd = next(p for p in expand(grid) if p.name == "recursive_kd-r18-ekd-seed=0")
    assert "data.images_per_id=4" in ekd.overrides and "distill.alpha=1.0" in ekd.overrides


FACE_KD_ROWS = ("scratch", "scratch-pk4", "equivalent_angular", "shrinkteanet", "kd", "fitnet", "rkd",
                "margin_distillation", "ekd", "adadistill", "attention_transfer", "cc", "sp", "proxyless_kd")


def test_the_face_kd_table_lists_every_row_with_one_teacher(capsys):
    path = str(REPO / "experiments" / "studies" / "face_kd_table.yaml")
    points = expand(load_grid(path))
    assert [p.name for p in points] == [f"face_kd_table-{row}-seed=0" for row in FACE_KD_ROWS]
    assert main(["sweep", path, "--print"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == len(FACE_KD_ROWS) and all(c.startswith("distill run ") for c in commands)
    teachers = {o for p in points for o in p.overrides if o.startswith(("teacher.checkpoint=", "teacher.head="))}
    assert teachers == {"teacher.checkpoint=runs/study/teacher-r18/teacher/backbone.pth",
                        "teacher.head=runs/study/teacher-r18/teacher/last.pt"}  # one frozen teacher for every row
    from distill.config.schema import load_config
    for point in points:  # every row is a valid experiment (a feature loss with the cache would be refused here)
        cfg = load_config(str(REPO / "experiments" / "quickstart.yaml"), point.overrides)
        assert cfg.generations == (0 if point.name.startswith("face_kd_table-scratch") else 1)
    for row, loss in (("fitnet", "fitnet"), ("attention_transfer", "attention_transfer")):
        point = next(p for p in points if p.name == f"face_kd_table-{row}-seed=0")
        assert f"distill.loss={loss}" in point.overrides and "teacher.cache=false" in point.overrides


def test_the_miniature_study_runs_compares_and_reports(tiny_finished_run, tmp_path, capsys):
    exp, run, _ = tiny_finished_run
    backbone = str(run / "teacher" / "backbone.pth")
    teacher = {"teacher.checkpoint": backbone}
    grid = {
        "base": str(exp), "name": "mini",
        "fixed": {"baseline": False, "tracking.wandb": "disabled", "train.max_steps": 2, "train.eval_every": 0},
        "grid": {"case": [
            {"name": "scratch-e1", "generations": 0, "baseline": True, "teacher": None},
            {"name": "r18-equivalent_angular", "generations": 1, **teacher},
            {"name": "r18-ekd", "generations": 1, "distill.loss": "ekd", "distill.alpha": 1.0,
             "data.images_per_id": 4, **teacher},
        ], "seed": [0, 1]},
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    out = tmp_path / "runs"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["compare", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mini-")]
    assert len(rows) == 2 * (1 + 2 * 2)  # scratch: baseline; each KD arm: teacher + gen1; two seeds

    results = _results_module()
    doc = tmp_path / "results.md"
    assert results.main([str(out), "--out", str(doc), "--no-plot"]) == 0
    text = doc.read_text()
    for row in (r"\| scratch \(no teacher\) \| baseline \| 1 \| [\d.]+ ± [\d.]+ \| .* \| 2 \|",
                r"\| r18 teacher \| teacher \| - \| ",
                r"\| r18 / equivalent_angular \| gen1 \| 1 \| [\d.]+ ± [\d.]+ \| .* \| 2 \|",
                r"\| r18 / ekd \| gen1 \| 1 \| "):
        assert re.search(row, text), row
    assert "**r18 teacher against scratch at equal budget**" in text
    assert "**Which loss wins at generation 1 (r18)?**" in text
    assert "| generation 2 | 99.83 / 98.27 / 98.05 |" in text  # the paper's figures, labelled apart
    table, set_name, seeds = results.collect(str(out))
    assert seeds == [0, 1] and set_name == "synth_val"
    assert len(table[("r18-ekd", "gen1")]["acc"]) == 2
    assert results.missing(table, seeds, str(path)) == []
    # a seed or an arm missing: the report refuses to average what is there
    (out / "mini-r18-ekd-seed=1" / "gen1" / "result.json").unlink()
    assert results.main([str(out), "--out", str(doc), "--no-plot", "--grid", str(path)]) == 2
    assert "the study is incomplete (r18-ekd / gen1: seed 1)" in capsys.readouterr().err
    table, _, seeds = results.collect(str(out))
    grid2 = tmp_path / "more.yaml"
    grid2.write_text(yaml.safe_dump({**grid, "grid": {**grid["grid"], "case": grid["grid"]["case"] + [
        {"name": "r18-cosine", "generations": 1, "distill.loss": "cosine", **teacher}]}}, sort_keys=False))
    assert "r18-cosine: no finished stage (point mini-r18-cosine-seed=0)" in results.missing(table, seeds, str(grid2))
