"""The margin heads' extension points: margin.options checked at config load, the hooks a head overrides
(class_cosines, logits, regulariser, head_state), and the traits the centre losses check (term_checks)."""

import functools

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config

from distill.losses.heads import HEADS, MarginHead, head_from_config, head_traits, register_head, unregister_head
from distill.losses.margin_head import HeadOptionError
from distill.losses.registry import register_loss, unregister_loss
from distill.losses.requirements import Requirements
from distill.losses.term_checks import Setting, term_problems
from distill.losses.terms import LossTerm
from distill.train.state import _with_added_keys
from distill.utils.errors import ConfigError


class TwoCentres(MarginHead):
    """k centres per class, the class's cosine their maximum (sub-centre ArcFace's shape), and one buffer."""

    takes_sample_margins = False

    def __init__(self, embedding_size, num_classes, s=64.0, m=0.5, k=2, **options):
        if not (isinstance(k, int) and k >= 1):
            raise HeadOptionError("k", f"k must be an integer >= 1, got {k!r}")
        self.k = k
        super().__init__(embedding_size, num_classes, s=s, m2=m, **options)
        self.centres_per_class = k
        self.register_buffer("calls", torch.zeros(()))

    def centre_shape(self, classes):
        return (classes, self.k, self.embedding_size)

    def class_cosines(self, embeddings, weight):
        self.calls += 1
        return torch.einsum("bd,ckd->bck", F.normalize(embeddings), F.normalize(weight, dim=2)).amax(2)


@pytest.fixture
def two_centres():
    register_head(TwoCentres, name="two_centres_test")
    yield "two_centres_test"
    unregister_head("two_centres_test")


def test_options_reach_the_head_and_its_hooks_run(two_centres):
    cfg = tiny_config(margin={"margin": two_centres, "s": 8.0, "options": {"k": 3}})
    head = head_from_config(cfg.margin, 4, 5)
    assert head.weight.shape == (5, 3, 4) and head.s == 8.0
    e, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    loss, _ = head(e, y)
    w = F.normalize(head.weight.detach(), dim=2)
    cos = torch.einsum("bd,ckd->bck", F.normalize(e), w).amax(2)
    logits = 8.0 * cos
    logits[range(6), y] = 8.0 * torch.cos(torch.acos(cos[range(6), y]) + 0.3)  # tiny_config: m 0.3
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits, y))
    assert int(head.calls) == 1
    full = head.full_weight()
    other = head_from_config(cfg.margin, 4, 5)
    other.load_full_weight(full)
    torch.testing.assert_close(other.weight, head.weight)
    assert head_traits(cfg.margin).centres_per_class == 3


@pytest.mark.parametrize("options, match", [
    ({"kk": 2}, r"key 'margin.options.kk': margin head 'two_centres_test' does not take kk; did you mean 'k'\?; "
                r"its options are k"),
    ({"s": 2.0}, r"key 'margin.options.s': s is a key of the margin section; set margin.s instead"),
    ({"k": 0}, r"key 'margin.options.k': margin head 'two_centres_test' refuses k=0: k must be an integer >= 1"),
])
def test_bad_options_are_refused_when_the_config_loads_naming_the_key(two_centres, options, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(margin={"margin": two_centres, "options": options})


def test_options_must_be_a_mapping_and_builtin_heads_take_none():
    with pytest.raises(ConfigError, match="key 'margin.options' must be a mapping"):
        tiny_config(margin={"options": [1]})
    assert tiny_config(margin={"options": {}}).margin.options is None  # the same run as no options
    with pytest.raises(ConfigError, match="margin.options.h': margin head 'arcface' does not take h; its options are "
                                          "none"):
        tiny_config(margin={"options": {"h": 0.3}})
    assert set(HEADS) >= {"arcface", "cosface", "combined", "softmax"}


def test_head_state_round_trips_and_a_foreign_state_is_refused(two_centres):
    cfg = tiny_config(margin={"margin": two_centres})
    head = head_from_config(cfg.margin, 4, 5)
    head(torch.randn(2, 4), torch.tensor([0, 1]))
    other = head_from_config(cfg.margin, 4, 5)
    other.load_head_state(head.head_state())
    assert int(other.calls) == 1
    with pytest.raises(ConfigError, match=r"keeps state \['calls'\], the checkpoint holds \[\]"):
        other.load_head_state({})
    assert head_from_config(tiny_config().margin, 4, 5).head_state() == {}


def test_a_compat_entry_written_before_margin_options_resumes():
    old = {"margin": "arcface", "s": 64.0}
    assert _with_added_keys("margin", old) == {**old, "options": None}
    assert _with_added_keys("seed", 3) == 3


def _term(loss):
    return LossTerm(name=loss, loss=loss, alpha=1.0, options={}, key="distill.loss")


def test_centre_losses_refuse_heads_they_cannot_use(two_centres):
    register_loss("sets_margins_test", requires=Requirements(sample_margins=True))(lambda s, t: (s - t).sum())
    try:
        head = functools.partial(head_traits, tiny_config(margin={"margin": two_centres}).margin)  # as checks.py
        for loss in ("kd", "proxyless_kd"):
            problems = term_problems([_term(loss)], Setting(head=head))
            assert problems and problems[0].key == "margin.margin"
            assert "keeps 2 centres per class" in str(problems[0])
        problems = term_problems([_term("sets_margins_test")], Setting(head=head))
        assert problems[0].key == "margin.margin" and "takes none per sample" in str(problems[0])
        assert term_problems([_term("equivalent_angular")], Setting(head=lambda: 1 / 0)) == []  # never built
        arcface = head_traits(tiny_config().margin)
        assert term_problems([_term(n) for n in ("kd", "sets_margins_test")], Setting(head=arcface)) == []
    finally:
        unregister_loss("sets_margins_test")


@pytest.mark.parametrize("head, loss, refused", [
    ("adaface", "margin_distillation", "decides its own margins"),
    ("magface", "margin_distillation", "decides its own margins"),
    ("curricularface", "margin_distillation", None),
    ("adaface", "adadistill", None),
    ("magface", "proxyless_kd", None),
    ("two_centres_test", "adadistill", "keeps 2 centres per class"),
    ("two_centres_test", "kd", "keeps 2 centres per class"),
])
def test_the_config_load_refuses_a_head_a_centre_loss_cannot_use(two_centres, head, loss, refused):
    sections = dict(margin={"margin": head}, distill={"loss": loss, "alpha": 1.0},
                    teacher={"head": "teacher_head.pt", "embedding_size": 64}, student={"embedding_size": 64})
    if refused is None:
        tiny_config(**sections)
        return
    with pytest.raises(ConfigError, match=f"distill.loss {loss} .*margin.margin {head} .*{refused}"):
        tiny_config(**sections)
