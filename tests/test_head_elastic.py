"""ElasticFace heads (elasticface_arc, elasticface_cos): the per-sample margin draw by hand, ElasticFace+'s pairings,
the draw's seed and resume, two gloo ranks equal to one process, and a stage that resumes bit for bit."""

import math

import pytest
import torch
import torch.nn.functional as F
from forked_ranks import gloo_ranks
from tiny import tiny_config, whole_and_resumed

from distill.losses.heads import create_head, head_from_config, head_traits
from distill.losses.heads_elastic import ElasticFace, draw_seed
from distill.utils.errors import ConfigError


def drawn(seed, draw, n, m, std):
    """Draw number `draw` of a head seeded `seed`, as the module docstring defines it."""
    return torch.normal(m, std, (n,), generator=torch.Generator().manual_seed(draw_seed(seed, draw)))


def by_hand(embeddings, weight, labels, margins, s, kind):
    """Cross-entropy of s·cos θ_j with the target s·cos(θ_y + m_i) (arc) or s·(cos θ_y − m_i) (cos)."""
    cos = F.normalize(embeddings) @ F.normalize(weight).T
    rows = torch.arange(len(labels))
    target = cos[rows, labels]
    margin = torch.cos(torch.acos(target) + margins) if kind == "arc" else target - margins
    logits = (s * cos).index_put((rows, labels), s * margin)
    return F.cross_entropy(logits, labels)


def problem(seed=0, n=5, classes=7, dim=6):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    embeddings = weight[labels] + 0.7 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return embeddings, weight, labels


# --- the draw and the margins, by hand ------------------------------------------------------------------------

@pytest.mark.parametrize("name, kind, m", [("elasticface_arc", "arc", 0.5), ("elasticface_cos", "cos", 0.35)])
def test_each_training_step_draws_one_margin_per_sample_and_evaluation_uses_m(name, kind, m):
    emb, weight, labels = problem()
    head = create_head(name, 6, 7, s=8.0, m=m, std=0.1, seed=5).double()
    head.load_full_weight(weight)
    for step in range(2):
        loss, _ = head(emb, labels)
        margins = drawn(5, step, 5, m, 0.1).double()  # float32, as the authors' draw
        torch.testing.assert_close(loss, by_hand(emb, weight, labels, margins, 8.0, kind))
    assert head.draws == 2 and head.std == 0.1 and head.m == m
    head.eval()
    torch.testing.assert_close(head(emb, labels)[0], by_hand(emb, weight, labels, torch.full((5,), m), 8.0, kind))
    assert head.draws == 2  # evaluation draws nothing


def test_plus_pairs_the_sorted_margins_with_the_target_cosines_both_ways():
    """Target cosines 0.5, 0.9, 0.7 (highest first: samples 1, 2, 0), margins drawn 0.3, 0.1, 0.2 (sorted 0.1, 0.2,
    0.3). code (the authors'): sample i gets sorted[order[i]] = 0.2, 0.3, 0.1; ranked: the highest cosine the
    smallest margin: sample 1 0.1, sample 2 0.2, sample 0 0.3."""
    cosine = torch.tensor([[0.5, 0.0], [0.0, 0.9], [0.7, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    margins = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)
    pairs = {p: create_head("elasticface_arc", 4, 2, plus=True, plus_pairing=p)._paired(margins, cosine, labels)
             for p in ("code", "ranked")}
    assert pairs["code"].tolist() == pytest.approx([0.2, 0.3, 0.1])
    assert pairs["ranked"].tolist() == pytest.approx([0.3, 0.1, 0.2])


def test_the_seed_comes_from_the_generator_the_run_seeds_and_the_state_resumes_the_draws():
    torch.manual_seed(3)
    first = create_head("elasticface_cos", 6, 7)
    torch.manual_seed(3)
    again = create_head("elasticface_cos", 6, 7)
    assert first.seed == again.seed and torch.equal(first.weight, again.weight)  # same run seed: same draws
    emb, _, labels = problem()
    first(emb.float(), labels)
    first(emb.float(), labels)
    resumed = create_head("elasticface_cos", 6, 7, seed=1)
    resumed.load_head_state(first.head_state())
    assert (resumed.seed, resumed.draws) == (first.seed, 2)
    assert torch.equal(resumed.draw_margins(4), first.draw_margins(4))
    assert draw_seed(0, 1) != draw_seed(1, 0) and draw_seed(7, 0) == 7
    with pytest.raises(ConfigError, match=r"lacks \['draws', 'seed'\]"):
        resumed.load_head_state({})


@pytest.mark.parametrize("options, key", [({"plus_pairing": "paper"}, "plus_pairing"), ({"std": -0.1}, "std"),
                                          ({"plus_batch": "device"}, "plus_batch"), ({"seed": -1}, "seed")])
def test_bad_options_are_refused_when_the_config_loads_naming_the_key(options, key):
    with pytest.raises(ConfigError, match=rf"key 'margin.options.{key}': margin head 'elasticface_arc' refuses"):
        tiny_config(margin={"margin": "elasticface_arc", "options": options})


def test_options_reach_the_head_and_it_takes_no_margins_from_a_loss():
    cfg = tiny_config(margin={"margin": "elasticface_cos", "s": 32.0, "m": 0.35,
                              "options": {"plus": True, "plus_pairing": "ranked", "seed": 9}})
    head = head_from_config(cfg.margin, 6, 7)
    assert isinstance(head, ElasticFace) and (head.kind, head.s, head.m, head.std) == ("cos", 32.0, 0.35, 0.02)
    assert (head.plus, head.plus_pairing, head.plus_batch, head.seed) == (True, "ranked", "rank", 9)
    assert head_traits(cfg.margin).takes_sample_margins is False
    with pytest.raises(ConfigError, match="takes no margin per sample"):
        head(torch.randn(2, 6), torch.tensor([0, 1]), margins=torch.tensor([0.2, 0.3]))


# --- a real two-process gloo group ----------------------------------------------------------------------------

E, C, S = 6, 23, 16.0        # 23 classes: shards of 12 and 11
ROWS = [(0, 3), (3, 5)]      # rank 0 holds 3 samples, rank 1 holds 2
CASES = {  # name: (head, options)
    "arc": ("elasticface_arc", dict(std=0.2)),
    "cos_plus_rank": ("elasticface_cos", dict(std=0.2, plus=True)),
    "arc_plus_global_ranked": ("elasticface_arc", dict(std=0.2, plus=True, plus_batch="global", plus_pairing="ranked")),
}


def _rank_work(rank, data):
    out, (lo, hi) = {}, ROWS[rank]
    for case, (name, options) in CASES.items():
        torch.manual_seed(42)  # as the engine seeds every rank alike before it builds the head
        head = create_head(name, E, C, s=S, **options).double()
        head.load_full_weight(data["weight"])
        emb = data["emb"][lo:hi].clone().requires_grad_()
        loss, _ = head(emb, data["y"][lo:hi])
        loss.backward()
        out[case] = dict(loss=loss.detach(), emb_grad=emb.grad, weight_grad=head.weight.grad, seed=head.seed)
    torch.manual_seed(10 + rank)
    sampled = create_head("elasticface_arc", E, C, s=S, std=0.2, sample_rate=0.5, seed=4).double()
    sampled.load_full_weight(data["weight"])
    out["sampled"] = dict(loss=sampled(data["emb"][lo:hi], data["y"][lo:hi])[0].detach(),
                          classes=sampled.sampled_classes)
    return out


def paired_by_segment(margins, target, sizes, pairing):
    """ElasticFace+'s pairing within each segment of rows (the authors' per-GPU batch)."""
    out, start = margins.clone(), 0
    for n in sizes:
        ascending = margins[start:start + n].sort().values
        order = target[start:start + n].argsort(descending=True)
        out[start:start + n] = ascending[order] if pairing == "code" else ascending[order.argsort()]
        start += n
    return out


def test_two_gloo_ranks_equal_one_process_with_the_same_draw(tmp_path):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(C, E, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 22, 11, 12, 5])
    data = dict(weight=weight, y=y, emb=weight[y] + 0.8 * torch.randn(5, E, generator=g, dtype=torch.float64))
    ranks = gloo_ranks(tmp_path, data, _rank_work)

    torch.manual_seed(42)
    seed = create_head("elasticface_arc", E, C).seed  # the seed each rank drew from the same generator state
    target = (F.normalize(data["emb"]) * F.normalize(weight)[y]).sum(1)
    for case, (name, options) in CASES.items():
        assert ranks[0][case]["seed"] == ranks[1][case]["seed"] == seed
        margins = drawn(seed, 0, 5, 0.5 if name == "elasticface_arc" else 0.35, 0.2).double()
        if options.get("plus"):
            sizes = [5] if options.get("plus_batch") == "global" else [3, 2]
            margins = paired_by_segment(margins, target, sizes, options.get("plus_pairing", "code"))
        emb, w = data["emb"].clone().requires_grad_(), weight.clone().requires_grad_()
        loss = by_hand(emb, w, y, margins, S, "arc" if name == "elasticface_arc" else "cos")
        loss.backward()
        for r, (lo, hi) in zip(ranks, ROWS, strict=True):
            torch.testing.assert_close(r[case]["loss"], loss.detach())
            torch.testing.assert_close(r[case]["emb_grad"], 2 * emb.grad[lo:hi])  # × world size, for DDP's mean
        torch.testing.assert_close(torch.cat([r[case]["weight_grad"] for r in ranks]), w.grad)

    # sampled: the softmax over the union of the ranks' kept classes, with the margins both ranks drew
    union = torch.cat([r["sampled"]["classes"] for r in ranks])
    assert set(y.tolist()) <= set(union.tolist())
    expected = by_hand(data["emb"], weight[union], torch.searchsorted(union, y), drawn(4, 0, 5, 0.5, 0.2).double(),
                       S, "arc")
    for r in ranks:
        torch.testing.assert_close(r["sampled"]["loss"], expected)


# --- a stage trains and resumes bit for bit -------------------------------------------------------------------

def test_a_stage_with_elasticface_plus_resumes_bit_identically(tmp_path, monkeypatch):
    import teachers
    from distill.train.engine import StageSpec

    cfg = tiny_config(margin={"margin": "elasticface_arc", "s": 16.0, "m": 0.3, "options": {"plus": True}},
                      train={"max_steps": 4, "checkpoint_every": 2})
    teacher = teachers.build_teacher(cfg.teacher.spec())
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=1.0, generation=1)
    whole, stopped, again = whole_and_resumed(cfg, spec, teacher, tmp_path, monkeypatch)
    assert int(stopped["head_state"]["draws"]) == 2 and int(whole["head_state"]["draws"]) == 4
    assert whole["head_state"]["seed"] == again["head_state"]["seed"] == stopped["head_state"]["seed"]
    assert int(again["head_state"]["draws"]) == 4
    assert torch.equal(again["head_weight"], whole["head_weight"])
    assert all(torch.equal(again["model"][k], whole["model"][k]) for k in whole["model"])
    assert math.isfinite(float(whole["head_weight"].sum()))
