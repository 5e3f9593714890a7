"""INT8 ONNX (behind `distill export ... --int8 --calibrate DATA`): ONNX Runtime static quantization.

The FP32 file written by distill.deploy.export (BatchNorm folded, input `input.1`, output `embedding`) goes through
`onnxruntime.quantization.quant_pre_process` (shape inference, ORT's basic graph optimisations), then
`quantize_static` in the QDQ format: weights int8 per output channel (symmetric), activations uint8 with
ranges calibrated on N images of a training set (RecordIO folder or .rec, an image-folder tree, or the
synthetic set, which is written as RecordIO). The ranges (DEFAULT_SETTINGS, calibration "images",
image_ranges) cover each tensor entirely on 99% of the calibration images: a training set holds a few
images whose activations are far outside the rest, and a plain MinMax range stretched to fit them quantizes
every other image coarsely in the deep layers; which ones the N images include then decides the accuracy.
Per-image ranges at 99% keep the INT8 file close to torch with few calibration images, where MinMax needs
many; ORT's Percentile and moving-average MinMax help less, its Entropy through quantize_static is MinMax (its
histogram has as many bins as the quantized one), and reduce_range (7-bit weights) loses more (the accuracies:
docs/measurements.md). The settings used are recorded in the file's metadata (`facedistill.quantization`,
`facedistill.quantization_settings`). The result keeps the FP32 file's interface: float32
in, float32 out; QuantizeLinear/DequantizeLinear pairs inside mark what runs in int8. ONNX Runtime fuses
DequantizeLinear -> op -> QuantizeLinear into int8 kernels (QLinearConv, QGemm, QLinearAdd, ...) when it
loads the file; ops it has no int8 kernel or quantizer for stay FP32 between a DequantizeLinear and a
QuantizeLinear. `int8_op_summary` reads that split from ORT's own optimised graph and the file records it
in its metadata (`facedistill.int8_ops`, `facedistill.fp32_ops`).

What ONNX Runtime 1.32 makes of VarGFaceNet (full size at 112x112; the metadata of each file says what
happened to it):
- the exported FP32 graph writes each of the 82 PReLU as Relu(x) + slope * Min(x, 0) (distill.deploy.onnx_graph.
  split_prelu: the same numbers; ORT's PRelu kernel is several times slower, and neither ORT's quantizer, whose op
  registry has Relu, Clip, LeakyRelu, Sigmoid but no PRelu, nor its CPU provider has an int8 PRelu);
- int8: all 102 Conv (the variable-group 3x3 ones, S = 8 channels per group, and the 1x1 ones alike) as
  QLinearConv, the FC as QGemm, the Adds (residual, branch and PReLU halves) as QLinearAdd, the Muls (SE gates
  and PReLU slopes) as QLinearMul, the SE gates' Sigmoid as QLinearSigmoid, Relu fused into its producer;
- FP32: the 82 Min of the PReLUs, the SE blocks' 12 ReduceMean (global pooling, no quantizer entry) and the
  Flatten, each between a DequantizeLinear and a QuantizeLinear: a dequantize/requantize round trip apiece.
Activations are uint8, not int8 (ORT's default): with int8 activations (S8S8) ORT's CPU provider left a
third of the convolutions (those fed by a PReLU shared with a residual Add, and the pointwise conv before
each SE block) as DequantizeLinear -> FP32 Conv -> QuantizeLinear, slower than FP32 itself; with uint8
activations and int8 weights (U8S8, its classic x86 path) every one is fused.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import warnings

import numpy as np

from distill.deploy.onnx_graph import shorten_names
from distill.utils.errors import ConfigError, UserNote

DEFAULT_CALIB_IMAGES = 512
CALIB_BATCH = 32
INT8_SUFFIX = ".int8.onnx"


def int8_path(fp32_path) -> str:
    """out.onnx -> out.int8.onnx, beside it."""
    path = os.fspath(fp32_path)
    return (path[:-len(".onnx")] if path.endswith(".onnx") else path) + INT8_SUFFIX


def check_calibration(int8: bool, calibrate, calib_images: int | None, what: str = "file") -> None:
    """The calibration options of `distill export` and `distill compare --export`, checked before any work:
    --calibrate only with --int8, an existing set, --calib-images >= 1 (None: DEFAULT_CALIB_IMAGES)."""
    if calibrate is not None and not int8:
        raise ConfigError(f"--calibrate {calibrate}: calibration is for the INT8 {what}; add --int8")
    if calib_images is not None and calib_images < 1:
        raise ConfigError(f"--calib-images: {calib_images}; calibration needs at least 1 image (default "
                          f"{DEFAULT_CALIB_IMAGES})")
    if calibrate is not None and not os.path.exists(calibrate):
        raise ConfigError(f"--calibrate {calibrate}: no such training set (a RecordIO folder holding train.rec, a "
                          f".rec file, or a folder of one sub-folder of images per identity)")


def open_calibration_set(path, input_size: int, images: int = DEFAULT_CALIB_IMAGES):
    """(dataset, indices): `images` images spread evenly over the training set at `path`, resized to
    input_size (a UserNote says so when they are stored at another size); fewer when the set is smaller
    (a UserNote gives the number used)."""
    from distill.data import open_training_set

    path = os.fspath(path)
    check_calibration(True, path, images)
    dataset = open_training_set(path, flip=False, input_size=input_size)
    if len(dataset) == 0:
        raise ConfigError(f"--calibrate {path}: the training set holds no images")
    stored = dataset.stored_size()
    if stored != (input_size, input_size):
        warnings.warn(f"--calibrate {path}: images are {stored[0]}x{stored[1]}, the model takes "
                      f"{input_size}x{input_size}: each calibration image is resized (bicubic) as training does",
                      UserNote, stacklevel=2)
    n = min(images, len(dataset))
    if n < images:
        warnings.warn(f"--calibrate {path}: the set holds {len(dataset)} images, fewer than the {images} asked "
                      f"(--calib-images); calibrating on all {n}", UserNote, stacklevel=2)
    indices = np.unique(np.linspace(0, len(dataset) - 1, n).round().astype(np.int64))
    return dataset, indices


def calibration_reader(dataset, indices, input_name: str, batch: int | None = CALIB_BATCH):
    """An onnxruntime.quantization.CalibrationDataReader feeding `dataset[indices]` (normalised images, no flip)
    in batches of `batch` (the file's fixed batch when it has one: short last batches are padded by repeating)."""
    from onnxruntime.quantization import CalibrationDataReader

    class FaceCalibrationReader(CalibrationDataReader):
        def __init__(self):
            self.step = batch or CALIB_BATCH
            self.fixed = batch is not None and batch != CALIB_BATCH
            self.rewind()

        def rewind(self):
            self._starts = iter(range(0, len(indices), self.step))

        def get_next(self):
            start = next(self._starts, None)
            if start is None:
                return None
            chunk = [int(i) for i in indices[start:start + self.step]]
            if self.fixed and len(chunk) < self.step:
                chunk += [chunk[-1]] * (self.step - len(chunk))
            x = np.stack([dataset.get(i, flip=False).numpy() for i in chunk]).astype(np.float32)
            return {input_name: x}

        def __len__(self):
            return (len(indices) + self.step - 1) // self.step

    return FaceCalibrationReader()


CALIBRATIONS = ("minmax", "percentile", "entropy", "images")
# where a tensor's range comes from: the extremes seen (MinMax), a percentile of its histogram (Percentile),
# or the range minimising the KL divergence of the quantized histogram (Entropy; through quantize_static its
# histogram has as many bins as the quantized one, so it only ever picks the full range: MinMax); `images`
# (image_ranges): each tensor's range covers that tensor entirely on `image_quantile` of the images, so the few
# calibration images with extreme activations (embedding norms 20x the median) are clipped, not every image
# quantized coarsely to make room for them
NODE_ROLES = ("first_conv", "embedding_out", "embedding_dw")


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    """How quantize_file quantizes. `exclude`: node roles (NODE_ROLES) kept FP32; `per_tensor`: roles whose
    weights get one scale instead of one per output channel."""
    calibration: str = "images"
    percentile: float = 99.999
    image_quantile: float = 0.99
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    moving_average: bool = False
    reduce_range: bool = False
    exclude: tuple = ()
    per_tensor: tuple = ()

    def describe(self) -> str:
        calib = {"minmax": "MinMax", "percentile": f"Percentile {self.percentile:g}", "entropy": "Entropy",
                 "images": f"per-image MinMax, ranges covering {100 * self.image_quantile:g}% of the images"}[
                     self.calibration]
        if self.moving_average:
            calib += " (moving average)"
        parts = [f"weights int8 per channel{' (7-bit, reduce_range)' if self.reduce_range else ''}"
                 f"{'' if self.weight_symmetric else ' asymmetric'}",
                 f"activations uint8{' symmetric' if self.activation_symmetric else ''}",
                 f"{calib} calibration"]
        if self.per_tensor:
            parts.append("per-tensor weights for " + ", ".join(self.per_tensor))
        if self.exclude:
            parts.append("kept FP32: " + ", ".join(self.exclude))
        return ", ".join(parts)


def _consumers(graph, name):
    return [n for n in graph.node if name in n.input]


def sensitive_nodes(graph, roles) -> dict:
    """{role: [node names]} for NODE_ROLES in `graph`: `first_conv` the Conv(s) reading the graph input,
    `embedding_out` the Gemm/MatMul/Conv producing the graph output (walking back over Flatten/Reshape/
    PRelu/Add...), `embedding_dw` the last grouped (depthwise) Conv of the graph."""
    import onnx

    unknown = [r for r in roles if r not in NODE_ROLES]
    if unknown:
        raise ConfigError(f"unknown node role(s) {unknown}; known: {', '.join(NODE_ROLES)}")
    producer = {o: n for n in graph.node for o in n.output}
    found = {}
    for role in roles:
        names = []
        if role == "first_conv":
            for inp in graph.input:
                names += [n.name for n in _consumers(graph, inp.name) if n.op_type == "Conv"]
        elif role == "embedding_out":
            for out in graph.output:
                node = producer.get(out.name)
                while node is not None and node.op_type not in ("Gemm", "MatMul", "Conv"):
                    node = producer.get(node.input[0])
                if node is not None:
                    names.append(node.name)
        elif role == "embedding_dw":
            grouped = [n.name for n in graph.node if n.op_type == "Conv" and any(
                a.name == "group" and onnx.helper.get_attribute_value(a) > 1 for a in n.attribute)]
            names += grouped[-1:]
        found[role] = names
    return found


def quantize_file(fp32_path, out_path, reader, metadata: dict | None = None,
                  settings: QuantSettings | None = None) -> dict:
    """Quantize `fp32_path` to `out_path` (QDQ, int8 per-channel weights, uint8 activations, ranges from
    `reader` as `settings` say, default DEFAULT_SETTINGS); add `metadata`, the settings and the int8/FP32 op
    split to its metadata_props. Returns int8_op_summary."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    settings = settings or DEFAULT_SETTINGS
    if settings.calibration not in CALIBRATIONS:
        raise ConfigError(f"--int8-calibration {settings.calibration}: use one of {', '.join(CALIBRATIONS)}")
    fp32_path, out_path = os.fspath(fp32_path), os.fspath(out_path)
    prepared = f"{out_path}.pre.onnx"
    try:
        # shape inference + ORT's basic optimisations (constant folding, redundant nodes): what ORT advises
        # before quantize_static, so each tensor gets one scale and the quantizer sees every shape
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        graph = onnx.load(prepared).graph
        roles = sensitive_nodes(graph, tuple(settings.exclude) + tuple(settings.per_tensor))
        exclude = [name for role in settings.exclude for name in roles[role]]
        extra = {"ActivationSymmetric": settings.activation_symmetric,
                 "WeightSymmetric": settings.weight_symmetric,
                 "CalibMovingAverage": settings.moving_average,
                 # histogram calibrators default to a range symmetric about 0: half of uint8 wasted
                 "CalibTensorRangeSymmetric": settings.activation_symmetric}
        if settings.calibration == "percentile":
            extra["CalibPercentile"] = settings.percentile
        per_tensor = {}
        initializers = {i.name for i in graph.initializer}
        for role in settings.per_tensor:
            for node in graph.node:
                if node.name in roles[role] and len(node.input) > 1 and node.input[1] in initializers:
                    per_tensor[node.input[1]] = [{"symmetric": settings.weight_symmetric}]  # no "axis": one scale
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy, "images": CalibrationMethod.MinMax}[settings.calibration]
        if settings.calibration == "images":
            for name, (lo, hi) in image_ranges(prepared, reader, settings.image_quantile).items():
                per_tensor.setdefault(name, [{}])[0].update(rmin=np.float32(lo), rmax=np.float32(hi))
            reader.rewind()
        if per_tensor:
            extra["TensorQuantOverrides"] = per_tensor
        quantize_static(prepared, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=settings.reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=exclude or None, calibrate_method=method,
                        extra_options=extra)
    finally:
        if os.path.exists(prepared):
            os.remove(prepared)
    summary = int8_op_summary(out_path)
    proto = onnx.load(out_path)
    shorten_names(proto.graph)  # the quantizer's long names are ~6% of the file
    props = dict(metadata or {})
    props["int8_ops"] = _counts_text(summary["int8"])
    props["fp32_ops"] = _counts_text(summary["fp32"])
    props["quantization"] = f"onnxruntime quantize_static, QDQ, {settings.describe()}"
    props["quantization_settings"] = json.dumps(dataclasses.asdict(settings), sort_keys=True)
    if exclude:
        props["fp32_nodes"] = ", ".join(exclude)
    existing = {p.key for p in proto.metadata_props}
    for key, value in props.items():
        name = f"facedistill.{key}"
        if name in existing:
            next(p for p in proto.metadata_props if p.key == name).value = str(value)
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = name, str(value)
    onnx.save(proto, out_path)
    return summary


DEFAULT_SETTINGS = QuantSettings()


def image_ranges(model_path, reader, quantile: float) -> dict:
    """{tensor: (rmin, rmax)} for every float activation of the model at `model_path`: the `1 - quantile`
    quantile over the images from `reader` of each image's minimum, and the `quantile` quantile of each image's
    maximum (0 always inside): on each side the floor((1 - quantile) * (N - 1)) most extreme of N images are
    clipped (none of 100 or fewer at 0.99: plain MinMax). The graph is run once with a Flatten ->
    ReduceMin/ReduceMax pair per tensor."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(model_path)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    floats = {vi.name for vi in list(graph.value_info) + list(graph.input) + list(graph.output)
              if vi.type.tensor_type.elem_type == TensorProto.FLOAT}
    initializers = {i.name for i in graph.initializer}
    names = sorted({t for n in graph.node for t in list(n.input) + list(n.output)} & floats - initializers)
    if opset >= 18:
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "_fd_axes"))
    outputs = []
    for i, name in enumerate(names):
        flat = f"_fd_flat{i}"
        graph.node.append(helper.make_node("Flatten", [name], [flat], axis=1))
        for op in ("ReduceMin", "ReduceMax"):
            out = f"_fd_{op}{i}"
            if opset >= 18:
                graph.node.append(helper.make_node(op, [flat, "_fd_axes"], [out], keepdims=0))
            else:
                graph.node.append(helper.make_node(op, [flat], [out], axes=[1], keepdims=0))
            graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
            outputs.append(out)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    lows, highs = [[] for _ in names], [[] for _ in names]
    reader.rewind()
    while (feed := reader.get_next()) is not None:
        values = session.run(outputs, feed)
        for i in range(len(names)):
            lows[i].append(values[2 * i])
            highs[i].append(values[2 * i + 1])
    ranges = {}
    for i, name in enumerate(names):
        # "higher"/"lower": an observed image's value, and plain MinMax for small sets
        lo = float(np.quantile(np.concatenate(lows[i]), 1 - quantile, method="lower"))
        hi = float(np.quantile(np.concatenate(highs[i]), quantile, method="higher"))
        ranges[name] = (min(lo, 0.0), max(hi, 0.0))
    return ranges


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def int8_op_summary(path) -> dict:
    """{"int8": {op: count}, "fp32": {op: count}}: the ops ONNX Runtime's CPU provider runs after fusing the
    QDQ file (extended optimisations, as a session does), split by whether they compute in int8.
    QuantizeLinear/DequantizeLinear themselves are left out."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        optimised = os.path.join(tmp, "optimised.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = optimised
        options.log_severity_level = 3
        ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
        graph = onnx.load(optimised).graph
    int8, fp32 = collections.Counter(), collections.Counter()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type.startswith(("QLinear", "QGemm", "QAttention")) or node.op_type.endswith("Integer"):
            int8[node.op_type] += 1
        else:
            fp32[node.op_type] += 1
    return {"int8": dict(int8), "fp32": dict(fp32)}
