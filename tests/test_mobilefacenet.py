"""MobileFaceNet (`mbf`, `mbf_large`, distill/models/mobilefacenet.py) as arcface_torch builds it: its state dicts
load strictly (keys and shapes written below as read from arcface_torch's backbones/mobilefacenet.py), its forward
gives arcface_torch's numbers, its parameters and FLOPs at 112 px, timm's contract as the other face models have it,
both spellings of the embedding size, and a 2-step stage at 16 px with MobileFaceNet as student and as teacher."""

import math
import re

import pytest
import test_timm_contract as contract
import timm
import torch

import distill  # noqa: F401 - registers the face models with timm
import teachers
from distill.config.schema import build_config
from distill.models.cost import count_flops, params_in_use
from distill.models.files import load_student, save_student
from distill.models.registry import create_model, model_defaults
from distill.train.engine import StageSpec, run_stage
from distill.utils.checkpoint import safe_torch_load
from distill.utils.errors import ConfigError

# arcface_torch's state dicts (deepinsight/insightface, recognition/arcface_torch/backbones/mobilefacenet.py; get_mbf:
# blocks (1, 4, 6, 2), scale 2; get_mbf_large: (2, 8, 12, 4), scale 4), one line a block: `prefix kind sizes`.
#   C out in/groups k   ConvBlock: .layers.0 conv (out, in/groups, k, k), .layers.1 BatchNorm2d, .layers.2 PReLU
#   D out in groups     DepthWise: .layers.0 C(groups <- in, 1x1), .layers.1 C(groups, depthwise 3x3),
#                       .layers.2 LinearBlock (conv (out, groups, 1, 1) + BatchNorm2d)
#   F out k             GDC: .layers.0 LinearBlock (512 depthwise k x k), .layers.2 Linear (out, 512) without bias,
#                       .layers.3 BatchNorm1d(out)
# `prefix*n`: arcface_torch's Residual, n DepthWise blocks <prefix>.layers.0 .. n-1
ARCFACE_TORCH = {
    "mbf": """layers.0 C 128 3 3 | layers.1 C 128 2 3 | layers.2 D 128 128 128 | layers.3*4 D 128 128 128 |
              layers.4 D 256 128 256 | layers.5*6 D 256 256 256 | layers.6 D 256 256 512 | layers.7*2 D 256 256 256 |
              conv_sep C 512 256 1 | features F 512 7""",
    "mbf_large": """layers.0 C 256 3 3 | layers.1*2 D 256 256 128 | layers.2 D 256 256 128 | layers.3*8 D 256 256 128 |
              layers.4 D 512 256 256 | layers.5*12 D 512 512 256 | layers.6 D 512 512 512 | layers.7*4 D 512 512 256 |
              conv_sep C 512 512 1 | features F 512 7""",
}
# ptflops (arcface_torch's flops.py) on the re-typed network: 2,059,520 / 6,314,880 parameters, 0.452 / 1.851 GMACs
PARAMS = {"mbf": 2_059_520, "mbf_large": 6_314_880}
# torch's FlopCounterMode (distill/models/cost.py: convolutions and matmuls, 2 FLOPs a multiply-add) at 112 px
FLOPS_112 = {"mbf": 875_041_792}
# arcface_torch's forward (re-typed outside the repository, float64, eval) on arcface_torch_state_dict('mbf') and
# torch.manual_seed(1); torch.randn(1, 3, 112, 112): the embedding's sum, norm and first entries
PINNED = {"sum": 17.41235882440548, "norm": 14.321692768796078,
          "first": [0.14255728825129071, 0.8117589508042791, 0.6266645433685772, 0.6372318056737224]}


def _bn(prefix: str, n: int) -> dict:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,), f"{prefix}.running_mean": (n,),
            f"{prefix}.running_var": (n,), f"{prefix}.num_batches_tracked": ()}


def _conv(prefix: str, out: int, per_group: int, k: int, prelu: bool) -> dict:
    keys = {f"{prefix}.layers.0.weight": (out, per_group, k, k), **_bn(f"{prefix}.layers.1", out)}
    return {**keys, f"{prefix}.layers.2.weight": (out,)} if prelu else keys


def _block(prefix: str, kind: str, sizes: list) -> dict:
    if kind == "C":
        return _conv(prefix, *sizes, prelu=True)
    if kind == "D":
        out, cin, groups = sizes
        return {**_conv(f"{prefix}.layers.0", groups, cin, 1, True), **_conv(f"{prefix}.layers.1", groups, 1, 3, True),
                **_conv(f"{prefix}.layers.2", out, groups, 1, False)}
    out, k = sizes  # F: the GDC
    return {**_conv(f"{prefix}.layers.0", 512, 1, k, False), f"{prefix}.layers.2.weight": (out, 512),
            **_bn(f"{prefix}.layers.3", out)}


def arcface_torch_shapes(name: str) -> dict:
    """{key: shape} of arcface_torch's state dict of `name`, expanded from ARCFACE_TORCH."""
    shapes = {}
    for line in ARCFACE_TORCH[name].split("|"):
        prefix, kind, *sizes = line.split()
        prefix, _, count = prefix.partition("*")
        for p in [f"{prefix}.layers.{i}" for i in range(int(count))] if count else [prefix]:
            shapes.update(_block(p, kind, [int(s) for s in sizes]))
    return shapes


def arcface_torch_state_dict(name: str, dtype=torch.float64) -> dict:
    """A state dict in arcface_torch's layout with seeded values of a trained network's scale (weights ~ 1/sqrt(fan
    in), BN scales near 1, positive variances), so every layer moves the embedding."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in arcface_torch_shapes(name).items():
        noise = torch.randn(shape, generator=generator, dtype=dtype)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif len(shape) > 1:  # conv, linear
            state[key] = noise / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator, dtype=dtype)
        elif re.search(r"layers\.2\.weight$", key) and len(shape) == 1 and not key.startswith("features"):
            state[key] = 0.25 + 0.05 * noise  # PReLU slopes
        elif key.endswith("weight"):
            state[key] = 1.0 + 0.1 * noise  # BatchNorm scales
        else:
            state[key] = 0.05 * noise  # BatchNorm shifts and means
    return state


def _is_parameter(key: str) -> bool:
    return not re.search(r"running_mean|running_var|num_batches_tracked", key)


@pytest.mark.parametrize("name", ["mbf", "mbf_large"])
def test_arcface_torch_state_dicts_load_strictly_and_the_parameters_are_theirs(name, tmp_path):
    shapes = arcface_torch_shapes(name)
    assert sum(math.prod(s) for k, s in shapes.items() if _is_parameter(k)) == PARAMS[name]  # the data as read
    model = timm.create_model(name)  # timm's name for it, after `import distill`
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(arcface_torch_state_dict(name, torch.float32), strict=True)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    if name == "mbf":  # arcface_torch's backbone.pth as a teacher: loaded strictly by the teachers' path
        torch.save(arcface_torch_state_dict(name, torch.float32), tmp_path / "backbone.pth")
        teacher = teachers.build_teacher({"arch": name, "checkpoint": str(tmp_path / "backbone.pth")})
        assert teacher.embedding_size == 512 and teacher.input_size == 112


def test_the_forward_is_arcface_torchs_and_so_are_its_flops():
    model = create_model("mbf").double().eval()
    model.load_state_dict(arcface_torch_state_dict("mbf"), strict=True)
    torch.manual_seed(1)
    x = torch.randn(1, 3, 112, 112, dtype=torch.float64)
    with torch.no_grad():
        embedding = model(x)
    assert embedding.sum().item() == pytest.approx(PINNED["sum"], rel=1e-12)
    assert embedding.norm().item() == pytest.approx(PINNED["norm"], rel=1e-12)
    assert embedding[0, :4].tolist() == pytest.approx(PINNED["first"], rel=1e-12)
    fresh = create_model("mbf")
    assert count_flops(fresh, 112) == FLOPS_112["mbf"] and params_in_use(fresh, 112) == PARAMS["mbf"]


def test_either_spelling_of_the_embedding_size():
    assert model_defaults("mbf")["blocks"] == (1, 4, 6, 2) and model_defaults("mbf_large")["scale"] == 4
    x = torch.randn(2, 3, 32, 32)
    for kwargs in ({"num_features": 128}, {"embedding_size": 128}, {"num_features": 128, "embedding_size": 128}):
        model = timm.create_model("mbf", input_size=32, **kwargs).eval()
        assert model(x).shape == (2, 128) and model.config["embedding_size"] == 128
        assert "num_features" not in model.config  # student.pt records the registry's spelling
    with pytest.raises(ConfigError, match="num_features .arcface_torch's name. and embedding_size are the same"):
        create_model("mbf", num_features=128, embedding_size=256)
    plain, half = (create_model("mbf", input_size=32, fp16=fp16).eval() for fp16 in (False, True))
    half.load_state_dict(plain.state_dict())
    with torch.no_grad():  # arcface_torch's switch: CUDA float16 autocast on the layers, nothing on a CPU
        assert torch.equal(half(x), plain(x)) and half.config["fp16"] is True
    with pytest.raises(ConfigError, match=r"key 'blocks' must be 4 counts of at least 1 .*got \[1, 4, 6\]"):
        create_model("mbf", blocks=[1, 4, 6])
    with pytest.raises(ConfigError, match="key 'scale' must be a whole number >= 1"):
        create_model("mbf", scale=0)
    for arch in ("mbf", "r50"):  # a config in arcface_torch's spelling sizes the embedding the run records
        cfg = build_config({"data": {"train": "faces"}, "student": {"arch": arch, "num_features": 64}}, quiet=True)
        assert cfg.student.embedding_size == 64 and cfg.student.model_kwargs(32)["embedding_size"] == 64


# ------------------------------------------------------------------------------ timm's contract, the shared checks

SMALL = {"mbf": dict(scale=1, blocks=[1, 1, 1, 1]), "mbf_large": dict(scale=1, blocks=[2, 1, 1, 1])}


@pytest.mark.parametrize("name", ["mbf", "mbf_large"])
def test_timms_contract_as_the_other_face_models_have_it(name, tmp_path, monkeypatch):
    """The checks of tests/test_timm_contract.py, run on MobileFaceNet at 32 px (the quickstart-sized runs' size),
    narrowed as those tests narrow VarGFaceNet (mbf_large keeps its residual stem: blocks[0] 2). As there, every
    member of the family runs forward_intermediates and features_only, one member (mbf) the rest."""
    monkeypatch.setitem(contract.SMALL, name, SMALL[name])
    contract.test_forward_intermediates_in_timms_semantics(name)
    contract.test_features_only_through_timm_at_two_sizes(name, 32)
    if name != "mbf":
        return
    contract.test_pretrained_cfg_and_classifier_api(name)
    contract.test_a_classifier_when_asked_and_student_pt_keeps_the_embedding_model(name, tmp_path)
    contract.test_grad_checkpointing_trains_what_plain_training_trains(name)
    contract.test_torchscript_and_fx_give_the_eager_embedding(name)
    model = contract._build(name).eval()  # no pooling: the map; the last BatchNorm1d keeps arcface_torch's scale
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final = model.forward_features(x)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), final) and final.shape == (2, model.num_features, 2, 2)
    model.reset_classifier(0, "embedding")
    model.train()(x).square().sum().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    assert "features.layers.3.weight" in dict(model.named_parameters())


# ---------------------------------------------------------------------------- a stage, as student and as teacher

def test_a_two_step_stage_with_mobilefacenet_as_student_and_teacher(tmp_path):
    from tiny import TinyFaces

    small = {"embedding_size": 32, "scale": 1, "blocks": [1, 1, 1, 1]}
    cfg = build_config({
        "name": "tiny_mbf", "seed": 0, "deterministic": True,
        "data": {"train": "in-memory", "input_size": 16, "num_workers": 0},
        "student": {"arch": "mbf", **small},
        "teacher": {"arch": "mbf", "input_size": 16, **small},
        "margin": {"margin": "arcface", "s": 16.0, "m": 0.3},
        "distill": {"loss": "equivalent_angular", "alpha": 7.0},
        "train": {"batch_size": 16, "lr": 0.05, "lr_batch_size": 16, "max_steps": 2, "log_every": 1,
                  "checkpoint_every": 2, "warmup_epochs": 0.0},
    })
    assert cfg.student.arch == "mbf" and cfg.student.num_features is None and cfg.student.embedding_size == 32
    teacher = teachers.build_teacher(cfg.teacher.spec())
    assert teacher.embedding_size == 32 and teacher.input_size == 16
    spec = StageSpec("gen1", "mbf", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    run_stage(cfg, spec, str(tmp_path / "gen1"), TinyFaces(), {}, teacher=teacher, progress=False)
    assert safe_torch_load(tmp_path / "gen1" / "last.pt")["step"] == 2
    student, payload = load_student(tmp_path / "gen1" / "student.pt")
    assert payload["arch"] == "mbf" and payload["kwargs"]["scale"] == 1 and student.config["input_size"] == 16
    save_student(tmp_path / "again.pt", student, "mbf")  # the student.pt it wrote rebuilds the same model
    assert load_student(tmp_path / "again.pt")[0].state_dict().keys() == student.state_dict().keys()
