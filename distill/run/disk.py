"""What a run will write, estimated before it starts, against the free space of its disk.

A run that fills the disk halfway through loses no work (every file is written atomically, the teacher
cache is allocated whole before its first row), but it loses time: the estimate lets `distill run`
refuse at once, with the figures, and `distill doctor` show them. Sizes are counted, not guessed:
parameters from the models built on the `meta` device (no memory, no weights), the classifier from the
identity count, optimizer slots from the optimizer's name, the cache from images x 2 views x dim x 2
bytes. Stages already finished, and the part of the cache already on disk, count nothing.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from distill.models.registry import create_model, resolve
from distill.utils.errors import ConfigError, DistillError
from distill.utils.layout import BASELINE, CacheLayout, RunLayout, generation_name
from teachers.prepare import needs_cache, teacher_source

MARGIN = 1.10  # metrics logs, W&B offline files, JSON: a tenth on top of the counted bytes


class DiskSpaceError(DistillError, OSError):
    """The run directory's disk cannot hold what the run will write."""


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"  # pragma: no cover


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


def estimate(cfg, run_dir: str, num_samples: int, num_classes: int) -> dict:
    """{"items": [(what, bytes)], "needed": bytes incl. margin, "free": bytes, "path": the folder measured}."""
    run = RunLayout(run_dir)
    items, peaks = [], [0]
    tcfg = cfg.teacher
    try:
        source = teacher_source(cfg)
    except ConfigError:  # neither a file nor a recipe: reported by the teacher's own check, nothing to estimate
        source = None
    if source is not None and source.trained_here and not run.teacher.is_done():
        b = stage_bytes(parameter_count(tcfg.arch, dict(tcfg.model)), num_classes, tcfg.embedding_size,
                        tcfg.train.optimizer, teacher_stage=True)
        items.append(("teacher stage (checkpoints)", b["kept"]))
        peaks.append(b["peak"] - b["kept"])
    if needs_cache(cfg):
        dim = cfg.student.embedding_size if tcfg.onnx else tcfg.embedding_size
        total = num_samples * 2 * dim * 2
        path = CacheLayout(run.teacher_cache).rows
        have = os.path.getsize(path) if os.path.exists(path) else 0
        if total > have:
            items.append((f"teacher cache ({num_samples:,} images x 2 views x {dim}-d float16)", total - have))
    student_params = parameter_count(cfg.student.arch, cfg.student.model_kwargs(cfg.data.input_size))
    stages = ([BASELINE] if cfg.baseline else []) + [generation_name(k) for k in range(1, cfg.generations + 1)]
    todo = [s for s in stages if not run.stage(s).is_done()]
    if todo:
        b = stage_bytes(student_params, num_classes, cfg.student.embedding_size, cfg.train.optimizer)
        items.append((f"{len(todo)} student stage{'s' if len(todo) > 1 else ''} ({', '.join(todo)}; checkpoints)",
                      b["kept"] * len(todo)))
        peaks.append(b["peak"] - b["kept"])
    counted = sum(n for _, n in items) + max(peaks)
    existing = run_dir
    while not os.path.exists(existing):  # the folder is created by the run: measure its nearest parent
        existing = os.path.dirname(os.path.abspath(existing))
    return {"items": items, "needed": int(counted * MARGIN), "free": shutil.disk_usage(existing).free,
            "path": existing}


def check_disk(cfg, run_dir: str, num_samples: int, num_classes: int) -> dict:
    """`estimate`, refused with its figures when the disk cannot hold it."""
    est = estimate(cfg, run_dir, num_samples, num_classes)
    if est["needed"] > est["free"]:
        parts = ", ".join(f"{what} {human(n)}" for what, n in est["items"])
        raise DiskSpaceError(f"{run_dir}: this run will write about {human(est['needed'])} ({parts}, plus 10% for "
                             f"logs), but {est['path']} has {human(est['free'])} free. Free disk space, give "
                             f"another --out on a larger disk"
                             + (", or set teacher.cache: false (the teacher then runs online)"
                                if any(w.startswith("teacher cache") for w, _ in est["items"]) else ""))
    return est
