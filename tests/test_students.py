"""VarGFaceNet: the paper's sizes at 112x112, every ablation knob, timm registration, BN settings."""

import itertools

import pytest
import timm
import torch
from torch import nn

import distill  # noqa: F401  (registers the students with timm)
from distill.models.cost import count_flops, params_in_use
from distill.models.files import load_student, save_student
from distill.models.registry import create_model, list_models
from distill.models.vargfacenet import SEBlock, VarGBlock, VarGFaceNet
from distill.utils.errors import UnknownNameError


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_paper_sizes_at_112():
    model = VarGFaceNet()
    assert params_in_use(model, 112) == trainable(model)  # nothing built that the forward skips
    assert trainable(model) == pytest.approx(5.20e6, rel=0.03)
    assert count_flops(model, 112) == pytest.approx(1.02e9, rel=0.03)
    no_se = VarGFaceNet(se=False)
    assert trainable(no_se) == pytest.approx(4.96e6, rel=0.03)
    model.eval()
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 512)


def test_embedding_kernel_follows_input_size():
    for size, k in [(112, 7), (96, 6), (64, 4), (48, 3), (32, 2)]:
        model = VarGFaceNet(input_size=size)
        group_conv = [m for m in model.embed if isinstance(m, nn.Conv2d) and m.groups > 1][0]
        assert group_conv.kernel_size == (k, k), size
        assert group_conv.groups == 1024 // 8


KNOBS = list(itertools.product([1, 8], [True, False], ["prelu", "relu"], ["vargfacenet", "vargnet"],
                               ["vargfacenet", "gap"]))


@pytest.mark.parametrize("group_size,se,act,head,embedding", KNOBS)
def test_every_knob_combination_builds_and_uses_all_parameters(group_size, se, act, head, embedding):
    model = VarGFaceNet(group_size=group_size, se=se, act=act, head=head, embedding=embedding,
                        input_size=32, embedding_size=128, multiplier=1.0, last_channels=256, units=(1, 2, 1))
    model.eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 128)
    # every trainable parameter receives a gradient: DDP needs no find_unused_parameters
    assert params_in_use(model, 32) == trainable(model)
    assert any(isinstance(m, SEBlock) for m in model.modules()) == se
    acts = {type(m) for m in model.modules() if isinstance(m, (nn.PReLU, nn.ReLU))}
    assert acts == {nn.PReLU if act == "prelu" else nn.ReLU}


def test_group_size_one_is_depthwise_and_s8_has_8_channels_per_group():
    for s, multiplier in ((1, 1.25), (8, 1.25), (16, 1.0)):  # S=16 needs widths divisible by 16
        model = VarGFaceNet(group_size=s, multiplier=multiplier, input_size=32)
        grouped = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert grouped and all(m.in_channels // m.groups == s for m in grouped)


def test_width_multiplier_and_embedding_size():
    small = VarGFaceNet(multiplier=0.5, embedding_size=256, input_size=32)
    assert small.head[0].out_channels == 16
    assert small.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 256)
    assert trainable(small) < trainable(VarGFaceNet(input_size=32))


def test_batchnorm_matches_mxnet_settings():
    bns = [m for m in VarGFaceNet().modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.1 and m.eps == 2e-5 for m in bns)


def test_identity_blocks_build_no_shortcut_module():
    model = VarGFaceNet()
    blocks = [m for m in model.modules() if isinstance(m, VarGBlock)]
    identity = [b for b in blocks if b.shortcut is None]
    assert len(identity) == (3 - 1) + (7 - 1) + (4 - 1)  # all but the head block
    assert model.head[3].shortcut is not None  # the stride-2 head block needs one


def test_timm_registration():
    for name in ("vargfacenet", "vargfacenet_depthwise"):
        assert name in timm.list_models() and name in list_models()
    model = timm.create_model("vargfacenet", input_size=32, se=False)
    assert isinstance(model, VarGFaceNet) and model.config["se"] is False
    assert timm.create_model("vargfacenet_depthwise", input_size=32).config["group_size"] == 1


def test_unknown_student_lists_registered_names():
    with pytest.raises(UnknownNameError, match="vargfacenet"):
        create_model("mobilefacenet_typo")


def test_bad_group_size_is_a_clear_error():
    with pytest.raises(ValueError, match="groups of 7"):
        VarGFaceNet(group_size=7)


def test_student_checkpoint_round_trip(tmp_path):
    model = VarGFaceNet(input_size=32, embedding_size=64, se=False)
    path = tmp_path / "student.pt"
    save_student(path, model, "vargfacenet")
    loaded, payload = load_student(path)
    assert payload["kwargs"]["se"] is False and loaded.config == model.config
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    assert not (tmp_path / "student.pt.tmp").exists()
