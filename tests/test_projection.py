"""distill.project: linear — a teacher of another embedding size: a learned projection used only inside the
distillation loss, trained with the student, kept in last.pt, never in student.pt; without it, a clear error."""

import pytest
import torch
from tiny import tiny_config, whole_and_resumed
from tiny_experiment import write_experiment

import teachers
from distill.cli import main
from distill.losses.distillation import DistillationObjective
from distill.models.files import load_student
from distill.train.engine import StageSpec


def _config(**train):
    # teacher 64-d, student 32-d (tests/tiny.py's student)
    return tiny_config(teacher={"embedding_size": 64}, distill={"project": "linear"},
                       train={"max_steps": 4, "checkpoint_every": 2, **train})


def test_the_projection_gets_gradients_the_teacher_none():
    torch.manual_seed(0)
    objective = DistillationObjective(lambda e, y: (e.sum() * 0, {}), alpha=7.0, project=(32, 64))
    student = torch.randn(8, 32, requires_grad=True)
    teacher = torch.randn(8, 64, requires_grad=True)
    total, logs = objective(student, torch.zeros(8, dtype=torch.long), teacher)
    total.backward()
    assert objective.projection.weight.shape == (64, 32) and objective.projection.weight.grad.abs().sum() > 0
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    expected = 7.0 * ((torch.nn.functional.normalize(teacher.detach(), dim=1)
                       - torch.nn.functional.normalize(student @ objective.projection.weight.T, dim=1)) ** 2
                      ).sum(1).mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_trained_with_the_student_kept_in_last_pt_dropped_from_student_pt_and_resumed_exactly(tmp_path, monkeypatch):
    cfg = _config()
    teacher = teachers.build_teacher(cfg.teacher.spec())
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    last, at_step_2, again = whole_and_resumed(cfg, spec, teacher, tmp_path, monkeypatch)
    assert last["objective"]["projection.weight"].shape == (64, 32)
    student, payload = load_student(tmp_path / "whole" / "student.pt")
    assert not any("projection" in k for k in payload["state_dict"])  # the deployable student only
    assert payload["kwargs"]["embedding_size"] == 32
    # stopped after the step-2 checkpoint, then rerun: the same projection and student, bit for bit
    assert at_step_2["step"] == 2
    # trained
    assert not torch.equal(at_step_2["objective"]["projection.weight"], last["objective"]["projection.weight"])
    assert torch.equal(again["objective"]["projection.weight"], last["objective"]["projection.weight"])
    assert all(torch.equal(again["model"][k], last["model"][k]) for k in last["model"])


def test_without_projection_a_size_mismatch_names_both_sizes_and_the_option(tiny_finished_run, tmp_path, capsys):
    exp, _, data = tiny_finished_run
    exp2 = write_experiment(tmp_path / "x.yaml", data, generations=1, tracking={"wandb": "disabled"},
                            teacher={"embedding_size": 64})
    assert main(["run", str(exp2), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "the teacher's embeddings are 64-d, student.embedding_size is 32" in err
    assert "Set distill.project: linear (a learned 32 -> 64 projection" in err
    assert main(["run", str(exp2), "--dry-run", "distill.project=linear"]) == 0
    assert main(["run", str(exp2), "--dry-run", "distill.project=mlp"]) == 2
    assert "key 'distill.project' must be one of none, linear, got 'mlp'" in capsys.readouterr().err
