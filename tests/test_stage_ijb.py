"""`data.ijb` in an experiment: every finished stage evaluated on IJB after training; result, W&B, summary, compare."""

import json
import shutil

import pytest

from distill.cli import main
from distill.data.synth_ijb import write_synthetic_ijb


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    write_synthetic_ijb(root, templates=12, seed=0)
    return root


def test_a_finished_run_is_evaluated_on_ijb_once_and_shows_it(tiny_finished_run, ijb_root, tmp_path, capsys):
    exp, run, _ = tiny_finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ijb = [f"data.ijb.root={ijb_root}", "data.ijb.target=IJBC"]
    # data.ijb may be added to a finished run: its stages are evaluated, nothing is retrained
    assert main(["run", str(exp), "--out", str(copy), "--no-progress"] + ijb) == 0
    out = capsys.readouterr().out
    for stage in ("teacher", "baseline", "gen1"):
        assert f"{stage}: finished earlier" in out or stage == "teacher"
        assert f"{stage}: IJBC template verification (" in out
        result = json.loads((copy / stage / "result.json").read_text())
        ijb_result = result["ijb"]
        assert ijb_result["target"] == "IJBC" and ijb_result["root"] == str(ijb_root)
        assert ijb_result["protocol"] == "N1 D1 F2"
        assert set(ijb_result["tar_at_far"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"}
        assert 0.0 <= ijb_result["auc"] <= 1.0 and ijb_result["pairs"] == 66
        logged = [json.loads(line) for line in (copy / stage / "metrics.jsonl").read_text().splitlines()]
        assert logged[-1]["ijb/IJBC/tar_at_far_1e-4"] == ijb_result["tar_at_far"]["1e-4"]
        assert logged[-1]["ijb/IJBC/auc"] == ijb_result["auc"]
    summary = (copy / "summary.md").read_text()
    assert "| IJBC TAR@1e-4 (%) | IJBC TAR@1e-5 (%) |" in summary
    gen1 = json.loads((copy / "gen1" / "result.json").read_text())["ijb"]
    assert f"| {100 * gen1['tar_at_far']['1e-4']:.2f} | {100 * gen1['tar_at_far']['1e-5']:.2f} |" in \
        next(line for line in summary.splitlines() if line.startswith("| gen1 "))

    # a rerun does not evaluate again; compare shows the columns
    assert main(["run", str(exp), "--out", str(copy), "--no-progress"] + ijb) == 0
    assert "template verification" not in capsys.readouterr().out
    assert main(["compare", str(copy)]) == 0
    assert "IJBC TAR@1e-4 (%)" in capsys.readouterr().out


def test_a_wrong_ijb_root_stops_the_run_before_any_work(tiny_finished_run, tmp_path, capsys):
    exp, _, _ = tiny_finished_run
    assert main(["run", str(exp), "--out", str(tmp_path / "new"), f"data.ijb.root={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'}: IJB folder not found" in err and "Traceback" not in err
    assert not (tmp_path / "new" / "teacher").exists()
    assert main(["run", str(exp), "--dry-run", "data.ijb.root=x", "data.ijb.target=IJBA"]) == 2
    assert "key 'data.ijb.target' must be one of IJBC, IJBB, got 'IJBA'" in capsys.readouterr().err


OLD_TARS = {"1e-06": 0.11, "1e-05": 0.22, "0.0001": 0.33, "0.001": 0.44, "0.01": 0.55, "0.1": 0.66}  # str(far) keys


def test_a_run_directory_of_an_earlier_version_still_summarises_compares_and_resumes(tiny_finished_run, ijb_root,
                                                                                      tmp_path, capsys):
    """IJB results written before distill.eval.far (keys '0.0001', '1e-05': eval_ijbc.py's column names) are read
    as today's '1e-4', '1e-5': by `distill compare` from summary.json and from result.json, and by a rerun."""
    exp, run, _ = tiny_finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    old_ijb = {"root": str(ijb_root), "target": "IJBC", "protocol": "N1 D1 F2", "tar_at_far": OLD_TARS, "auc": 0.9,
               "images": 1, "templates": 12, "pairs": 66}
    for stage in ("teacher", "baseline", "gen1"):
        path = copy / stage / "result.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "ijb": old_ijb}))
    summary = json.loads((copy / "summary.json").read_text())
    for s in summary["stages"]:
        s["ijb"] = {"target": "IJBC", "tar_at_far": OLD_TARS, "auc": 0.9}
    (copy / "summary.json").write_text(json.dumps(summary))

    def gen1_row(text):
        return next(line for line in text.splitlines() if "| gen1 |" in line)

    assert main(["compare", str(copy)]) == 0  # from the old summary.json
    out = capsys.readouterr().out
    assert "| IJBC TAR@1e-4 (%) | IJBC TAR@1e-5 (%) |" in out and "| 33.00 | 22.00 |" in gen1_row(out)
    assert main(["compare", str(copy), "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["runs"][0]["stages"]
    assert all(s["ijb"]["tar_at_far"] == {"1e-6": 0.11, "1e-5": 0.22, "1e-4": 0.33, "1e-3": 0.44, "1e-2": 0.55,
                                          "1e-1": 0.66} for s in stages)
    (copy / "summary.json").unlink()
    assert main(["compare", str(copy)]) == 0  # from the old result.json files
    assert "| 33.00 | 22.00 |" in gen1_row(capsys.readouterr().out)

    # a rerun with data.ijb: nothing is retrained or evaluated again; the summary reads the old keys
    ijb = [f"data.ijb.root={ijb_root}", "data.ijb.target=IJBC"]
    assert main(["run", str(exp), "--out", str(copy), "--no-progress"] + ijb) == 0
    out = capsys.readouterr().out
    assert "template verification" not in out and "gen1: finished earlier" in out
    assert "| 33.00 | 22.00 |" in gen1_row((copy / "summary.md").read_text())
    written = json.loads((copy / "summary.json").read_text())["stages"]
    assert all(set(s["ijb"]["tar_at_far"]) == {"1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"} for s in written)
