"""Ablation grids (behind `distill sweep`): a base experiment x lists of override values, one experiment per point.

A grid file (experiments/ablations/*.yaml):

    base: ../quickstart.yaml          # experiment file, relative to the grid file
    name: alpha                       # optional (default: the file name); names runs/<name>/<point>
    grid:                             # dotted override -> values; the cartesian product is swept
      distill.alpha: [0, 1, 7, 20]
    fixed:                            # optional: overrides shared by every point
      baseline: false

A grid key `case:` holds named sets of overrides swept as one key, for studies that are not a full
cartesian product (a control with its own settings beside the main arms):

    grid:
      case:
        - {name: scratch, generations: 0, teacher: null}
        - {name: r18-cosine, distill.loss: cosine, teacher.checkpoint: runs/t/backbone.pth}
      seed: [0, 1, 2]

Each point is its own experiment named `<grid name>-<key>=<value>-...` (a case by its name) in `<out>/<point name>`
(default out: runs/<grid name>), run in this process one after another through the generations
driver; every point is validated before the first one starts. Points whose teacher settings agree
share one trained teacher: the finished teacher stage of an earlier point is copied into the next
point's directory instead of training it again (a teacher given by checkpoint is simply loaded).
A rerun resumes: finished points are skipped. `--print` prints one `distill run` command per point
instead, for a cluster scheduler (each command then trains its own teacher unless the base or
`fixed:` names a teacher.checkpoint). The sweep ends with one `distill compare` table of all points.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field

import yaml

from distill.config.files import parse_overrides, read_yaml_mapping, safe_load
from distill.config.schema import load_config
from distill.models.registry import create_model
from distill.run.compare import comparison_json, comparison_table, load_runs
from distill.run.context import run_logger
from distill.run.experiment import run_experiment
from distill.run.preflight import preflight_problems
from distill.train.engine import Preempted
from distill.train.tracking import close_open_runs
from distill.utils.atomic import atomic_write_json, atomic_write_text
from distill.utils.errors import ConfigError, DistillError
from distill.utils.layout import RunLayout, StageLayout, comparison_files, is_run_dir
from teachers.prepare import teacher_identity, teacher_source

GRID_KEYS = ("base", "name", "grid", "fixed", "description")
CASE = "case"  # grid key whose values are named override sets


@dataclass
class Grid:
    path: str                 # the grid file
    name: str
    base: str                 # the experiment file every point starts from
    grid: dict                # dotted key -> list of values
    fixed: dict = field(default_factory=dict)


@dataclass
class Point:
    name: str
    values: dict              # dotted key -> value of this point
    overrides: list           # `key=value` strings: fixed ones, this point's, then name=<point name>


def _scalar(value) -> str:
    """A value as an override string that parses back (YAML) to the same value: 7, false, [1, 2], 'abc'."""
    text = value if isinstance(value, str) else json.dumps(value)
    try:
        same = safe_load(text) == value
    except yaml.YAMLError:
        same = False
    return text if same else json.dumps(value)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _safe(text: str) -> str:
    """A point name usable as a directory name, W&B group and shell word."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "point"


def load_grid(path: str, base: str | None = None, overrides: list | None = None) -> Grid:
    """Read and check a grid file; `base` replaces its base experiment, `overrides` join its `fixed:`."""
    raw = read_yaml_mapping(path, "grid file")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a grid file has {', '.join(GRID_KEYS)}")
    where = "--base"
    if base is None:
        if not isinstance(raw.get("base"), str):
            raise ConfigError(f"{path}: key 'base' must name the experiment file the points start from "
                              f"(relative to the grid file), e.g. base: ../quickstart.yaml")
        base, where = os.path.normpath(os.path.join(os.path.dirname(path), raw["base"])), "key 'base'"
    if not os.path.exists(base):
        raise ConfigError(f"{path}: {where}: experiment file {base} not found")
    name = raw.get("name", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(name, str) or _safe(name) != name:
        raise ConfigError(f"{path}: key 'name' must be letters, digits and . _ = + - only, got {name!r}")
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: key 'grid' must map dotted config keys to lists of values, "
                          f"e.g. grid: {{distill.alpha: [0, 1, 7]}}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: key 'grid.{key}' must be a non-empty list of values, got {values!r}")
    for i, case in enumerate(grid.get(CASE, [])):
        if not isinstance(case, dict) or not isinstance(case.get("name"), str) or _safe(case["name"]) != case["name"]:
            raise ConfigError(f"{path}: grid.{CASE}[{i}] must be a mapping with a name (letters, digits, . _ = + -) "
                              f"and the overrides of that case, got {case!r}")
    for case in grid.get(CASE, []):  # a grid key would silently win over the case's own value of it
        clash = sorted(set(_flat({k: v for k, v in case.items() if k != "name"})) & (set(grid) - {CASE}))
        if clash:
            raise ConfigError(f"{path}: grid.{CASE} {case['name']!r} sets {', '.join(clash)}, which grid also sweeps "
                              f"(the grid's value would win); keep it in one place")
    case_names = [c["name"] for c in grid.get(CASE, [])]
    if len(set(case_names)) != len(case_names):
        raise ConfigError(f"{path}: grid.{CASE}: two cases are named "
                          f"{sorted(n for n in case_names if case_names.count(n) > 1)[0]!r}; give each its own name")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{path}: key 'fixed' must map dotted config keys to values, got {fixed!r}")
    fixed = {**_flat(fixed), **_flat(parse_overrides(overrides or []))}  # command-line overrides join `fixed:`
    both = sorted(set(grid) & set(fixed))
    if both:
        raise ConfigError(f"{path}: key(s) {', '.join(both)} are both swept (grid) and fixed; keep one")
    if "name" in grid or "name" in fixed:
        raise ConfigError(f"{path}: 'name' cannot be overridden: each point is named after its values")
    return Grid(path=path, name=name, base=base, grid=grid, fixed=fixed)


def expand(grid: Grid) -> list:
    """The cartesian product of the grid, in file order (the last key varies fastest)."""
    keys = list(grid.grid)
    fixed = [f"{k}={_scalar(v)}" for k, v in grid.fixed.items()]
    points = []
    for combo in itertools.product(*(grid.grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=False))
        parts = [v["name"] if k == CASE else f"{k}={_scalar(v)}" for k, v in values.items()]
        name = _safe("-".join([grid.name] + parts))
        settings = []
        for k, v in values.items():
            case = _flat({kk: vv for kk, vv in v.items() if kk != "name"}) if k == CASE else {k: v}
            settings += [f"{kk}={_scalar(vv)}" for kk, vv in case.items()]
        overrides = fixed + settings + [f"name={name}"]
        points.append(Point(name=name, values=values, overrides=overrides))
    names = [p.name for p in points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{grid.path}: values that differ only in characters unsafe for a directory name give "
                          f"the same point name {dupes[0]!r}; make the values distinct")
    return points


def point_config(grid: Grid, point: Point, build: bool = True):
    """The point's validated config; with `build`, its student is also built once (S must divide widths...)."""
    try:
        cfg = load_config(grid.base, point.overrides)
    except ConfigError as err:
        raise ConfigError(f"{grid.path}: point {point.name}: {err}") from None
    if build:
        try:
            create_model(cfg.student.arch, **cfg.student.model_kwargs(cfg.data.input_size))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{grid.path}: point {point.name}: the student cannot be built with these values: "
                              f"{err}") from None
    return cfg


def default_out(grid: Grid) -> str:
    return os.path.join("runs", grid.name)


def commands(grid: Grid, out: str | None = None) -> list:
    """One `distill run` command per point (what `--print` prints), for a cluster scheduler."""
    out = out or default_out(grid)
    base = os.path.relpath(grid.base)
    base = grid.base if base.startswith("..") else base
    return [shlex.join(["distill", "run", base, *p.overrides, "--out", os.path.join(out, p.name)])
            for p in expand(grid)]


def _teacher_key(cfg) -> str | None:
    """Points whose trained teacher has one identity (teachers/prepare.py) share it; a loaded one is not shared."""
    try:
        source = teacher_source(cfg)
    except ConfigError:  # neither file nor recipe: the point fails in its own run, the others go on
        return None
    if source is None or not source.trained_here:
        return None  # no teacher, or one loaded from its file: nothing to share
    return json.dumps(teacher_identity(cfg), sort_keys=True, default=str)


def _share_teacher(source: StageLayout, run_dir: str) -> bool:
    """Copy a finished teacher stage (the files layout.StageLayout names as shared: not last.pt/best.pt, not
    the W&B run id) into a point's run directory that has none yet."""
    target = RunLayout(run_dir).teacher
    if target.is_done() or not source.is_done():
        return False
    os.makedirs(target.dir, exist_ok=True)
    for src, dst in zip(source.shared_teacher_files(), target.shared_teacher_files(), strict=False):
        if os.path.exists(src):
            shutil.copy2(src, dst)
    return True


def run_sweep(grid: Grid, out: str | None = None, progress: bool = True, logger=None, before=None) -> dict:
    """Run every point (validated first), then compare them. Returns {"points": [...], "failed": [...]}.
    `logger`: where the sweep's and its runs' lines go (a logging.Logger; default: standard output).
    `before(point, cfg, run_dir)`: called before each point runs (a study links in the finished stages it shares)."""
    out = out or default_out(grid)
    log = logger or run_logger()
    points = expand(grid)
    configs = [point_config(grid, p) for p in points]  # every point is checked before any work
    for point, cfg in zip(points, configs, strict=False):  # and what distill run checks before its work, per point
        problems = preflight_problems(cfg, os.path.join(out, point.name))
        if problems:
            raise ConfigError(f"point {point.name}: {problems[0][1]}")
    log.info(f"sweep {grid.name}: {len(points)} points from {grid.base} into {out}")
    teachers, failed = {}, []
    for i, (point, cfg) in enumerate(zip(points, configs, strict=False), 1):
        run_dir = os.path.join(out, point.name)
        log.info(f"\n[{i}/{len(points)}] {point.name}: " + ", ".join(
            f"{k}={v['name'] if k == CASE else _scalar(v)}" for k, v in point.values.items()))
        key = _teacher_key(cfg)
        if key in teachers and _share_teacher(teachers[key], run_dir):
            log.info(f"{point.name}: teacher shared from {teachers[key].dir}")
        if before is not None:
            before(point, cfg, run_dir)
        try:
            run_experiment(cfg, run_dir, progress=progress, logger=log)
        except Preempted:
            raise
        except DistillError as err:  # one broken point does not cost the others
            close_open_runs(exit_code=1)
            log.info(f"{point.name}: FAILED: {err}")
            failed.append(point.name)
        if key is not None and key not in teachers and RunLayout(run_dir).teacher.is_done():
            teachers[key] = RunLayout(run_dir).teacher
    done = [os.path.join(out, p.name) for p in points if is_run_dir(os.path.join(out, p.name))]
    if done:
        runs = load_runs(done)
        table = comparison_table(runs)
        md, js = comparison_files(out)
        atomic_write_text(md, f"# sweep {grid.name} ({grid.path})\n\n{table}\n")
        atomic_write_json(js, comparison_json(runs))
        log.info(f"\nsweep {grid.name} ({md})\n{table}")
    if failed:
        log.info(f"\nsweep {grid.name}: {len(failed)} point(s) failed: {', '.join(failed)}")
    return {"points": [p.name for p in points], "failed": failed}
