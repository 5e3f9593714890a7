"""VarGFaceNet: the paper's sizes at 112x112, every ablation knob, timm registration, BN settings."""

import itertools

import pytest
import timm
import torch
from torch import nn

import distill  # noqa: F401 - registers the students with timm
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
    assert small.stem[0].out_channels == 16
    assert small.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 256)
    assert trainable(small) < trainable(VarGFaceNet(input_size=32))


def test_batchnorm_matches_mxnet_settings():
    bns = [m for m in VarGFaceNet().modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum == 0.1 and m.eps == 2e-5 for m in bns)


def test_identity_blocks_build_no_shortcut_module():
    model = VarGFaceNet()
    blocks = [m for m in model.modules() if isinstance(m, VarGBlock)]
    identity = [b for b in blocks if b.shortcut is None]
    assert len(identity) == (3 - 1) + (7 - 1) + (4 - 1)  # all but the stem block
    assert model.stem[3].shortcut is not None  # the stride-2 stem block needs one


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


def _with_legacy_keys(state: dict, renames: dict) -> dict:
    """The state dict as files written before the renames hold it (current prefix -> legacy prefix)."""
    out = {}
    for k, v in state.items():
        new = next((n for n in renames if k.startswith(n)), None)
        out[renames[new] + k[len(new):] if new else k] = v
    return out


VARG_LEGACY = {"stem.": "head.", "embedding_norm.": "features."}


@pytest.mark.parametrize("kwargs", [{}, {"head": "vargnet", "embedding": "gap"}])
def test_state_dicts_with_the_legacy_module_names_load_strictly(tmp_path, kwargs):
    """VarGFaceNet's stem and embedding BatchNorm were `head` and `features`: a student.pt, a last.pt model state
    and a teacher checkpoint with those keys load strictly and compute the same embedding."""
    import teachers
    from distill.utils.checkpoint import load_state_dict_strict

    model = VarGFaceNet(input_size=32, embedding_size=64, **kwargs).eval()
    with torch.no_grad():  # non-trivial running statistics
        model.embedding_norm.running_mean.normal_()
    legacy = _with_legacy_keys(model.state_dict(), VARG_LEGACY)
    assert "head.0.weight" in legacy and "features.running_mean" in legacy and "stem.0.weight" not in legacy
    x = torch.randn(2, 3, 32, 32)
    want = model(x)

    torch.save({"format": "facedistill.student/1", "arch": "vargfacenet", "kwargs": dict(model.config),
                "state_dict": legacy}, tmp_path / "student.pt")
    loaded, _ = load_student(tmp_path / "student.pt")
    assert torch.equal(loaded.eval()(x), want)

    plain = VarGFaceNet(input_size=32, embedding_size=64, **kwargs)
    plain.load_state_dict(legacy, strict=True)  # how last.pt's model state is loaded
    assert torch.equal(plain.eval()(x), want)
    strict = VarGFaceNet(input_size=32, embedding_size=64, **kwargs)
    load_state_dict_strict(strict, legacy)
    assert torch.equal(strict.eval()(x), want) and list(strict.state_dict()) == list(model.state_dict())

    torch.save(legacy, tmp_path / "teacher.pt")
    teacher = teachers.build_teacher({"arch": "vargfacenet", "input_size": 32, "embedding_size": 64, **kwargs,
                                      "checkpoint": str(tmp_path / "teacher.pt")})
    assert torch.equal(teacher(x), want)


def test_teacher_fingerprints_hash_the_legacy_key_names():
    """A teacher's fingerprint keys its cache: renaming modules must not change it."""
    import hashlib

    import teachers

    teacher = teachers.build_teacher({"arch": "vargfacenet", "input_size": 32, "embedding_size": 16})
    h = hashlib.sha256()
    for name, t in sorted(_with_legacy_keys(teacher.model.state_dict(), VARG_LEGACY).items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    assert teacher.fingerprint() == h.hexdigest()


def test_timm_backbone_state_dicts_with_the_legacy_norm_name_load():
    model = create_model("timm/resnet10t", embedding_size=16, input_size=32).eval()
    legacy = _with_legacy_keys(model.state_dict(), {"embedding_norm.": "features."})
    again = create_model("timm/resnet10t", embedding_size=16, input_size=32)
    again.load_state_dict(legacy, strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.eval()(x), model(x))


def test_a_student_pt_recording_arcface_torchs_num_features_loads(tmp_path):
    model = create_model("iresnet18", embedding_size=32, input_size=32).eval()
    kwargs = {k: v for k, v in model.config.items() if k != "embedding_size"}
    torch.save({"format": "facedistill.student/1", "arch": "r18", "kwargs": {**kwargs, "num_features": 32},
                "state_dict": model.state_dict()}, tmp_path / "student.pt")
    loaded, payload = load_student(tmp_path / "student.pt")
    assert payload["kwargs"]["embedding_size"] == 32 and "num_features" not in payload["kwargs"]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))


def test_legacy_keys_load_under_a_wrapper_prefix():
    """The keys are renamed where the model sits (a DDP `module.`, a teacher wrapper's `model.`), not at the root."""
    from distill.utils.checkpoint import load_state_dict_strict

    inner = VarGFaceNet(input_size=32, embedding_size=16).eval()
    legacy = {f"module.{k}": v for k, v in _with_legacy_keys(inner.state_dict(), VARG_LEGACY).items()}
    x = torch.randn(2, 3, 32, 32)
    for load in (lambda m, sd: m.load_state_dict(sd, strict=True), load_state_dict_strict):
        wrapper = nn.ModuleDict({"module": VarGFaceNet(input_size=32, embedding_size=16)})
        load(wrapper, legacy)
        assert torch.equal(wrapper["module"].eval()(x), inner(x))
