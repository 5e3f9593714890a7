"""`distill export MODEL OUT.onnx`: a student or teacher to ONNX with a parity check (library: distill.export)."""

from __future__ import annotations

from distill.errors import ConfigError
from distill.export import INPUT_NAME, NORMALISATION, OUTPUT_NAME, export_model


def _batch(value: str):
    if value == "dynamic":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--batch: expected 'dynamic' or a number, got {value!r}") from None


def _export(args) -> int:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"export needs onnx and onnxruntime ({err}); pip install 'facedistill[onnx]'") from None
    r = export_model(args.model, args.out, arch=args.arch, input_size=args.input_size, opset=args.opset,
                     batch=_batch(args.batch))
    axis = "dynamic" if args.batch == "dynamic" else f"fixed at {args.batch}"
    print(f"wrote {r['path']}: input {INPUT_NAME!r} (N, 3, {r['input_size']}, {r['input_size']}) "
          f"{NORMALISATION}, batch {axis}; output {OUTPUT_NAME!r} (N, {r['embedding_size']}); opset {r['opset']}")
    print(f"parity with torch (ONNX Runtime, batch {r['batch']}): max abs diff {r['max_abs_diff']:.3g}, "
          f"min cosine similarity {r['min_cosine']:.7f}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="export a student or teacher to ONNX, with a parity check against torch")
    p.add_argument("model", help="student.pt, an arcface_torch state dict (.pth, with --arch) or a model name")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--arch", default=None, help="architecture of a plain state dict, e.g. r100")
    p.add_argument("--input-size", type=int, default=None, help="square input side (default: the model's, 112)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--batch", default="dynamic", help="'dynamic' (default) or a fixed batch size, e.g. 1")
    p.set_defaults(func=_export)
