"""AdaFace, CurricularFace, MagFace (distill/losses/heads_adaptive.py): their logits by hand from the papers'
equations, the state each keeps (updated in training only, over the global batch), two gloo ranks equal to one
process in loss, gradients and state (sharded and with PartialFC sampling), the refusals, and a stage resuming bit
for bit. Their authors' numbers: tests/test_reference_{adaface,curricularface,magface}.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from forked_ranks import gloo_ranks
from tiny import tiny_config, whole_and_resumed
from torch import nn

from distill.losses.heads import create_head, head_traits
from distill.utils.errors import ConfigError


def problem(seed=0, batch=5, dim=6, classes=7, norms=(3.0, 9.0, 20.0, 31.0, 60.0)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    x = F.normalize(x) * torch.tensor(norms[:batch], dtype=torch.float64).unsqueeze(1)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(batch) % classes
    return x, weight, labels


def built(name, weight, **kwargs):
    head = create_head(name, weight.shape[1], weight.shape[0], s=16.0, **kwargs).double()
    head.load_full_weight(weight)
    return head


def cosines(x, weight):
    return F.normalize(x) @ F.normalize(weight).T


def ce(logits, labels):
    return F.cross_entropy(logits, labels)


# --- by hand -----------------------------------------------------------------------------------------------

def test_adaface_margin_follows_the_norm_against_the_updated_batch_statistics():
    x, weight, y = problem()
    head = built("adaface", weight, m=0.4, h=2.0, t_alpha=0.5)
    head.batch_mean.fill_(10.0)
    head.batch_std.fill_(8.0)
    loss, _ = head(x, y)
    norms = x.norm(dim=1)
    mu, sigma = 0.5 * norms.mean() + 0.5 * 10.0, 0.5 * norms.std() + 0.5 * 8.0  # updated first, then used
    z = ((norms - mu) / (sigma + 1e-3) * 2.0).clamp(-1, 1)
    assert z.min() == -1 and z.max() == 1 and ((z > -1) & (z < 1)).any()  # both clips and the line between
    cos = cosines(x, weight).clamp(-1 + 1e-3, 1 - 1e-3)
    logits = 16.0 * cos
    rows = torch.arange(len(y))
    theta = (torch.acos(cos[rows, y]) - 0.4 * z).clamp(1e-3, math.pi - 1e-3)
    logits[rows, y] = 16.0 * (torch.cos(theta) - (0.4 + 0.4 * z))
    torch.testing.assert_close(loss, ce(logits, y))
    torch.testing.assert_close(head.batch_mean, mu)
    torch.testing.assert_close(head.batch_std, sigma)


def test_adaface_statistics_move_in_training_only_and_never_from_one_sample():
    x, weight, y = problem()
    head = built("adaface", weight)
    head.eval()
    head(x, y)
    head.train()
    head(x[:1], y[:1])
    assert (float(head.batch_mean), float(head.batch_std)) == (20.0, 100.0)
    head(x, y)
    assert float(head.batch_mean) != 20.0


def test_curricularface_reweights_the_negatives_harder_than_the_target_margin():
    x, weight, y = problem()
    head = built("curricularface", weight, m=0.5)
    head.t.fill_(0.3)
    loss, logs = head(x, y)
    cos = cosines(x, weight)
    rows = torch.arange(len(y))
    target = cos[rows, y]
    t = 0.01 * target.mean() + 0.99 * 0.3
    margin = torch.cos(torch.acos(target) + 0.5)
    hard = cos > margin.unsqueeze(1)
    assert hard.sum() > len(y)  # some negatives are hard, beside every target column
    logits = torch.where(hard, cos * (t + cos), cos)
    logits[rows, y] = margin
    torch.testing.assert_close(loss, ce(16.0 * logits, y))
    torch.testing.assert_close(head.t, t)
    head.eval()
    head(x, y)
    torch.testing.assert_close(head.t, t)  # evaluation reads t, never moves it


def test_curricularface_takes_margin_distillations_per_sample_margin():
    x, weight, y = problem()
    m = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    head = built("curricularface", weight)
    loss, _ = head(x, y, margins=m)
    cos = cosines(x, weight)
    rows = torch.arange(len(y))
    margin = torch.cos(torch.acos(cos[rows, y]) + m)
    logits = torch.where(cos > margin.unsqueeze(1), cos * (float(head.t) + cos), cos)
    logits[rows, y] = margin
    torch.testing.assert_close(loss, ce(16.0 * logits, y))


@pytest.mark.parametrize("easy_margin", [True, False])
def test_magface_margin_grows_with_the_magnitude_and_the_loss_adds_its_regulariser(easy_margin):
    x, weight, y = problem(norms=(5.0, 30.0, 70.0, 109.0, 200.0))
    head = built("magface", weight, easy_margin=easy_margin)
    loss, logs = head(x, y)
    a = x.norm(dim=1).clamp(10.0, 110.0)
    m = 0.45 + (0.8 - 0.45) * (a - 10.0) / 100.0
    cos = cosines(x, weight)
    rows = torch.arange(len(y))
    target = cos[rows, y]
    margin = torch.cos(torch.acos(target) + m)
    logits = cos.clone()
    logits[rows, y] = torch.where(target > 0, margin, target) if easy_margin else margin
    g = (1 / a + a / 110.0 ** 2).mean()
    torch.testing.assert_close(loss, ce(16.0 * logits, y) + 35.0 * g)
    torch.testing.assert_close(logs["mag_g"], g)


def test_adaptive_margins_refuse_a_margin_per_sample_and_bad_options():
    x, weight, y = problem()
    for name in ("adaface", "magface"):
        with pytest.raises(ConfigError, match="sets its own target margins"):
            built(name, weight)(x, y, margins=torch.full((5,), 0.3, dtype=torch.float64))
        assert not head_traits(tiny_config(margin={"margin": name}).margin).takes_sample_margins
    assert head_traits(tiny_config(margin={"margin": "curricularface"}).margin).takes_sample_margins
    for margin, key in (({"margin": "adaface", "options": {"t_alpha": 0}}, "margin.options.t_alpha"),
                        ({"margin": "adaface", "m": 2.0}, "margin.m"),
                        ({"margin": "magface", "options": {"u_a": 5.0}}, "margin.options.u_a"),
                        ({"margin": "magface", "options": {"easy_margin": "yes"}}, "margin.options.easy_margin")):
        with pytest.raises(ConfigError, match=f"key '{key}'"):
            tiny_config(margin=margin)


# --- two gloo ranks ----------------------------------------------------------------------------------------

HEADS = ("adaface", "curricularface", "magface")
E, C, IN = 6, 23, 5
ROWS = [(0, 3), (3, 5)]  # rank 0 holds 3 samples, rank 1 holds 2


def _rank_work(rank, data):
    lo, hi = ROWS[rank]
    out = {}
    for name in HEADS:
        head = built(name, data["weight"])
        backbone = nn.Linear(IN, E).double()
        backbone.load_state_dict(data["backbone"])
        ddp = nn.parallel.DistributedDataParallel(backbone)
        emb = ddp(data["x"][lo:hi])
        emb.retain_grad()
        loss, _ = head(emb, data["y"][lo:hi])
        loss.backward()
        torch.manual_seed(10 + rank)
        sampled = built(name, data["weight"], sample_rate=0.5)
        out[name] = dict(loss=loss.detach(), emb_grad=emb.grad, backbone_grad=backbone.weight.grad,
                         weight_grad=head.weight.grad, state=head.head_state(),
                         sampled_loss=sampled(data["x"][lo:hi] @ data["proj"], data["y"][lo:hi])[0].detach(),
                         sampled_classes=sampled.sampled_classes, sampled_state=sampled.head_state())
    return out


def test_two_gloo_ranks_equal_one_process_in_loss_gradients_and_state(tmp_path):
    torch.manual_seed(0)
    backbone = nn.Linear(IN, E).double()
    with torch.no_grad():
        backbone.weight.mul_(20.0)  # feature norms of a few tens, where AdaFace's and MagFace's margins vary
    data = dict(x=torch.randn(5, IN, dtype=torch.float64), y=torch.tensor([0, 22, 11, 12, 5]),
                weight=torch.randn(C, E, dtype=torch.float64), backbone=backbone.state_dict(),
                proj=30.0 * torch.randn(IN, E, dtype=torch.float64))
    ranks = gloo_ranks(tmp_path, data, _rank_work)
    for name in HEADS:
        reference = built(name, data["weight"])
        net = nn.Linear(IN, E).double()
        net.load_state_dict(data["backbone"])
        emb = net(data["x"])
        emb.retain_grad()
        loss, _ = reference(emb, data["y"])
        loss.backward()
        for r, (lo, hi) in zip(ranks, ROWS, strict=True):
            got = r[name]
            torch.testing.assert_close(got["loss"], loss.detach(), msg=name)
            torch.testing.assert_close(got["emb_grad"], 2 * emb.grad[lo:hi], msg=name)  # × world size, for DDP
            torch.testing.assert_close(got["backbone_grad"], net.weight.grad, msg=name)
            assert got["state"].keys() == reference.head_state().keys()
            for key, value in reference.head_state().items():
                torch.testing.assert_close(got["state"][key], value, msg=f"{name} {key}")
        torch.testing.assert_close(torch.cat([r[name]["weight_grad"] for r in ranks]), reference.weight.grad)
        # sampled: the softmax over the union of the classes each rank kept
        union = torch.cat([r[name]["sampled_classes"] for r in ranks])
        subset = built(name, data["weight"][union])
        expected, _ = subset(data["x"] @ data["proj"], torch.searchsorted(union, data["y"]))
        for r in ranks:
            torch.testing.assert_close(r[name]["sampled_loss"], expected.detach(), msg=name)
            for key, value in subset.head_state().items():
                torch.testing.assert_close(r[name]["sampled_state"][key], value)


# --- a stage resumes bit for bit -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", HEADS)
def test_a_stage_resumes_bit_identically_with_the_heads_state(name, tmp_path, monkeypatch):
    import teachers
    from distill.train.engine import StageSpec

    cfg = tiny_config(margin={"margin": name, "s": 16.0, "m": 0.3}, train={"max_steps": 4, "checkpoint_every": 2})
    teacher = teachers.build_teacher(cfg.teacher.spec())
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=1.0, generation=1)
    whole, stopped, again = whole_and_resumed(cfg, spec, teacher, tmp_path, monkeypatch)
    assert stopped["step"] == 2 and again["step"] == whole["step"] == 4
    assert whole["head_state"].keys() == again["head_state"].keys()
    for key, value in whole["head_state"].items():
        assert torch.equal(again["head_state"][key], value) and not torch.equal(stopped["head_state"][key], value)
    assert torch.equal(again["head_weight"], whole["head_weight"])
    assert all(torch.equal(again["model"][k], whole["model"][k]) for k in whole["model"])


# --- with the centre losses that accept them ------------------------------------------------------------------

def test_the_centre_losses_train_through_these_heads():
    from distill.losses.registry import create_distill_loss

    x, weight, y = problem()
    teacher = x + 0.1 * torch.randn_like(x)
    # margin_distillation on CurricularFace: its per-sample margins replace m in the target and the threshold
    head = built("curricularface", weight)
    md = create_distill_loss("margin_distillation").double()
    md.set_centres(weight, head)
    m = md.margins(head, y, teacher)
    loss, logs = md.classify(head, x, y, teacher)
    torch.testing.assert_close(loss, built("curricularface", weight)(x, y, margins=m)[0])
    assert not head.weight.requires_grad and "md_margin" in logs  # frozen teacher centres, the paper's default
    # proxyless_kd on MagFace and adadistill on AdaFace: the heads' own loss against the centres the loss keeps
    for name, loss_name in (("magface", "proxyless_kd"), ("adaface", "adadistill")):
        head = built(name, weight)
        term = create_distill_loss(loss_name).double()
        if loss_name == "proxyless_kd":
            term.set_centres(weight, head)
        else:
            term.prepare_head(head)
        emb = x.clone().requires_grad_(True)
        loss, _ = term.classify(head, emb, y, teacher)
        loss.backward()
        assert torch.isfinite(loss) and emb.grad.abs().sum() > 0 and head.weight.grad is None
