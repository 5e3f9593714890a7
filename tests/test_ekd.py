"""EKD: thresholds at FAR levels from a batch's negatives, their EMA over two steps, the soft-count loss by hand."""

import math

import numpy as np
import pytest
import torch

from distill.losses.distillation import DistillationObjective
from distill.losses.ekd import EKD
from distill.losses.registry import create_distill_loss, requirements
from distill.utils.errors import ConfigError


def unit(degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees], dtype=torch.float64)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_thresholds_ema_and_loss_by_hand():
    """Batch of 4 (identities 0, 0, 1, 1), 2-d embeddings at known angles; FAR levels 0.5 and 0.25 so that the
    4 negative pairs give thresholds by hand: a_0.5 = 2nd highest negative, a_0.25 = the highest."""
    ekd = EKD(fars=(0.5, 0.25), hard_negatives=3)
    labels = torch.tensor([0, 0, 1, 1])
    # step 1. student at 0, 30, 90, 120 degrees: negatives (0,2) (0,3) (1,2) (1,3) = cos 90, 120, 60, 90
    #                                             = 0, -0.5, 0.5, 0 -> a_0.5 = 0, a_0.25 = 0.5
    #         teacher at 0, 10, 60, 70 degrees: negatives cos 60, 70, 50, 60 -> a_0.5 = 0.5, a_0.25 = cos 50
    ekd(unit([0, 30, 90, 120]), unit([0, 10, 60, 70]), labels)
    assert ekd.thresholds[0].tolist() == pytest.approx([0.0, 0.5], abs=1e-12)
    assert ekd.thresholds[1].tolist() == pytest.approx([0.5, math.cos(math.radians(50))])
    # step 2. student at 0, 20, 40, 100: negatives cos 40, 100, 20, 80 -> sorted 0.940, 0.766, 0.174, -0.174
    #         teacher at 0, 0, 90, 90:     negatives 0, 0, 0, 0
    s2, t2 = unit([0, 20, 40, 100]), unit([0, 0, 90, 90])
    loss = ekd(s2, t2, labels).item()
    c = lambda d: math.cos(math.radians(d))  # noqa: E731 - cos of degrees, one line as the paper writes it
    a_s = 0.99 * np.array([0.0, 0.5]) + 0.01 * np.array([c(40), c(20)])
    a_t = 0.99 * np.array([0.5, c(50)]) + 0.01 * np.array([0.0, 0.0])
    assert ekd.thresholds[0].tolist() == pytest.approx(a_s.tolist())
    assert ekd.thresholds[1].tolist() == pytest.approx(a_t.tolist())
    count = lambda x, a: sigmoid((np.asarray(x)[:, None] - a[None, :]) / 0.01).sum(1)  # noqa: E731 - the soft count, one line
    pos_s, pos_t = [c(20), c(60)], [1.0, 1.0]                      # pairs (0,1) and (2,3)
    # the 3 hardest negatives by student similarity: (1,2) cos 20, (0,2) cos 40, (1,3) cos 80
    neg_s, neg_t = [c(20), c(40), c(80)], [0.0, 0.0, 0.0]
    expected = 0.02 * np.mean((count(pos_s, a_s) - count(pos_t, a_t)) ** 2) \
        + 0.01 * np.mean((count(neg_s, a_s) - count(neg_t, a_t)) ** 2)
    assert loss == pytest.approx(expected, rel=1e-6)  # the thresholds are float32 buffers
    assert int(ekd.seen) == 2


def test_default_levels_gradients_and_contract():
    ekd = create_distill_loss("ekd")
    assert isinstance(ekd, EKD) and ekd.fars == (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6) and ekd.hard_negatives == 2000
    assert requirements("ekd").labels and requirements("ekd").images_per_id
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(2)
    from distill.losses.heads import create_head
    objective = DistillationObjective(create_head("arcface", 16, 4, s=16.0, m=0.3), loss="ekd", alpha=1.0)
    total, logs = objective(student, labels, teacher)
    total.backward()
    assert logs["loss_kd/ekd"] > 0 and student.grad.abs().sum() > 0 and teacher.grad is None
    assert set(objective.training_state()) == {"distill_loss.thresholds", "distill_loss.seen"}  # saved in last.pt


def test_a_batch_without_repeated_identities_names_images_per_id():
    with pytest.raises(ConfigError, match="data.images_per_id"):
        EKD()(torch.randn(4, 8), torch.randn(4, 8), torch.arange(4))


def test_a_stage_with_ekd_resumes_exactly_thresholds_included(tmp_path, monkeypatch):
    from tiny import tiny_config, whole_and_resumed

    import teachers
    from distill.train.engine import StageSpec

    cfg = tiny_config(distill={"loss": "ekd", "alpha": 1.0}, data={"images_per_id": 4},
                      train={"max_steps": 4, "checkpoint_every": 2})
    teacher = teachers.build_teacher(cfg.teacher.spec())
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=1.0, generation=1)
    whole, _, again = whole_and_resumed(cfg, spec, teacher, tmp_path, monkeypatch)
    assert torch.equal(again["objective"]["distill_loss.thresholds"], whole["objective"]["distill_loss.thresholds"])
    assert all(torch.equal(again["model"][k], whole["model"][k]) for k in whole["model"])


def test_an_unknown_loss_option_gets_did_you_mean():
    with pytest.raises(ConfigError, match=r"does not take hard_negative; did you mean 'hard_negatives'\?"):
        create_distill_loss("ekd", hard_negative=10)
