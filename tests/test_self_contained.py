"""The checkout tests itself: committed fixtures match their checksums, no test reaches outside the repository,
and a copy of the checkout with nothing beside it passes every test that reads the fixtures."""

import ast
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

from conftest import REPO

FIXTURE_DIR = REPO / "tests" / "fixtures"
NOT_LISTED = {"README.md", "SHA256SUMS"}  # describe the fixtures (in any folder), are not fixtures
LAYOUT = {"insightface_rec", "insightface_rec/im2rec", "verification_bin", "verification_protocol"}
OLD_RUNS = "old_runs"  # run directories of this project's own earlier version (test_old_runs.py), not the tools'

# Every test that reads tests/fixtures: whole files, or single tests where the file mostly does not.
FIXTURE_TESTS = [
    "tests/test_recordio.py",
    "tests/test_verification_bin.py",
    "tests/test_evaluate.py::test_reproduces_insightface_numbers_on_fixture",
    "tests/test_evaluate.py::test_distill_eval_table_and_json_agree",
    "tests/test_evaluate.py::test_distill_eval_asks_for_input_size_when_unknown",
    "tests/test_evaluate.py::test_distill_eval_refuses_two_sets_with_one_name",
    "tests/test_evaluate.py::test_distill_eval_refuses_a_malicious_bin_without_running_it",
    "tests/test_folders.py::test_open_training_set_picks_the_reader",
    "tests/test_gpu_decode.py",
    "tests/test_gpu_path.py::test_gpu_decode_path_trains_the_student_the_cpu_path_trains",
    "tests/test_gpu_path.py::test_gpu_decode_on_a_cpu_run_is_a_config_error_before_training",
    "tests/test_gpu_path.py::test_a_broken_image_under_gpu_decode_names_its_record",
]

# References to files beside the checkout. Each pattern is spelled so that it does not match its own source
# (a character class in the middle), so this file scans itself like every other.
OUTSIDE = {
    "up and into the shared folder": re.compile(r"\.\./sh[a]red\b"),
    "a path part named shared": re.compile(r"[\"']sh[a]red[\"']"),
    "the folder above the repository": re.compile(r"\bREPO\s*\.\s*par[e]nt\b|\.par[e]nts\[[2-9]\]"),
    "an absolute path under the work folder": re.compile(r"(?<![\w.])/wor[k]\b"),
}

# When the checkout is not a git clone (CI's copy of it): everything but environments and outputs.
NOT_COPIED_TOP = {".git", ".venv", "runs", "data", "wandb", "build", "dist"}
NOT_COPIED_ANYWHERE = {"__pycache__", ".pytest_cache"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listed() -> dict:
    """SHA256SUMS as {relative path: digest}, in `sha256sum` format (`*` marks binary mode)."""
    sums = {}
    for line in (FIXTURE_DIR / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.removeprefix("*")] = digest
    return sums


def test_every_fixture_is_listed_in_sha256sums_and_matches_it():
    sums = _listed()
    on_disk = {p.relative_to(FIXTURE_DIR).as_posix() for p in FIXTURE_DIR.rglob("*")
               if p.is_file() and p.name not in NOT_LISTED}
    assert sorted(on_disk - set(sums)) == [], "fixture files missing from tests/fixtures/SHA256SUMS"
    assert sorted(set(sums) - on_disk) == [], "files listed in tests/fixtures/SHA256SUMS are missing"
    folders = {name.rsplit("/", 1)[0] for name in sums}
    assert {f for f in folders if f.split("/")[0] != OLD_RUNS} == LAYOUT and OLD_RUNS in folders
    changed = sorted(name for name, digest in sums.items() if _sha256(FIXTURE_DIR / name) != digest)
    assert changed == [], "fixtures differ from SHA256SUMS (see tests/fixtures/README.md to refresh)"
    assert (FIXTURE_DIR / "README.md").is_file()


def _code_lines(source: str):
    """(line number, text) of `source` with comments removed; strings stay, paths live in them."""
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return enumerate(lines, 1)


def _outside_references(source: str) -> list:
    return [(n, what) for n, line in _code_lines(source) for what, pattern in OUTSIDE.items()
            if pattern.search(line)]


def test_the_scan_finds_each_outside_reference_in_code_and_ignores_comments():
    up, part = "..", "sh" + "ared"
    bad = {  # one line per kind, in OUTSIDE's order
        f'a = "{up}/{part}/fixtures"': "up and into the shared folder",
        f'b = REPO / "tests" / "{part}"': "a path part named shared",
        f"c = REPO.{'parent'} / 'x'": "the folder above the repository",
        f'e = Path("{"/wo" + "rk"}/x/fixtures")': "an absolute path under the work folder",
    }
    assert set(bad.values()) == set(OUTSIDE)
    assert _outside_references("\n".join(bad)) == list(enumerate(bad.values(), 1))
    assert [what for _, what in _outside_references(f'd = Path(__file__).{"parents"}[2]')] == [
        "the folder above the repository"]
    assert _outside_references("\n".join(f"x = 1  # {line}" for line in bad)) == []
    assert _outside_references('f = tmp_path / "work" / "runs/work"\nd = p.parents[1]') == []


def test_no_test_refers_to_files_outside_the_repository():
    found = [f"{path.name}:{n}: {what}" for path in sorted((REPO / "tests").glob("*.py"))
             for n, what in _outside_references(path.read_text())]
    assert found == []


def test_every_test_that_reads_the_fixtures_runs_in_the_copy_below():
    """A test taking `fixtures` must be in FIXTURE_TESTS (a helper fixture taking it: its whole file)."""
    missing = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        file_id = f"tests/{path.name}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "fixtures" in {
                    a.arg for a in node.args.args + node.args.kwonlyargs}:
                needed = f"{file_id}::{node.name}" if node.name.startswith("test_") else file_id
                if file_id not in FIXTURE_TESTS and needed not in FIXTURE_TESTS:
                    missing.append(needed)
    assert missing == []


def _checkout_files() -> list:
    """What a clone holds: tracked files plus untracked ones git does not ignore, as relative paths."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode()
        names = [name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for root, dirs, files in os.walk(REPO):
            rel = Path(root).relative_to(REPO)
            dirs[:] = [d for d in dirs if d not in NOT_COPIED_ANYWHERE and not d.endswith(".egg-info")
                       and not (rel == Path(".") and d in NOT_COPIED_TOP)]
            names += [(rel / f).as_posix() for f in files if not f.endswith(".pyc")]
    return [name for name in names if (REPO / name).is_file()]  # a tracked file deleted in the work tree is gone


def test_a_copy_of_the_checkout_with_nothing_beside_it_passes_the_fixture_tests(tmp_path):
    copy = tmp_path / "checkout"
    for name in _checkout_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, copy / name)
    assert (copy / "tests" / "fixtures" / "SHA256SUMS").is_file() and not (copy / ".venv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout"]  # nothing beside the copy

    env = {k: v for k, v in os.environ.items() if k not in ("FACEDISTILL_FIXTURES", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(copy)
    where = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('distill').origin)"],
                           cwd=copy, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(copy), f"the copy imports distill from {where}"

    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FIXTURE_TESTS],
                         cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert run.returncode == 0, output[-4000:]
    assert re.search(r"\b[1-9]\d* passed\b", summary), output[-4000:]
    assert not re.search(r"failed|error|skipped|deselected|xfail|xpass|no tests ran", summary), output[-4000:]
