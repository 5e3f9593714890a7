"""ONNX: export with a parity check, ONNX files as frozen teachers (in-graph normalisation, fixed batch), errors."""

import hashlib

import pytest
import torch
from torch import nn

import teachers
from distill.cli import main
from distill.models.files import save_student
from distill.models.registry import create_model
from distill.utils.errors import CheckpointError, ConfigDeprecationWarning, ConfigError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper

from distill.deploy.export import ExportParityError, check_parity, export_model, export_onnx
from teachers.onnx import OnnxTeacherModel

CPU = ["CPUExecutionProvider"]


def calibrated(name, **kwargs):
    """A random model whose BatchNorm statistics come from data, so embeddings are O(1) and every
    BN matters (a fresh IResNet's embeddings are ~1e7, a fresh VarGFaceNet's ~1e-4: both would make
    an absolute tolerance meaningless)."""
    torch.manual_seed(0)
    model = create_model(name, input_size=32, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the statistics of that batch
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (torch model, dynamic-batch .onnx path) for a tiny VarGFaceNet and an IResNet-18 at 32x32."""
    out = {}
    d = tmp_path_factory.mktemp("onnx")
    for name, kwargs in (("vargfacenet", dict(multiplier=0.5, last_channels=256, units=(1, 1, 1))), ("r18", {})):
        model = calibrated(name, **kwargs)
        out[name] = model, export_onnx(model, d / f"{name}.onnx", 32)
    return out


@pytest.mark.parametrize("name", ["vargfacenet", "r18"])
def test_export_matches_torch(exported, name):
    model, path = exported[name]
    r = check_parity(model, path, 32)
    assert r["min_cosine"] >= 0.9999 and r["max_abs_diff"] < 1e-3 and r["batch"] == 3
    session = ort.InferenceSession(str(path), providers=CPU)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "input.1" and inp.shape[1:] == [3, 32, 32] and isinstance(inp.shape[0], str)
    assert out.name == "embedding" and out.shape[1] == 512


def test_parity_check_catches_a_different_model(exported):
    model, path = exported["r18"]
    other = calibrated("r18")
    with torch.no_grad():
        other.fc.weight.mul_(-1)  # flips every embedding: cosine -1
    with pytest.raises(ExportParityError, match="min cosine"):
        check_parity(other, path, 32)


@pytest.mark.parametrize("name", ["vargfacenet", "r18"])
def test_exported_file_is_a_frozen_teacher_with_torch_embeddings(exported, name):
    model, path = exported[name]
    teacher = teachers.build_teacher({"onnx": str(path), "providers": CPU})
    assert isinstance(teacher, teachers.FrozenTeacher) and isinstance(teacher.model, OnnxTeacherModel)
    assert teacher.input_size == 32 and teacher.embedding_size == 512
    assert not teacher.model.raw_pixels and teacher.model.fixed_batch is None
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0.5  # a real scale, so the tolerance below means something
    nn.ModuleDict({"teacher": teacher}).train()  # a parent's .train() must not unfreeze it
    got = teacher(x)
    assert got.dtype == torch.float32 and got.shape == (5, 512) and got.grad_fn is None
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_fingerprint_hashes_the_file(exported, tmp_path):
    _, path = exported["vargfacenet"]
    teacher = teachers.build_teacher({"onnx": str(path)})
    assert teacher.fingerprint() == hashlib.sha256(open(path, "rb").read()).hexdigest()
    other = teachers.build_teacher({"onnx": str(exported["r18"][1])})
    assert other.fingerprint() != teacher.fingerprint()


class NormalisesInside(nn.Module):
    """What an MXNet-converted insightface model looks like: raw 0..255 pixels in, (p-127.5)*0.0078125 first."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, p):
        return self.inner((p - 127.5) * 0.0078125)


def test_model_normalising_inside_is_fed_raw_pixels(exported, tmp_path):
    model, _ = exported["r18"]
    mxnet_like = NormalisesInside(model)
    path = export_onnx(mxnet_like, tmp_path / "mxnet_like.onnx", 32)
    graph = onnx.load(path).graph
    assert [n.op_type for n in graph.node if "input.1" in n.input] == ["Sub"]  # then Mul, deep in file order
    teacher = teachers.build_teacher({"onnx": path})
    assert teacher.model.raw_pixels
    pixels = torch.randint(0, 256, (2, 3, 32, 32)).float()
    x = (pixels / 255 - 0.5) / 0.5  # what the toolkit hands every teacher
    with torch.no_grad():  # (0.0078125 is 1/128, not 1/127.5: compare with the graph's own arithmetic)
        expected = mxnet_like(pixels)
    assert torch.allclose(teacher(x), expected, atol=1e-4, rtol=1e-4)
    # fed normalised input instead, the same file would give something else entirely
    session = ort.InferenceSession(path, providers=CPU)
    wrong = torch.from_numpy(session.run(None, {"input.1": x.numpy()})[0])
    assert not torch.allclose(wrong, expected, atol=1e-2)


def test_mxnet_conversion_layout_ir3_initializers_as_inputs(tmp_path):
    """Old MXNet->ONNX files: IR 3 (weights also listed as graph inputs), scalar Sub/Mul nodes, batch fixed at 1."""
    from onnx import numpy_helper

    w = torch.randn(8, 3 * 4 * 4)
    inits = [numpy_helper.from_array(v, name) for name, v in (
        ("_minusscalar0_second", torch.tensor([127.5]).numpy()),
        ("_mulscalar0_second", torch.tensor([0.0078125]).numpy()),
        ("fc1_weight", w.T.contiguous().numpy()))]
    nodes = [helper.make_node("Sub", ["data", "_minusscalar0_second"], ["s"], name="_minusscalar0"),
             helper.make_node("Mul", ["s", "_mulscalar0_second"], ["m"], name="_mulscalar0"),
             helper.make_node("Flatten", ["m"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "fc1_weight"], ["fc1"])]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 4, 4])]
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "mxnet", inputs, [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 8])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.save(model, tmp_path / "mx.onnx")
    teacher = teachers.build_teacher({"onnx": str(tmp_path / "mx.onnx")})
    m = teacher.model
    assert (m.input_name, m.input_shape, m.fixed_batch, m.raw_pixels) == ("data", (1, 3, 4, 4), 1, True)
    assert teacher.input_size == 4 and teacher.embedding_size == 8
    x = torch.rand(3, 3, 4, 4) * 2 - 1
    pixels = x * 127.5 + 127.5
    assert torch.allclose(teacher(x), ((pixels - 127.5) * 0.0078125).flatten(1) @ w.T, atol=1e-4)


def test_fixed_batch_1_model_runs_a_batch_of_3(exported, tmp_path):
    model, _ = exported["vargfacenet"]
    path = export_onnx(model, tmp_path / "b1.onnx", 32, batch=1)
    assert ort.InferenceSession(path, providers=CPU).get_inputs()[0].shape == [1, 3, 32, 32]
    teacher = teachers.build_teacher({"onnx": path})
    assert teacher.model.fixed_batch == 1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(teacher(x), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="32x32"):
        teacher(torch.randn(1, 3, 48, 48))


def _tiny_graph(tmp_path, input_shape, output_shape, op="Identity"):
    """A hand-built ONNX file with the given input/output shapes (None: a dynamic axis)."""
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [d if d else "n" for d in input_shape])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [d if d else "n" for d in output_shape])
    nodes = [helper.make_node(op, ["x"], ["y"], **({"axis": 1} if op == "Flatten" else {}))]
    model = helper.make_model(helper.make_graph(nodes, "g", [inp], [out]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"tiny_{len(list(tmp_path.iterdir()))}.onnx"
    onnx.save(model, path)
    return str(path)


def test_bad_onnx_files_give_clear_errors(tmp_path):
    missing = str(tmp_path / "nope.onnx")
    with pytest.raises(CheckpointError, match="nope.onnx: ONNX file not found"):
        teachers.build_teacher({"onnx": missing})
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00 not a protobuf at all" * 10)
    with pytest.raises(CheckpointError, match="junk.onnx: not an ONNX"):
        teachers.build_teacher({"onnx": str(junk)})
    pth = tmp_path / "backbone.pth"
    torch.save(create_model("r18", input_size=32).state_dict(), pth)
    with pytest.raises(CheckpointError, match=r"backbone\.pth: .*ONNX"):
        teachers.build_teacher({"onnx": str(pth)})
    gray = _tiny_graph(tmp_path, (None, 1, 32, 32), (None, 1024), op="Flatten")
    with pytest.raises(CheckpointError, match=r"shape \['n', 1, 32, 32\].*3-channel NCHW"):
        teachers.build_teacher({"onnx": gray})
    flat = _tiny_graph(tmp_path, (None, 3072), (None, 3072))
    with pytest.raises(CheckpointError, match="3-channel NCHW"):
        teachers.build_teacher({"onnx": flat})
    feature_map = _tiny_graph(tmp_path, (None, 3, 32, 32), (None, 3, 32, 32))
    with pytest.raises(CheckpointError, match="output 'y' .*2-D"):
        teachers.build_teacher({"onnx": feature_map})
    with pytest.raises(ConfigError, match="teacher.onnx: an ONNX teacher needs"):
        teachers.build_teacher({"onnx": None})
    with pytest.warns(ConfigDeprecationWarning, match="write onnx: "), \
            pytest.raises(ConfigError, match="teacher.onnx: an ONNX teacher needs"):
        teachers.build_teacher({"kind": "onnx"})
    with pytest.raises(ConfigError, match="input_size"):
        teachers.build_teacher({"onnx": gray, "input_size": 32})
    with pytest.raises(ConfigError, match="NoSuchExecutionProvider"):
        teachers.build_teacher({"onnx": feature_map, "providers": ["NoSuchExecutionProvider"]})


def test_export_cli_end_to_end(tmp_path, capsys):
    student = calibrated("vargfacenet", multiplier=0.5, last_channels=256, units=(1, 1, 1), embedding_size=128)
    save_student(tmp_path / "student.pt", student, "vargfacenet")
    out = tmp_path / "student.onnx"
    assert main(["export", str(tmp_path / "student.pt"), str(out)]) == 0
    text = capsys.readouterr().out
    assert "max abs diff" in text and "min cosine similarity" in text and "input.1" in text
    assert out.is_file() and not (tmp_path / "student.onnx.tmp").exists()
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert props["facedistill.normalisation"] == "RGB, (x/255-0.5)/0.5" and props["facedistill.input_size"] == "32"
    teacher = teachers.build_teacher({"onnx": str(out)})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), student(x), atol=1e-4, rtol=1e-4)

    # an arcface_torch state dict with --arch, and a fixed batch
    torch.save(calibrated("r18").state_dict(), tmp_path / "backbone.pth")
    assert main(["export", str(tmp_path / "backbone.pth"), str(tmp_path / "r18.onnx"), "--arch", "r18",
                 "--batch", "1", "--opset", "13"]) == 0
    assert "batch fixed at 1" in capsys.readouterr().out
    assert ort.InferenceSession(str(tmp_path / "r18.onnx"), providers=CPU).get_inputs()[0].shape == [1, 3, 32, 32]

    assert main(["export", str(tmp_path / "backbone.pth"), str(tmp_path / "x.onnx")]) == 2
    assert "--arch" in capsys.readouterr().err
    for bad, named in ((["--batch", "many"], "--batch"), (["--opset", "99"], "--opset: 99")):
        assert main(["export", "vargfacenet", str(tmp_path / "x.onnx"), *bad]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err and not (tmp_path / "x.onnx").exists()


def test_failed_parity_leaves_no_file(tmp_path, monkeypatch):
    import distill.deploy.export as export

    def disagree(model, path, input_size, batch=None, seed=0, name=None):
        assert str(path).endswith(".tmp") and name == str(tmp_path / "v.onnx")  # checks the temporary file
        raise ExportParityError(f"{name or path}: ONNX Runtime disagrees with torch")

    monkeypatch.setattr(export, "check_parity", disagree)
    with pytest.raises(ExportParityError, match=r"v\.onnx: ONNX Runtime disagrees"):  # the file asked for, not .tmp
        export_model("vargfacenet", tmp_path / "v.onnx", input_size=32)
    assert list(tmp_path.iterdir()) == []


def test_distill_run_with_an_onnx_teacher(exported, tiny_finished_run, tmp_path, capsys):
    """An ONNX teacher has no checkpoint and no recipe: distill run and --dry-run load it (they ask for no
    teacher.checkpoint). The cache is built from the ONNX model and generation 1 distils from it."""
    import yaml
    from tiny_experiment import tiny_experiment

    _, _, data = tiny_finished_run
    _, path = exported["r18"]
    raw = tiny_experiment(data, name="onnx-teacher", generations=1, baseline=False, tracking={"wandb": "disabled"},
                          student={"embedding_size": 512, "multiplier": 0.5, "last_channels": 64, "units": [1, 1, 1]})
    raw["teacher"] = {"onnx": str(path)}
    exp = tmp_path / "onnx.yaml"
    exp.write_text(yaml.safe_dump(raw, sort_keys=False))
    raw = exp.read_text()
    assert main(["run", str(exp), "--dry-run"]) == 0
    assert "dry run: teacher ok (" in capsys.readouterr().out
    assert main(["run", str(exp), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "gen1: training vargfacenet from scratch, distilling with equivalent_angular (alpha 7)" in out
    assert (tmp_path / "run" / "gen1" / "result.json").exists()
    assert (tmp_path / "run" / "teacher_cache" / "embeddings.f16").stat().st_size == 72 * 2 * 512 * 2
    assert "onnx" in raw


def test_distill_eval_takes_an_onnx_model(exported, tiny_finished_run, capsys):
    """distill eval (like distill ijb) loads an insightface .onnx through the ONNX teacher loader; its numbers equal
    those of the torch model it was exported from (parity is checked to 1e-3, accuracy compared to 2 decimals)."""
    import json

    _, _, data = tiny_finished_run
    model, path = exported["r18"]
    assert main(["eval", str(path), "--bin", str(data / "synth_val.bin"), "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)["synth_val"]
    from distill.eval.verification import evaluate_sets
    from_torch = evaluate_sets(model, {"synth_val": str(data / "synth_val.bin")}, 32, progress=False)["synth_val"]
    assert from_onnx["acc_mean"] == pytest.approx(from_torch["acc_mean"], abs=0.01)
    assert from_onnx["xnorm"] == pytest.approx(from_torch["xnorm"], rel=1e-3)
