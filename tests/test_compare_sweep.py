"""`distill compare` (table, JSON, PNG; finished and unfinished runs) and `distill sweep` (grids, --print, a run)."""

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from tiny_experiment import write_experiment

from distill.cli import build_parser, main
from distill.config.schema import load_config
from distill.eval.verification import set_name_of
from distill.run.context import silent_logger
from distill.run.experiment import run_experiment
from distill.run.sweep import expand, load_grid, point_config

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
ABLATIONS = REPO / "experiments" / "ablations"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def table_rows(text: str) -> list:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if "---" not in line]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "faces"  # generated once, on first use


@pytest.fixture(scope="module")
def runs(tmp_path_factory, faces):
    """Two finished tiny runs: A = teacher, baseline, gen1; B = gen1, gen2 without a teacher."""
    tmp = tmp_path_factory.mktemp("compare")
    data = faces
    a = write_experiment(tmp / "a.yaml", data, side=16, name="tiny-a", generations=1, tracking={"wandb": "disabled"})
    b = write_experiment(tmp / "b.yaml", data, side=16, name="tiny-b", teacher=None, baseline=False,
                         tracking={"wandb": "disabled"})
    for path, out in ((a, "run-a"), (b, "run-b")):
        run_experiment(load_config(str(path)), str(tmp / out), progress=False, logger=silent_logger())
    return tmp, tmp / "run-a", tmp / "run-b"


def test_compare_table_has_one_row_per_run_and_stage(runs, capsys):
    _, a, b = runs
    assert main(["compare", str(a), str(b)]) == 0
    rows = table_rows(capsys.readouterr().out)
    head = rows[0]
    assert head[:7] == ["run", "stage", "arch", "init from", "params (M)", "GFLOPs", "train (s)"]
    assert head[7:] == ["synth_val acc (%)", "synth_val TAR@1e-3 (%)", "synth_val TAR@1e-4 (%)", "distillation"]
    assert [(r[0], r[1]) for r in rows[1:]] == [("tiny-a", "teacher"), ("tiny-a", "baseline"), ("tiny-a", "gen1"),
                                               ("tiny-b", "gen1"), ("tiny-b", "gen2")]
    for row in rows[1:]:
        run_dir = a if row[0] == "tiny-a" else b
        summary = {s["stage"]: s for s in json.loads((run_dir / "summary.json").read_text())["stages"]}[row[1]]
        m = summary["metrics"]["synth_val"]
        assert row[7] == f"{100 * m['acc_mean']:.2f} ± {100 * m['acc_std']:.2f}"
        assert row[4] == f"{summary['params'] / 1e6:.2f}" and row[6] == f"{summary['train_seconds']:.0f}"
        assert row[2] == summary["arch"] == ("iresnet18" if row[1] == "teacher" else "vargfacenet")
        assert row[8] == row[9] == "n/a"  # 20 impostor pairs cannot measure FAR 1e-3
    assert rows[5][3] == "gen1/student.pt"  # tiny-b's gen2 starts from its gen1's student.pt
    # each stage's terms: tiny-a's gen1 distils with the short form's one term; tiny-b has no teacher
    assert [r[10] for r in rows[1:]] == ["-", "none", "equivalent_angular (alpha 7)", "none", "none"]


def test_compare_json_is_one_object_with_every_stage(runs, capsys):
    _, a, b = runs
    assert main(["compare", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in out["runs"]] == ["tiny-a", "tiny-b"]
    on_disk = json.loads((b / "summary.json").read_text())["stages"]
    assert [{k: v for k, v in s.items() if k != "status"} for s in out["runs"][1]["stages"]] == on_disk
    assert {s["status"] for r in out["runs"] for s in r["stages"]} == {"done"}


def test_compare_plot_is_a_valid_png(runs, capsys):
    tmp, a, b = runs
    path = tmp / "plots" / "compare.png"
    assert main(["compare", str(a), str(b), "--plot", str(path)]) == 0
    assert f"plot: {path}" in capsys.readouterr().out
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    from matplotlib.image import imread
    image = imread(str(path))
    assert image.shape[:2] == (500, 1300) and image[..., :3].std() > 0.05  # two panels, not blank


def test_compare_reads_an_unfinished_run_from_its_metrics_log(runs, tmp_path, capsys):
    _, _, b = runs
    run = tmp_path / "run-b"
    shutil.copytree(b, run)
    for name in ("gen2/result.json", "gen2/student.pt"):  # gen2 redone: summary.json still lists the old one
        (run / name).unlink()
    lines = [json.loads(x) for x in (run / "gen2" / "metrics.jsonl").read_text().splitlines()]
    (run / "gen2" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines if x["step"] <= 3))
    assert main(["compare", str(run), "--json"]) == 0
    gen1, gen2 = json.loads(capsys.readouterr().out)["runs"][0]["stages"]
    assert gen1["status"] == "done" and gen2["status"] == "unfinished (step 3)"
    step2 = [x for x in lines if x["step"] == 2 and "val/synth_val/acc" in x][0]
    assert gen2["metrics"]["synth_val"]["acc_mean"] == step2["val/synth_val/acc"]
    assert gen2["train_seconds"] is None and gen2["params"] == gen1["params"]
    assert main(["compare", str(run)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0][-1] == "status" and rows[2][1] == "gen2" and rows[2][6] == "-" and rows[2][2] == "vargfacenet"
    assert rows[2][-1] == "unfinished (step 3)"


def test_compare_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def write_grid(tmp_path, faces, grid: dict, fixed: dict | None = None, name: str = "g") -> Path:
    base = write_experiment(tmp_path / "base.yaml", faces, side=16, generations=1, baseline=False,
                            tracking={"wandb": "disabled"})
    path = tmp_path / "grids" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"base": f"../{base.name}", "name": name, "grid": grid, "fixed": fixed or {}}))
    return path


def test_sweep_print_expands_the_grid_into_runnable_commands(tmp_path, faces, capsys):
    path = write_grid(tmp_path, faces, {"distill.alpha": [0, 7], "student.se": [True, False]}, {"train.max_steps": 3})
    assert main(["sweep", str(path), "--print", "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [(0.0, True), (0.0, False), (7.0, True), (7.0, False)]  # the last key varies fastest
    assert len(lines) == 4
    for line, (alpha, se) in zip(lines, expected, strict=True):
        argv = shlex.split(line)
        assert argv[:2] == ["distill", "run"]
        args = build_parser().parse_args(argv[1:])  # exactly what `distill run` accepts
        cfg = load_config(args.experiment, args.overrides)
        name = f"g-distill.alpha={alpha:g}-student.se={str(se).lower()}"
        assert (cfg.name, cfg.distill.alpha, cfg.student.se, cfg.train.max_steps) == (name, alpha, se, 3)
        assert args.out == str(tmp_path / "out" / name)
    assert not (tmp_path / "out").exists()  # nothing ran


def test_sweep_refuses_a_bad_grid_before_any_work(tmp_path, faces, capsys):
    path = write_grid(tmp_path, faces, {"distill.alpha": [0, 7], "student.multipler": [1.0]})
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "point g-distill.alpha=0-student.multipler=1.0" in err and "did you mean 'student.multiplier'" in err
    assert not (tmp_path / "out").exists()


def test_a_small_sweep_runs_end_to_end_sharing_one_teacher(tmp_path, faces, capsys):
    path = write_grid(tmp_path, faces, {"distill.alpha": [0, 5]}, name="duo")
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    first, second = out / "duo-distill.alpha=0", out / "duo-distill.alpha=5"
    for run_dir, alpha in ((first, 0.0), (second, 5.0)):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["experiment"] == run_dir.name and [s["stage"] for s in summary["stages"]] == ["teacher", "gen1"]
        assert yaml.safe_load((run_dir / "experiment.yaml").read_text())["distill"]["alpha"] == alpha
    assert f"{second.name}: teacher shared from {first / 'teacher'}" in stdout
    assert (second / "teacher" / "backbone.pth").read_bytes() == (first / "teacher" / "backbone.pth").read_bytes()
    assert not (second / "teacher" / "last.pt").exists()  # copied, not trained again
    rows = table_rows((out / "comparison.md").read_text())
    assert [(r[0], r[1]) for r in rows[1:]] == [(first.name, "teacher"), (first.name, "gen1"),
                                               (second.name, "teacher"), (second.name, "gen1")]
    assert json.loads((out / "comparison.json").read_text())["runs"][1]["run"] == second.name
    assert stdout.rstrip().splitlines()[-1].startswith(f"| {second.name} | gen1 |")  # ends with the table
    assert main(["compare", str(out)]) == 0  # the sweep's directory stands for its points
    assert table_rows(capsys.readouterr().out) == rows


needs_quickstart = pytest.mark.skipif(not QUICKSTART.exists(), reason="experiments/quickstart.yaml not written yet")

SHIPPED = {"alpha": ("distill.alpha", [0, 1, 7, 20]),
           "loss": ("distill.loss", ["equivalent_angular", "shrinkteanet_angular", "cosine", "l2"]),
           "group_size": ("student.group_size", [1, 8, 16]), "se": ("student.se", [True, False]),
           "head": ("student.head", ["vargfacenet", "vargnet"]),
           "embedding": ("student.embedding", ["vargfacenet", "gap"]), "generations": ("generations", [1, 2, 3])}


@needs_quickstart
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_grids_expand_over_the_quickstart_and_every_point_builds(name):
    grid = load_grid(str(ABLATIONS / f"{name}.yaml"))
    key, values = SHIPPED[name]
    assert Path(grid.base).resolve() == QUICKSTART and list(grid.grid) == [key]
    points = expand(grid)
    assert [p.values[key] for p in points] == values
    for p in points:
        cfg = point_config(grid, p)  # loads and builds the student (S=16 needs widths divisible by 16)
        section, _, field = key.rpartition(".")
        assert getattr(getattr(cfg, section) if section else cfg, field) == p.values[key]


@needs_quickstart
def test_wandb_sweep_command_runs_distill_run_with_the_sampled_overrides(tmp_path):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load((ABLATIONS / "wandb_sweep.yaml").read_text())
    params = {k: {"value": v.get("values", [v.get("min")])[0]} for k, v in sweep["parameters"].items()}
    macros = {**create_sweep_command_args({"args": params}), "env": ["/usr/bin/env"], "program": [sweep["program"]]}
    command = [w for c in sweep["command"] for w in (macros[c[2:-1]] if c.startswith("${") else [c])]
    fake = tmp_path / "bin" / "distill"  # stands in for the real command: prints what it was given
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "WANDB_SWEEP_ID": "s1", "WANDB_RUN_ID": "r1"}
    argv = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
    args, extra = build_parser().parse_known_args(argv)
    assert args.command == "run" and args.experiment == "experiments/quickstart.yaml"
    assert args.out == "runs/wandb-sweep/s1/r1" and extra == [f"--{k}={v['value']}" for k, v in params.items()]
    cfg = load_config(str(REPO / args.experiment), extra)  # every swept key is a real config key
    assert cfg.distill.alpha == params["distill.alpha"]["value"] and cfg.train.lr == params["train.lr"]["value"]
    assert sweep["metric"]["name"] == f"val/{set_name_of(cfg.data.val[0])}/acc"
