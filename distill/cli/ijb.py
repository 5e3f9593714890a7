"""`distill ijb MODEL [MODEL ...] --root DIR`: IJB-B / IJB-C 1:1 template verification (TAR at FAR, AUC)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from distill.cli import help_values, thread_policy
from distill.eval.far import IJB_FARS, far_key
from distill.utils.errors import ConfigError, DataFormatError


def _labels(sources) -> list:
    """Short unique names for file names and the table: the file stem, or more of the path when stems clash."""
    parts = [list(Path(s).with_suffix("").parts) if os.path.splitext(s)[1] else [s] for s in sources]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["-".join(p[-depth:]).replace(os.sep, "-") for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(i) for i in range(len(sources))]


def _per_row_path(path, label: str, several: bool):
    """--cache/--scores name one file; with several rows each gets its label before the suffix."""
    if path is None or not several:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.{label}{ext or '.npy'}"


def _load_model(source: str, args):
    """(model, input size): an ONNX file through the ONNX teacher loader, anything else as distill eval loads it."""
    from distill.cli.eval import load_model_for

    return load_model_for("ijb", source, arch=args.arch, input_size=args.input_size)


def _model_features(source: str, label: str, meta, args, several: bool):
    """(features, valid mask) of one model: from its --cache when that holds them, else embedded now."""
    import numpy as np

    from distill.data.ijb import missing_images
    from distill.eval.ijb import embed_images, feature_cache_key, load_feature_cache, save_feature_cache
    from distill.utils.device import resolve_device

    model, input_size = _load_model(source, args)
    cache = _per_row_path(args.cache, label, several)
    key = feature_cache_key(source, meta, flip=not args.no_flip, input_size=input_size) if cache else None
    cached = load_feature_cache(cache, key) if cache else None
    if cached is not None:
        feats, missing = cached
        if missing.size and not args.skip_missing:
            raise ConfigError(f"--cache {cache}: these features leave out {missing.size} missing images (first: "
                              f"{meta.names[int(missing[0])]}); pass --skip-missing to use them")
        valid = np.ones(len(meta.names), dtype=bool)
        valid[missing] = False
        if not args.json:
            print(f"distill ijb: {source}: features from {cache}", file=sys.stderr)
        return feats, valid
    valid = ~missing_images(meta)
    if not valid.all():
        first = meta.names[int(np.argmin(valid))]
        if not args.skip_missing:
            raise DataFormatError(f"{meta.image_dir}: {int((~valid).sum())} of {len(valid)} images listed in "
                                  f"{meta.path('landmarks')} are missing (first: {first}); restore them, or pass "
                                  f"--skip-missing to leave them out of their templates")
        print(f"distill ijb: note: leaving out {int((~valid).sum())} missing images (first: {first})", file=sys.stderr)
    device = resolve_device(args.device, "--device")
    model.to(device)
    plan = thread_policy(args, args.workers, say=False)  # the process and its image readers share the cores
    start = time.perf_counter()
    feats = embed_images(model, meta, input_size, indices=np.flatnonzero(valid), flip=not args.no_flip,
                         batch_size=args.batch_size, workers=plan.workers, device=device,
                         progress=not args.json, model_name=source)
    if not args.json:
        seconds = time.perf_counter() - start
        print(f"distill ijb: {source}: embedded {int(valid.sum())} images in {seconds:.1f} s "
              f"({valid.sum() / max(seconds, 1e-9):.0f} img/s; {plan.describe()})", file=sys.stderr)
    if cache:
        save_feature_cache(cache, feats, key, np.flatnonzero(~valid))
    return feats, valid


def format_table(results: dict, meta, mode: str) -> str:
    """One row per model: TAR (%) at each FAR and AUC (%), as eval_ijbc.py's table (two decimals)."""
    header = ["model"] + [f"TAR@FAR={far_key(f)} (%)" for f in IJB_FARS] + ["AUC (%)"]
    rows = [[label] + [f"{100 * r['tar_at_far'][far_key(f)]:.2f}" for f in IJB_FARS] + [f"{100 * r['auc']:.4f}"]
            for label, r in results.items()]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    first = next(iter(results.values()))
    lines.insert(0, f"{meta.target} 1:1 verification, {mode}: {first['images']} images, {first['templates']} "
                    f"templates, {first['pairs']} pairs ({first['genuine_pairs']} genuine)")
    if first["impostor_pairs"] * min(IJB_FARS) < 1:
        lines.append(f"note: {first['impostor_pairs']} impostor pairs measure FARs down to "
                     f"{1 / first['impostor_pairs']:.2g}; below that the nearest ROC point is read, "
                     f"as eval_ijbc.py does")
    for label, r in results.items():
        if r["missing_images"] or r["empty_templates"]:
            lines.append(f"{label}: {r['missing_images']} missing images left out; {r['empty_templates']} templates "
                         f"without any image score 0")
    return "\n".join(lines)


def _plot(path: str, curves: dict, target: str) -> None:
    import numpy as np

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    low = 1.0
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1, label=f"{label} (AUC = {100 * auc:.4f} %)")
        low = min(low, float(tpr[np.searchsorted(fpr, min(IJB_FARS))]) if fpr.size else 1.0)
    ax.set_xscale("log")
    ax.set_xlim(min(IJB_FARS), max(IJB_FARS))
    ax.set_ylim(0.3 if low >= 0.3 else 0.0, 1.0)
    ax.set_xticks(IJB_FARS)
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(f"ROC on {target}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as err:
        raise ConfigError(f"--plot {path}: cannot write ({err.strerror or err})") from None
    finally:
        plt.close(fig)


def _check_args(args) -> None:
    from distill.data.ijb import TARGETS
    from distill.utils.atomic import check_output_file
    from distill.utils.device import resolve_device

    if args.target not in TARGETS:
        raise ConfigError(f"--target {args.target}: one of {', '.join(TARGETS)}")
    if not args.model and not args.features:
        raise ConfigError("nothing to evaluate: give a MODEL (student.pt, backbone.pth with --arch, .onnx) "
                          "or --features FILE")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: must be 0 (read images in this process) or more")
    if args.input_size is not None and args.input_size < 16:
        raise ConfigError(f"--input-size {args.input_size}: must be at least 16")
    sources = list(args.model) + list(args.features or [])
    if len(set(sources)) != len(sources):
        raise ConfigError(f"{sorted(s for s in sources if sources.count(s) > 1)[0]} is given twice")
    if args.cache and not args.model:
        raise ConfigError("--cache stores the features a MODEL computes; with --features only there is "
                          "nothing to cache")
    for option, path in (("--plot", args.plot), ("--scores", args.scores), ("--cache", args.cache)):
        if path:  # written after every image is embedded (hours at IJB-C scale): checked first
            check_output_file(path, option)
    if args.model:
        resolve_device(args.device, "--device")  # a GPU that is not there stops the run before any work


def run_ijb(args) -> int:
    from distill.data.ijb import read_ijb_meta
    from distill.eval.ijb import load_features, protocol_name, save_scores, verify

    _check_args(args)
    meta = read_ijb_meta(args.root, args.target)
    sources = list(args.model) + list(args.features or [])
    labels = dict(zip(sources, _labels(sources), strict=False))
    several = len(sources) > 1
    mode = protocol_name(not args.no_norm_score, not args.no_detector_score, not args.no_flip)
    results, curves = {}, {}
    for source in sources:
        label = labels[source]
        if source in args.model:
            feats, valid = _model_features(source, label, meta, args, several)
        else:
            feats, valid = load_features(source, meta), None
        result, scores, fpr, tpr = verify(meta, feats, valid=valid, norm_score=not args.no_norm_score,
                                          detector_score=not args.no_detector_score)
        result["mode"] = mode if source in args.model else protocol_name(not args.no_norm_score,
                                                                          not args.no_detector_score, None)
        results[source] = result
        curves[label] = (fpr, tpr, result["auc"])
        scores_path = _per_row_path(args.scores, label, several)
        if scores_path:
            save_scores(scores_path, scores)
            if not args.json:
                print(f"distill ijb: wrote {len(scores)} pair scores of {source} to {scores_path}", file=sys.stderr)
    if args.plot:
        _plot(args.plot, curves, meta.target)
    if args.json:
        print(json.dumps(results[sources[0]] if not several else results, indent=2))
    else:
        print(format_table({labels[s]: r for s, r in results.items()}, meta, mode))
    return 0


def add_commands(sub) -> None:
    parser = sub.add_parser(
        "ijb", help="IJB-B / IJB-C 1:1 template verification (TAR at FAR) of models or features",
        description="TAR at FAR = 1e-6 ... 1e-1 and AUC of template-to-template verification on IJB-B or IJB-C, "
                    "computed as arcface_torch's eval_ijbc.py does (5-point alignment, flip summed, norm and "
                    "detector score kept as weights: mode N1 D1 F2). --root holds insightface's IJB folder: "
                    "loose_crop/ and meta/<t>_name_5pts_score.txt, <t>_face_tid_mid.txt, "
                    "<t>_template_pair_label.txt.")
    parser.add_argument("model", metavar="MODEL", nargs="*",
                        help="a student.pt, an arcface_torch .pth (with --arch), an insightface .onnx, or a model "
                             "name (random weights: smoke test); several give one row each")
    parser.add_argument("--root", required=True, metavar="DIR", help="the IJB folder (loose_crop/, meta/)")
    help_values(parser.add_argument("--target", default="IJBC", type=str.upper,
                                    help="which set's meta files to read: %(targets)s (default IJBC)"),
                targets="distill.data.ijb:TARGETS")
    parser.add_argument("--features", action="append", metavar="FILE",
                        help="score these image features (.npy, N x D in the order of <t>_name_5pts_score.txt, "
                             "flip already combined) instead of running a model; repeatable")
    parser.add_argument("--cache", metavar="FILE",
                        help="keep the image features (.npy, before scores and norms; PATH.json says what they "
                             "came from) and reuse them on the next run; with several models FILE.<model>.npy")
    parser.add_argument("--scores", metavar="FILE",
                        help="save the score of every pair (.npy, float64, pair-file order); with several rows "
                             "FILE.<model>.npy")
    parser.add_argument("--plot", metavar="PNG", help="draw the ROC curves (log FAR) into this image")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (several models: one per model, keyed by MODEL)")
    parser.add_argument("--no-norm-score", action="store_true",
                        help="normalise each image feature before pooling (N0; default N1 keeps its norm as a weight)")
    parser.add_argument("--no-detector-score", action="store_true",
                        help="do not weight image features by the detector score (D0; default D1)")
    parser.add_argument("--no-flip", action="store_true",
                        help="embed the image only (F0; default F2 adds the embedding of its mirror image)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out listed images that are missing from loose_crop/ (counted and reported)")
    parser.add_argument("--arch", help="architecture of a plain state dict, e.g. r100 or vargfacenet")
    parser.add_argument("--input-size", type=int, help="square input side when the model does not record it")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="images per batch (each with its flip; default 128)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes reading, decoding and aligning images (default: CPUs, at most 8; the thread "
                             "policy keeps one core for the model)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of this process (default: the thread policy)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.set_defaults(func=run_ijb)
