"""Margin heads: margin formulas, true and straight-through gradients, numerics near θ=0 and π, sharding, sampling."""

import math
import multiprocessing
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from distill.losses.heads import HEADS, create_head
from distill.losses.margin_head import shard_range
from distill.utils.errors import ConfigError, UnknownNameError


def at_angle(centre: torch.Tensor, theta: float, norm: float = 1.7, seed: int = 0) -> torch.Tensor:
    """A vector of length `norm` at angle `theta` from `centre`."""
    g = torch.Generator().manual_seed(seed)
    c = F.normalize(centre, dim=0)
    v = torch.randn(centre.shape, generator=g, dtype=centre.dtype)
    u = F.normalize(v - (v @ c) * c, dim=0)
    return norm * (math.cos(theta) * c + math.sin(theta) * u)


def loss_of(head, embeddings, weight, labels):
    return functional_call(head, {"weight": weight}, (embeddings, labels))[0]


def cosines(embeddings, weight):
    return F.normalize(embeddings) @ F.normalize(weight).T


# --- registry and parameters -------------------------------------------------------------------

def test_unknown_head_lists_registered_names():
    with pytest.raises(UnknownNameError) as err:
        create_head("sphereface9000", 8, 10)
    for name in ("arcface", "cosface", "combined", "softmax"):
        assert name in str(err.value)


def test_unknown_head_argument_is_a_config_error_listing_accepted_ones():
    with pytest.raises(ConfigError, match="margin") as err:
        create_head("arcface", 8, 10, margin=0.5)
    assert "s, m" in str(err.value) and "sample_rate" in str(err.value)


@pytest.mark.parametrize("kwargs", [dict(s=0), dict(s=-1), dict(sample_rate=0), dict(sample_rate=1.5),
                                    dict(m1=0), dict(m2=-0.1)])
def test_bad_parameters_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        create_head("combined", 8, 10, **kwargs)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_trains(name):
    torch.manual_seed(0)
    head = create_head(name, 16, 12)
    # the class first, the embedding last (a sub-centre head holds (classes, k, d))
    assert head.num_classes == 12 and head.weight.shape[0] == 12 and head.weight.shape[-1] == 16
    assert isinstance(head.weight, nn.Parameter)
    assert "num_classes=12" in repr(head)
    emb = torch.randn(6, 16, requires_grad=True)
    loss, logs = head(emb, torch.tensor([0, 3, 5, 11, 3, 7]))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert emb.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0
    assert set(logs) >= {"acc", "cos_target"} and not any(v.requires_grad for v in logs.values())


def test_bad_inputs_are_config_errors():
    head = create_head("arcface", 8, 10)
    with pytest.raises(ConfigError, match="embedding_size"):
        head(torch.randn(4, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"\[0, 10\)"):
        head(torch.randn(2, 8), torch.tensor([3, 10]))
    with pytest.raises(ConfigError, match="labels"):
        head(torch.randn(2, 8), torch.tensor([3]))


# --- margin formulas -----------------------------------------------------------------------------

def test_arcface_logit_is_s_cos_theta_plus_m_and_others_s_cos():
    torch.manual_seed(0)
    head = create_head("arcface", 8, 5, s=64, m=0.5).double()
    cos = torch.empty(4, 5, dtype=torch.float64).uniform_(-0.8, 0.8)  # θ in the safe region (< π − m)
    labels = torch.tensor([0, 4, 2, 2])
    logits = head.apply_margin(cos, labels)
    expected = 64 * cos.clone()
    rows = torch.arange(4)
    expected[rows, labels] = 64 * torch.cos(torch.acos(cos[rows, labels]) + 0.5)
    torch.testing.assert_close(logits, expected)


def test_cosface_and_softmax_logits():
    cos = torch.tensor([[0.3, -0.2, 0.9]], dtype=torch.float64)
    labels = torch.tensor([1])
    cosface = create_head("cosface", 4, 3, s=30, m=0.4).double()
    torch.testing.assert_close(cosface.apply_margin(cos, labels),
                               torch.tensor([[9.0, 30 * (-0.2 - 0.4), 27.0]], dtype=torch.float64))
    softmax = create_head("softmax", 4, 3, s=10).double()
    torch.testing.assert_close(softmax.apply_margin(cos, labels), 10 * cos)


def test_label_minus_one_means_target_not_on_this_shard():
    head = create_head("arcface", 4, 3).double()
    cos = torch.tensor([[0.3, -0.2, 0.9]], dtype=torch.float64)
    torch.testing.assert_close(head.apply_margin(cos, torch.tensor([-1])), 64 * cos)


def test_loss_is_cross_entropy_of_the_margin_logits():
    torch.manual_seed(1)
    head = create_head("combined", 8, 6, s=32, m1=1.0, m2=0.3, m3=0.2).double()
    emb = torch.randn(5, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 5, 5, 3])
    cos = cosines(emb, head.weight)
    logits = 32 * cos
    rows = torch.arange(5)
    logits[rows, labels] = 32 * (torch.cos(torch.acos(cos[rows, labels]) + 0.3) - 0.2)
    loss, logs = head(emb, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    torch.testing.assert_close(logs["acc"], (cos.argmax(1) == labels).float().mean())
    torch.testing.assert_close(logs["cos_target"], cos[rows, labels].mean())


@pytest.mark.parametrize("kwargs", [dict(m1=1.0, m2=0.5, m3=0.0), dict(m1=1.35, m2=0.3, m3=0.1),
                                    dict(m1=1.0, m2=0.0, m3=0.4), dict(m1=1.0, m2=1.2, m3=0.0)])
def test_target_logit_is_continuous_and_monotone_in_theta(kwargs):
    """Past θ* = (π − m2)/m1, cos(m1·θ + m2) would rise again; the fallback keeps falling without a jump."""
    head = create_head("combined", 4, 2, **kwargs).double()
    theta = torch.linspace(0, math.pi, 20001, dtype=torch.float64)
    target = head.margin_cosine(torch.cos(theta))
    steps = target.diff()
    assert (steps <= 0).all(), f"target logit rises at θ = {theta[1:][steps > 0][:3].tolist()}"
    assert steps.abs().max() < 1e-3  # a jump like cosθ − m·sin m at θ* would be 0.1


# --- gradients -----------------------------------------------------------------------------------

def problem(theta: float, seed: int = 0, classes: int = 3, dim: int = 5):
    """Float64 embeddings whose first row sits at angle θ from its class centre."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    emb = torch.randn(3, dim, generator=g, dtype=torch.float64)
    emb[0] = at_angle(weight[1], theta, seed=seed)
    return emb.requires_grad_(), weight.requires_grad_(), torch.tensor([1, 0, 2])


@pytest.mark.parametrize("head_kwargs", [dict(name="arcface"), dict(name="cosface"),
                                         dict(name="combined", m1=1.35, m2=0.25, m3=0.1)], ids=lambda k: k["name"])
@pytest.mark.parametrize("theta", [1.1, 1e-3, 2.9, math.pi - 1e-3],
                         ids=["generic", "near0", "past_pi_minus_m", "near_pi"])
def test_true_margin_gradient_passes_gradcheck(head_kwargs, theta):
    kwargs = dict(head_kwargs)
    head = create_head(kwargs.pop("name"), 5, 3, s=4.0, **kwargs)
    emb, weight, labels = problem(theta)
    assert torch.autograd.gradcheck(lambda e, w: loss_of(head, e, w, labels), (emb, weight))


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("theta", [0.0, math.pi])
def test_gradients_are_finite_exactly_at_zero_and_pi_in_float32(name, theta):
    head = create_head(name, 5, 3)
    emb, weight, labels = problem(theta)
    emb = emb.detach().float().requires_grad_()
    centre = head.weight[1].detach().reshape(-1, 5)[0]  # (a sub-centre head: class 1's first sub-centre)
    emb.data[0] = 2.5 * F.normalize(centre, dim=0) * (1 if theta == 0 else -1)
    loss, _ = head(emb, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def arcface_torch_gradients(emb, weight, labels, s, m):
    """arcface_torch's gradient: the margin changes the logit values but backward treats logits as s·cosθ."""
    emb, weight = emb.detach().requires_grad_(), weight.detach().requires_grad_()
    cos = cosines(emb, weight)
    with torch.no_grad():
        logits = s * cos.clone()
        rows = torch.arange(len(labels))
        logits[rows, labels] = s * torch.cos(torch.acos(cos[rows, labels]) + m)
        grad_logits = (logits.softmax(1) - F.one_hot(labels, cos.shape[1])) / len(labels)
    torch.autograd.backward(s * cos, grad_logits)
    return emb.grad, weight.grad


def test_straight_through_reproduces_arcface_torch_and_default_gives_the_true_gradient():
    emb, weight, labels = problem(1.2, seed=3)
    grads = {}
    for straight_through in (False, True):
        head = create_head("arcface", 5, 3, s=16.0, straight_through=straight_through)
        loss = loss_of(head, emb, weight, labels)
        grads[straight_through] = torch.autograd.grad(loss, (emb, weight))
    reference = arcface_torch_gradients(emb, weight, labels, s=16.0, m=0.5)
    torch.testing.assert_close(grads[True], reference)
    assert not torch.allclose(grads[False][0], reference[0], rtol=1e-3, atol=1e-6)


def test_straight_through_changes_gradient_not_value():
    emb, weight, labels = problem(0.7, seed=4)
    plain = loss_of(create_head("arcface", 5, 3), emb, weight, labels)
    straight = loss_of(create_head("arcface", 5, 3, straight_through=True), emb, weight, labels)
    torch.testing.assert_close(plain, straight)


def test_autocast_bfloat16_computes_the_softmax_in_float32():
    head = create_head("arcface", 16, 10)
    emb = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = head(emb, torch.tensor([1, 2, 3, 4]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --- sharding and sampling -----------------------------------------------------------------------

@pytest.mark.parametrize("num_classes,world_size", [(7, 2), (10, 3), (12, 4), (5, 5), (100, 8)])
def test_shards_are_contiguous_and_cover_every_class_once(num_classes, world_size):
    shards = [shard_range(num_classes, r, world_size) for r in range(world_size)]
    assert shards[0][0] == 0
    for (start, n), (next_start, _) in zip(shards, shards[1:], strict=False):
        assert start + n == next_start
    assert sum(n for _, n in shards) == num_classes
    assert max(n for _, n in shards) - min(n for _, n in shards) <= 1
    assert shard_range(7, 0, 2) == (0, 4) and shard_range(7, 1, 2) == (4, 3)


def test_sampling_keeps_every_positive_and_equals_softmax_over_the_sampled_classes():
    torch.manual_seed(0)
    head = create_head("arcface", 8, 40, s=16, sample_rate=0.25)
    emb = torch.randn(6, 8)
    labels = torch.tensor([3, 17, 17, 25, 39, 0])
    loss, _ = head(emb, labels)
    loss.backward()
    sampled = head.sampled_classes
    assert torch.isfinite(loss) and len(sampled) == 10 and (sampled.diff() > 0).all()
    assert set(labels.tolist()) <= set(sampled.tolist())
    unsampled = torch.ones(40, dtype=torch.bool)
    unsampled[sampled] = False
    assert (head.weight.grad[unsampled] == 0).all() and (head.weight.grad[sampled].abs().sum(1) > 0).all()

    subset = create_head("arcface", 8, 10, s=16)
    subset.load_full_weight(head.weight.detach()[sampled])
    torch.testing.assert_close(loss, subset(emb, torch.searchsorted(sampled, labels))[0])


def test_sampling_keeps_all_positives_even_beyond_the_sample_size_and_is_off_in_eval():
    head = create_head("cosface", 8, 40, sample_rate=0.05)  # int(0.05 · 40) = 2 classes
    emb, labels = torch.randn(5, 8), torch.tensor([1, 2, 3, 4, 5])
    head(emb, labels)
    assert head.sampled_classes.tolist() == [1, 2, 3, 4, 5]
    full = create_head("cosface", 8, 40)
    full.load_full_weight(head.full_weight())
    head.eval()
    torch.testing.assert_close(head(emb, labels)[0], full(emb, labels)[0])


def test_full_weight_round_trip():
    head = create_head("arcface", 8, 10)
    other = create_head("arcface", 8, 10)
    other.load_full_weight(head.full_weight())
    torch.testing.assert_close(other.weight, head.weight)
    with pytest.raises(ConfigError, match="10 classes"):
        other.load_full_weight(torch.zeros(11, 8))


# --- a real two-process gloo group ----------------------------------------------------------------

E, C, IN, S = 6, 23, 5, 16.0   # 23 classes: shards of 12 and 11
ROWS = [(0, 3), (3, 5)]        # rank 0 has 3 samples, rank 1 has 2 (an uneven last batch)


def _gloo_worker(rank, tmp):
    torch.set_num_threads(1)
    data = torch.load(tmp / "data.pt")
    early = create_head("arcface", E, C)  # built before the group exists: must refuse to run inside it
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        out = {}
        try:
            early(torch.randn(2, E), torch.tensor([0, 1]))
            out["stale_refused"] = False
        except ConfigError:
            out["stale_refused"] = True
        lo, hi = ROWS[rank]
        head = create_head("arcface", E, C, s=S).double()
        head.load_full_weight(data["weight"])
        backbone = nn.Linear(IN, E).double()
        backbone.load_state_dict(data["backbone"])
        ddp = nn.parallel.DistributedDataParallel(backbone)  # keep a reference: its reducer syncs the gradients
        emb = ddp(data["x"][lo:hi])
        emb.retain_grad()
        loss, _ = head(emb, data["y"][lo:hi])
        loss.backward()
        out.update(loss=loss.detach(), emb_grad=emb.grad, weight_grad=head.weight.grad,
                   backbone_grad=backbone.weight.grad, full_weight=head.full_weight(), shard=(head.class_start,
                                                                                          head.num_local_classes))
        torch.manual_seed(10 + rank)
        sampled = create_head("arcface", E, C, s=S, sample_rate=0.5).double()
        sampled.load_full_weight(data["weight"])
        out["sampled_loss"] = sampled(data["x"][lo:hi] @ data["weight"][:IN], data["y"][lo:hi])[0].detach()
        out["sampled_classes"] = sampled.sampled_classes
        torch.save(out, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_with_all_classes(tmp_path):
    torch.manual_seed(0)
    backbone = nn.Linear(IN, E).double()
    data = dict(x=torch.randn(5, IN, dtype=torch.float64), y=torch.tensor([0, 22, 11, 12, 5]),
                weight=torch.randn(C, E, dtype=torch.float64), backbone=backbone.state_dict())
    torch.save(data, tmp_path / "data.pt")
    # fork where the platform has it: the workers then skip re-importing torch and timm (seconds each)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(_gloo_worker, args=(tmp_path,), nprocs=2, join=True, start_method=method)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    reference = create_head("arcface", E, C, s=S).double()
    reference.load_full_weight(data["weight"])
    emb = backbone(data["x"])
    emb.retain_grad()
    loss, _ = reference(emb, data["y"])
    loss.backward()

    assert [r["shard"] for r in ranks] == [(0, 12), (12, 11)]
    assert all(r["stale_refused"] for r in ranks)
    for r, (lo, hi) in zip(ranks, ROWS, strict=True):
        torch.testing.assert_close(r["loss"], loss.detach())
        torch.testing.assert_close(r["full_weight"], data["weight"])
        # DDP averages backbone gradients, so each rank's embeddings get 2 × ∂loss/∂e ...
        torch.testing.assert_close(r["emb_grad"], 2 * emb.grad[lo:hi])
        # ... and the averaged backbone gradient is exactly the single-process one
        torch.testing.assert_close(r["backbone_grad"], backbone.weight.grad)
    torch.testing.assert_close(torch.cat([r["weight_grad"] for r in ranks]), reference.weight.grad)

    # sampled: each rank keeps its positives; the loss is the softmax over the union of sampled classes
    union = torch.cat([r["sampled_classes"] for r in ranks])
    assert set(data["y"].tolist()) <= set(union.tolist())
    assert [len(r["sampled_classes"]) for r in ranks] == [6, 5]  # int(0.5 · 12), int(0.5 · 11)
    subset = create_head("arcface", E, len(union), s=S).double()
    subset.load_full_weight(data["weight"][union])
    expected = subset(data["x"] @ data["weight"][:IN], torch.searchsorted(union, data["y"]))[0]
    for r in ranks:
        torch.testing.assert_close(r["sampled_loss"], expected.detach())
