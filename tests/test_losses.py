"""Distillation losses against hand-computed values, the constant teacher, and the cls + alpha × KD objective."""

import math

import pytest
import torch

from distill.losses.distillation import DistillationObjective
from distill.losses.heads import create_head
from distill.losses.registry import DISTILL_LOSSES, check_loss_options, create_distill_loss
from distill.utils.errors import ConfigError, UnknownNameError

# (student, teacher) pairs whose losses are worked out by hand below
ORTHOGONAL = ([1.0, 0.0], [0.0, 3.0])        # cos = 0
SAME_DIRECTION = ([1.0, 1.0], [2.0, 2.0])    # cos = 1, different norms
OPPOSITE = ([1.0, 0.0], [-2.0, 0.0])         # cos = -1
SIXTY_DEGREES = ([1.0, 0.0], [1.0, math.sqrt(3)])  # cos = 1/2

HAND = {  # name: expected loss for ORTHOGONAL, SAME_DIRECTION, OPPOSITE, SIXTY_DEGREES
    # |t̂ − ŝ|² = 2 − 2cos
    "equivalent_angular": [2.0, 0.0, 4.0, 1.0],
    # (1 − cos)²
    "shrinkteanet_angular": [1.0, 0.0, 4.0, 0.25],
    # 1 − cos
    "cosine": [1.0, 0.0, 2.0, 0.5],
    # mean over the 2 elements of (s − t)²: (1 + 9)/2, (1 + 1)/2, (9 + 0)/2, (0 + 3)/2
    "l2": [5.0, 1.0, 4.5, 1.5],
}
PAIRS = [ORTHOGONAL, SAME_DIRECTION, OPPOSITE, SIXTY_DEGREES]
# the (student, teacher) -> scalar losses; loss classes (adadistill, ...) are tested in test_losses_new.py
EMBEDDING_LOSSES = sorted(name for name, fn in DISTILL_LOSSES.items() if not isinstance(fn, type))


def pair(p):
    student, teacher = p
    return torch.tensor([student], dtype=torch.float64), torch.tensor([teacher], dtype=torch.float64)


def test_every_registered_loss_has_hand_computed_values():
    assert set(EMBEDDING_LOSSES) == set(HAND)  # the class losses have their own tests


@pytest.mark.parametrize("name", sorted(HAND))
@pytest.mark.parametrize("case", range(4), ids=["orthogonal", "same_direction", "opposite", "sixty_degrees"])
def test_loss_matches_hand_computed_value(name, case):
    student, teacher = pair(PAIRS[case])
    loss = create_distill_loss(name)(student, teacher)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(HAND[name][case], abs=1e-12)


@pytest.mark.parametrize("name", sorted(HAND))
def test_batch_loss_is_the_mean(name):
    """For the angular losses the mean over samples; for l2 the mean over all batch × dim elements."""
    student = torch.tensor([s for s, _ in PAIRS], dtype=torch.float64)
    teacher = torch.tensor([t for _, t in PAIRS], dtype=torch.float64)
    expected = {"equivalent_angular": 7.0 / 4, "shrinkteanet_angular": 5.25 / 4, "cosine": 3.5 / 4,
                "l2": (10 + 2 + 9 + 3) / 8}[name]
    assert create_distill_loss(name)(student, teacher).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("case", range(4), ids=["orthogonal", "same_direction", "opposite", "sixty_degrees"])
def test_shrinkteanet_linear_form_is_one_minus_cos(case):
    """form "linear" (MarginDistillation's angular_distillation): mean_i (1 − cos), the `cosine` values; the default
    "squared" is checked with HAND above."""
    student, teacher = pair(PAIRS[case])
    linear = create_distill_loss("shrinkteanet_angular", form="linear")(student, teacher)
    assert linear.item() == pytest.approx(HAND["cosine"][case], abs=1e-12)
    squared = create_distill_loss("shrinkteanet_angular", form="squared")(student, teacher)
    assert squared.item() == pytest.approx(HAND["shrinkteanet_angular"][case], abs=1e-12)


def test_shrinkteanet_form_other_than_squared_or_linear_is_refused():
    student, teacher = pair(ORTHOGONAL)
    with pytest.raises(ValueError, match="shrinkteanet_angular: form must be one of squared, linear, got 'cubic'"):
        DISTILL_LOSSES["shrinkteanet_angular"](student, teacher, form="cubic")


def test_equivalent_angular_is_two_minus_two_cos_on_random_embeddings():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 512), torch.randn(16, 512) * 5
    cos = torch.nn.functional.cosine_similarity(student, teacher, dim=1)
    torch.testing.assert_close(create_distill_loss("equivalent_angular")(student, teacher), (2 - 2 * cos).mean())


@pytest.mark.parametrize("name", EMBEDDING_LOSSES)
def test_teacher_is_a_constant(name):
    torch.manual_seed(0)
    student = torch.randn(4, 8, requires_grad=True)
    teacher = torch.randn(4, 8, requires_grad=True)
    create_distill_loss(name)(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("name", EMBEDDING_LOSSES)
def test_gradients_pass_gradcheck(name):
    torch.manual_seed(0)
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, dtype=torch.float64)
    fn = create_distill_loss(name)
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher), (student,))


@pytest.mark.parametrize("name", EMBEDDING_LOSSES)
def test_float16_teacher_cache_with_float32_student(name):
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 8), torch.randn(4, 8)
    loss = create_distill_loss(name)(student, teacher.half())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, create_distill_loss(name)(student, teacher.half().float()))


def test_registry_errors_name_what_is_known():
    with pytest.raises(UnknownNameError) as err:
        create_distill_loss("kl")
    for name in DISTILL_LOSSES:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="temperature"):
        create_distill_loss("cosine", temperature=4)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ConfigError, match=r"\(4, 256\).*\(4, 512\)"):
        create_distill_loss("equivalent_angular")(torch.randn(4, 256), torch.randn(4, 512))


# --- the objective ---------------------------------------------------------------------------------

def objective_inputs(seed=0):
    torch.manual_seed(seed)
    head = create_head("arcface", 8, 10, s=16)
    student = torch.randn(4, 8, requires_grad=True)
    return head, student, torch.tensor([1, 2, 3, 9]), torch.randn(4, 8)


def test_default_objective_is_classification_plus_seven_equivalent_angular():
    head, student, labels, teacher = objective_inputs()
    objective = DistillationObjective(head)
    assert objective.alpha == 7.0 and objective.loss_name == "equivalent_angular"
    total, logs = objective(student, labels, teacher)
    loss_cls, head_logs = head(student, labels)
    loss_kd = create_distill_loss("equivalent_angular")(student, teacher)
    torch.testing.assert_close(total, loss_cls + 7 * loss_kd)
    assert set(logs) == {"loss", "loss_cls", "loss_kd/equivalent_angular"} | set(head_logs)
    torch.testing.assert_close(logs["loss_cls"], loss_cls.detach())
    torch.testing.assert_close(logs["loss_kd/equivalent_angular"], loss_kd.detach())
    torch.testing.assert_close(logs["loss"], total.detach())
    assert all(not v.requires_grad for v in logs.values())
    total.backward()
    assert student.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", EMBEDDING_LOSSES)
def test_objective_uses_the_named_loss_and_alpha(name):
    head, student, labels, teacher = objective_inputs()
    total, logs = DistillationObjective(head, loss=name, alpha=2.5)(student, labels, teacher)
    torch.testing.assert_close(logs[f"loss_kd/{name}"], create_distill_loss(name)(student, teacher).detach())
    torch.testing.assert_close(total, logs["loss_cls"] + 2.5 * logs[f"loss_kd/{name}"])


@pytest.mark.parametrize("alpha,with_teacher", [(0.0, True), (7.0, False)], ids=["alpha_zero", "no_teacher"])
def test_plain_training_computes_no_distillation_term(alpha, with_teacher):
    head, student, labels, teacher = objective_inputs()
    objective = DistillationObjective(head, alpha=alpha)

    def must_not_run(*args):
        raise AssertionError("distillation loss computed in plain training")

    objective.distill_loss = must_not_run
    total, logs = objective(student, labels, teacher if with_teacher else None)
    assert not any(k.startswith("loss_kd") for k in logs)
    torch.testing.assert_close(total, head(student, labels)[0])
    torch.testing.assert_close(logs["loss"], logs["loss_cls"])


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf"), "7"])
def test_bad_alpha_is_a_config_error(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        DistillationObjective(create_head("softmax", 8, 10), alpha=alpha)


def test_shrinkteanet_form_is_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"key 'distill.terms\[0\]': distillation loss 'shrinkteanet_angular' refuses "
                                          r"these options: shrinkteanet_angular: form must be one of squared, linear, "
                                          r"got 'cubic'"):
        check_loss_options("shrinkteanet_angular", {"form": "cubic"}, "distill.terms[0]")
