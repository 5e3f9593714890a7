"""Sub-center ArcFace (subcenter_arcface): the max over k sub-centres by hand, k = 1 is ArcFace, PartialFC keeps a
class's k sub-centres together, two gloo ranks equal one process, the centre losses refuse it, a stage resumes."""


import pytest
import torch
import torch.nn.functional as F
from forked_ranks import gloo_ranks
from tiny import tiny_config, whole_and_resumed

from distill.losses.heads import create_head, head_from_config, head_traits
from distill.losses.heads_subcenter import SubCenterArcFace
from distill.losses.term_checks import Setting, term_problems
from distill.losses.terms import LossTerm
from distill.utils.errors import ConfigError


def by_hand(embeddings, weight, labels, s, m):
    """ArcFace's cross-entropy on cos θ_c = max_j cos(x, W_cj), weight (classes, k, d)."""
    cos = torch.einsum("bd,ckd->bck", F.normalize(embeddings), F.normalize(weight, dim=2)).max(2).values
    rows = torch.arange(len(labels))
    logits = (s * cos).index_put((rows, labels), s * torch.cos(torch.acos(cos[rows, labels]) + m))
    return F.cross_entropy(logits, labels)


def problem(seed=0, n=5, classes=7, k=3, dim=6):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, k, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    near = torch.randint(0, k, (n,), generator=g)
    embeddings = weight[labels, near] + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return embeddings, weight, labels


def test_the_class_cosine_is_the_max_over_its_sub_centres_and_only_that_one_learns():
    """Two classes, 2-d, k = 2: class 0's sub-centres at 0° and 90°, class 1's at 180° and 270°; a sample at 80° is
    10° from class 0's second sub-centre (cos 10°) and 100° from class 1's nearest (cos 100°, its 180° one)."""
    unit = lambda deg: torch.tensor([torch.cos(torch.deg2rad(torch.tensor(float(deg)))),  # noqa: E731 - a unit vector
                                     torch.sin(torch.deg2rad(torch.tensor(float(deg))))], dtype=torch.float64)
    head = create_head("subcenter_arcface", 2, 2, s=4.0, m=0.2, k=2).double()
    head.load_full_weight(torch.stack([torch.stack([unit(0), unit(90)]), torch.stack([unit(180), unit(270)])]))
    x = (3 * unit(80)).unsqueeze(0).requires_grad_()
    loss, logs = head(x, torch.tensor([0]))
    c10, c100 = torch.cos(torch.deg2rad(torch.tensor(10.0, dtype=torch.float64))), torch.cos(
        torch.deg2rad(torch.tensor(100.0, dtype=torch.float64)))
    expected = -F.log_softmax(torch.stack([4 * torch.cos(torch.acos(c10) + 0.2), 4 * c100]), 0)[0]
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["cos_target"], c10)
    loss.backward()
    moved = head.weight.grad.abs().sum(2) > 0  # (class, sub-centre): the two maxima only
    assert moved.tolist() == [[False, True], [True, False]]


def test_the_loss_by_hand_k_1_is_arcface_and_the_centre_api_refuses_k_centres():
    emb, weight, labels = problem()
    head = create_head("subcenter_arcface", 6, 7, s=16.0, m=0.5).double()
    assert head.weight.shape == (7, 3, 6) and head.centres_per_class == 3 and "k=3" in repr(head)
    head.load_full_weight(weight)
    torch.testing.assert_close(head(emb, labels)[0], by_hand(emb, weight, labels, 16.0, 0.5))
    one = create_head("subcenter_arcface", 6, 7, s=16.0, m=0.5, k=1).double()
    arcface = create_head("arcface", 6, 7, s=16.0, m=0.5).double()
    arcface.load_full_weight(weight[:, 0])
    one.load_full_weight(arcface.full_weight())  # k = 1 holds ArcFace's (classes, d) centres
    torch.testing.assert_close(one(emb, labels)[0], arcface(emb, labels)[0])
    assert one.local_centres() is one.weight
    with pytest.raises(ConfigError, match="keeps 3 centres per class, and a loss that reads or moves one centre"):
        head.local_centres()
    with pytest.raises(ConfigError, match="set margin.margin arcface"):
        head.update_local_centres(torch.tensor([0]), torch.zeros(1, 6))


def test_sampling_keeps_all_k_sub_centres_of_a_kept_class():
    torch.manual_seed(0)
    head = create_head("subcenter_arcface", 8, 40, s=16.0, sample_rate=0.25)
    emb, labels = torch.randn(6, 8), torch.tensor([3, 17, 17, 25, 39, 0])
    loss, _ = head(emb, labels)
    loss.backward()
    kept = head.sampled_classes
    assert len(kept) == 10 and set(labels.tolist()) <= set(kept.tolist())
    unkept = torch.ones(40, dtype=torch.bool)
    unkept[kept] = False
    assert (head.weight.grad[unkept] == 0).all() and (head.weight.grad[kept].abs().sum((1, 2)) > 0).all()
    subset = create_head("subcenter_arcface", 8, 10, s=16.0)
    subset.load_full_weight(head.full_weight()[kept])
    torch.testing.assert_close(loss, subset(emb, torch.searchsorted(kept, labels))[0])


def test_options_reach_the_head_a_bad_k_is_refused_and_centre_losses_refuse_it():
    cfg = tiny_config(margin={"margin": "subcenter_arcface", "options": {"k": 2}})
    head = head_from_config(cfg.margin, 6, 5)
    assert isinstance(head, SubCenterArcFace) and head.weight.shape == (5, 2, 6) and head.m2 == 0.3  # tiny: m 0.3
    assert head_traits(cfg.margin).centres_per_class == 2
    with pytest.raises(ConfigError, match=r"margin head holds 5 classes × 2 × 6, got class centres of shape \(5, 6\)"):
        head.load_full_weight(torch.zeros(5, 6))  # a teacher's one-centre-per-class head file
    for k in (0, 1.5, True):
        with pytest.raises(ConfigError, match=r"key 'margin.options.k': margin head 'subcenter_arcface' refuses k="):
            tiny_config(margin={"margin": "subcenter_arcface", "options": {"k": k}})
    # the losses through the teacher's class centres read one centre per identity: refused, naming margin.margin
    for loss in ("kd", "proxyless_kd", "margin_distillation"):
        term = LossTerm(name=loss, loss=loss, alpha=1.0, key="distill.loss")
        problems = term_problems([term], Setting(head=head_traits(cfg.margin)))
        assert [p.key for p in problems] == ["margin.margin"] and "keeps 2 centres per class" in str(problems[0])


# --- a real two-process gloo group ----------------------------------------------------------------------------

E, C, K, S = 6, 23, 3, 16.0   # 23 classes: shards of 12 and 11
ROWS = [(0, 3), (3, 5)]       # rank 0 holds 3 samples, rank 1 holds 2


def _rank_work(rank, data):
    lo, hi = ROWS[rank]
    head = create_head("subcenter_arcface", E, C, s=S).double()
    head.load_full_weight(data["weight"])
    emb = data["emb"][lo:hi].clone().requires_grad_()
    loss, _ = head(emb, data["y"][lo:hi])
    loss.backward()
    out = dict(loss=loss.detach(), emb_grad=emb.grad, weight_grad=head.weight.grad, full=head.full_weight(),
               shard=tuple(head.weight.shape))
    torch.manual_seed(10 + rank)
    sampled = create_head("subcenter_arcface", E, C, s=S, sample_rate=0.5).double()
    sampled.load_full_weight(data["weight"])
    out.update(sampled_loss=sampled(data["emb"][lo:hi], data["y"][lo:hi])[0].detach(),
               sampled_classes=sampled.sampled_classes)
    return out


def test_two_gloo_ranks_equal_one_process_holding_every_sub_centre(tmp_path):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(C, K, E, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 22, 11, 12, 5])
    near = torch.tensor([0, 1, 2, 1, 0])  # the sub-centre each sample starts near
    data = dict(weight=weight, y=y, emb=weight[y, near] + 0.6 * torch.randn(5, E, generator=g, dtype=torch.float64))
    ranks = gloo_ranks(tmp_path, data, _rank_work)

    emb, w = data["emb"].clone().requires_grad_(), weight.clone().requires_grad_()
    loss = by_hand(emb, w, y, S, 0.5)
    loss.backward()
    assert [r["shard"] for r in ranks] == [(12, K, E), (11, K, E)]
    for r, (lo, hi) in zip(ranks, ROWS, strict=True):
        torch.testing.assert_close(r["loss"], loss.detach())
        torch.testing.assert_close(r["emb_grad"], 2 * emb.grad[lo:hi])  # × world size, for DDP's mean
        torch.testing.assert_close(r["full"], weight)
    torch.testing.assert_close(torch.cat([r["weight_grad"] for r in ranks]), w.grad)

    union = torch.cat([r["sampled_classes"] for r in ranks])
    assert set(y.tolist()) <= set(union.tolist()) and [len(r["sampled_classes"]) for r in ranks] == [6, 5]
    expected = by_hand(data["emb"], weight[union], torch.searchsorted(union, y), S, 0.5)
    for r in ranks:
        torch.testing.assert_close(r["sampled_loss"], expected)


# --- a stage trains and resumes bit for bit -------------------------------------------------------------------

def test_a_stage_with_subcenter_arcface_resumes_bit_identically(tmp_path, monkeypatch):
    import teachers
    from distill.train.engine import StageSpec

    cfg = tiny_config(margin={"margin": "subcenter_arcface", "s": 16.0, "m": 0.3, "sample_rate": 0.5},
                      train={"max_steps": 4, "checkpoint_every": 2})
    teacher = teachers.build_teacher(cfg.teacher.spec())
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=1.0, generation=1)
    whole, stopped, again = whole_and_resumed(cfg, spec, teacher, tmp_path, monkeypatch)
    assert whole["head_weight"].shape == (8, 3, 32) and stopped["step"] == 2  # TinyFaces: 8 classes
    assert torch.equal(again["head_weight"], whole["head_weight"])
    assert all(torch.equal(again["model"][k], whole["model"][k]) for k in whole["model"])
