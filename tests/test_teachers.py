"""Teachers: arcface_torch-compatible IResNet state dicts and forward, strict safe loading, freezing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import teachers
from distill.models.iresnet import LAYERS, IResNet
from distill.utils.errors import (
    CheckpointError,
    ConfigDeprecationWarning,
    ConfigError,
    UnknownNameError,
    UnsafeFileError,
)


@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_state_dict_layout_matches_arcface_torch(depth):
    model = IResNet(depth)
    sd = model.state_dict()
    blocks = sum(LAYERS[depth])
    # stem 7 + 18 per block + 6 per stage downsample + head 12 (docs/formats.md §4)
    assert len(sd) == 7 + 18 * blocks + 6 * 4 + 12
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["prelu.weight"].shape == (64,)
    for i, planes in enumerate((64, 128, 256, 512), start=1):
        assert sd[f"layer{i}.0.downsample.0.weight"].shape[:2] == (planes, planes // 2 if i > 1 else 64)
        assert f"layer{i}.0.downsample.1.num_batches_tracked" in sd
        assert f"layer{i}.1.downsample.0.weight" not in sd
        last = LAYERS[depth][i - 1] - 1
        for key in ("bn1.running_var", "conv1.weight", "bn2.bias", "prelu.weight", "conv2.weight", "bn3.weight"):
            assert f"layer{i}.{last}.{key}" in sd
    assert sd["fc.weight"].shape == (512, 25088) and sd["fc.bias"].shape == (512,)
    assert sd["bn2.weight"].shape == (512,) and "features.num_batches_tracked" in sd
    assert not model.features.weight.requires_grad and torch.all(model.features.weight == 1)


def test_r100_numbers():
    model = IResNet(100)
    assert len(model.state_dict()) == 925
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 65_155_648


def _bn(x, sd, name, eps=1e-5):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                        sd[f"{name}.weight"], sd[f"{name}.bias"], False, 0.0, eps)


def reference_forward(sd, x, layers):
    """IResNet written straight from docs/formats.md §4 over a state dict, independent of distill.models.iresnet."""
    x = F.prelu(_bn(F.conv2d(x, sd["conv1.weight"], padding=1), sd, "bn1"), sd["prelu.weight"])
    for i, n in enumerate(layers, start=1):
        for b in range(n):
            p = f"layer{i}.{b}"
            stride = 2 if b == 0 else 1
            out = _bn(x, sd, f"{p}.bn1")
            out = F.conv2d(out, sd[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(_bn(out, sd, f"{p}.bn2"), sd[f"{p}.prelu.weight"])
            out = _bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), sd, f"{p}.bn3")
            short = x if b else _bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=2), sd, f"{p}.downsample.1")
            x = out + short
    x = _bn(x, sd, "bn2").flatten(1)
    return _bn(F.linear(x, sd["fc.weight"], sd["fc.bias"]), sd, "features")


def test_forward_matches_the_specification():
    torch.manual_seed(0)
    model = IResNet(18).eval()
    with torch.no_grad():  # non-trivial BN statistics so every BN matters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(model(x), reference_forward(model.state_dict(), x, LAYERS[18]), atol=1e-4, rtol=1e-4)


def test_build_teacher_loads_arcface_torch_checkpoint_and_strips_module_prefix(tmp_path):
    src = IResNet(18, input_size=32).eval()
    plain, ddp = tmp_path / "backbone.pth", tmp_path / "ddp.pth"
    torch.save(src.state_dict(), plain)
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, ddp)
    x = torch.randn(2, 3, 32, 32)
    for path in (plain, ddp):
        t = teachers.build_teacher({"arch": "iresnet18", "input_size": 32, "checkpoint": str(path)})
        assert torch.equal(t(x), src(x))


def test_wrong_depth_names_missing_keys_and_loads_nothing(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(IResNet(18, input_size=32).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing keys .*layer1\.2\.") as err:
        teachers.build_teacher({"arch": "iresnet34", "input_size": 32, "checkpoint": str(path)})
    assert str(path) in str(err.value)


def test_unexpected_keys_and_shape_mismatch_are_named(tmp_path):
    sd = IResNet(18, input_size=32).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra\.weight"):
        teachers.build_teacher({"arch": "iresnet18", "input_size": 32, "checkpoint": str(path)})
    with pytest.raises(CheckpointError, match=r"shape mismatches .*fc\.weight"):  # 112 checkpoint, 32 model
        torch.save(IResNet(18).state_dict(), path)
        teachers.build_teacher({"arch": "iresnet18", "input_size": 32, "checkpoint": str(path)})


class Payload:  # needs unpickling of an arbitrary class
    pass


def test_checkpoint_needing_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"obj": Payload()}, path)
    with pytest.raises(UnsafeFileError, match="refused"):
        teachers.build_teacher({"arch": "iresnet18", "checkpoint": str(path)})


def test_bad_specs():
    with pytest.raises(UnknownNameError, match=r"unknown model 'resnet'.*registered: iresnet18, .*timm/<name>"):
        teachers.build_teacher({"arch": "resnet"})
    with pytest.raises(UnknownNameError, match="iresnet101'; did you mean 'iresnet100'"):
        teachers.build_teacher({"arch": "iresnet101"})
    with pytest.raises(ConfigError, match="unknown key 'teacher.checkpiont'.*did you mean 'teacher.checkpoint'"):
        teachers.build_teacher({"arch": "iresnet18", "checkpiont": "x.pth"})
    with pytest.raises(ConfigError, match="say which model"):
        teachers.build_teacher({"checkpoint": "x.pth"})
    with pytest.raises(CheckpointError, match="not found"):
        teachers.build_teacher({"arch": "iresnet18", "checkpoint": "/nonexistent/backbone.pth"})


class Distiller(nn.Module):
    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher
        self.student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512))


def test_teacher_stays_frozen_inside_a_training_parent():
    teacher = teachers.build_teacher({"arch": "iresnet18", "input_size": 32})
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    parent = Distiller(teacher).train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    opt = torch.optim.SGD(parent.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        x = torch.randn(4, 3, 32, 32)
        t = teacher(x)
        assert t.grad_fn is None and t.shape == (4, 512)
        loss = (F.normalize(parent.student(x)) - F.normalize(t)).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics


def test_fingerprint_tracks_weights():
    a = teachers.build_teacher({"arch": "iresnet18", "input_size": 32})
    fp = a.fingerprint()
    assert fp == a.fingerprint() and len(fp) == 64
    with torch.no_grad():
        a.model.fc.bias[0] += 1
    assert a.fingerprint() != fp


def test_timm_teacher():
    t = teachers.build_teacher({"arch": "timm/resnet18", "embedding_size": 128, "input_size": 32})
    out = t(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 128) and not t.training
    with pytest.raises(UnknownNameError, match="resnet_typo"):
        teachers.build_teacher({"arch": "timm/resnet_typo"})


def test_facedistill_teacher_loads_a_student_checkpoint(tmp_path):
    from distill.models.files import save_student
    from distill.models.vargfacenet import VarGFaceNet

    kwargs = {"embedding_size": 64, "multiplier": 0.5, "last_channels": 128, "units": [1, 1, 1], "input_size": 32}
    src = VarGFaceNet(**kwargs).eval()
    save_student(tmp_path / "student.pt", src, "vargfacenet")
    spec = {"kind": "facedistill", "arch": "vargfacenet", "model_kwargs": kwargs, "embedding_size": 64,
            "input_size": 32, "checkpoint": str(tmp_path / "student.pt")}
    with pytest.warns(ConfigDeprecationWarning, match="write arch: vargfacenet with its arguments"):
        t = teachers.build_teacher(spec)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(t(x), src(x)) and not t.training and t.embedding_size == 64
    with pytest.warns(ConfigDeprecationWarning), pytest.raises(CheckpointError, match="shape mismatches"):
        teachers.build_teacher({**spec, "model_kwargs": {**kwargs, "embedding_size": 32}, "embedding_size": 32})
    with pytest.raises(ConfigError, match="needs 'arch'"):
        teachers.build_teacher({"kind": "facedistill"})
    # the current form of the same teacher: the architecture's arguments beside arch
    same = teachers.build_teacher({"arch": "vargfacenet", **kwargs, "checkpoint": str(tmp_path / "student.pt")})
    assert torch.equal(same(x), src(x))


def test_legacy_kind_specs_load_with_a_note_saying_what_to_write():
    with pytest.warns(ConfigDeprecationWarning, match="'kind: iresnet' is deprecated; write arch: iresnet18"):
        t = teachers.build_teacher({"kind": "iresnet", "depth": 18, "input_size": 32, "embedding_size": 64})
    assert isinstance(t.model, IResNet) and t.model.depth == 18 and t.embedding_size == 64 and t.input_size == 32
    with pytest.warns(ConfigDeprecationWarning, match="write arch: timm/resnet18"):
        t = teachers.build_teacher({"kind": "timm", "name": "resnet18", "embedding_size": 128, "input_size": 32})
    assert t.embedding_size == 128
    with pytest.warns(ConfigDeprecationWarning), pytest.raises(UnknownNameError, match="iresnet101"):
        teachers.build_teacher({"kind": "iresnet", "depth": 101})
    with pytest.raises(ConfigError, match="unknown teacher kind 'resnet'"):
        teachers.build_teacher({"kind": "resnet"})
