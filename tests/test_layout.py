"""One owner for the run directory (layout), one atomic writer (atomic), one home for ranks (dist)."""

import ast
import errno
import os
from pathlib import Path

import pytest
import torch
import yaml

from distill.config.schema import load_config
from distill.utils import dist
from distill.utils.atomic import WriteError, atomic_open, atomic_write_json, atomic_write_text
from distill.utils.checkpoint import atomic_torch_save
from distill.utils.errors import CheckpointError
from distill.utils.layout import RunLayout, StageLayout, is_run_dir, stage_order

REPO = Path(__file__).resolve().parents[1]
RUN_FILE_NAMES = ("result.json", "student.pt", "last.pt", "best.pt", "metrics.jsonl", "experiment.yaml",
                  "summary.json", "summary.md", "teacher_cache", "backbone.pth", "wandb_run_id.txt",
                  "wandb_group.txt", "wandb_artifact.txt", "comparison.md", "comparison.json",
                  "as_teacher_cache", "embeddings.f16", "manifest.json")  # the last two: CacheLayout's


def _string_constants(path: Path) -> list:
    """(line, text) of every string literal in a module, docstrings excluded."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_only_layout_spells_the_file_names_of_a_run():
    offenders = []
    for path in sorted([*(REPO / "distill").rglob("*.py"), *(REPO / "teachers").rglob("*.py")]):
        if path.name == "layout.py":
            continue
        for line, text in _string_constants(path):
            # a path component (a whole literal, or the end of one: f"{d}/last.pt"); prose may name the files
            offenders += [f"{path.relative_to(REPO)}:{line}: {text!r}" for name in RUN_FILE_NAMES
                          if text == name or text.endswith("/" + name)]
    assert not offenders, "run file names spelled outside distill/utils/layout.py:\n" + "\n".join(offenders)


def test_a_cache_layout_names_its_files(tmp_path):
    from distill.utils.layout import CacheLayout

    cache = CacheLayout(str(tmp_path))
    assert (os.path.basename(cache.rows), os.path.basename(cache.manifest)) == ("embeddings.f16", "manifest.json")
    for name in ("progress.rank0.json", "progress.rank12.json", "progress.rankx.json", "other.json"):
        (tmp_path / name).write_text("{}")
    assert sorted(os.path.basename(p) for p in cache.progress_files()) == ["progress.rank0.json",
                                                                          "progress.rank12.json"]
    assert cache.progress(3) == str(tmp_path / "progress.rank3.json")


def test_layout_answers_the_questions_asked_of_a_run(tmp_path):
    run = RunLayout(str(tmp_path / "run"))
    assert not run.is_run_dir() and run.stage_names() == []
    for name in ("gen10", "gen2", "baseline", "teacher", "notes", "teacher_cache"):
        (tmp_path / "run" / name).mkdir(parents=True)
    Path(run.experiment).write_text("name: x\n")
    assert is_run_dir(run.root) and run.stage_names() == ["teacher", "baseline", "gen2", "gen10"]
    stage = run.generation(2)
    assert isinstance(stage, StageLayout) and stage.name == "gen2" and not stage.is_done()
    atomic_write_json(stage.result, {"stage": "gen2"})
    assert stage.is_done() and stage.read_result() == {"stage": "gen2"}
    assert sorted(["gen1", "other", "teacher", "gen9", "baseline"], key=stage_order) == \
        ["teacher", "baseline", "gen1", "gen9", "other"]
    assert [os.path.basename(p) for p in run.teacher.shared_teacher_files()] == list(StageLayout.SHARED_TEACHER_FILES)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, failure):
    path = tmp_path / "result.json"
    atomic_write_json(path, {"old": True})
    with pytest.raises(WriteError,
                       match=r"result.json: could not write .*the previous result.json is intact.*Free disk"):
        with atomic_open(path, "w") as f:
            f.write('{"new": tr')
            raise failure
    assert path.read_text().startswith('{\n "old": true') and not (tmp_path / "result.json.tmp").exists()


def test_torch_save_running_out_of_disk_is_a_checkpoint_error(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError, not an OSError: caught all the same."""
    path = tmp_path / "last.pt"
    atomic_torch_save({"step": 1}, path)

    def full(*_a, **_k):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"last.pt: could not write the checkpoint .*previous last.pt is intact"):
        atomic_torch_save({"step": 2}, path)
    assert not (tmp_path / "last.pt.tmp").exists()
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_a_read_only_folder_names_the_path(tmp_path, monkeypatch):
    """(Injected: the tests may run as root, which writes anywhere.)"""
    import builtins

    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(WriteError, match=f"{tmp_path / 'ro'}/x.txt: could not write x.txt \\(Permission denied\\); "
                                         f"no previous x.txt existed.*make the folder writable"):
        atomic_write_text(tmp_path / "ro" / "x.txt", "hello")


def test_without_a_process_group_this_is_rank_0_of_1(monkeypatch):
    monkeypatch.setenv("RANK", "3")  # a stray variable does not make a lone process a non-zero rank
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main() and not dist.is_distributed()
    calls = []
    assert dist.rank0_first(lambda: calls.append(1) or "done") == "done" and calls == [1]
    dist.barrier()  # a no-op


def test_changing_arch_in_a_child_file_keeps_the_model_arguments_the_new_model_takes(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "data": {"train": "d"},
        "teacher": {"arch": "vargfacenet", "multiplier": 0.5, "input_size": 32, "checkpoint": "t.pth",
                    "train": {"epochs": 3.0}},
        "student": {"arch": "vargfacenet", "multiplier": 0.5, "init": "s.pt"}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "teacher": {"arch": "iresnet18"}}))
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.teacher.arch == "iresnet18" and "multiplier" not in cfg.teacher.model
    # input_size is an argument of both models: kept (as an override of teacher.arch keeps it, issue 37)
    assert cfg.teacher.input_size == 32 and cfg.teacher.checkpoint == "t.pth" and cfg.teacher.train.epochs == 3.0
    same = load_config(str(tmp_path / "base.yaml"), ["teacher.arch=vargfacenet", "student.arch=vargfacenet_depthwise"])
    assert same.teacher.multiplier == 0.5 and same.teacher.input_size == 32  # same arch: arguments kept
    # another arch keeps the file's arguments it takes (multiplier), its own defaults for the rest (group_size 1)
    assert same.student.group_size == 1 and same.student.multiplier == 0.5 and same.student.init == "s.pt"
