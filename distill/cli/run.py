"""`distill run` (an experiment's stages, resumable) and `distill cache build` (the teacher cache alone)."""

from __future__ import annotations

import contextlib
import sys

EX_TEMPFAIL = 75  # preempted: a scheduler should requeue the same command


def _run(args) -> int:
    from distill.config.schema import load_config
    from distill.run.dry_run import dry_run
    from distill.run.experiment import run_experiment
    from distill.run.rundir import default_run_dir
    from distill.train.engine import Preempted
    from distill.utils.device import deterministic_cublas
    from distill.utils.dist import init_distributed

    cfg = load_config(args.experiment, args.overrides)
    if cfg.deterministic:
        deterministic_cublas()  # before anything uses cuBLAS
    init_distributed(cfg.device, cfg.dist.timeout_minutes)
    run_dir = args.out or default_run_dir(cfg)
    if args.dry_run:
        dry_run(cfg, run_dir=run_dir)
        return 0
    try:
        with _disk_full_advice(cfg, run_dir):
            run_experiment(cfg, run_dir, progress=not args.no_progress and sys.stderr.isatty(),
                           restart=args.restart_stage)
    except Preempted as err:
        print(f"distill run: {err}", file=sys.stderr)
        return EX_TEMPFAIL
    return 0


@contextlib.contextmanager
def _disk_full_advice(cfg, run_dir: str):
    """A write that found the disk full (any file of the run, metrics.jsonl included) ends the command with one
    line: where, what to free, that the rerun resumes (distill.run.disk.disk_full_error). The teacher cache's own
    refusal (allocated whole before its first row: it knows what the cache needs) is kept as it is."""
    from distill.utils.atomic import full_disk
    from distill.utils.errors import DistillError
    from teachers.cache_file import CacheSpaceError

    try:
        yield
    except (DistillError, OSError) as err:
        if full_disk(err) is None or isinstance(err, CacheSpaceError):
            raise
        from distill.run.disk import disk_full_error
        raise disk_full_error(cfg, run_dir, err) from None


def _cache_build(args) -> int:
    from distill.config.schema import load_config
    from distill.run.experiment import build_teacher_cache
    from distill.run.rundir import default_run_dir
    from distill.utils.device import deterministic_cublas
    from distill.utils.dist import init_distributed

    cfg = load_config(args.experiment, args.overrides)
    if cfg.teacher is None:
        print("distill cache build: the experiment has no teacher; nothing to cache", file=sys.stderr)
        return 2
    if cfg.deterministic:
        deterministic_cublas()  # the teacher may train here first
    init_distributed(cfg.device, cfg.dist.timeout_minutes)  # under torchrun every rank builds its slice of the cache
    run_dir = args.out or default_run_dir(cfg)
    with _disk_full_advice(cfg, run_dir):
        build_teacher_cache(cfg, run_dir, progress=sys.stderr.isatty())
    return 0


def _doctor(args) -> int:
    from distill.config.schema import load_config
    from distill.run.doctor import main_report
    from distill.run.rundir import default_run_dir

    cfg = load_config(args.experiment, args.overrides)
    report, status = main_report(cfg, args.out or default_run_dir(cfg), args.experiment)
    print(report)
    return status


def _experiment_args(p) -> None:
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides: train.lr=0.05 or --train.lr=0.05")
    p.add_argument("--out", default=None, help="run directory (default: runs/<experiment name>)")


def add_commands(sub) -> None:
    p = sub.add_parser("run", help="run an experiment: teacher, baseline, generations; resumable")
    _experiment_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="validate files and shapes, print the run plan, run 2 steps per stage, keep nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--restart-stage", action="append", default=[], metavar="NAME",
                   help="train stage NAME (teacher, baseline, gen1, ...) again from its beginning; its old folder is "
                        "kept as NAME.restarted-<time>; repeat for several stages")
    p.set_defaults(func=_run)
    d = sub.add_parser("doctor", help="check an experiment before a long run: versions, device, data, teacher, "
                                      "disk, W&B, run directory (reads only); exit 1 when something would fail")
    _experiment_args(d)
    d.set_defaults(func=_doctor)
    cache = sub.add_parser("cache", help="the frozen teacher's embedding cache")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="CACHE_COMMAND", required=True)
    b = cache_sub.add_parser("build", help="compute the teacher embeddings of an experiment's training set")
    _experiment_args(b)
    b.set_defaults(func=_cache_build)
