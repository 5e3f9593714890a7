"""ONNX export (behind `distill export MODEL OUT.onnx`): a student or teacher, BatchNorm folded, checked
against torch with ONNX Runtime; optionally an INT8 file beside it and verification numbers side by side.

The exported graph has the interface of insightface arcface_torch's ONNX exports, so it loads in
insightface, ONNX Runtime and back into facedistill as an `onnx` teacher:
- input  `input.1`: float32 (N, 3, S, S) RGB normalised (x/255 - 0.5)/0.5, i.e. (p - 127.5)/127.5
  (no normalisation inside the graph); N is a dynamic axis named `batch` unless --batch N fixes it;
- output `embedding`: float32 (N, embedding_size) raw embeddings (not L2-normalised).
The file also records `facedistill.normalisation`, `facedistill.source`, `facedistill.input_size` and
`facedistill.batchnorm` (how its BatchNorms were removed) in its metadata_props.

BatchNorm: `distill export` leaves no BatchNormalization node (fold_batchnorm, on the ONNX graph: the
TorchScript exporter already folds Conv -> BN; the BN after the fc, BatchNorm1d `features`, is folded here
into the Gemm; any BN no neighbour can absorb exactly becomes Mul + Add). The folded file must match the
unfolded torch model to FOLDED_MAX_REL_DIFF (1e-4 of the largest embedding value).

MODEL is a facedistill `student.pt`, a plain state dict such as arcface_torch's `backbone.pth`
(with --arch), or a model name (random weights, for deployment tests). The file is written only
after the parity check passes: ONNX Runtime and torch must agree on random input (cosine similarity of
every embedding >= 0.9999 and a small max abs difference), otherwise nothing is left at OUT.
With --int8 the file OUT.int8.onnx (student.onnx -> student.int8.onnx) is written beside it (distill.deploy.quantize).
With --check-bin, check_exports / judge_checks / format_checks compare torch and each file on .bin sets.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

from distill.deploy.onnx_graph import fold_batchnorm, split_prelu
from distill.utils.atomic import ensure_writable, unwritable
from distill.utils.errors import ConfigError, DataFormatError, DistillError

INPUT_NAME = "input.1"
OUTPUT_NAME = "embedding"
NORMALISATION = "RGB, (x/255-0.5)/0.5"
MIN_COSINE = 0.9999
# allowed max abs difference, relative to the largest embedding value (float32 reorderings only)
MAX_REL_DIFF = 1e-3
# what `distill export` allows its BatchNorm-folded file against the unfolded torch model
FOLDED_MAX_REL_DIFF = 1e-4
# the deployed graph writes PReLU as Relu + slope * Min(x, 0): same numbers, ~4x faster in ORT (onnx_graph.split_prelu)
SPLIT_PRELU = True
# opsets the TorchScript exporter writes (9 is its base; 20 its maximum in torch 2.x)
OPSETS = range(9, 21)


class ExportParityError(DistillError):
    """The exported ONNX model does not compute what the torch model computes."""


def export_onnx(model: nn.Module, path, input_size: int, opset: int = 17, batch: int | None = None,
                metadata: dict | None = None, fold_bn: bool = False) -> str:
    """Write `model` (eval, CPU, float32) to `path` as ONNX; `batch` None keeps the batch axis dynamic.
    `fold_bn` removes every BatchNormalization node (see fold_batchnorm) and records how in the metadata."""
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
    if metadata or fold_bn:
        import onnx
        proto = onnx.load(path)
        metadata = dict(metadata or {})
        if fold_bn:
            counts = fold_batchnorm(proto)
            metadata["batchnorm"] = (f"folded: {counts['folded']} into the neighbouring Conv/Gemm (the exporter "
                                     f"folds Conv->BN itself), {counts['mul_add']} as Mul+Add, {counts['left']} left")
            if SPLIT_PRELU:
                metadata["prelu"] = (f"{split_prelu(proto)} PRelu as Relu(x) + slope * Min(x, 0) "
                                     f"(faster in ONNX Runtime)")
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = f"facedistill.{key}", str(value)
        onnx.save(proto, path)
    return path


def check_parity(model: nn.Module, path, input_size: int, batch: int | None = None, seed: int = 0,
                 name: str | None = None, max_rel_diff: float = MAX_REL_DIFF) -> dict:
    """Run torch and ONNX Runtime on the same random batch; raise ExportParityError when they disagree
    (naming `name`, default `path`: the file the user asked for, not the temporary one checked).

    Returns {"max_abs_diff", "min_cosine", "batch", "embedding_size", "scale"} (scale: the largest torch
    embedding value, at least 1, which the allowed difference is relative to)."""
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
    result = {"max_abs_diff": diff, "min_cosine": cosine, "batch": n, "embedding_size": int(got.shape[1]),
              "scale": scale}
    if not cosine >= MIN_COSINE or not diff <= max_rel_diff * scale:  # `not >=` also catches NaN
        raise ExportParityError(
            f"{name or path}: ONNX Runtime disagrees with torch (min cosine {cosine:.6f}, needs >= {MIN_COSINE}; "
            f"max abs diff {diff:.3g}, allowed {max_rel_diff * scale:.3g}); an op exported wrongly: "
            f"try another --opset, and report the model and torch version")
    return result


def _check_paths(out: str, int8: bool, calibrate, check_bins) -> str:
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"{out}: the directory {out_dir} does not exist")
    if os.path.isdir(out):
        raise ConfigError(f"{out}: is a folder; give the .onnx file to write "
                          f"(e.g. {os.path.join(out, 'student.onnx')})")
    if int8 and calibrate is None:
        raise ConfigError("--int8: static quantization needs calibration images; add --calibrate DATA (a training "
                          "set: a RecordIO folder or .rec file, or an image-folder tree)")
    from distill.deploy.quantize import check_calibration

    check_calibration(int8, calibrate, None)
    from distill.data.verification import read_verification_pickle

    for path in check_bins:
        if not os.path.isfile(path):
            raise ConfigError(f"--check-bin {path}: verification set not found")
        try:  # read whole (structure; nothing decoded) now, not after the .onnx files are written
            read_verification_pickle(path)
        except DataFormatError as err:
            raise DataFormatError(f"--check-bin {err}; nothing was exported") from None
    ensure_writable(out_dir, "the exported model")  # before the export's work, not after
    return out_dir


def _move_into_place(tmp: str, out: str) -> None:
    try:
        os.replace(tmp, out)
    except OSError as err:
        raise unwritable(out, err, "the exported model") from None


def remove_leftovers(paths) -> list:
    """Delete the partial files an export killed mid-way (kill -9: no `finally` ran) left beside `paths`: the
    temporary model (PATH.tmp) and the INT8 step's pre-processed copy (PATH.tmp.pre.onnx, tens of MB). Each
    removal is one UserNote. Returns the removed paths."""
    import warnings

    from distill.utils.errors import UserNote

    removed = []
    for path in paths:
        for leftover in (f"{path}.tmp", f"{path}.tmp.pre.onnx"):
            if os.path.isfile(leftover):
                os.remove(leftover)
                removed.append(leftover)
                warnings.warn(f"removed {leftover}, a partial file an interrupted export left behind", UserNote,
                              stacklevel=2)
    return removed


def _check_input_size(model: nn.Module, source: str, built: int | None, asked: int | None) -> None:
    """Refuse `--input-size` other than the side a fixed-size model was built for (timm's `fixed_input_size`: a
    face model's embedding block or fc is sized for the last feature map), before any export work: torch would
    fail deep in the trace with a matrix-shape error."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if asked is None or built is None or asked == built or not cfg.get("fixed_input_size"):
        return
    raise ConfigError(f"{source}: this model was built for {built}x{built} input (its embedding layer is sized "
                      f"for it), so it cannot be exported at --input-size {asked}; drop --input-size (it exports at "
                      f"{built}), or export a model trained at {asked}")


def export_model(source: str, out, arch: str | None = None, input_size: int | None = None, opset: int = 17,
                 batch: int | None = None, int8: bool = False, calibrate=None, calib_images: int | None = None,
                 check_bins=(), int8_calibration: str | None = None, source_name: str | None = None) -> dict:
    """Load `source` (see distill.models.files.load_model), export it to `out` with BatchNorm folded, check parity
    (<= FOLDED_MAX_REL_DIFF against the unfolded torch model), then move it into place.

    With `int8`, also write `int8_path(out)` (out.int8.onnx), quantized statically on `calib_images` images of
    the training set `calibrate` (distill.deploy.quantize). With `check_bins`, evaluate torch and every file written
    on those verification sets (check_exports; judge the result with judge_checks). Every argument and the
    output directory are checked before any work."""
    from distill.models.files import load_model

    out = os.fspath(out)
    if not out.endswith(".onnx"):
        raise ConfigError(f"{out}: the output file should end in .onnx")
    if opset not in OPSETS:
        raise ConfigError(f"--opset: {opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1} (default 17)")
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch: a fixed batch must be at least 1, got {batch}")
    from distill.deploy.quantize import DEFAULT_CALIB_IMAGES, check_calibration, int8_path
    if int8:
        check_calibration(int8, None, calib_images)
    calib_images = DEFAULT_CALIB_IMAGES if calib_images is None else calib_images
    _check_paths(out, int8, calibrate, check_bins)
    remove_leftovers([out] + ([int8_path(out)] if int8 else []))
    model, size = load_model(source, arch=arch, input_size=input_size)
    _check_input_size(model, source, size, input_size)
    size = input_size or size or 112
    tmp = f"{out}.tmp"
    try:
        try:
            export_onnx(model, tmp, size, opset=opset, batch=batch, fold_bn=True,
                        metadata={"normalisation": NORMALISATION, "source": source_name or os.path.basename(source),
                                  "input_size": size})
        except OSError as err:  # the disk filled during the export
            raise unwritable(out, err, "the exported model") from None
        result = check_parity(model, tmp, size, batch=batch, name=out)
        allowed = FOLDED_MAX_REL_DIFF * result.get("scale", 1.0)
        if not result["max_abs_diff"] <= allowed:
            raise ExportParityError(
                f"{out}: the BatchNorm-folded graph drifts from the torch model (max abs diff "
                f"{result['max_abs_diff']:.3g}, allowed {allowed:.3g}); report the model and torch version")
        _move_into_place(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    import onnx
    props = {p.key: p.value for p in onnx.load(out, load_external_data=False).metadata_props}
    result = {**result, "path": out, "input_size": size, "opset": opset, "size_mb": os.path.getsize(out) / 1e6,
              "batchnorm": props.get("facedistill.batchnorm"), "files": {"fp32": out}, "model": model}
    if int8:
        result["int8"] = _export_int8(model, out, int8_path(out), size, batch, calibrate, calib_images,
                                      int8_calibration)
        result["files"]["int8"] = result["int8"]["path"]
    if check_bins:
        result["check"] = check_exports(model, size, result["files"], check_bins)
    return result


def _export_int8(model, fp32: str, out: str, size: int, batch, calibrate, calib_images: int,
                 calibration: str | None = None) -> dict:
    """Quantize the FP32 file into `out` (atomically); report the calibration and how close it stays to torch.
    `calibration`: how activation ranges are read (distill.deploy.quantize.CALIBRATIONS; None: its default)."""
    from distill.deploy.quantize import (
        DEFAULT_SETTINGS,
        QuantSettings,
        calibration_reader,
        open_calibration_set,
        quantize_file,
    )

    settings = QuantSettings(calibration=calibration) if calibration else DEFAULT_SETTINGS
    dataset, indices = open_calibration_set(calibrate, size, calib_images)
    tmp = f"{out}.tmp"
    try:
        try:
            summary = quantize_file(fp32, tmp, calibration_reader(dataset, indices, INPUT_NAME, batch),
                                    metadata={"calibration": f"{len(indices)} images of "
                                                             f"{os.path.basename(os.path.normpath(calibrate))}"},
                                    settings=settings)
        except OSError as err:
            raise unwritable(out, err, "the INT8 model") from None
        cosines = _cosines_to_torch(model, tmp, dataset, indices[:64], batch)
        _move_into_place(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": out, "size_mb": os.path.getsize(out) / 1e6, "calib_images": int(len(indices)),
            "quantization": settings.describe(),
            "int8_ops": summary["int8"], "fp32_ops": summary["fp32"], **cosines}


def _onnx_model(path):
    from teachers.onnx import OnnxTeacherModel

    return OnnxTeacherModel(path, providers=["CPUExecutionProvider"])


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-12)


def _cosines_to_torch(model, path, dataset, indices, batch) -> dict:
    """Min / mean cosine between torch's and the file's embeddings of some calibration images."""
    x = torch.stack([dataset.get(int(i), flip=False) for i in indices])
    with torch.no_grad():
        expected = model.eval()(x).float().numpy()
        got = _onnx_model(path)(x).numpy()
    cos = _cosine_rows(got, expected)
    return {"calib_cosine_min": float(cos.min()), "calib_cosine_mean": float(cos.mean())}


def check_exports(model, input_size: int, files: dict, bins, batch_size: int = 64) -> dict:
    """{set: {"pytorch": metrics, label: metrics + cosine_min/cosine_mean/size_mb for each file}}: verification
    accuracy, XNorm and TAR@FAR (distill.eval.verification's embed_pairs + verification_metrics, as `distill eval`)
    of the torch model and of each ONNX file in `files` ({label: path}), and the cosine between torch's and the
    file's embedding of every image and of its flip."""
    from distill.data import load_verification_bin
    from distill.eval.verification import EvaluationError, embed_pairs, set_name_of, size_note, verification_metrics

    results = {}
    for path in bins:
        name = set_name_of(path)
        images, issame = load_verification_bin(path)
        size_note(f"verification set {name}", images, input_size)
        rows = {}
        reference = None
        for label, runner in [("pytorch", model)] + [(label, _onnx_model(p)) for label, p in files.items()]:
            orig, flip = embed_pairs(runner, images, input_size, batch_size=batch_size, progress=False,
                                     model_name=label if label == "pytorch" else files[label], set_name=name)
            try:
                rows[label] = verification_metrics(orig, flip, issame)
            except EvaluationError as err:
                raise EvaluationError(f"verification set {name}: {err}") from None
            both = np.concatenate([orig, flip])
            if reference is None:
                reference = both
            else:
                cos = _cosine_rows(both, reference)
                rows[label].update(cosine_min=float(cos.min()), cosine_mean=float(cos.mean()),
                                   size_mb=os.path.getsize(files[label]) / 1e6, path=files[label])
        results[name] = rows
    return results


def judge_checks(results: dict, int8_margin: float = 0.5) -> list:
    """Raise ExportParityError when the FP32 file's embedding of some verification image is not the torch
    model's (cosine < MIN_COSINE); warn (UserNote) for each set where the INT8 file loses more than
    `int8_margin` points of accuracy. Returns the warnings' texts."""
    from distill.utils.errors import UserNote

    notes = []
    for name, rows in results.items():
        fp32 = rows.get("fp32")
        if fp32 is not None and not fp32["cosine_min"] >= MIN_COSINE:
            raise ExportParityError(
                f"{fp32['path']}: on {name} its embeddings differ from torch's (min cosine {fp32['cosine_min']:.6f}, "
                f"needs >= {MIN_COSINE}); an op exported wrongly: try another --opset, and report the model and "
                f"torch version")
        q = rows.get("int8")
        if q is not None:
            lost = 100.0 * (rows["pytorch"]["acc_mean"] - q["acc_mean"])
            if lost > int8_margin:
                notes.append(f"{q['path']}: INT8 loses {lost:.2f} points of accuracy on {name} "
                             f"({100 * rows['pytorch']['acc_mean']:.2f}% -> {100 * q['acc_mean']:.2f}%), more than "
                             f"--int8-margin {int8_margin}; calibrate on more images (--calib-images) or images "
                             f"closer to the deployment's, or deploy the FP32 file")
    for note in notes:
        warnings.warn(note, UserNote, stacklevel=2)
    return notes


def format_checks(results: dict) -> str:
    """One row per set and model: the PyTorch model, then each file (size, accuracy, XNorm, TAR@FAR, cosine)."""
    from distill.eval.far import VERIFICATION_FARS, far_key

    keys = [far_key(far) for far in VERIFICATION_FARS]
    header = ["set", "model", "size (MB)", "accuracy (%)", "XNorm"] + [f"TAR@FAR={k} (%)" for k in keys] \
        + ["cosine to PyTorch (min / mean)"]
    table = []
    for name, rows in results.items():
        for label, m in rows.items():
            tars = [m["tar_at_far"][k]["tar"] for k in keys]
            table.append([name, label, "-" if "size_mb" not in m else f"{m['size_mb']:.2f}",
                          f"{100 * m['acc_mean']:.3f} ± {100 * m['acc_std']:.3f}", f"{m['xnorm']:.4f}"]
                         + ["n/a" if t is None else f"{100 * t:.3f}" for t in tars]
                         + ["-" if "cosine_min" not in m else f"{m['cosine_min']:.6f} / {m['cosine_mean']:.6f}"])
    widths = [max(len(r[i]) for r in [header] + table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header] + table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
