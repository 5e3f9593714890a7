"""The study (experiments/studies/study.py, report.py) in miniature: every study file run with 2 seeds on tiny data,
then docs/results.md's sections; the report refuses a study with a missing seed or arm; the budget rule."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from tiny_experiment import write_experiment

from distill.run.sweep import CASE, expand, load_grid

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "experiments" / "studies"


def _module(name):
    sys.path.insert(0, str(STUDIES))
    spec = importlib.util.spec_from_file_location(f"study_{name}", STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLE_ROWS = ("scratch", "scratch-pk4", "scratch-pk2", "equivalent_angular", "shrinkteanet", "kd", "fitnet", "rkd",
              "margin_distillation", "ekd", "ekd-k2", "scratch-pk4-mix50", "ekd-mix50", "adadistill",
              "attention_transfer", "cc", "sp", "proxyless_kd", "margin_distillation-pre38", "ekd-pre38",
              "adadistill-pre38", "rkd-pre38", "attention_transfer-pre38")


def test_the_study_files_plan_every_arm_with_three_seeds_and_one_teacher():
    grids = {f: load_grid(str(STUDIES / f"{f}.yaml")) for f in
             ("budget_curve", "face_kd_table", "recursive_kd", "recursion_long", "pk_batches")}
    assert [c["name"] for c in grids["face_kd_table"].grid[CASE]] == list(TABLE_ROWS)
    assert [c["name"] for c in grids["recursive_kd"].grid[CASE]] == ["equivalent_angular-chain",
                                                                     "equivalent_angular-bornagain"]
    for name, grid in grids.items():
        assert grid.grid["seed"] == ([0, 1, 2, 3, 4] if name == "pk_batches" else [0, 1, 2]), name
        assert all("train.epochs" not in c for c in grid.grid[CASE]) or name == "budget_curve"  # study.py sets E
        loads = {grid.fixed.get("teacher.checkpoint")} - {None}
        assert loads <= {"runs/study/teacher/teacher/backbone.pth"}, name  # one frozen teacher everywhere
    born = next(p for p in expand(grids["recursive_kd"]) if "bornagain" in p.name)
    assert "recursive.teacher=previous" in born.overrides


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    """The whole study, 2 seeds, 1 step a stage (one torch thread: no load probe), on a tiny synthetic set (144
    images of 16 people, 16 x 16 pixels: the smallest side the models take, a quarter of the convolutions of 32).
    The teacher is a VarGFaceNet of the students' size: nothing here depends on its architecture, and an IResNet-18
    (11M parameters), loaded by each of the ~50 runs that distil, cost 4-5 s of the fixture's ~35."""
    tmp = tmp_path_factory.mktemp("study")
    exp = write_experiment(
        tmp / "tiny.yaml", tmp / "faces", generations=0, tracking={"wandb": "disabled"},
        data={"input_size": 16,
              "synthetic": {"ids": 16, "images_per_id": 9, "size": 16, "pairs": 40, "seed": 0, "holdout_ids": 8}},
        teacher={"arch": "vargfacenet", "input_size": 16, "embedding_size": 32, "multiplier": 0.5, "last_channels": 64,
                 "units": [1, 1, 1],
                 "train": {"batch_size": 32, "lr": 0.1, "lr_batch_size": 32, "max_steps": 6, "log_every": 2}},
        train={"batch_size": 32, "lr": 0.1, "lr_batch_size": 32, "max_steps": 2, "log_every": 1, "eval_every": 0,
               "checkpoint_every": 2})
    study = _module("study")
    doc = tmp / "docs" / "results.md"
    code = study.main(["--runs", str(tmp / "runs"), "--out", str(doc), "--base", str(exp), "--seeds", "0,1",
                       "--pk-seeds", "0,1,2", "--ijb-templates", "6", "train.max_steps=1", "train.threads=1"])
    return tmp, doc, code


def test_the_miniature_study_runs_every_file_and_reports(miniature):
    tmp, doc, code = miniature
    assert code == 0
    text = doc.read_text()
    for section in ("## 1. How long a stage trains", "## 2. Recursion against one long distillation",
                    "## 3. The face-KD table", "## 4. Why P x K batches hurt", "## 5. What it cost"):
        assert section in text
    assert re.search(r"\*\*Budget: E = \d+ epochs per stage\*\*", text)
    for row in TABLE_ROWS:  # every row, 2 seeds, IJB TAR@1e-4 measured
        assert re.search(rf"^\| {re.escape(row)} \| [\d.]+ ± [\d.]+ \| .* \| [\d.]+ ± [\d.]+ \|", text, re.M), row
    assert "| 90.48 |" in text  # EKD's published row beside ours
    for arm in ("generation 3 (from generation 2)", "one schedule", "born-again generation 2 (teacher: generation 1)"):
        assert arm in text
    assert "**Answer:**" in text and "**In plain words.**" in text
    assert "- The remedy, half of each batch shuffled single images (data.grouped_fraction 0.5" in text
    for plot in ("curve", "recursion", "table"):
        assert (tmp / "docs" / f"results_{plot}.png").stat().st_size > 1000
    recal = json.loads((tmp / "runs" / "pk" / "recalibration.json").read_text())
    assert sorted(recal) == ["pk-pk4-seed=0", "pk-pk4-seed=1", "pk-pk4-seed=2"]  # the P×K diagnosis's own seeds
    assert "Seeds 0, 1 (the P×K diagnosis: 0, 1, 2)" in text
    assert re.search(r"Scratch students, E = \d+ epochs, 3 seeds \(experiments/studies/pk_batches.yaml\)", text)
    assert "**Diagnosis** (each candidate cause, and the comparison that isolates it): supported beyond seed" in text
    assert set(recal["pk-pk4-seed=0"]) == {"as trained", "re-estimated on shuffled batches",
                                           "re-estimated on P×K batches"}
    timing = json.loads((tmp / "runs" / "study" / "timing-all.json").read_text())
    assert {"teacher", "budget curve", "face-KD table", "generations", "one schedule of 3E",
            "P×K diagnosis"} <= set(timing)
    assert ("best loss: generations" in timing) == (timing["best_loss"] != "equivalent_angular")
    # the born-again arm's generation 2 learnt from generation 1's student, the chain's from the teacher
    run = tmp / "runs" / "recursive"
    assert (run / "recursive-equivalent_angular-bornagain-seed=0" / "gen1" / "as_teacher_cache").is_dir()
    assert not (run / "recursive-equivalent_angular-chain-seed=0" / "gen1" / "as_teacher_cache").exists()
    # the table's best row was recursed too, and its long controls ran
    best = timing["best_loss"]  # (the paper's loss itself when it wins: its arms are stream 2's)
    assert (run / f"recursive-{best}-chain-seed=1" / "gen3" / "result.json").exists()
    assert (tmp / "runs" / "long-x3" / f"long-{best}-seed=1" / "gen1" / "result.json").exists()
    # a stage two study files train alike is trained once and linked into the other (SAME_STAGES)
    same = [(tmp / "runs" / "curve" / f"curve-scratch-e{_budget(text)}-seed=0" / "baseline",
             tmp / "runs" / "face_kd_table" / "face_kd_table-scratch-seed=0" / "baseline"),
            (tmp / "runs" / "face_kd_table" / "face_kd_table-equivalent_angular-seed=1" / "gen1",
             run / "recursive-equivalent_angular-chain-seed=1" / "gen1"),
            (run / "recursive-equivalent_angular-chain-seed=0" / "gen1",
             run / "recursive-equivalent_angular-bornagain-seed=0" / "gen1"),
            (tmp / "runs" / "face_kd_table" / "face_kd_table-scratch-pk4-seed=1" / "baseline",
             tmp / "runs" / "pk" / "pk-pk4-seed=1" / "baseline")]
    for first, second in same:
        assert (first / "student.pt").stat().st_ino == (second / "student.pt").stat().st_ino, second
    assert (run / f"recursive-{best}-chain-seed=0" / "gen1" / "student.pt").stat().st_ino == (
        tmp / "runs" / "face_kd_table" / f"face_kd_table-{best}-seed=0" / "gen1" / "student.pt").stat().st_ino
    # every student trains with one thread in channels-last; IJB-C is evaluated for the table alone
    import yaml
    for point in (run / "recursive-equivalent_angular-chain-seed=0", tmp / "runs" / "pk" / "pk-pk4-seed=1",
                  tmp / "runs" / "face_kd_table" / "face_kd_table-kd-seed=0"):
        cfg = yaml.safe_load((point / "experiment.yaml").read_text())
        assert (cfg["train"]["threads"], cfg["train"]["channels_last"]) == (1, True), point
        assert (cfg["data"]["ijb"] is not None) == ("face_kd_table" in point.name), point


def _budget(text: str) -> int:
    return int(re.search(r"\*\*Budget: E = (\d+) epochs per stage\*\*", text)[1])


def test_a_stage_with_other_settings_is_not_linked_in(miniature, tmp_path):
    from distill.run.sweep import point_config

    tmp, _, _ = miniature
    logged = []
    study = _module("study").Study(str(tmp / "runs"), str(tmp / "tiny.yaml"), [0, 1],
                                   ["train.max_steps=1", "train.threads=1"], 6, log=logged.append)
    grid = study.grid("recursive_kd", study.at(1) + ["train.lr=0.05"])  # the miniature's settings but one
    point = next(p for p in expand(grid) if p.name.endswith("bornagain-seed=0"))
    study.same_stage(point, point_config(grid, point), str(tmp_path / "recursive" / point.name))
    assert not (tmp_path / "recursive" / point.name / "gen1").exists()
    assert logged and all("not taken from" in line and "differs in train.lr" in line for line in logged), logged
    # the miniature's own settings: linked
    grid = study.grid("recursive_kd", study.at(1))
    point = next(p for p in expand(grid) if p.name.endswith("bornagain-seed=0"))
    study.same_stage(point, point_config(grid, point), str(tmp_path / "recursive" / point.name))
    assert (tmp_path / "recursive" / point.name / "gen1" / "result.json").is_file()


def test_the_curve_halves_are_the_whole_curve_once():
    study = _module("study")
    halves = [c for half in study.CURVE_HALVES.values() for c in half]
    assert sorted(halves) == sorted(c["name"] for c in load_grid(str(STUDIES / "budget_curve.yaml")).grid[CASE])
    assert len(set(halves)) == len(halves)


def test_the_report_refuses_a_study_with_a_seed_or_an_arm_missing(miniature, tmp_path, capsys):
    import shutil

    tmp, _, _ = miniature
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs", runs)
    report = _module("report")
    (runs / "long-x2" / "long-scratch-seed=1" / "baseline" / "result.json").unlink()
    assert report.main([str(runs), "--out", str(tmp_path / "r.md"), "--no-plot"]) == 2
    assert "the study is incomplete (long-x2/scratch baseline: seed 1)" in capsys.readouterr().err
    shutil.copytree(tmp / "runs" / "long-x2", runs / "long-x2", dirs_exist_ok=True)  # the seed back
    shutil.rmtree(runs / "pk" / "pk-pk2-seed=2")  # a seed only the P×K diagnosis runs
    assert report.main([str(runs), "--out", str(tmp_path / "r.md"), "--no-plot"]) == 2
    assert "the study is incomplete (pk/pk2 baseline: seed 2)" in capsys.readouterr().err
    shutil.copytree(tmp / "runs" / "pk" / "pk-pk2-seed=2", runs / "pk" / "pk-pk2-seed=2")
    shutil.rmtree(runs / "pk" / "pk-pk8-seed=0")
    shutil.rmtree(runs / "pk" / "pk-pk8-seed=1")
    shutil.rmtree(runs / "pk" / "pk-pk8-seed=2")
    assert report.main([str(runs), "--out", str(tmp_path / "r.md"), "--no-plot"]) == 2
    assert "pk/pk8: no finished stage" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_the_budget_is_where_more_epochs_stop_helping_beyond_seed_noise():
    numbers = _module("study_numbers")

    def curve(points):
        return {f"scratch-e{e}": {"baseline": {"acc": dict(enumerate(accs)), "tar": {}, "ijb": {}, "seconds": {}}}
                for e, accs in points.items()}

    rising = curve({2: [60, 61, 62], 4: [70, 71, 72], 8: [80, 81, 79], 16: [80.5, 81.5, 80]})
    assert numbers.budget(rising)["epochs"] == 8  # 8 -> 16 is within noise
    assert numbers.budget(curve({2: [60, 61, 62], 4: [70, 71, 72]}))["epochs"] == 4  # still rising: the largest
    assert "largest budget" in numbers.budget(curve({2: [60, 61, 62], 4: [70, 71, 72]}))["why"]
    assert numbers.budget(curve({2: [60, 70, 50], 4: [70, 71, 72]}))["epochs"] == 2  # noise hides the gain
    # an early step within noise does not stop the search when a later budget is clearly better
    assert numbers.budget(curve({2: [55, 62, 58], 4: [58, 70, 65], 8: [80, 84, 83]}))["epochs"] == 8


def test_the_report_writes_the_readme_summary_between_its_markers_and_nothing_else(miniature, tmp_path, capsys):
    tmp, doc, _ = miniature
    report, summary = _module("report"), _module("readme_summary")
    readme = tmp_path / "README.md"
    readme.write_text(f"# above\n\nkept\n\n{summary.BEGIN}\nold digits 12.34\n{summary.END}\n\n## below\n")
    out = tmp_path / "r.md"
    assert report.main([str(tmp / "runs"), "--out", str(out), "--no-plot", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# above\n\nkept\n\n" + summary.BEGIN + "\n")
    assert text.endswith(summary.END + "\n\n## below\n")
    assert "old digits 12.34" not in text
    block = text[text.index(summary.BEGIN):text.index(summary.END)]
    results = out.read_text()
    e = _budget(results)
    assert f"trains E = {e} epochs" in block
    # the conclusions are results.md's own lines, the recursion table has a row per generation, the table every
    # distillation row
    plain = results[results.index("**In plain words.**"):results.index("## 1.")].strip().splitlines()[2:]
    assert plain and all(line in block for line in plain)
    for g in (1, 2, 3):
        assert re.search(rf"^  \| {g * e} \({g}E\) \| [\d.]+ ± [\d.]+ \|", block, re.M)
    for row in TABLE_ROWS:
        if not row.startswith(("scratch", "ekd")) and not row.endswith("-pre38"):  # a -pre38 row: results.md only
            assert f"; {row} " in block or f": {row} " in block, row
    assert "minutes of wall time" in block or "not measured" in block
    # a README without the markers is refused before anything is written
    readme.write_text("# no markers\n")
    out2 = tmp_path / "r2.md"
    assert report.main([str(tmp / "runs"), "--out", str(out2), "--no-plot", "--readme", str(readme)]) == 2
    assert "the study summary's BEGIN marker is missing" in capsys.readouterr().err
    assert not out2.exists() and readme.read_text() == "# no markers\n"


def test_the_cost_section_says_not_measured_without_timing_files():
    report = _module("report")
    assert report.time_section({})[2].startswith("Not measured in this run: no timing-<stream>.json")
    measured = report.time_section({"prepare": {"teacher": 60.0}, "wall": 120.0})
    assert "**2.0 minutes of wall time**" in measured[2] and "| prepare | teacher | 1.0 |" in measured


def test_the_numbers_skip_a_point_another_process_is_still_creating(miniature, tmp_path):
    """Two study processes run side by side: one reads a sweep's folder while the other has made a point's folder
    but not yet its experiment.yaml (the curve's halves crashed on exactly that)."""
    import shutil

    tmp, _, _ = miniature
    numbers = _module("study_numbers")
    shutil.copytree(tmp / "runs" / "curve", tmp_path / "curve")
    whole = numbers.collect(str(tmp_path / "curve"))
    (tmp_path / "curve" / "curve-scratch-e99-seed=0").mkdir()
    assert numbers.collect(str(tmp_path / "curve")) == whole and "scratch-e2" in whole
    (tmp_path / "empty" / "curve-scratch-e2-seed=0").mkdir(parents=True)
    assert numbers.collect(str(tmp_path / "empty")) == {}


def _cells(**arms):
    return {name: {"baseline": {"acc": dict(enumerate(accs)), "tar": {}, "ijb": {}, "seconds": {}}}
            for name, accs in arms.items()}


def test_the_pk_diagnosis_names_the_causes_its_comparisons_support():
    report, numbers = _module("report"), _module("study_numbers")
    shuffled = {0: 83.0, 1: 83.5, 2: 82.5}
    pk = _cells(pk2=[81, 81.5, 80.5], pk4=[76, 76.5, 75.5], pk8=[69, 70, 68], pk4_acc2=[72, 72.5, 71.5],
                pk4_b128=[78, 78.5, 77.5], shuffled_acc2=[82, 84, 83], shuffled_b128=[81, 85, 83],
                pk4_mix50=[80, 80, 81])
    pk = {k.replace("_", "-"): v for k, v in pk.items()}
    recal = {f"pk-pk4-seed={i}": {"as trained": {"v": a / 100}, "re-estimated on shuffled batches": {"v": b / 100},
                                  "re-estimated on P×K batches": {"v": a / 100}}
             for i, (a, b) in enumerate([(76, 76.1), (76.5, 76.3), (75.5, 75.6)])}
    found, against, unshown = numbers.pk_causes(pk, shuffled, recal)
    short = lambda items: [cause.split(" (")[0] for cause, _ in items]  # noqa: E731 - the causes' short names, one line
    assert short(found) == ["how many images of one identity a batch of 64 holds",
                            "BatchNorm's training statistics over a batch of few identities"]
    assert short(against) == ["too few identities per update for the margin head"]
    assert short(unshown) == ["the schedule of two accumulated micro-batches alone",
                              "the schedule of batches of 128 alone", "the running statistics evaluation uses"]
    # the paired check: the same students, so a consistent small shift is beyond noise where unpaired would not be
    assert numbers.paired([76.5, 77.0, 76.0], [76.0, 76.5, 75.5])[2] == "beyond seed noise"
    words = report._causes_in_words(pk, shuffled, recal)
    assert words.startswith("of the causes section 4 isolates, shown beyond seed noise: how many images")
    assert "against it beyond noise: too few identities per update" in words
