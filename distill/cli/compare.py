"""`distill compare RUN_DIR ...`: stages of run directories side by side (library: distill.compare)."""

from __future__ import annotations

import json
import sys

from distill.compare import comparison_json, comparison_table, load_runs, plot_comparison, unfinished_runs


def _compare(args) -> int:
    runs = load_runs(args.run_dirs)
    if args.plot:
        plot_comparison(runs, args.plot)
    if args.json:
        print(json.dumps(comparison_json(runs), indent=1))
    else:
        print(comparison_table(runs))
    if args.plot:
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)
    for run_dir in unfinished_runs(runs):
        print(f"distill compare: note: {run_dir} holds no finished stage yet (rows marked 'unfinished' come from "
              f"the last evaluation in metrics.jsonl; 'not started' rows have nothing yet)", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("compare", help="compare stages of run directories: table, JSON, plot (local files only)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories of `distill run`, or a `distill sweep` --out directory")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="also write accuracy per stage and loss curves")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_compare)
