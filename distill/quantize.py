"""INT8 ONNX (behind `distill export ... --int8 --calibrate DATA`): ONNX Runtime static quantization.

The FP32 file written by distill.export (BatchNorm folded, input `input.1`, output `embedding`) goes through
`onnxruntime.quantization.quant_pre_process` (shape inference, ORT's basic graph optimisations), then
`quantize_static` in the QDQ format: weights int8 per output channel (symmetric), activations uint8 with
ranges calibrated (MinMax) on N images of a training set (RecordIO folder or .rec, an image-folder tree,
or the synthetic set, which is written as RecordIO). The result keeps the FP32 file's interface: float32
in, float32 out; QuantizeLinear/DequantizeLinear pairs inside mark what runs in int8. ONNX Runtime fuses
DequantizeLinear -> op -> QuantizeLinear into int8 kernels (QLinearConv, QGemm, QLinearAdd, ...) when it
loads the file; ops it has no int8 kernel or quantizer for stay FP32 between a DequantizeLinear and a
QuantizeLinear. `int8_op_summary` reads that split from ORT's own optimised graph and the file records it
in its metadata (`facedistill.int8_ops`, `facedistill.fp32_ops`).

What ONNX Runtime 1.32 makes of VarGFaceNet (measured, full size at 112x112; the metadata of each file says
what happened to it):
- int8: all 102 Conv (the variable-group 3x3 ones, S = 8 channels per group, and the 1x1 ones alike) as
  QLinearConv, the FC as QGemm, the 18 residual/branch Adds as QLinearAdd, the SE gates' Sigmoid and Mul as
  QLinearSigmoid / QLinearMul;
- FP32: the 82 PReLU, the SE blocks' 12 ReduceMean (global pooling) and the Flatten. Neither ORT's
  quantizer (its op registry has Relu, Clip, LeakyRelu, Sigmoid but no PRelu, no ReduceMean) nor its CPU
  provider (no int8 PRelu kernel) handles them, so each PReLU runs between a DequantizeLinear and a
  QuantizeLinear: the int8 file pays a dequantize/requantize round trip per activation.
Activations are uint8, not int8 (ORT's default): with int8 activations (S8S8) ORT's CPU provider left a
third of the convolutions (those fed by a PReLU shared with a residual Add, and the pointwise conv before
each SE block) as DequantizeLinear -> FP32 Conv -> QuantizeLinear, slower than FP32 itself; with uint8
activations and int8 weights (U8S8, its classic x86 path) every one is fused.
"""

from __future__ import annotations

import collections
import os
import warnings

import numpy as np

from distill.errors import ConfigError, UserNote

DEFAULT_CALIB_IMAGES = 512
CALIB_BATCH = 32
INT8_SUFFIX = ".int8.onnx"


def int8_path(fp32_path) -> str:
    """out.onnx -> out.int8.onnx, beside it."""
    path = os.fspath(fp32_path)
    return (path[:-len(".onnx")] if path.endswith(".onnx") else path) + INT8_SUFFIX


def open_calibration_set(path, input_size: int, images: int = DEFAULT_CALIB_IMAGES):
    """(dataset, indices): `images` images spread evenly over the training set at `path`, resized to
    input_size (a UserNote says so when they are stored at another size); fewer when the set is smaller
    (a UserNote gives the number used)."""
    from distill.data import open_training_set

    path = os.fspath(path)
    if images < 1:
        raise ConfigError(f"--calib-images: {images}; calibration needs at least 1 image (default {DEFAULT_CALIB_IMAGES})")
    if not os.path.exists(path):
        raise ConfigError(f"--calibrate {path}: no such training set (a RecordIO folder holding train.rec, a .rec "
                          f"file, or a folder of one sub-folder of images per identity)")
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


def quantize_file(fp32_path, out_path, reader, metadata: dict | None = None) -> dict:
    """Quantize `fp32_path` to `out_path` (QDQ, int8 per-channel weights, uint8 activations, MinMax calibration
    from `reader`); add `metadata` and the int8/FP32 op split to its metadata_props. Returns int8_op_summary."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = os.fspath(fp32_path), os.fspath(out_path)
    prepared = f"{out_path}.pre.onnx"
    try:
        # shape inference + ORT's basic optimisations (constant folding, redundant nodes): what ORT advises
        # before quantize_static, so each tensor gets one scale and the quantizer sees every shape
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        if os.path.exists(prepared):
            os.remove(prepared)
    summary = int8_op_summary(out_path)
    proto = onnx.load(out_path)
    props = dict(metadata or {})
    props["int8_ops"] = _counts_text(summary["int8"])
    props["fp32_ops"] = _counts_text(summary["fp32"])
    props["quantization"] = ("onnxruntime quantize_static, QDQ, weights int8 per channel, activations uint8, "
                             "MinMax calibration")
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
