"""A margin head registered from outside (distill.losses.heads.register_head) is the one a stage trains with."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import TinyFaces, tiny_config

from distill.losses import heads
from distill.losses.heads import HEADS, MarginHead, head_from_config, register_head, unregister_head
from distill.train.engine import StageSpec, run_stage
from distill.utils.errors import ConfigError

NAME = "recording_cosface"


class RecordingCosFace(MarginHead):
    """CosFace (target logit s·(cosθ − m)) that records every forward: its loss, the loss recomputed by hand
    from the same inputs, and a log term `custom_head` = 1 that no built-in head writes."""

    built: list = []

    def __init__(self, embedding_size, num_classes, s=64.0, m=0.4, **options):
        super().__init__(embedding_size, num_classes, s=s, m1=1.0, m2=0.0, m3=m, **options)
        self.calls = []
        RecordingCosFace.built.append(self)

    def forward(self, embeddings, labels):
        loss, logs = super().forward(embeddings, labels)
        with torch.no_grad():  # plain single-process CosFace, by hand
            cos = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float())).clamp(-1, 1)
            logits = self.s * cos
            rows = torch.arange(len(labels))
            logits[rows, labels] = self.s * (cos[rows, labels] - self.m3)
            expected = F.cross_entropy(logits, labels.long())
        self.calls.append((float(loss.detach()), float(expected)))
        return loss, {**logs, "custom_head": torch.ones(())}


@pytest.fixture
def registered():
    RecordingCosFace.built.clear()
    register_head(RecordingCosFace, name=NAME)
    try:
        yield RecordingCosFace
    finally:
        unregister_head(NAME)
        RecordingCosFace.built.clear()
    assert NAME not in HEADS


def test_a_registered_head_is_built_from_the_margin_section_and_trains(registered, tmp_path):
    cfg = tiny_config(margin={"margin": NAME, "s": 16.0, "m": 0.35}, train={"max_steps": 4, "log_every": 2})
    spec = StageSpec("baseline", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=0.0)
    run_stage(cfg, spec, str(tmp_path), TinyFaces(), {}, progress=False)

    # the config check built a tiny one (its values refused at load, not at stage start); the engine built this
    # head, not the softmax fallback
    assert [h.num_classes for h in registered.built] == [4096, 8]
    head = registered.built[1]
    assert (head.s, head.m3) == (16.0, 0.35) and head.num_classes == 8 and head.embedding_size == 32
    assert len(head.calls) == 4  # one forward per step (batch 16, no accumulation)
    for loss, expected in head.calls:
        assert loss == pytest.approx(expected, rel=1e-5)  # the loss the head computes is CosFace's
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "train/loss" in x]
    assert [x["step"] for x in logged] == [2, 4] and all(x["train/custom_head"] == 1.0 for x in logged)
    for row, window in zip(logged, (head.calls[:2], head.calls[2:]), strict=True):  # the trained loss is this head's
        assert row["train/loss"] == pytest.approx(sum(c[0] for c in window) / 2, rel=1e-5)


def test_registration_refusals_and_a_custom_config_mapping(registered):
    with pytest.raises(ValueError, match="registered twice"):
        register_head(RecordingCosFace, name=NAME)
    with pytest.raises(ValueError, match="registered twice"):
        register_head(heads.arcface)  # a built-in name is not replaced by accident

    # a factory without sample_rate: the option set in the config is an error at validation, not dropped
    def plain(embedding_size, num_classes, s=64.0):
        return MarginHead(embedding_size, num_classes, s=s)

    register_head(plain, name="plain_test_head")
    try:
        with pytest.raises(ConfigError, match="does not take margin.sample_rate"):
            tiny_config(margin={"margin": "plain_test_head", "sample_rate": 0.5})
        assert head_from_config(tiny_config(margin={"margin": "plain_test_head"}).margin, 8, 4).s == 16.0
    finally:
        unregister_head("plain_test_head")

    # an entry's own mapping from margin.* to its arguments
    register_head(name="scaled_test_head", config_kwargs=lambda margin: {"s": 2 * margin.s, "m": margin.m})(
        RecordingCosFace)
    try:
        head = head_from_config(tiny_config(margin={"margin": "scaled_test_head", "m": 0.2}).margin, 8, 4)
        assert isinstance(head, RecordingCosFace) and (head.s, head.m3) == (32.0, 0.2)
    finally:
        unregister_head("scaled_test_head")
    assert NAME in HEADS and not {"plain_test_head", "scaled_test_head"} & set(HEADS)  # the test's own are gone
