"""`distill sweep GRID.yaml`: run an ablation grid, or print one `distill run` per point
(library: distill.run.sweep)."""

from __future__ import annotations

import sys

from distill.cli.run import EX_TEMPFAIL


def _sweep(args) -> int:
    from distill.run.sweep import commands, expand, load_grid, point_config, run_sweep
    from distill.train.engine import Preempted

    grid = load_grid(args.grid, base=args.base, overrides=args.overrides)
    if args.print:
        for p in expand(grid):
            point_config(grid, p)  # a typo fails here, not on the cluster
        print("\n".join(commands(grid, args.out)))
        return 0
    try:
        result = run_sweep(grid, args.out, progress=not args.no_progress and sys.stderr.isatty())
    except Preempted as err:
        print(f"distill sweep: {err}", file=sys.stderr)
        return EX_TEMPFAIL
    return 1 if result["failed"] else 0


def add_commands(sub) -> None:
    p = sub.add_parser("sweep", help="run an ablation grid (one experiment per point) and compare the points")
    p.add_argument("grid", help="grid file, e.g. experiments/ablations/alpha.yaml")
    p.add_argument("overrides", nargs="*", help="overrides for every point: train.max_steps=50 or --train.lr=0.05")
    p.add_argument("--print", action="store_true", help="print one `distill run` command per point, run nothing")
    p.add_argument("--out", default=None, help="directory of the points' run directories (default: runs/<grid name>)")
    p.add_argument("--base", default=None, help="experiment file replacing the grid's base (e.g. the paper recipe)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_sweep)
