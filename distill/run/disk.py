"""What a run will write, estimated before it starts, against the free space of its disk.

A run that fills the disk halfway through loses no work (every file is written atomically, the teacher
cache is allocated whole before its first row), but it loses time: the estimate lets `distill run`
refuse at once, with the figures, and `distill doctor` show them. Sizes are counted, not guessed:
parameters from the models built on the `meta` device (no memory, no weights), the classifier from the
identity count, optimizer slots from the optimizer's name, the cache from images x 2 views x dim x 2
bytes. Stages already finished, and the part of the cache already on disk, count nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch

from distill.models.registry import create_model, resolve
from distill.utils.atomic import full_disk, human
from distill.utils.errors import ConfigError, DistillError
from distill.utils.layout import BASELINE, CacheLayout, RunLayout, generation_name
from teachers.prepare import needs_cache, teacher_source

MARGIN = 1.10  # metrics logs, W&B offline files, JSON: a tenth on top of the counted bytes


class DiskSpaceError(DistillError, OSError):
    """The run directory's disk cannot hold what the run will write."""


_COUNTS: dict = {}  # (constructor, arch, kwargs) -> parameter_count: a sweep's points ask for the same few models


def parameter_count(arch: str, kwargs: dict) -> int:
    """Parameters and buffers of `arch(**kwargs)`, counted on the meta device (no memory), once a process per
    architecture and arguments (building even on the meta device took 70 ms a point of the study's miniature)."""
    key = (id(resolve(arch)[0].fn), arch, json.dumps(kwargs, sort_keys=True, default=repr))
    if key not in _COUNTS:
        with torch.device("meta"):
            model = create_model(arch, **kwargs)
        _COUNTS[key] = sum(t.numel() for t in model.state_dict().values())
    return _COUNTS[key]


def optimizer_slots(name: str) -> int:
    """Tensors the optimizer keeps per parameter (SGD momentum: 1; Adam-like: 2)."""
    name = name.lower().replace("lookahead_", "")
    return 2 if any(k in name for k in ("adam", "lamb", "lars", "nadam", "radam", "adabelief")) else 1


def stage_bytes(params: int, classes: int, embedding: int, optimizer: str, teacher_stage: bool = False) -> dict:
    """Bytes one stage leaves on disk: last.pt (model, classifier, optimizer state), best.pt and student.pt
    (the model), backbone.pth for a teacher; `peak` adds the last.pt.tmp that exists while last.pt is replaced."""
    model, head = 4 * params, 4 * classes * embedding
    last = (model + head) * (1 + optimizer_slots(optimizer))
    kept = last + 2 * model + (model if teacher_stage else 0)
    return {"kept": kept, "peak": kept + last}


def _needed(kept: int, peak: int) -> tuple[int, int]:
    """(logs, needed): the margin on top of the counted bytes, and the total, so that needed is exactly
    kept + peak + logs (the figure stated is the sum of the parts stated)."""
    logs = int((kept + peak) * (MARGIN - 1))
    return logs, kept + peak + logs


def estimate(cfg, run_dir: str, num_samples: int, num_classes: int) -> dict:
    """What the run will write against the free space of its disk:

    items: [(what, bytes)] the files the run leaves on disk; peak: (what, bytes) the largest checkpoint that is
    replaced while its previous copy still exists (last.pt.tmp beside last.pt); logs: the margin for metrics logs,
    W&B files and JSON; needed: items + peak + logs exactly; free, path: the folder measured and its free bytes;
    options: [(setting, what it drops, bytes saved)] the config changes that drop a part of the estimate."""
    run = RunLayout(run_dir)
    items, peaks, options = [], [(None, 0)], []
    tcfg = cfg.teacher
    try:
        source = teacher_source(cfg)
    except ConfigError:  # neither a file nor a recipe: reported by the teacher's own check, nothing to estimate
        source = None
    if source is not None and source.trained_here and not run.teacher.is_done():
        b = stage_bytes(parameter_count(tcfg.arch, dict(tcfg.model)), num_classes, tcfg.embedding_size,
                        tcfg.train.optimizer, teacher_stage=True)
        items.append(("teacher stage (checkpoints)", b["kept"]))
        peaks.append(("teacher", b["peak"] - b["kept"]))
    cache = 0
    if needs_cache(cfg):
        dim = cfg.student.embedding_size if tcfg.onnx else tcfg.embedding_size
        total = num_samples * 2 * dim * 2
        path = CacheLayout(run.teacher_cache).rows
        have = os.path.getsize(path) if os.path.exists(path) else 0
        if total > have:
            cache = total - have
            items.append((f"teacher cache ({num_samples:,} images x 2 views x {dim}-d float16)", cache))
    student_params = parameter_count(cfg.student.arch, cfg.student.model_kwargs(cfg.data.input_size))
    stages = ([BASELINE] if cfg.baseline else []) + [generation_name(k) for k in range(1, cfg.generations + 1)]
    todo = [s for s in stages if not run.stage(s).is_done()]
    student = stage_bytes(student_params, num_classes, cfg.student.embedding_size, cfg.train.optimizer)
    if todo:
        items.append((f"{len(todo)} student stage{'s' if len(todo) > 1 else ''} ({', '.join(todo)}; checkpoints)",
                      student["kept"] * len(todo)))
        peaks.append(("student", student["peak"] - student["kept"]))
    kept = sum(n for _, n in items)
    peak = max(peaks, key=lambda p: p[1])
    logs, needed = _needed(kept, peak[1])
    if cache:
        options.append(("teacher.cache: false", "the teacher cache (the teacher then runs online, each step)",
                        needed - _needed(kept - cache, peak[1])[1]))
    if BASELINE in todo:
        rest = [p for p in peaks if p[0] != "student" or len(todo) > 1]
        options.append(("baseline: false", "the baseline stage (no comparison without distillation)",
                         needed - _needed(kept - student["kept"], max(n for _, n in rest))[1]))
    existing = run_dir
    while not os.path.exists(existing):  # the folder is created by the run: measure its nearest parent
        existing = os.path.dirname(os.path.abspath(existing))
    return {"items": items, "peak": (f"a {peak[0]} last.pt while it is replaced (last.pt.tmp)", peak[1]),
            "logs": logs, "needed": needed, "free": shutil.disk_usage(existing).free, "path": existing,
            "options": options}


def describe(est: dict) -> str:
    """The estimate's total as the sum of its parts: 'about 354.4 MB (teacher stage 225.2 MB + ... + logs (10%)
    32.2 MB)'; 'about 0 B (nothing left to write)' when every stage is done."""
    if not est["items"]:
        return f"about {human(est['needed'])} (nothing left to write)"
    parts = [f"{what} {human(n)}" for what, n in est["items"]]
    if est["peak"][1]:
        parts.append(f"{est['peak'][0]} {human(est['peak'][1])}")
    parts.append(f"logs and small files ({MARGIN - 1:.0%} on top) {human(est['logs'])}")
    return f"about {human(est['needed'])} ({' + '.join(parts)})"


def check_disk(cfg, run_dir: str, num_samples: int, num_classes: int) -> dict:
    """`estimate`, refused with its figures when the disk cannot hold it: how much to free, and only the config
    changes that alone would make the run fit."""
    est = estimate(cfg, run_dir, num_samples, num_classes)
    short = est["needed"] - est["free"]
    if short > 0:
        fits = [f"{setting} (drops {what}: {human(saved)})" for setting, what, saved in est["options"]
                if saved >= short]
        raise DiskSpaceError(f"{run_dir}: this run will write {describe(est)}, but {est['path']} has "
                             f"{human(est['free'])} free. Free at least {human(short)} on that disk, or give --out "
                             f"a folder on a disk with {human(est['needed'])} free"
                             + (f", or set {' or '.join(fits)}" if fits else ""))
    return est


# ------------------------------------------------------------------------------------------ the disk filled

def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed meanwhile
                total += os.path.getsize(os.path.join(folder, name))
    return total


def dispensable(cfg, run_dir: str) -> list:
    """[(path, bytes, why)] what a rerun of the same command never reads, biggest first: the old folders
    `--restart-stage` set aside, temporary files a kill left, and the last.pt of a finished stage that no stage
    still to run starts from (init_head_from_previous) or takes class centres from (teacher/last.pt, gen<k>/last.pt
    under recursive.teacher: previous)."""
    from distill.run.plan import plan_stages

    run = RunLayout(run_dir)
    try:
        specs = plan_stages(cfg, run_dir)
    except DistillError:  # the plan itself is refused: keep every last.pt
        specs = None
    out = []
    if specs is not None:
        still_read = {os.path.abspath(p) for s in specs if not run.stage(s.name).is_done()
                      for p in (s.head_from, s.centres) if p}
        for name in run.stage_names():
            stage = run.stage(name)
            if stage.is_done() and os.path.isfile(stage.last) and os.path.abspath(stage.last) not in still_read:
                out.append((stage.last, os.path.getsize(stage.last),
                            f"the training state of the finished stage {name}"))
    for entry in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, entry)
        if ".restarted-" in entry:
            out.append((path, _size(path), "the old folder --restart-stage set aside"))
    for folder, _, files in os.walk(run_dir):
        if ".restarted-" in folder:
            continue
        for name in files:
            if name.endswith(".tmp"):
                path = os.path.join(folder, name)
                out.append((path, _size(path), "a temporary file an interrupted write left"))
    return sorted(out, key=lambda x: -x[1])


def disk_full_error(cfg, run_dir: str, err: BaseException, counts: tuple | None = None) -> DiskSpaceError:
    """The one line for a disk that filled during `distill run` (a write raised ENOSPC or EDQUOT): where, how much
    the rest of the run needs (from `counts`, (images, identities), read from data.train when not given), what the
    run directory holds and what in it can go (`dispensable`), and that the rerun resumes from the last checkpoint
    (every file is written whole or not at all, metrics.jsonl included)."""
    full = full_disk(err)
    path = os.fspath(full.filename) if full is not None and full.filename else None
    folder = os.path.dirname(os.path.abspath(path)) if path else run_dir
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    rest = ""
    with contextlib.suppress(Exception):  # a figure we cannot compute is left out, never a second error
        if counts is None:
            from distill.data import open_training_set

            train = open_training_set(cfg.data.train, flip=True, input_size=cfg.data.input_size)
            counts = (len(train), train.num_classes)
        run = RunLayout(run_dir)
        need = estimate(cfg, run_dir, *counts)["needed"] - sum(
            _size(p) for name in run.stage_names() if not run.stage(name).is_done()
            for p in _checkpoints(run.stage(name)))
        rest = f"; the rest of the run needs about {human(need)}" + (
            f": free at least {human(need - free)}" if need > free else "")
    drop = dispensable(cfg, run_dir)
    if drop:
        shown = ", ".join(f"{os.path.relpath(p, run_dir)} ({human(n)}: {why})" for p, n, why in drop[:4])
        what = f"; safe to delete, as the rerun never reads them: {shown}" + (
            f" and {len(drop) - 4} more" if len(drop) > 4 else "")
    else:
        what = ", all of it needed by the rerun: free space elsewhere on that disk"
    written = os.path.basename(path) if path else "the run"
    return DiskSpaceError(f"{folder}: the disk filled while writing {written} ({human(free)} free there){rest}; the "
                          f"run directory {run_dir} holds {human(_size(run_dir))}{what}. Then rerun the same command: "
                          f"it resumes from the last checkpoint")


def _checkpoints(stage) -> list:
    return [p for p in (stage.last, stage.best, stage.student, stage.backbone) if os.path.isfile(p)]
