"""EKD: thresholds at FAR levels from a batch's negatives, their EMA over two steps, the soft-count loss by hand."""

import math

import numpy as np
import pytest
import torch

from distill.losses.distillation import DistillationObjective
from distill.losses.ekd import EKD, threshold_position
from distill.losses.registry import check_loss_options, create_distill_loss, requirements
from distill.utils.errors import ConfigError


def unit(degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees], dtype=torch.float64)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_thresholds_ema_and_loss_by_hand():
    """Batch of 4 (identities 0, 0, 1, 1), 2-d embeddings at known angles; FAR levels 0.5 and 0.25 so that the
    4 negative pairs give thresholds by hand, under the options of before issue 38 ("ceil": a_0.5 = 2nd highest
    negative, a_0.25 = the highest; "first_batch": the first batch sets the running thresholds)."""
    ekd = EKD(fars=(0.5, 0.25), hard_negatives=3, threshold_index="ceil", warm_start="first_batch")
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


def test_the_defaults_take_tfaces_index_and_start_the_thresholds_at_zero():
    """The first batch of the test above under the defaults ("floor", "zero"). Sorted negatives: student 0.5, 0, 0,
    −0.5; teacher cos 50, 0.5, 0.5, cos 70. "floor" takes sorted[int(r·N)]: r·N = 2 and 1, both whole, so a_0.5 =
    sorted[2] and a_0.25 = sorted[1] (student 0, 0; teacher 0.5, 0.5), which 2 and 1 negatives exceed; the running
    thresholds start at 0 and move by momentum 0.01 towards them."""
    ekd = EKD(fars=(0.5, 0.25), hard_negatives=3)
    assert (ekd.threshold_index, ekd.warm_start, ekd.batch) == ("floor", "zero", "global")
    labels = torch.tensor([0, 0, 1, 1])
    loss = ekd(unit([0, 30, 90, 120]), unit([0, 10, 60, 70]), labels).item()
    a_s, a_t = np.array([0.0, 0.0]), np.array([0.005, 0.005])
    assert ekd.thresholds.tolist() == [pytest.approx(a_s.tolist(), abs=1e-12), pytest.approx(a_t.tolist())]
    c = lambda d: math.cos(math.radians(d))  # noqa: E731 - cos of degrees
    count = lambda x, a: sigmoid((np.asarray(x)[:, None] - a[None, :]) / 0.01).sum(1)  # noqa: E731 - the soft count
    pos_s, pos_t = [c(30), c(30)], [c(10), c(10)]                 # pairs (0,1) and (2,3)
    neg_s, neg_t = [c(60), c(90), c(90)], [c(50), c(60), c(60)]   # the 3 hardest by student similarity
    expected = 0.02 * np.mean((count(pos_s, a_s) - count(pos_t, a_t)) ** 2) \
        + 0.01 * np.mean((count(neg_s, a_s) - count(neg_t, a_t)) ** 2)
    assert loss == pytest.approx(expected, rel=1e-6)
    # the student's two negatives at 0 sit on both of its thresholds (count σ(0) + σ(0) = 1), every other pair is far
    # above every threshold (count 2): only those two differ from the teacher's 2
    assert loss == pytest.approx(0.01 * (0 + 1 + 1) / 3, rel=1e-6)


@pytest.mark.parametrize(("far", "n", "floor", "ceil"), [
    (0.1, 160, 16, 15),         # r·N whole: 16 exceed TFace's, 15 exceed the ceil one
    (0.1, 165, 16, 16),         # r·N = 16.5: the two agree
    (1 / 3, 54, 18, 17),        # whole, though 1/3 is not a float: 54 · (1/3) counts as 18
    (1e-6, 160, 0, 0),          # r·N < 1: the highest
])
def test_threshold_index_floor_is_int_r_n_and_ceil_the_ceil_r_n_th_highest(far, n, floor, ceil):
    assert threshold_position(far, n, "floor") == floor and threshold_position(far, n, "ceil") == ceil


@pytest.mark.parametrize(("options", "message"), [
    ({"threshold_index": "round"}, "threshold_index must be one of 'floor', 'ceil', got 'round'"),
    ({"warm_start": "first"}, "warm_start must be one of 'zero', 'first_batch', got 'first'"),
    ({"batch": "all"}, "batch must be one of 'global', 'device', got 'all'"),
    ({"fars": [0.1, 1.0]}, "every FAR in fars must lie between 0 and 1"),
])
def test_a_bad_option_value_names_the_allowed_ones(options, message):
    with pytest.raises(ValueError, match=message):
        EKD(**options)
    with pytest.raises(ConfigError, match=rf"key 'distill.terms\[0\]': .*{message}"):
        check_loss_options("ekd", options, "distill.terms[0]")


def test_before_any_training_batch_first_batch_uses_the_batch_and_zero_the_zero_thresholds():
    torch.manual_seed(0)
    s, t, labels = torch.randn(8, 6), torch.randn(8, 6), torch.arange(4).repeat_interleave(2)
    seeded, zero = EKD(warm_start="first_batch").eval(), EKD().eval()
    assert seeded(s, t, labels) != zero(s, t, labels)
    assert int(seeded.seen) == int(zero.seen) == 0 and not seeded.thresholds.any() and not zero.thresholds.any()
    trained = EKD(warm_start="first_batch")
    assert trained(s, t, labels).item() == pytest.approx(seeded(s, t, labels).item())  # the batch's thresholds


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


# --- batch: "global" over two gloo ranks equals one process holding the whole batch -----------------------------

ROWS = [(0, 5), (5, 12)]  # uneven: rank 0 holds 5 rows, rank 1 holds 7


def _two_ranks_data():
    torch.manual_seed(3)
    labels = torch.arange(4).repeat_interleave(3)
    x = torch.randn(4, 6, dtype=torch.float64)[labels] + 0.5 * torch.randn(12, 6, dtype=torch.float64)
    teacher = torch.randn(4, 16, dtype=torch.float64)[labels] + torch.randn(12, 16, dtype=torch.float64)
    backbone = torch.nn.Linear(6, 16).double()
    return dict(x=x, labels=labels, teacher=teacher, backbone=backbone.state_dict())


def _ekd_step(backbone, data, rows, **options):
    """One training step of a Linear backbone under EKD (FARs with whole r·N for the global batch's 54 negatives; a
    temperature at which no pair's sigmoid saturates, so every embedding gets a gradient); returns the loss, the
    embeddings' and the backbone's gradient and the thresholds."""
    lo, hi = rows
    ekd = EKD(fars=(1 / 2, 1 / 6, 1 / 100), hard_negatives=20, temperature=0.5, **options).double()
    emb = backbone(data["x"][lo:hi])
    emb.retain_grad()
    loss = ekd(emb, data["teacher"][lo:hi], data["labels"][lo:hi])
    loss.backward()
    return dict(loss=loss.detach(), emb_grad=emb.grad, backbone_grad=backbone.weight.grad.clone(),
                thresholds=ekd.thresholds.clone())


def _ekd_worker(rank, tmp):
    import torch.distributed as dist
    torch.set_num_threads(1)
    data = torch.load(tmp / "data.pt")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        backbone = torch.nn.Linear(6, 16).double()
        backbone.load_state_dict(data["backbone"])
        out = {"global": _ekd_step(backbone, data, ROWS[rank])}
        dist.all_reduce(out["global"]["backbone_grad"])  # DDP's average, without DDP's seconds of imports
        out["global"]["backbone_grad"] /= 2
        backbone.zero_grad()
        out["device"] = _ekd_step(backbone, data, ROWS[rank], batch="device")  # no DDP: this rank's own gradient
        torch.save(out, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_batch_over_two_gloo_ranks_equals_one_process_and_device_is_each_ranks_own(tmp_path):
    import multiprocessing
    data = _two_ranks_data()
    torch.save(data, tmp_path / "data.pt")
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(_ekd_worker, args=(tmp_path,), nprocs=2, join=True, start_method=method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    def one_process(rows, **options):
        backbone = torch.nn.Linear(6, 16).double()
        backbone.load_state_dict(data["backbone"])
        return _ekd_step(backbone, data, rows, **options)

    whole = one_process((0, 12))
    assert whole["emb_grad"].norm(dim=1).gt(1e-4).all()  # every row's gradient counts in the comparison
    for r, rows in zip(ranks, ROWS, strict=True):
        mine = r["global"]
        torch.testing.assert_close(mine["loss"], whole["loss"])
        torch.testing.assert_close(mine["thresholds"], whole["thresholds"])
        # each rank's embeddings get 2 × ∂loss/∂e, so that the average over the ranks (DDP's) ...
        torch.testing.assert_close(mine["emb_grad"] / 2, whole["emb_grad"][rows[0]:rows[1]])
        # ... is the single process's gradient of the backbone
        torch.testing.assert_close(mine["backbone_grad"], whole["backbone_grad"])
        alone = one_process(rows, batch="device")
        torch.testing.assert_close(r["device"]["loss"], alone["loss"])
        torch.testing.assert_close(r["device"]["emb_grad"], alone["emb_grad"])
        assert not torch.allclose(r["device"]["loss"], whole["loss"])
