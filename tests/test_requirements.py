"""What a distillation loss needs (distill/losses/requirements.py), declared once per loss, and the one check of a
run's terms against it (distill/losses/term_checks.py); the margin head's centre API the centre losses use; what
a stage's alpha does to the terms (distill/losses/terms.py: stage_terms)."""

import pytest
import torch
from torch import nn

from distill.losses.heads import create_head
from distill.losses.registry import DISTILL_LOSSES, register_loss, requirements, unregister_loss
from distill.losses.requirements import Requirements
from distill.losses.term_checks import Setting, check_terms, term_problems
from distill.losses.terms import LossTerm, stage_terms
from distill.utils.errors import ConfigError

FLAGS = ("needs_labels", "needs_features", "needs_centres", "replaces_classification", "same_size", "any_size",
         "images_per_id", "min_batch")


def test_every_registered_loss_declares_one_requirements_value_and_no_loose_flags():
    for name, loss in DISTILL_LOSSES.items():
        assert isinstance(requirements(name), Requirements), name
        assert not [f for f in FLAGS if hasattr(loss, f)], name
    assert requirements("fitnet").feature_maps and requirements("fitnet").online_teacher
    assert requirements("kd").centres and not requirements("kd").replaces_classification
    assert requirements("proxyless_kd") == Requirements(centres=True, sizes="same", replaces_classification=True)
    assert requirements("rkd").min_batch == 3 and requirements("cosine") == Requirements()


def test_a_class_declares_its_requirements_as_an_attribute_or_at_registration_not_both():
    class Relations(nn.Module):
        requires = Requirements(sizes="any", min_batch=2)

        def forward(self, student_emb, teacher_emb):
            return (student_emb.sum() - teacher_emb.sum()) * 0

    try:
        register_loss(Relations, "relations_example")
        assert requirements("relations_example") == Requirements(sizes="any", min_batch=2)
        class Narrower(Relations):  # a subclass inherits its base's declaration, or declares its own at registration
            pass

        register_loss(Narrower, "narrower_example")
        assert requirements("narrower_example") == Requirements(sizes="any", min_batch=2)
        register_loss(Narrower, "narrower_labels", requires=Requirements(labels=True))
        assert requirements("narrower_labels") == Requirements(labels=True)
        with pytest.raises(TypeError, match="declare its Requirements once"):
            register_loss(Relations, "relations_twice", requires=Requirements())
        with pytest.raises(TypeError, match="must be a Requirements value"):
            register_loss(lambda s, t: s, "not_a_value", requires={"labels": True})
    finally:
        for name in ("relations_example", "narrower_example", "narrower_labels", "relations_twice", "not_a_value"):
            unregister_loss(name)
    with pytest.raises(ValueError, match="sizes must be one of projectable, same, any"):
        Requirements(sizes="equal")
    with pytest.raises(ValueError, match="min_batch must be an integer >= 1"):
        Requirements(min_batch=0)


def _term(loss, alpha=1.0, key="distill.loss", **options):
    return LossTerm(loss, loss, alpha, options, key)


@pytest.mark.parametrize("loss,setting,key,says", [
    ("fitnet", Setting(teacher="onnx"), "teacher.onnx", "an ONNX file does not give"),
    ("attention_transfer", Setting(teacher="torch", cached=True), "teacher.cache", "set teacher.cache: false"),
    ("attention_transfer", Setting(stages=(("student", "vargfacenet", 4),)), "distill.loss",
     "stage 5 of the student (vargfacenet): it has 4 feature stages"),
    ("rkd", Setting(batch_size=2), "train.batch_size", "needs at least 3 per batch, train.batch_size is 2"),
    ("kd", Setting(teacher="onnx", centres=False), "teacher", "which a loaded ONNX teacher does not carry"),
    ("ekd", Setting(images_per_id=0), "data.images_per_id", "needs repeated identities"),
    ("ekd", Setting(images_per_id=4, batch_size=4), "data.images_per_id", "gives one identity per batch"),
    ("adadistill", Setting(student_dim=32, teacher_dim=64, project="linear"), "teacher",
     "distill.loss adadistill moves the student's class centres"),
    ("cosine", Setting(student_dim=32, teacher_dim=64, project="none"), "teacher", "Set distill.project: linear"),
])
def test_each_requirement_a_setting_does_not_meet_is_one_problem_naming_its_key(loss, setting, key, says):
    options = {"stages": [-3, 5]} if loss == "attention_transfer" and setting.stages else {}
    problems = term_problems([_term(loss, **options)], setting)
    assert len(problems) == 1 and problems[0].key == key and says in str(problems[0]), problems
    assert term_problems([_term(loss, **options)], Setting()) == []  # nothing known: nothing checked
    assert term_problems([_term(loss, 0.0, **options)], setting) == []  # a term at alpha 0 needs nothing


def test_what_is_met_passes_and_two_owners_of_the_classification_are_refused():
    fine = Setting(teacher="torch", cached=False, centres=True, images_per_id=4, batch_size=16, student_dim=32,
                   teacher_dim=64, project="linear", stages=(("student", "vargfacenet", 4),))
    terms = [_term("cosine", key="distill.terms[0]"), _term("kd", key="distill.terms[1]"),
             _term("rkd", key="distill.terms[2]"), _term("fitnet", key="distill.terms[3]")]
    assert term_problems(terms, fine) == []
    owners = [LossTerm("a", "adadistill", 1.0), LossTerm("b", "proxyless_kd", 1.0)]
    with pytest.raises(ConfigError, match="a and b both replace the classification loss"):
        check_terms(owners, Setting())


def test_the_margin_head_gives_its_centres_through_its_api():
    head = create_head("arcface", 2, 4, s=16.0, m=0.3)
    head.class_start, head.num_local_classes = 2, 2  # rank 1 of 2 (simulated: the shard's bounds)
    shard = head.centre_shard()
    assert (shard.start, shard.count) == (2, 2) and head.local_centres() is head.weight
    full = torch.arange(8.0).reshape(4, 2)
    assert torch.equal(shard.rows_of(full), full[2:])
    local, mine = shard.local(torch.tensor([0, 3, 2]))
    assert local.tolist() == [-2, 1, 0] and mine.tolist() == [False, True, True]
    head.update_local_centres(torch.tensor([1]), torch.tensor([[5.0, 6.0]], dtype=torch.float64))
    assert head.weight[1].tolist() == [5.0, 6.0] and head.weight.dtype == torch.float32
    head.freeze_centres()
    assert not head.weight.requires_grad


class _Distill:
    def __init__(self, terms=None, loss="cosine", alpha=7.0):
        self.terms, self.loss, self.alpha = terms, loss, alpha


def test_a_stage_alpha_is_a_weight_in_both_forms():
    short = _Distill()
    assert [t.alpha for t in stage_terms(short, 7.0)] == [7.0]
    assert [t.alpha for t in stage_terms(short, 0.0)] == [0.0]  # the baseline: every term at 0
    assert [t.alpha for t in stage_terms(short, 5.0)] == [5.0]
    both = _Distill([{"loss": "equivalent_angular", "alpha": 6}, {"loss": "cosine", "alpha": 2}], None, None)
    assert [t.alpha for t in stage_terms(both, 8.0)] == [6.0, 2.0]  # the experiment's weight: as configured
    assert [t.alpha for t in stage_terms(both, 0.0)] == [0.0, 0.0]
    assert [t.alpha for t in stage_terms(both, 4.0)] == [3.0, 1.0]  # another weight scales them in proportion
