"""`distill compare RUN_DIR ...`: stages of run directories side by side (library: distill.run.compare);
with --export DIR every finished stage is exported to ONNX (and INT8) and the files are evaluated."""

from __future__ import annotations

import json
import sys

from distill.cli.export import add_calib_images_option, add_calibration_option, check_int8_margin, require_onnx
from distill.utils.errors import ConfigError


def _log(message: str) -> None:
    print(f"distill compare: {message}", file=sys.stderr)


def _compare(args) -> int:
    from distill.run.compare import comparison_json, comparison_table, load_runs, plot_comparison, unfinished_runs

    check_int8_margin(args.int8_margin)
    runs = load_runs(args.run_dirs)
    plans = None
    if args.export is not None:
        require_onnx("--export")
        from distill.deploy.run_export import export_run, export_table, plan_export

        empty = set(unfinished_runs(runs))
        if len(empty) == len(runs):
            raise ConfigError(f"--export: nothing to export: no stage of {', '.join(sorted(empty))} has finished "
                              f"(a finished stage has its result.json)")
        plans = plan_export([r for r in runs if r["run_dir"] not in empty], args.export, int8=args.int8,
                            calibrate=args.calibrate, calib_images=args.calib_images)  # before any work
    elif args.int8 or args.calibrate is not None or args.calib_images is not None or args.int8_margin is not None \
            or args.int8_calibration is not None:
        raise ConfigError("--int8, --calibrate, --calib-images, --int8-margin and --int8-calibration go with "
                          "--export DIR")
    if args.plot:
        plot_comparison(runs, args.plot)
    summaries = []
    if plans is not None:
        for plan in plans:
            for missing in plan["missing_bins"]:
                _log(f"note: {plan['run']['run_dir']}: verification set {missing} (data.val) not found; "
                     f"the exported files are not evaluated on it")
            summaries.append(export_run(plan, int8=args.int8, calib_images=args.calib_images,
                                        int8_margin=args.int8_margin, int8_calibration=args.int8_calibration,
                                        log=_log))
    if args.json:
        out = comparison_json(runs)
        if plans is not None:
            out["export"] = {"dir": args.export, "runs": summaries}
        print(json.dumps(out, indent=1))
    else:
        print(comparison_table(runs))
        if plans is not None:
            print(f"\nexported to {args.export} (accuracy: mean over each run's val sets; "
                  f"{', '.join(sorted({s for x in summaries for s in x['val_sets']})) or 'none found'}):")
            print(export_table(summaries))
    if args.plot:
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    for run_dir in unfinished_runs(runs):
        print(f"distill compare: note: {run_dir} holds no finished stage yet (rows marked 'unfinished' come from "
              f"the last evaluation in metrics.jsonl; 'not started' rows have nothing yet)", file=sys.stderr)
    failed = [f"{s['run']}/{st['stage']}" for s in summaries for st in s["stages"] if st["status"].startswith("failed")]
    if failed:
        _log(f"error: export failed for {', '.join(failed)} (see the status column / export_summary.json)")
        return 1
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("compare", help="compare stages of run directories: table, JSON, plot (local files only); "
                                       "--export: every finished stage as ONNX")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories of `distill run`, or a `distill sweep` --out directory")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="also write accuracy per stage and loss curves")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="export every finished stage to DIR/<run>/<stage>.onnx (BatchNorm folded, parity-checked, "
                        "as `distill export`), evaluate each file on the run's val sets and write "
                        "DIR/<run>/export_summary.json")
    p.add_argument("--int8", action="store_true",
                   help="with --export: also write <stage>.int8.onnx (ONNX Runtime static quantization)")
    p.add_argument("--calibrate", default=None, metavar="DATA",
                   help="with --int8: training set calibrating the INT8 files (default: each run's data.train)")
    add_calib_images_option(p, "with --int8: calibration images spread over the set")
    p.add_argument("--int8-margin", type=float, default=None, metavar="POINTS",
                   help="with --int8: note each val set where INT8 loses more accuracy points than this (default 0.5)")
    add_calibration_option(p)
    p.set_defaults(func=_compare)
