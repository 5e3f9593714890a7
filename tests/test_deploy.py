"""Deployment: BatchNorm-folded FP32 ONNX, INT8 by ONNX Runtime static quantization, --check-bin,
benchmarks/bench_infer.py, and the refusals and notes around them. One tiny student trained for a few steps on
stand-in faces, a small image-folder training set and a small .bin written from the same faces."""

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tiny import TinyFaces, tiny_config

from distill.cli import main
from distill.data import write_verification_bin
from distill.data.images import encode_jpeg
from distill.deploy.export import export_model, export_onnx, fold_batchnorm
from distill.deploy.quantize import int8_path, open_calibration_set
from distill.models.files import load_model
from distill.train.engine import StageSpec, run_stage
from distill.utils.errors import ConfigError, UserNote

REPO = Path(__file__).resolve().parents[1]
CPU = ["CPUExecutionProvider"]
SIZE = 16


def _uint8(x: torch.Tensor) -> np.ndarray:
    """A normalised 3xHxW tensor back to HxWx3 uint8 RGB."""
    return ((x.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).clip(0, 255).round().astype(np.uint8)


def _image_tree(root: Path, faces, per_class: int, size: int | None = None) -> Path:
    """An identity-per-folder JPEG tree of the first `per_class` stand-in faces of each identity (resized to
    `size` when given)."""
    labels = faces.labels()
    for i in range(len(faces)):
        if i - int(np.argmax(labels == labels[i])) >= per_class:
            continue
        x = faces.get(i, False)
        if size:
            x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        d = root / f"id{labels[i]:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.jpg").write_bytes(encode_jpeg(_uint8(x)))
    return root


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    """(student.pt of a tiny VarGFaceNet trained 12 steps at 16x16, image-folder training set of 32 images,
    a 40-pair .bin of new noise draws around the same 8 identities)."""
    tmp = tmp_path_factory.mktemp("deploy")
    # one thread: the same student anywhere
    cfg = tiny_config(train={"max_steps": 12, "checkpoint_every": 12, "threads": 1})
    spec = StageSpec("baseline", "vargfacenet", cfg.student.model_kwargs(SIZE), cfg.train, alpha=0.0, generation=0)
    faces = TinyFaces()
    run_stage(cfg, spec, str(tmp / "stage"), faces, {}, progress=False)
    train = _image_tree(tmp / "train", faces, per_class=4)
    g = torch.Generator().manual_seed(1)
    pairs, issame = [], []
    for k in range(40):
        c, same = k % 8, k % 2 == 0
        for identity in (c, c if same else (c + 3) % 8):
            x = (faces.protos[identity] + 0.6 * torch.randn(faces.protos[identity].shape, generator=g)).clamp(-1, 1)
            pairs.append(encode_jpeg(_uint8(x)))
        issame.append(same)
    write_verification_bin(tmp / "tiny_val.bin", pairs, issame)
    return tmp / "stage" / "student.pt", train, tmp / "tiny_val.bin"


def _calibrated(name, size=32, **kwargs):
    """A random model whose BatchNorm statistics come from data (every BN matters, embeddings O(1))."""
    from torch import nn

    from distill.models.registry import create_model
    torch.manual_seed(0)
    model = create_model(name, input_size=size, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, size, size))
    return model.eval()


def _ops(path) -> list:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("name,kwargs,mul_add", [
    ("vargfacenet", dict(multiplier=0.5, last_channels=64, units=(1, 1, 1), embedding_size=32), 0),
    ("r18", {}, 8)])
def test_batchnorm_folding_leaves_no_batchnorm_and_keeps_parity(tmp_path, name, kwargs, mul_add):
    model = _calibrated(name, **kwargs)
    plain = export_onnx(model, tmp_path / "plain.onnx", 32)
    assert "BatchNormalization" in _ops(plain)  # what the exporter alone leaves (the BN after the fc at least)
    folded = export_onnx(model, tmp_path / "folded.onnx", 32, fold_bn=True)
    ops = _ops(folded)
    assert "BatchNormalization" not in ops
    # IResNet's pre-activation BNs sit before zero-padded 3x3 convs: written as Mul + Add, not folded
    # ... and every PReLU as Relu + slope * Min(x, 0) (split_prelu: ORT's PRelu kernel is ~4x slower)
    prelus = _ops(plain).count("PRelu")
    assert prelus > 0 and "PRelu" not in ops and ops.count("Min") == prelus
    assert ops.count("Mul") - _ops(plain).count("Mul") == mul_add + prelus
    props = {p.key: p.value for p in onnx.load(str(folded)).metadata_props}
    assert f"{mul_add} as Mul+Add, 0 left" in props["facedistill.batchnorm"]
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort.InferenceSession(str(folded), providers=CPU).run(None, {"input.1": x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    assert np.abs(expected).max() > 0.5  # a real scale, so the tolerance means something


def test_split_prelu_computes_prelu_bit_for_bit():
    from onnx import TensorProto, helper, numpy_helper

    from distill.deploy.onnx_graph import split_prelu

    rng = np.random.default_rng(0)
    slope = numpy_helper.from_array(rng.uniform(-0.5, 0.5, (4, 1, 1)).astype(np.float32), "slope")
    shape = [2, 4, 5, 5]
    graph = helper.make_graph([helper.make_node("PRelu", ["x", "slope"], ["y"], name="act")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [slope])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal(shape).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, -0.0, 1e-38]
    before = ort.InferenceSession(proto.SerializeToString(), providers=CPU).run(None, {"x": x})[0]
    assert split_prelu(proto) == 1 and [n.op_type for n in proto.graph.node] == ["Relu", "Min", "Mul", "Add"]
    after = ort.InferenceSession(proto.SerializeToString(), providers=CPU).run(None, {"x": x})[0]
    assert np.array_equal(after, before)


def test_fold_batchnorm_maths_on_a_hand_built_graph():
    """Gemm -> BN, BN -> Flatten -> Gemm, and a lone BN (Mul + Add) compute what the BNs did."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c, hw, k = 3, 4, 5

    def bn(name, inp, out, n):
        params = [rng.uniform(0.5, 2, n), rng.normal(size=n), rng.normal(size=n), rng.uniform(0.5, 2, n)]
        inits = [numpy_helper.from_array(p.astype(np.float32), f"{name}.{i}") for i, p in enumerate(params)]
        return helper.make_node("BatchNormalization", [inp] + [t.name for t in inits], [out], name=name,
                                epsilon=1e-3), inits

    n1, i1 = bn("lone", "x", "a", c)
    n2, i2 = bn("pre", "a", "b", c)
    n3, i3 = bn("post", "g", "y", k)
    w = numpy_helper.from_array(rng.normal(size=(k, c * hw)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(size=k).astype(np.float32), "bias")
    nodes = [n1, n2, helper.make_node("Flatten", ["b"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "w", "bias"], ["g"], transB=1, alpha=0.5), n3]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", k])],
                              initializer=i1 + i2 + i3 + [w, bias])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    x = rng.normal(size=(2, c, 2, 2)).astype(np.float32)
    expected = ort.InferenceSession(proto.SerializeToString(), providers=CPU).run(None, {"x": x})[0]
    counts = fold_batchnorm(proto)
    assert counts == {"folded": 2, "mul_add": 1, "left": 0}
    assert [n.op_type for n in proto.graph.node] == ["Mul", "Add", "Flatten", "Gemm"]
    got = ort.InferenceSession(proto.SerializeToString(), providers=CPU).run(None, {"x": x})[0]
    assert np.allclose(got, expected, atol=1e-5)


def test_export_int8_and_check_bin_end_to_end(deploy, tmp_path, capsys):
    student, train, val_bin = deploy
    out = tmp_path / "student.onnx"
    code = main(["export", str(student), str(out), "--int8", "--calibrate", str(train), "--check-bin", str(val_bin)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    q = tmp_path / "student.int8.onnx"
    assert out.is_file() and q.is_file() and str(q) == int8_path(out)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # the INT8 file: same interface and metadata as the FP32 one, plus what ORT left in FP32
    session = ort.InferenceSession(str(q), providers=CPU)
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "input.1" and inp.shape[1:] == [3, SIZE, SIZE] and isinstance(inp.shape[0], str)
    assert outp.name == "embedding" and outp.shape[1] == 32
    assert session.run(None, {"input.1": np.zeros((3, 3, SIZE, SIZE), np.float32)})[0].shape == (3, 32)
    props = {p.key: p.value for p in onnx.load(str(q)).metadata_props}
    assert props["facedistill.input_size"] == str(SIZE) and props["facedistill.normalisation"] == "RGB, (x/255-0.5)/0.5"
    assert "Min x27" in props["facedistill.fp32_ops"] and "QLinearConv x36" in props["facedistill.int8_ops"]
    assert max(len(n.name) for n in onnx.load(str(q)).graph.node) <= 6  # shorten_names: n<i>
    assert props["facedistill.calibration"] == "32 images of train"
    assert "DequantizeLinear" in _ops(q) and os.path.getsize(q) < 0.5 * os.path.getsize(out)
    assert "BatchNormalization" not in _ops(out) and "BatchNormalization" not in _ops(q)
    # the printed summary and the --check-bin table: one row per model, cosine columns for the files
    text = captured.out
    assert "FP32 in ONNX Runtime: Min x27" in text and "calibrated on 32 images" in text
    rows = {line.split()[1]: line.split() for line in text.splitlines() if line.startswith("tiny_val ")}
    assert set(rows) == {"pytorch", "fp32", "int8"}
    header = next(line for line in text.splitlines() if line.startswith("set "))
    for column in ("size (MB)", "accuracy (%)", "XNorm", "TAR@FAR=1e-3 (%)", "cosine to PyTorch (min / mean)"):
        assert column in header
    acc = {k: float(r[3]) for k, r in rows.items()}
    assert acc["pytorch"] >= 80.0  # a trained student: the check below means something
    # INT8 within one pair of the 40 (2.5 points): which single borderline pair the quantisation flips moves
    # with the library versions (onnxruntime, numpy); a broken calibration costs far more (chance is 50%)
    assert acc["fp32"] == acc["pytorch"] and abs(acc["int8"] - acc["pytorch"]) <= 2.5
    assert float(rows["fp32"][-3]) >= 0.9999 and 0.95 < float(rows["int8"][-3]) < 1.0
    assert "fewer than the 512 asked" in captured.err and "calibrating on all 32" in captured.err


def test_int8_calibration_option_reaches_the_file(deploy, tmp_path, capsys):
    student, train, _ = deploy
    out = tmp_path / "student.onnx"
    assert main(["export", str(student), str(out), "--int8", "--calibrate", str(train), "--calib-images", "8",
                 "--int8-calibration", "minmax"]) == 0
    props = {p.key: p.value for p in onnx.load(int8_path(out)).metadata_props}
    assert json.loads(props["facedistill.quantization_settings"])["calibration"] == "minmax"
    assert "MinMax calibration" in capsys.readouterr().out


def test_check_bin_fails_when_fp32_parity_breaks_and_warns_on_int8_loss(deploy, tmp_path, monkeypatch, capsys):
    import distill.deploy.export as export

    student, _, val_bin = deploy
    model, size = load_model(str(student))
    path = export_onnx(model, tmp_path / "s.onnx", size, fold_bn=True)
    results = export.check_exports(model, size, {"fp32": path}, [str(val_bin)])
    assert export.judge_checks(results, 0.5) == []
    broken = dict(results["tiny_val"]["fp32"], cosine_min=0.99)
    with pytest.raises(export.ExportParityError, match="min cosine 0.990000"):
        export.judge_checks({"tiny_val": {**results["tiny_val"], "fp32": broken}})
    lossy = dict(results["tiny_val"]["fp32"], acc_mean=results["tiny_val"]["pytorch"]["acc_mean"] - 0.02, path="q.onnx")
    with pytest.warns(UserNote, match=r"q.onnx: INT8 loses 2.00 points .* more than --int8-margin 0.5"):
        export.judge_checks({"tiny_val": {"pytorch": results["tiny_val"]["pytorch"], "int8": lossy}}, 0.5)
    assert export.judge_checks({"tiny_val": {"pytorch": results["tiny_val"]["pytorch"], "int8": lossy}}, 3.0) == []
    # through the command line: a file that is not the model fails with exit code 2, after the table
    monkeypatch.setattr(export, "_cosine_rows", lambda a, b: np.full(len(a), 0.5))
    assert main(["export", str(student), str(tmp_path / "t.onnx"), "--check-bin", str(val_bin)]) == 2
    captured = capsys.readouterr()
    assert "tiny_val  fp32" in captured.out and "error:" in captured.err and "min cosine 0.500000" in captured.err


def test_refusals_before_any_work(deploy, tmp_path, monkeypatch, capsys):
    import distill.deploy.export as export
    import distill.models.files as models

    student, train, val_bin = deploy

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_work)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the write probe fail as a read-only folder would
        import distill.utils.atomic

        class ReadOnly:
            @staticmethod
            def mkstemp(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(distill.utils.atomic, "tempfile", ReadOnly)
    try:
        with pytest.raises(export.DistillError, match=r"locked: cannot write the exported model \(Permission denied"):
            export_model(str(student), locked / "s.onnx", int8=True, calibrate=str(train))
    finally:
        locked.chmod(0o700)
        monkeypatch.undo()
    monkeypatch.setattr(models, "load_model", no_work)
    for kwargs, message in ((dict(int8=True), "--int8: static quantization needs calibration images; add --calibrate"),
                            (dict(calibrate=str(train)), "add --int8"),
                            (dict(int8=True, calibrate=str(tmp_path / "nope")), "nope: no such training set"),
                            (dict(check_bins=[str(tmp_path / "lfw.bin")]),
                             "--check-bin .*lfw.bin: verification set not found"),
                            (dict(int8=True, calibrate=str(train), calib_images=0), "--calib-images: 0")):
        with pytest.raises(ConfigError, match=message):
            export_model(str(student), tmp_path / "s.onnx", **kwargs)
    assert main(["export", str(student), str(tmp_path / "s.onnx"), "--int8"]) == 2
    assert "add --calibrate" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [locked]


def test_calibration_notes_fewer_images_and_other_size(deploy, tmp_path):
    _, train, _ = deploy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset, indices = open_calibration_set(train, SIZE, images=10)
    assert not [w for w in caught if issubclass(w.category, UserNote)]  # enough images, the right size: silent
    assert len(indices) == 10 and len(set(indices.tolist())) == 10 and indices.max() <= len(dataset) - 1
    with pytest.warns(UserNote, match=r"holds 32 images, fewer than the 512 asked .* calibrating on all 32"):
        _, indices = open_calibration_set(train, SIZE, images=512)
    assert len(indices) == 32
    big = _image_tree(tmp_path / "big", TinyFaces(), per_class=2, size=24)
    with pytest.warns(UserNote, match=r"images are 24x24, the model takes 16x16: each calibration image is resized"):
        dataset, indices = open_calibration_set(big, SIZE, images=16)
    assert tuple(dataset.get(int(indices[0]), False).shape) == (3, SIZE, SIZE)


def test_bench_infer_json(deploy, capsys):
    student, _, _ = deploy
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_infer
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = bench_infer.main(["--student", str(student), "--iters", "2", "--batch-size", "4", "--batch-iters", "1",
                            "--calib-images", "8", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(out))
    assert {"threads", "batch_size", "torch", "onnxruntime", "machine", "models"} <= set(printed)
    assert printed["threads"] == 1 and torch.get_num_threads() == 1
    r = printed["models"]["student"]
    assert r["input_size"] == SIZE and r["int8_mb"] < r["fp32_mb"] and "Min" in r["int8_fp32_ops"]
    for runtime in ("eager", "ort_fp32", "ort_int8"):
        m = r[runtime]
        assert set(m) == {"b1_p50_ms", "b1_p90_ms", "batch_img_s"}
        assert 0 < m["b1_p50_ms"] <= m["b1_p90_ms"] and m["batch_img_s"] > 0
    assert set(r["ratios"]) == {"ort_fp32_vs_eager_batch_img_s", "ort_fp32_vs_eager_b1_p50_ms",
                                "ort_int8_vs_eager_batch_img_s", "ort_int8_vs_eager_b1_p50_ms"}
    assert r["ratios"]["ort_int8_vs_eager_batch_img_s"] == pytest.approx(
        r["ort_int8"]["batch_img_s"] / r["eager"]["batch_img_s"], rel=1e-2)


class _ArrayReader:
    """A CalibrationDataReader over a (N, ...) float32 array, `batch` rows at a time."""

    def __init__(self, x, batch=8, name="input.1"):
        self.x, self.batch, self.name = x, batch, name
        self.rewind()

    def rewind(self):
        self._starts = iter(range(0, len(self.x), self.batch))

    def get_next(self):
        start = next(self._starts, None)
        return None if start is None else {self.name: self.x[start:start + self.batch]}


def test_image_ranges_clip_the_few_extreme_images_only_from_enough_images(tmp_path):
    from onnx import TensorProto, helper

    from distill.deploy.quantize import image_ranges
    node = helper.make_node("Relu", ["input.1"], ["embedding"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(0).uniform(-1, 1, (301, 4)).astype(np.float32)
    x[[7, 150, 300]] *= 50.0  # 1% of the images far outside the rest: floor(0.01 * 300) = 3 clipped each side
    ranges = image_ranges(str(path), _ArrayReader(x), 0.99)
    assert set(ranges) == {"input.1", "embedding"}
    lo, hi = ranges["input.1"]
    assert -1.0 <= lo < -0.9 and 0.9 < hi <= 1.0  # both outliers clipped
    assert ranges["embedding"][0] == 0.0 and 0.9 < ranges["embedding"][1] <= 1.0
    few = image_ranges(str(path), _ArrayReader(x[:100]), 0.99)  # 100 images: none clipped, plain MinMax
    assert few["input.1"] == pytest.approx((float(x[:100].min()), float(x[:100].max())))


def test_quantize_settings_roles_and_metadata(tmp_path):
    import dataclasses

    from distill.deploy.quantize import DEFAULT_SETTINGS, QuantSettings, quantize_file, sensitive_nodes
    model = _calibrated("vargfacenet", size=SIZE, multiplier=0.5, last_channels=64, units=(1, 1, 1),
                        embedding_size=32)
    fp32 = export_onnx(model, tmp_path / "m.onnx", SIZE)
    x = torch.randn(16, 3, SIZE, SIZE).numpy()
    roles = sensitive_nodes(onnx.load(fp32).graph, ("first_conv", "embedding_out", "embedding_dw"))
    assert [len(v) for v in roles.values()] == [1, 1, 1]
    assert roles["embedding_out"][0].endswith("Gemm") and roles["embedding_dw"][0].startswith("/embed/")
    default = quantize_file(fp32, tmp_path / "d.onnx", _ArrayReader(x))
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "d.onnx")).metadata_props}
    assert json.loads(props["facedistill.quantization_settings"]) == json.loads(
        json.dumps(dataclasses.asdict(DEFAULT_SETTINGS)))
    assert DEFAULT_SETTINGS.calibration == "images" and "99% of the images" in props["facedistill.quantization"]
    kept = quantize_file(fp32, tmp_path / "k.onnx", _ArrayReader(x),
                         settings=QuantSettings(exclude=("first_conv", "embedding_out", "embedding_dw")))
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "k.onnx")).metadata_props}
    assert props["facedistill.fp32_nodes"].count("/") >= 3
    assert "kept FP32: first_conv" in props["facedistill.quantization"]
    assert kept["int8"]["QLinearConv"] == default["int8"]["QLinearConv"] - 2
    assert "QGemm" not in kept["int8"] and kept["fp32"]["Gemm"] == 1
    with pytest.raises(ConfigError, match="--int8-calibration kl"):
        quantize_file(fp32, tmp_path / "x.onnx", _ArrayReader(x), settings=QuantSettings(calibration="kl"))
