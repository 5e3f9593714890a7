"""AdaDistill: class centres pulled toward the teacher (hand-computed), the loss that replaces classification,
gradients to the student only, sharded centres, and a real stage that resumes exactly."""

import math

import pytest
import torch
from tiny import tiny_config, whole_and_resumed

import teachers
from distill.losses.adadistill import AdaDistill
from distill.losses.distillation import DistillationObjective
from distill.losses.heads import create_head
from distill.losses.registry import create_distill_loss, requirements
from distill.train.engine import StageSpec


def _head(weight):
    head = create_head("arcface", weight.shape[1], weight.shape[0], s=64.0, m=0.45)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def test_the_centre_update_by_hand():
    """2-d: class 1's centre at 0°, the teacher at 90°, the student at 60°: cos(ŝ, t̂) = 1/2, cos(Ŵ, t̂) = 0
    -> clipped to 1e-6, α = 1e-6 (the centre jumps to the teacher). Class 0 (not in the batch) is untouched;
    the centre is normalised first (its norm 3 does not matter)."""
    head = _head(torch.tensor([[0.0, 2.0], [3.0, 0.0], [-1.0, 0.0]]))
    student = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]])
    teacher = torch.tensor([[0.0, 5.0]])
    alpha = AdaDistill().update_centres(head, student, torch.tensor([1]), teacher)
    assert alpha.tolist() == pytest.approx([1e-6])
    assert head.weight[1].tolist() == pytest.approx([1e-6, 1 - 1e-6], abs=1e-7)
    assert head.weight[0].tolist() == [0.0, 2.0] and head.weight[2].tolist() == [-1.0, 0.0]

    # centre at 45° to the teacher, student aligned with it: α = 1 · cos 45° = 0.7071
    head = _head(torch.tensor([[1.0, 1.0], [3.0, 0.0]]))
    alpha = AdaDistill().update_centres(head, torch.tensor([[0.0, 1.0]]), torch.tensor([0]), torch.tensor([[0.0, 2.0]]))
    a = math.sqrt(0.5)
    assert alpha.tolist() == pytest.approx([a])
    assert head.weight[0].tolist() == pytest.approx([a * a, a * a + (1 - a)])


def test_two_samples_of_one_identity_average_their_updates():
    head = _head(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # α = 1 for the first (all aligned), 1e-6 for the second
    AdaDistill().update_centres(head, student, torch.tensor([0, 0]), teacher)
    assert head.weight[0].tolist() == pytest.approx([(1 + 1e-6) / 2, (1 - 1e-6) / 2], abs=1e-7)


def test_a_rank_updates_only_the_centres_it_holds():
    """Rank 1 of 2 holding classes 2 and 3 (simulated: the head's shard bounds); labels 0 and 3 in the batch."""
    head = _head(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    head.class_start, head.num_local_classes = 2, 2
    AdaDistill().update_centres(head, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 3]),
                                torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert head.weight[0].tolist() == [1.0, 0.0]  # class 2: not in the batch
    assert head.weight[1].tolist() == pytest.approx([1e-6, 1 - 1e-6], abs=1e-7)  # class 3 moved to the teacher


def test_it_replaces_the_classification_term_and_only_the_student_gets_gradients():
    torch.manual_seed(0)
    weight = torch.randn(5, 8)
    student = torch.randn(4, 8, requires_grad=True)
    teacher = torch.randn(4, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 3])
    objective = DistillationObjective(_head(weight), loss="adadistill", alpha=7.0)
    total, logs = objective(student, labels, teacher)
    # what it computes: the plain head's loss after the same centre update; no alpha x term
    reference = _head(weight)
    AdaDistill().update_centres(reference, student.detach(), labels, teacher.detach())
    expected, _ = reference(student.detach(), labels)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "loss_kd/adadistill" not in logs and 0 < logs["ada_alpha"].item() <= 1
    total.backward()
    assert student.grad.abs().sum() > 0 and objective.head.weight.grad.abs().sum() > 0 and teacher.grad is None
    assert requirements("adadistill").replaces_classification and requirements("adadistill").sizes == "same"
    assert isinstance(create_distill_loss("adadistill"), AdaDistill)


def test_a_stage_with_adadistill_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config(distill={"loss": "adadistill"}, train={"max_steps": 4, "checkpoint_every": 2})
    teacher = teachers.build_teacher(cfg.teacher.spec())
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    whole, _, again = whole_and_resumed(cfg, spec, teacher, tmp_path, monkeypatch)
    assert torch.equal(again["head_weight"], whole["head_weight"])
    assert all(torch.equal(again["model"][k], whole["model"][k]) for k in whole["model"])


def test_a_size_mismatch_is_an_error_even_with_a_projection():
    from distill.run.preflight import embedding_size_problem

    cfg = tiny_config(distill={"loss": "adadistill", "project": "linear"}, teacher={"embedding_size": 64})
    problem = embedding_size_problem(cfg, 64)
    assert "distill.loss adadistill moves the student's class centres" in problem
    assert "64" in problem and "32" in problem
    assert embedding_size_problem(tiny_config(distill={"loss": "cosine", "project": "linear"}), 64) is None
