"""timm's model contract on every face model (distill/models/contract.py): pretrained_cfg, the classifier API,
feature_info, forward_intermediates / prune_intermediate_layers in timm's semantics (the checks of timm's
tests/test_models.py::test_model_forward_intermediates, written here for our models), features_only through
timm.create_model, grad checkpointing, TorchScript and FX, and that nothing existing changes."""

import copy
import math

import pytest
import timm
import torch
from tiny import tame
from tiny_experiment import write_experiment

import distill  # noqa: F401 - registers the face models with timm
from distill.config.schema import load_config
from distill.models.files import load_student, save_student
from distill.models.registry import create_model
from distill.utils.errors import ConfigError

FACE = ["vargfacenet", "vargfacenet_depthwise", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200"]
SMALL = {"vargfacenet": dict(multiplier=0.25, last_channels=32, units=[1, 1, 1]),
         "vargfacenet_depthwise": dict(multiplier=0.25, last_channels=32, units=[1, 1, 1])}


def _build(name, size=32, via_timm=False, tamed=True, **kwargs):
    """Seed 0; an IResNet tamed (its untrained outputs overflow at depth) unless maps are compared across builds."""
    torch.manual_seed(0)
    kwargs = {"embedding_size": 16, "input_size": size, **SMALL.get(name, {}), **kwargs}
    model = timm.create_model(name, **kwargs) if via_timm else create_model(name, **kwargs)
    return tame(model) if tamed and name.startswith("iresnet") and not kwargs.get("features_only") else model


@pytest.mark.parametrize("name", FACE)
def test_forward_intermediates_in_timms_semantics(name):
    model = _build(name).eval()
    x = torch.randn(2, 3, 32, 32)
    info = model.feature_info
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert len(maps) == len(info)
        for m, f in zip(maps, info, strict=True):  # channels and stride as feature_info says
            assert m.shape[1] == f["num_chs"] and m.shape[-1] == math.ceil(32 / f["reduction"]), (f, m.shape)
        assert torch.equal(final, model.forward_features(x)) and final.shape[1] == model.num_features
        assert torch.equal(model.forward_head(final), model(x))  # forward == forward_head(forward_features)
        only = model.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(only, maps, strict=True))
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)  # an int: the last n
        assert [t.shape for t in last2] == [t.shape for t in maps[-2:]]
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert torch.equal(picked[0], maps[0]) and torch.equal(picked[1], maps[-1])
        stopped, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(early[0], maps[1]) and torch.equal(stopped, maps[1])
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        norm = model._final_norm()
        assert torch.equal(normed, norm(maps[-1]) if norm is not None else maps[-1])
        with pytest.raises(ValueError, match="NCHW"):
            model.forward_intermediates(x, output_fmt="NHWC")
        pruned = copy.deepcopy(model)
        taken = pruned.prune_intermediate_layers([1])
        assert taken == [1] and pruned.num_classes == 0
        assert torch.equal(pruned.forward_intermediates(x, indices=taken, intermediates_only=True)[0], maps[1])
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["vargfacenet", "vargfacenet_depthwise", "iresnet18", "r50"])
@pytest.mark.parametrize("size", [32, 48])
def test_features_only_through_timm_at_two_sizes(name, size):
    x = torch.randn(2, 3, size, size)
    reference = _build(name, size, tamed=False).eval()
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        listed = _build(name, size, via_timm=True, features_only=True).eval()  # timm's FeatureListNet
        assert type(listed).__name__ == "FeatureListNet"
        got = listed(x)
        assert [t.shape for t in got] == [t.shape for t in expected]
        assert listed.feature_info.channels() == [f["num_chs"] for f in reference.feature_info]
        getter = _build(name, size, via_timm=True, features_only=True, feature_cls="getter", out_indices=(1, -1))
        assert type(getter).__name__ == "FeatureGetterNet"
        two = getter.eval()(x)
        assert [t.shape for t in two] == [expected[1].shape, expected[-1].shape]
    for t, e in zip(got, expected, strict=True):  # the same weights (seed 0) give the same maps
        assert torch.allclose(t, e, atol=1e-5)


@pytest.mark.parametrize("name", ["vargfacenet", "iresnet18"])
def test_pretrained_cfg_and_classifier_api(name):
    model = _build(name, 48)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and cfg["input_size"] == (3, 48, 48) and cfg["fixed_input_size"] is True
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5) and cfg["num_classes"] == 0 == model.num_classes
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    final = model.forward_features(torch.randn(1, 3, 48, 48))
    assert tuple(final.shape[-2:]) == cfg["pool_size"] and model.head_hidden_size == 16
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    assert not [k for k in model.state_dict() if k.startswith("classifier")]  # the keys are unchanged
    timm_built = _build(name, 48, via_timm=True)
    assert timm_built.pretrained_cfg["input_size"] == (3, 48, 48)
    assert timm_built.state_dict().keys() == model.state_dict().keys()
    matcher = model.group_matcher()
    import re
    names = [n for n, _ in model.named_parameters()]
    assert any(re.match(matcher["stem"], n) for n in names) and any(re.match(matcher["blocks"], n) for n in names)
    with pytest.raises(ValueError, match="in_chans=3"):
        _build(name, 32, in_chans=1)


@pytest.mark.parametrize("name", ["vargfacenet", "iresnet18"])
def test_a_classifier_when_asked_and_student_pt_keeps_the_embedding_model(name, tmp_path):
    model = _build(name, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, embedding = model(x), model.forward_head(model.forward_features(x), pre_logits=True)
    assert logits.shape == (3, 10) and embedding.shape == (3, 16) and model.pretrained_cfg["num_classes"] == 10
    save_student(tmp_path / "student.pt", model, name)
    loaded, payload = load_student(tmp_path / "student.pt")  # strict: the embedding model, no classifier keys
    assert "num_classes" not in payload["kwargs"] and loaded.num_classes == 0
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), embedding)
    model.reset_classifier(0)
    with torch.no_grad():
        assert torch.equal(model(x), embedding)
    model.reset_classifier(5)
    assert model(x).shape == (3, 5) and model.get_classifier().out_features == 5


@pytest.mark.parametrize("name", ["vargfacenet", "iresnet18"])
def test_grad_checkpointing_trains_what_plain_training_trains(name):
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model = _build(name).train()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6) for k in grads[0])


@pytest.mark.parametrize("name", ["vargfacenet", "iresnet18"])
def test_torchscript_and_fx_give_the_eager_embedding(name):
    import warnings
    model = _build(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in this torch
        scripted = torch.jit.script(model)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        eager = model(x)
        assert torch.allclose(scripted(x), eager, atol=1e-6) and torch.allclose(traced(x), eager, atol=1e-6)


def test_timm_knows_the_iresnets_by_name_and_alias():
    for name in ("iresnet18", "iresnet200", "r18", "r100"):
        assert timm.is_model(name), name
    model = _build("iresnet18", via_timm=True)
    alias = timm.create_model("r18", embedding_size=16, input_size=32)
    assert type(alias) is type(model) and alias.state_dict().keys() == model.state_dict().keys()


def test_an_experiment_refuses_num_classes_for_its_models(tmp_path):
    exp = write_experiment(tmp_path / "x.yaml", tmp_path / "faces")
    with pytest.raises(ConfigError, match="student.num_classes"):
        load_config(str(exp), ["student.num_classes=10"])
    with pytest.raises(ConfigError, match="teacher.num_classes"):
        load_config(str(exp), ["teacher.num_classes=10"])


@pytest.mark.parametrize("name", ["vargfacenet", "iresnet18"])
def test_global_pool_off_gives_the_map_and_every_parameter_trains(name):
    model = _build(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final = model.forward_features(x)
        model.reset_classifier(0, "")  # timm's "no pooling": the embedding block is left out
        assert torch.equal(model(x), final)
        model.reset_classifier(0, "embedding")
        assert model(x).shape == (2, 16)
    with pytest.raises(ValueError, match="global_pool 'avg'"):
        model.reset_classifier(0, "avg")
    # the last BatchNorm's fixed scale (MXNet fix_gamma) is a buffer: same key, every parameter gets a gradient
    norm = "features" if name.startswith("iresnet") else "embedding_norm"  # IResNet keeps arcface_torch's names
    assert f"{norm}.weight" in model.state_dict() and f"{norm}.weight" not in dict(model.named_parameters())
    assert torch.equal(getattr(model, norm).weight, torch.ones(16))
    model.train()(x).square().sum().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    timm_unpooled = timm.create_model(name, embedding_size=16, input_size=32, global_pool="").eval()
    assert timm_unpooled(x).dim() == 4


def test_the_timm_test_runner_keeps_only_the_face_models(tmp_path, capsys):
    """tools/timm_model_tests.py on a stand-in for timm's tests/test_models.py (--src): the conftest it writes
    registers the face models before collection and deselects every other model's case."""
    from tools.timm_model_tests import main
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_models.py").write_text(
        "import pytest\nimport timm\n\n\n"
        "@pytest.mark.parametrize('model_name', sorted(set(timm.list_models('*resnet18')) | {'vargfacenet'}))\n"
        "def test_model_forward(model_name):\n"
        "    assert model_name in ('vargfacenet', 'iresnet18'), model_name\n")
    assert main(["--src", str(tmp_path), "--", "-q"]) == 0  # resnet18, seresnet18 ... would fail if kept
    with pytest.raises(SystemExit, match="no tests/test_models.py"):
        main(["--src", str(tmp_path / "nowhere")])
