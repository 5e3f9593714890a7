"""Run directories written by an earlier version (commit c38a1d9) and interrupted mid-stage resume with this code
to the weights and metrics that version reached, bit for bit (tests/fixtures/old_runs; its README says how they
were made and how expected.json was computed). A term whose loss's defaults changed since keeps the options that
version computed with (distill.compat.LEGACY_LOSS_DEFAULTS) and the resume says so, once per term."""

import hashlib
import json
import shutil

import pytest
import torch
import yaml
from conftest import REPO
from forked_ranks import cli_in_fork

from distill.compat import LEGACY_LOSS_DEFAULTS
from distill.losses.registry import loss_options

OLD_RUNS = REPO / "tests" / "fixtures" / "old_runs"
EXPECTED = json.loads((OLD_RUNS / "expected.json").read_text())
# run -> (its finished stages in the fixture, the stage stopped right after its last.pt at step 2 of 4)
STOPPED = {"short_form": (("teacher", "baseline"), "gen1"),  # distill: {loss: equivalent_angular, alpha: 7}, cached
           "terms": (("teacher",), "gen1")}  # distill.terms: equivalent_angular + fitnet + ekd, online teacher


def weights(student_pt) -> dict:
    """As make.py computes it: one digest over each tensor's 'dtype shape sha256' lines, sorted (key names and
    order do not count: a renamed state-dict key keeps it, a changed value does not)."""
    state = torch.load(student_pt, map_location="cpu", weights_only=True)["state_dict"]
    lines = sorted(f"{t.dtype} {list(t.shape)} {hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()}"
                   for t in state.values())
    return {"tensors": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def outcome(run_dir) -> dict:
    stages = {}
    for stage in sorted(p for p in run_dir.iterdir() if (p / "result.json").exists()):
        res = json.loads((stage / "result.json").read_text())
        student = stage / "student.pt"
        stages[stage.name] = {"metrics": res["metrics"], "best": res.get("best"), "steps": res.get("steps"),
                              "weights": weights(student) if student.exists() else None}
    return stages


def old_defaults_kept(run) -> list:
    """The note each term of `run` should resume with: the options whose default changed since the old code
    (distill.compat.LEGACY_LOSS_DEFAULTS), which it keeps, as that code computed them."""
    distill = yaml.safe_load((OLD_RUNS / f"{run}.yaml").read_text())["distill"]
    notes = []
    for term in distill.get("terms") or [{"loss": distill["loss"]}]:
        now = {k: list(v) if isinstance(v, tuple) else v for k, v in loss_options(term["loss"]).items()}
        kept = {k: v for k, v in LEGACY_LOSS_DEFAULTS.get(term["loss"], {}).items()
                if k in now and k not in term and v != now[k]}
        if kept:
            notes.append(f"{STOPPED[run][1]}: note: term {term['loss']} resumes with the options it started with, "
                         + ", ".join(f"{k} {json.dumps(v) if not isinstance(v, str) else v}" for k, v in kept.items()))
    return notes


def _steps(metrics_jsonl) -> list:
    return [json.loads(line)["step"] for line in metrics_jsonl.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("run", sorted(STOPPED))
def test_an_old_interrupted_run_directory_resumes_bit_identically(run, tmp_path):
    if (EXPECTED["cpu"], EXPECTED["torch"]) != (torch.backends.cpu.get_cpu_capability(), torch.__version__):
        pytest.skip(f"expected.json holds the digits of a {EXPECTED['cpu']} CPU with torch {EXPECTED['torch']}; "
                    f"this is {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, which trains to "
                    f"other digits (tests/fixtures/old_runs/README.md says how to remake them)")
    copy = tmp_path / "old_runs"
    shutil.copytree(OLD_RUNS, copy)  # `terms` loads its teacher from short_form/teacher/backbone.pth
    run_dir = copy / run
    finished, stopped = STOPPED[run]
    trained = lambda: {f.relative_to(run_dir).as_posix(): f.read_bytes()  # noqa: E731 - read twice, before and after
                       for name in finished for f in sorted((run_dir / name).glob("*.pt*"))}
    before = trained()
    assert (run_dir / stopped / "last.pt").exists() and not (run_dir / stopped / "result.json").exists()
    steps_before = _steps(run_dir / stopped / "metrics.jsonl")
    assert max(steps_before) == 2

    # `distill run` as a new process would run it (tests/forked_ranks.py: a fork, without the imports)
    code, printed = cli_in_fork(["run", f"{run}.yaml", "--out", run, "--no-progress"], copy, tmp_path / "run.log")
    assert code == 0, printed[-4000:]
    # the stopped stage's terms resumed under the loss options the old code computed with, and said so
    assert [line.split(" (")[0] for line in printed.splitlines() if ": note: term " in line] == old_defaults_kept(run)

    # the finished stages were not trained again, the stopped one went on from its step 2 (an exact resume and
    # a restart from scratch reach the same digits: the metrics log tells them apart)
    assert trained() == before
    log = (run_dir / stopped / "metrics.jsonl").read_text()
    assert log.startswith((OLD_RUNS / run / stopped / "metrics.jsonl").read_text())
    assert all(step > 2 for step in _steps(run_dir / stopped / "metrics.jsonl")[len(steps_before):])
    got, expected = outcome(run_dir), EXPECTED["runs"][run]
    assert sorted(got) == sorted(expected)
    for stage in expected:
        assert got[stage]["weights"] == expected[stage]["weights"], f"{run}/{stage}: other weights"
        assert got[stage] == expected[stage], f"{run}/{stage}: other metrics"
