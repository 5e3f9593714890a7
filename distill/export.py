"""ONNX export (behind `distill export MODEL OUT.onnx`): a student or teacher, checked against torch with ONNX Runtime.

The exported graph has the interface of insightface arcface_torch's ONNX exports, so it loads in
insightface, ONNX Runtime and back into facedistill as an `onnx` teacher:
- input  `input.1`: float32 (N, 3, S, S) RGB normalised (x/255 - 0.5)/0.5, i.e. (p - 127.5)/127.5
  (no normalisation inside the graph); N is a dynamic axis named `batch` unless --batch N fixes it;
- output `embedding`: float32 (N, embedding_size) raw embeddings (not L2-normalised).
The file also records `facedistill.normalisation`, `facedistill.source` and `facedistill.input_size`
in its metadata_props.

MODEL is a facedistill `student.pt`, a plain state dict such as arcface_torch's `backbone.pth`
(with --arch), or a model name (random weights, for deployment tests). The file is written only
after the parity check passes: ONNX Runtime and torch must agree on random input (cosine similarity of
every embedding >= 0.9999 and a small max abs difference), otherwise nothing is left at OUT.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from distill.atomic import ensure_writable, unwritable
from distill.errors import ConfigError, DistillError

INPUT_NAME = "input.1"
OUTPUT_NAME = "embedding"
NORMALISATION = "RGB, (x/255-0.5)/0.5"
MIN_COSINE = 0.9999
# allowed max abs difference, relative to the largest embedding value (float32 reorderings only)
MAX_REL_DIFF = 1e-3
# opsets the TorchScript exporter writes (9 is its base; 20 its maximum in torch 2.x)
OPSETS = range(9, 21)


class ExportParityError(DistillError):
    """The exported ONNX model does not compute what the torch model computes."""


def export_onnx(model: nn.Module, path, input_size: int, opset: int = 17, batch: int | None = None,
                metadata: dict | None = None) -> str:
    """Write `model` (eval, CPU, float32) to `path` as ONNX; `batch` None keeps the batch axis dynamic."""
    path = os.fspath(path)
    model = model.eval().to("cpu", torch.float32)
    example = torch.randn(batch or 2, 3, input_size, input_size)
    dynamic = None if batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    with warnings.catch_warnings():
        # torch >= 2.9 deprecates the TorchScript exporter, but its replacement needs onnxscript, a
        # further dependency; the TorchScript exporter still writes the graphs insightface tools expect
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), path, dynamo=False, export_params=True, opset_version=opset,
                          do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic)
    if metadata:
        import onnx
        proto = onnx.load(path)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = f"facedistill.{key}", str(value)
        onnx.save(proto, path)
    return path


def check_parity(model: nn.Module, path, input_size: int, batch: int | None = None, seed: int = 0,
                 name: str | None = None) -> dict:
    """Run torch and ONNX Runtime on the same random batch; raise ExportParityError when they disagree
    (naming `name`, default `path`: the file the user asked for, not the temporary one checked).

    Returns {"max_abs_diff", "min_cosine", "batch", "embedding_size"}."""
    import onnxruntime as ort

    n = batch or 3  # 3, not the export's example batch of 2: proves the batch axis really is dynamic
    x = torch.randn(n, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters(), torch.empty(0)).device
    with torch.no_grad():
        expected = model.eval()(x.to(device)).float().cpu().numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises pybind exception types without a common base
        raise ExportParityError(f"{name or path}: ONNX Runtime cannot load the exported model "
                                f"({str(err).splitlines()[0][:300]}); try another --opset") from None
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != expected.shape:
        raise ExportParityError(f"{name or path}: ONNX output shape {got.shape} differs from torch's {expected.shape}")
    diff = float(np.abs(got - expected).max())
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    cosine = float(((got * expected).sum(1) / np.maximum(norms, 1e-12)).min())
    scale = max(1.0, float(np.abs(expected).max()))
    result = {"max_abs_diff": diff, "min_cosine": cosine, "batch": n, "embedding_size": int(got.shape[1])}
    if not cosine >= MIN_COSINE or not diff <= MAX_REL_DIFF * scale:  # `not >=` also catches NaN
        raise ExportParityError(
            f"{name or path}: ONNX Runtime disagrees with torch (min cosine {cosine:.6f}, needs >= {MIN_COSINE}; "
            f"max abs diff {diff:.3g}, allowed {MAX_REL_DIFF * scale:.3g}); an op exported wrongly: "
            f"try another --opset, and report the model and torch version")
    return result


def export_model(source: str, out, arch: str | None = None, input_size: int | None = None, opset: int = 17,
                 batch: int | None = None) -> dict:
    """Load `source` (see distill.models.load_model), export it to `out`, check parity, then move it into place."""
    from distill.models import load_model

    out = os.fspath(out)
    if not out.endswith(".onnx"):
        raise ConfigError(f"{out}: the output file should end in .onnx")
    if opset not in OPSETS:
        raise ConfigError(f"--opset: {opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1} (default 17)")
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch: a fixed batch must be at least 1, got {batch}")
    model, size = load_model(source, arch=arch, input_size=input_size)
    size = input_size or size or 112
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"{out}: the directory {out_dir} does not exist")
    ensure_writable(out_dir, "the exported model")  # before the export's work, not after
    tmp = f"{out}.tmp"
    try:
        try:
            export_onnx(model, tmp, size, opset=opset, batch=batch,
                        metadata={"normalisation": NORMALISATION, "source": os.path.basename(source), "input_size": size})
        except OSError as err:  # the disk filled during the export
            raise unwritable(out, err, "the exported model") from None
        result = check_parity(model, tmp, size, batch=batch, name=out)
        try:
            os.replace(tmp, out)
        except OSError as err:
            raise unwritable(out, err, "the exported model") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {**result, "path": out, "input_size": size, "opset": opset}
