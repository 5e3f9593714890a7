"""The relational losses on the batch's embeddings (distill/losses/relational.py): RKD, CC and SP on hand-computed
cases, gradients to the student only, the batch sizes they refuse, and a cached-teacher stage that resumes
bit-identically."""

import math

import pytest
import torch
from tiny import tiny_config
from tiny_experiment import write_experiment

from distill.config.schema import load_config
from distill.losses.registry import check_loss_options, create_distill_loss, requirements
from distill.train.engine import StageSpec
from distill.utils.errors import ConfigError

RIGHT = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # a right angle at point 0


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_by_hand():
    # a similar triangle (twice as large) has the same normalised distances and angles: nothing to learn
    for pairs in ("all", "distinct"):
        assert create_distill_loss("rkd", pairs=pairs)(RIGHT, 2 * RIGHT).item() == pytest.approx(0.0, abs=1e-12)
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    # distances / their mean: student (1, 1, √2) / ((2 + √2) / 3), teacher (1, 2, 1) / (4 / 3)
    ms, mt = (2 + math.sqrt(2)) / 3, 4 / 3
    ds, dt = [1 / ms, 1 / ms, math.sqrt(2) / ms], [1 / mt, 2 / mt, 1 / mt]
    # each unordered pair twice among the 6 ordered
    distance = sum(huber(a - b) for a, b in zip(ds, dt, strict=True)) / 3
    # angles at each vertex between the two other points: student (0, 1/√2, 1/√2), teacher (1, -1, 1); the 12
    # triplets with i != j, k != j hold each of these twice and 6 with i == k (cos 1 on both sides)
    r = 1 / math.sqrt(2)
    angle = 2 * sum(huber(a - b) for a, b in zip([0, r, r], [1, -1, 1], strict=True)) / 12
    # pairs "distinct": those means; "all" (the default, the authors'): the same sums over the 9 pairs and 27
    # triplets, the degenerate ones 0 on both sides
    for pairs, d_scale, a_scale in (("distinct", 1, 1), ("all", 6 / 9, 12 / 27)):
        rkd_distance = create_distill_loss("rkd", distance_weight=1.0, angle_weight=0.0, pairs=pairs)
        assert rkd_distance(RIGHT, line).item() == pytest.approx(distance * d_scale)
        rkd_angle = create_distill_loss("rkd", distance_weight=0.0, angle_weight=1.0, pairs=pairs)
        assert rkd_angle(RIGHT, line).item() == pytest.approx(angle * a_scale)
    assert create_distill_loss("rkd")(RIGHT, line).item() == pytest.approx(25 * distance * 6 / 9 + 50 * angle * 12 / 27)
    with pytest.raises(ValueError, match="rkd: pairs must be one of all, distinct, got 'some'"):
        create_distill_loss("rkd", pairs="some")
    with pytest.raises(ConfigError, match=r"key 'distill.terms\[0\]': distillation loss 'rkd' refuses these options: "
                                          r"rkd: pairs must be one of all, distinct, got 'some'"):
        check_loss_options("rkd", {"pairs": "some"}, "distill.terms[0]")  # as the config load checks it


def test_cc_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)   # dot products I
    t = torch.tensor([[3.0, 0.0], [1.0, 0.0]], dtype=torch.float64)   # normalised: one direction, dots all 1
    # order 1: C = e^{-2γ}(1 + 2γ x·y): the two differ by 2γe^{-2γ} off the diagonal; |ΔC|² / b² = 2 (2γe^{-2γ})² / 4
    g = 0.4
    assert create_distill_loss("cc", gamma=g, order=1)(s, t).item() == pytest.approx(
        2 * (2 * g * math.exp(-2 * g)) ** 2 / 4)
    assert create_distill_loss("cc", order=0)(s, t).item() == pytest.approx(0.0, abs=1e-15)  # a constant kernel
    # the default order 2 is close to the exact Gaussian kernel for small γ on unit vectors
    x = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    from distill.losses.relational import rbf_correlation
    exact = torch.exp(-0.05 * torch.cdist(x, x) ** 2)
    assert torch.allclose(rbf_correlation(x, 0.05, 2), exact, atol=2e-4)


def test_sp_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)   # G = I
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)   # G = all ones: rows (1, 1)/√2
    assert create_distill_loss("sp")(s, t).item() == pytest.approx(1 - math.sqrt(2) / 2)


@pytest.mark.parametrize("name", ["rkd", "cc", "sp"])
def test_gradients_reach_the_student_only_and_sizes_may_differ(name):
    torch.manual_seed(0)
    student = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)  # another embedding size
    fn = create_distill_loss(name)
    fn(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher.detach()), (student.detach().requires_grad_(),))
    assert requirements(name).sizes == "any"


@pytest.mark.parametrize("name, least", [("rkd", 3), ("cc", 2), ("sp", 2)])
def test_a_batch_too_small_is_refused_at_load_and_in_the_loss(tmp_path, name, least):
    with pytest.raises(ConfigError, match=f"distillation loss {name} relates the images of a batch and needs at least"):
        create_distill_loss(name)(torch.randn(least - 1, 4), torch.randn(least - 1, 4))
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces")
    with pytest.raises(ConfigError, match=rf"needs at least {least} per batch, train.batch_size is {least - 1}"):
        load_config(str(exp), [f"distill.loss={name}", f"train.batch_size={least - 1}",
                               f"train.lr_batch_size={least - 1}"])


def test_a_cached_rkd_stage_resumes_bit_identically(tmp_path, monkeypatch):
    from tiny import TinyFaces, tame, whole_and_resumed

    import teachers
    from teachers.cache import build_cache
    cfg = tiny_config(distill={"loss": "rkd", "alpha": 1.0}, train={"max_steps": 6, "checkpoint_every": 2})
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=1.0, generation=1)
    torch.manual_seed(5)
    cache = build_cache(tame(teachers.build_teacher(cfg.teacher.spec())), TinyFaces(), str(tmp_path / "cache"),
                        progress=False)
    whole, stopped, resumed = whole_and_resumed(cfg, spec, None, tmp_path, monkeypatch, cache=cache)
    assert stopped["step"] < whole["step"] == resumed["step"] == 6
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert torch.equal(whole["head_weight"], resumed["head_weight"])
