"""`distill eval MODEL --bin lfw.bin [--bin ...]`: insightface verification numbers for any model."""

from __future__ import annotations

import json

from distill.cli import thread_policy
from distill.utils.errors import ConfigError


def load_model_for(command: str, source: str, arch: str | None = None, input_size: int | None = None):
    """The model a command line names (`distill eval`, `distill ijb`): (model in eval mode, input size). An
    insightface `.onnx` file is run by ONNX Runtime through the ONNX teacher loader (`teachers.build_teacher`),
    anything else is read by `distill.models.files.load_model` (student.pt, a state dict with --arch, a model
    name). A note when --input-size disagrees with what the model records; an error when the size is unknown."""
    import os
    import sys

    from distill.models import files

    if source.endswith(".onnx") and os.path.exists(source):
        import teachers

        model = teachers.build_teacher({"onnx": source})
        recorded = model.input_size
    else:
        model, recorded = files.load_model(source, arch=arch, input_size=input_size)
    if recorded is not None and input_size and input_size != recorded:
        print(f"distill {command}: note: {source} was built for {recorded}x{recorded} inputs; using {recorded}, "
              f"not --input-size {input_size}", file=sys.stderr)
    size = recorded or input_size
    if size is None:
        raise ConfigError(f"{source}: cannot infer the model's input size; pass --input-size "
                          f"(112 for arcface_torch and insightface models)")
    return model, size


def _pct(x) -> str:
    return "n/a" if x is None else f"{100.0 * x:.3f}"


def format_table(results: dict) -> str:
    """One row per set: accuracy ± std (%), mean best threshold, XNorm, TAR at each FAR (%)."""
    from distill.eval.far import VERIFICATION_FARS, far_key

    far_keys = [far_key(far) for far in VERIFICATION_FARS]  # '1e-3', '1e-4'
    header = ["set", "accuracy (%)", "threshold", "XNorm"] + [f"TAR@FAR={k} (%)" for k in far_keys] \
        + ["VAL@FAR=1e-3, insightface (%)"]
    rows = []
    for name, m in results.items():
        v = m["insightface_val"]
        rows.append([name, f"{100.0 * m['acc_mean']:.3f} ± {100.0 * m['acc_std']:.3f}", f"{m['threshold']:.3f}",
                     f"{m['xnorm']:.4f}"] + [_pct(m["tar_at_far"][k]["tar"]) for k in far_keys]
                    + [f"{100.0 * v['val_mean']:.3f} ± {100.0 * v['val_std']:.3f} (FAR {v['far_mean']:.2g})"])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    short = sorted({f"{name} ({m['tar_at_far'][k]['negatives']} impostor pairs)"
                    for name, m in results.items() for k in far_keys if m["tar_at_far"][k]["tar"] is None})
    if short:
        lines.append("n/a: a FAR of 1/N needs at least N impostor pairs; too few in " + ", ".join(short))
    lines.append("TAR@FAR: all pairs, the exact threshold admitting that share of impostors. VAL@FAR, insightface: "
                 "its calculate_val (10 folds, threshold interpolated on the other nine), as in its training logs.")
    return "\n".join(lines)


def _set_sources(paths) -> dict:
    from distill.eval.verification import set_name_of

    sets = {}
    for path in paths:
        name = set_name_of(path)
        if name in sets:
            raise ConfigError(f"--bin {path}: another set is already named {name!r} ({sets[name]}); "
                              f"sets are named after the file, so rename one of the files")
        sets[name] = path
    return sets


def run_eval(args) -> int:

    from distill.eval.verification import evaluate_sets
    from distill.utils.device import resolve_device

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    sets = _set_sources(args.bin)
    thread_policy(args)
    model, input_size = load_model_for("eval", args.model, arch=args.arch, input_size=args.input_size)
    device = resolve_device(args.device, "--device")
    model.to(device)
    results = evaluate_sets(model, sets, input_size, batch_size=args.batch_size, device=device,
                            progress=not args.json, model_name=args.model)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def add_commands(sub) -> None:
    parser = sub.add_parser(
        "eval", help="verification accuracy (insightface protocol) of a model on .bin sets",
        description="10-fold verification accuracy, XNorm and TAR@FAR of a model on insightface .bin sets "
                    "(lfw, cfp_fp, agedb_30, ...), computed exactly as insightface does.")
    parser.add_argument("model", metavar="MODEL",
                        help="a student.pt written by this toolkit, an arcface_torch .pth (with --arch), "
                             "or a model name such as vargfacenet or r100 (random weights: smoke test)")
    parser.add_argument("--bin", action="append", required=True, metavar="FILE",
                        help="a verification .bin; repeat for several sets (each named after its file)")
    parser.add_argument("--arch", help="architecture of a plain state dict, e.g. r100 or vargfacenet")
    parser.add_argument("--input-size", type=int, help="square input side when the model does not record it")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: the thread policy: the cores this process may use)")
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by set name")
    parser.set_defaults(func=run_eval)
