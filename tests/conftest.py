"""Shared test setup: fixture paths, one thread per process, W&B never online and in a temporary directory."""

import os
from pathlib import Path

import pytest

# one thread in this process and in every process a test starts (a `distill` subprocess, torchrun ranks, loader
# workers): the suite runs on 2 cores beside itself (pytest-xdist) and more threads than cores is 10x slower
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
import torch

REPO = Path(__file__).resolve().parents[1]
# The committed copy of the tool-written fixtures (tests/fixtures/README.md), so a fresh clone tests itself;
# FACEDISTILL_FIXTURES=/path reads another copy (e.g. the source of truth) instead
FIXTURES = Path(os.environ.get("FACEDISTILL_FIXTURES", REPO / "tests" / "fixtures"))

torch.set_num_threads(1)
# W&B never goes online in tests, in this process and the ones it starts: no credentials reach them, so an
# experiment's `tracking.wandb: auto` resolves to offline (distill.train.tracking.has_wandb_credentials). WANDB_MODE
# is not set: it would override every experiment's own setting, and an experiment that says `disabled` (most tiny
# runs) would still run W&B offline, seconds of CPU a stage; one that says `offline` (tiny_experiment's default)
# runs it offline. A test about the variable sets it itself.
UNSET = ("WANDB_API_KEY", "WANDB_MODE")
for _name in UNSET:
    os.environ.pop(_name, None)
os.environ["NETRC"] = os.devnull  # no netrc entry for the W&B host either
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def fixtures() -> Path:
    if "FACEDISTILL_FIXTURES" in os.environ:
        how = "FACEDISTILL_FIXTURES points there; unset it to use the committed tests/fixtures"
    else:
        how = "restore the committed copy with `git checkout -- tests/fixtures` (see tests/fixtures/README.md)"
    assert FIXTURES.is_dir(), f"test fixtures not found at {FIXTURES}: {how}"
    return FIXTURES


@pytest.fixture(autouse=True)
def _wandb_in_tmp(tmp_path, monkeypatch):
    """W&B never goes online in tests (no credentials, above) and writes only under the test's temporary directory."""
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", os.devnull)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / ".wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".wandb_config"))


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder `build(folder)` fills once for the whole session, pytest-xdist workers included: the first
    worker builds it under an exclusive lock (the others wait, then reuse it). Read-only for the tests."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' base temporary folders sit side by side in this one
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if folder.exists():  # an earlier builder failed half-way
                import shutil
                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_finished_run(tmp_path_factory):
    """(experiment file, finished run directory, data directory) of the tiny experiment with one generation
    (teacher, baseline, gen1; about 10 s), built once per session (built_once). Tests that change it work on a
    copy."""

    def build(tmp):
        from tiny_experiment import write_experiment

        from distill.config.schema import load_config
        from distill.run.context import silent_logger
        from distill.run.experiment import run_experiment

        exp = write_experiment(tmp / "x.yaml", tmp / "faces", generations=1, tracking={"wandb": "disabled"})
        run_experiment(load_config(str(exp)), str(tmp / "run"), progress=False, logger=silent_logger())

    tmp = built_once(tmp_path_factory, "finished", build)
    return tmp / "x.yaml", tmp / "run", tmp / "faces"


# The modules that take longest on one worker, longest first: seconds for the file alone on this project's 2-core CPU
# (its tests, without the interpreter's start): study 42, teacher_identity 23 (the session's tiny finished run
# included), recursive 22, engine 21, synthetic_r100 20, shared_teacher 20, gpu_check 17, onnx 17, user_mistakes 15,
# teacher_cache 15, bad_inputs 15, imports 14, registry 14, compare_sweep 14, distributed 12, gpu_path 12, old_runs 12,
# self_contained 11 (study, recursive, synthetic_r100, gpu_check, imports and self_contained measured again after
# their speed-ups of issue 38); every other module takes under 12 s and follows in file-name order. Started first,
# they run while the other worker shares the rest, and the short modules even out the two workers at the end.
LONGEST_FIRST = ("test_study.py", "test_teacher_identity.py", "test_recursive.py", "test_engine.py",
                 "test_synthetic_r100.py", "test_shared_teacher.py", "test_gpu_check.py", "test_onnx.py",
                 "test_user_mistakes.py", "test_teacher_cache.py", "test_bad_inputs.py", "test_imports.py",
                 "test_registry.py", "test_compare_sweep.py", "test_distributed.py", "test_gpu_path.py",
                 "test_old_runs.py", "test_self_contained.py")


def pytest_configure(config):
    """pytest-xdist's loadscope hands modules out in the collection's order (below) only without its
    --loadscope-reorder, which is on by default and orders them by their number of tests instead: that started the
    study (9 tests) in the middle and left the 20-second modules of two tests or one to the very end."""
    if getattr(config.option, "dist", "no") == "loadscope" and hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """The longest modules first (LONGEST_FIRST), the others after them in file-name order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0].rsplit("/", 1)[-1], len(rank)))
