"""`distill export MODEL OUT.onnx [--int8 --calibrate DATA] [--check-bin X.bin ...]`: a student or teacher to
ONNX, BatchNorm folded, with a parity check; optionally INT8 beside it and verification numbers side by side
(library: distill.deploy.export, distill.deploy.quantize)."""

from __future__ import annotations

from distill.cli import help_values
from distill.utils.errors import ConfigError

# library constants in help texts, read when the help is printed (distill.cli.help_values)
_INT8_SUFFIX = "distill.deploy.quantize:INT8_SUFFIX"
_DEFAULT_CALIB_IMAGES = "distill.deploy.quantize:DEFAULT_CALIB_IMAGES"


def _batch(value: str):
    if value == "dynamic":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--batch: expected 'dynamic' or a number, got {value!r}") from None


def _ops(counts: dict) -> str:
    return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def require_onnx(what: str) -> None:
    """`what` (export, --export) needs the onnx extra: a ConfigError saying how to install it, before any work."""
    try:
        import onnx  # noqa: F401 - imported only to see that it is installed
        import onnxruntime  # noqa: F401 - imported only to see that it is installed
    except ImportError as err:
        raise ConfigError(f"{what} needs onnx and onnxruntime ({err}); pip install 'facedistill[onnx]'") from None


def check_int8_margin(margin) -> None:
    """--int8-margin: accuracy points INT8 may lose against PyTorch before it is a failure; a number >= 0."""
    if margin is not None and not (margin >= 0 and margin != float("inf")):
        raise ConfigError(f"--int8-margin {margin}: must be a number of accuracy points >= 0 (default 0.5)")


def _export(args) -> int:
    if args.input_size is not None and args.input_size < 16:
        raise ConfigError(f"--input-size {args.input_size}: must be at least 16 (as for profile, ijb and pack)")
    check_int8_margin(args.int8_margin)
    require_onnx("export")
    from distill.cli import thread_policy

    thread_policy(args)  # torch's and ONNX Runtime's threads in the parity and verification checks
    from distill.deploy.export import INPUT_NAME, NORMALISATION, OUTPUT_NAME, export_model, format_checks, judge_checks

    r = export_model(args.model, args.out, arch=args.arch, input_size=args.input_size, opset=args.opset,
                     batch=_batch(args.batch), int8=args.int8, calibrate=args.calibrate,
                     calib_images=args.calib_images, check_bins=args.check_bin or (),
                     int8_calibration=args.int8_calibration)
    axis = "dynamic" if args.batch == "dynamic" else f"fixed at {args.batch}"
    side = r['input_size']
    print(f"wrote {r['path']} ({r['size_mb']:.2f} MB): input {INPUT_NAME!r} (N, 3, {side}, {side}) "
          f"{NORMALISATION}, batch {axis}; output {OUTPUT_NAME!r} (N, {r['embedding_size']}); opset {r['opset']}")
    print(f"BatchNorm {r['batchnorm']}")
    print(f"parity with torch (ONNX Runtime, batch {r['batch']}): max abs diff {r['max_abs_diff']:.3g}, "
          f"min cosine similarity {r['min_cosine']:.7f}")
    if "int8" in r:
        q = r["int8"]
        print(f"wrote {q['path']} ({q['size_mb']:.2f} MB): INT8 (QDQ; {q['quantization']}), "
              f"calibrated on {q['calib_images']} images; same input and output")
        print(f"  int8 in ONNX Runtime: {_ops(q['int8_ops'])}")
        print(f"  FP32 in ONNX Runtime: {_ops(q['fp32_ops'])} (no int8 kernel or quantizer for them in ORT)")
        print(f"  cosine to torch on calibration images: min {q['calib_cosine_min']:.5f}, "
              f"mean {q['calib_cosine_mean']:.5f}")
    if "check" in r:
        print(format_checks(r["check"]))
        judge_checks(r["check"], args.int8_margin)  # raises when the FP32 file breaks parity; INT8 losses: notes
    return 0


def add_calib_images_option(parser, text: str) -> None:
    """--calib-images N of `distill export` and `distill compare --export` (None: DEFAULT_CALIB_IMAGES)."""
    help_values(parser.add_argument("--calib-images", type=int, default=None, metavar="N",
                                    help=text + " (default %(calib_default)s)"), calib_default=_DEFAULT_CALIB_IMAGES)


def add_calibration_option(parser) -> None:
    """--int8-calibration of `distill export` and `distill compare --export` (QuantSettings.calibration)."""
    parser.add_argument("--int8-calibration", choices=("images", "percentile", "minmax"), default=None,
                        help="how activation ranges are read from the calibration images: images (default: each "
                             "range covers its tensor on 99%% of the images, the rare extreme ones clipped), "
                             "percentile (99.999), minmax (the whole range of all images)")


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="export a student or teacher to ONNX (BatchNorm folded, parity-checked), "
                                      "optionally INT8 too")
    p.add_argument("model", help="student.pt, an arcface_torch state dict (.pth, with --arch) or a model name")
    help_values(p.add_argument("out", help="the .onnx file to write (FP32); with --int8 the INT8 file is written "
                                           "beside it as OUT%(suffix)s without the first .onnx (student.onnx -> "
                                           "student%(suffix)s)"), suffix=_INT8_SUFFIX)
    p.add_argument("--arch", default=None, help="architecture of a plain state dict, e.g. r100")
    p.add_argument("--input-size", type=int, default=None, help="square input side (default: the model's, 112)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--batch", default="dynamic", help="'dynamic' (default) or a fixed batch size, e.g. 1")
    help_values(p.add_argument("--int8", action="store_true", help="also write an INT8 file (ONNX Runtime static "
                                                                   "quantization, QDQ) beside OUT: OUT%(suffix)s"),
                suffix=_INT8_SUFFIX)
    p.add_argument("--calibrate", metavar="DATA", default=None,
                   help="training set whose images calibrate the INT8 ranges: a RecordIO folder or .rec file "
                        "(the synthetic set is one), or an identity-per-folder image tree")
    add_calib_images_option(p, "calibration images, spread over the set")
    p.add_argument("--check-bin", action="append", metavar="FILE",
                   help="a verification .bin: accuracy, XNorm, TAR@FAR of torch and each file side by side, and "
                        "the embedding cosine between them; fails when the FP32 file is not the torch model; "
                        "repeat for several sets")
    add_calibration_option(p)
    p.add_argument("--int8-margin", type=float, default=0.5, metavar="POINTS",
                   help="with --check-bin: warn when INT8 loses more accuracy points than this (default 0.5)")
    p.set_defaults(func=_export)
