"""The teacher's stages of a run plan (distill/run/plan.py), as `distill run` executes them:

- TRAIN_TEACHER: the teacher trained in the run directory as stage 0 by the engine, like every other stage
  (its result.json records the teacher's identity), then loaded frozen from its backbone.pth;
- LOAD_TEACHER: the teacher loaded frozen from its file, evaluated once on the verification sets on the run's
  device (under torchrun each rank embeds its share);
- TEACHER_CACHE: its embeddings of every training image and its flip, in the run directory or in the
  teacher.shared_cache folder of this teacher, data and autocast.

What makes a model a teacher (the frozen wrapper, its identity, the cache) lives in teachers/; this module
decides when each happens in a run.
"""

from __future__ import annotations

import dataclasses
import os

from distill.eval.verification import evaluate_sets, set_name_of
from distill.models.cost import model_cost
from distill.run.context import RunContext
from distill.run.plan import TEACHER_STAGE, TRAIN_TEACHER, PlannedStage
from distill.run.preflight import check_embedding_sizes
from distill.run.shared_teacher import cached_metrics, held, keep_metrics, shared_folder
from distill.run.summary import teacher_model
from distill.train.engine import run_stage
from distill.train.tracking import val_scalars
from distill.utils.atomic import atomic_write_json
from distill.utils.digest import file_sha256
from distill.utils.dist import from_rank0
from distill.utils.layout import TEACHER, RunLayout
from distill.utils.threads import apply_threads, loader_workers, plan_threads
from teachers.prepare import IDENTITY_KEY, load_teacher, prepare_cache, teacher_identity
from teachers.signal import online_signal, signal_cache_key


def train_teacher(ctx: RunContext, cfg, stage: PlannedStage, train_set, val, open_tracker=None) -> None:
    """TRAIN_TEACHER: the teacher stage trained by the engine when it has not finished (resumed from its last.pt
    like any stage), its result.json recording the teacher's identity. `open_tracker() -> tracker`: the tracking
    hook's (None: the stage's metrics.jsonl only)."""
    layout = ctx.layout.teacher
    note = layout.damaged_note()
    if note:
        ctx.log.info(note)
    if layout.is_done():
        return
    ctx.log.info(f"teacher: training {cfg.teacher.arch} ({cfg.teacher.model}) as stage 0")
    spec = dataclasses.replace(stage.spec, record={IDENTITY_KEY: teacher_identity(cfg, train_set)})
    run_stage(cfg, spec, layout.dir, train_set, val, progress=ctx.progress, logger=ctx.log,
              tracker=open_tracker() if open_tracker else None)


def frozen_teacher(ctx: RunContext, cfg, stage: PlannedStage, train_set, val, hooks) -> tuple:
    """TRAIN_TEACHER (trained first when it has not finished) or LOAD_TEACHER: (the frozen teacher, its
    teacher.shared_cache folder or None), its embedding size checked against the student's."""
    if stage.kind == TRAIN_TEACHER:
        train_teacher(ctx, cfg, stage, train_set, val, lambda: hooks.tracker(TEACHER, 0, None))
    teacher = load_teacher(cfg, ctx.run_dir)
    check_embedding_sizes(cfg, teacher.embedding_size)  # before the cache and any student
    return teacher, shared_folder_of(ctx, cfg, teacher, train_set)  # hashes the weights and the data: once


def run_teacher(ctx: RunContext, cfg, stage: PlannedStage, train_set, val, hooks) -> tuple:
    """TRAIN_TEACHER or LOAD_TEACHER with its hooks: (frozen teacher, result, its teacher.shared_cache folder)."""
    teacher, folder = frozen_teacher(ctx, cfg, stage, train_set, val, hooks)
    result = teacher_result(ctx, cfg, teacher, val, train_set, folder, hooks)
    return teacher, hooks.after(stage, result, lambda: (teacher, teacher.input_size), folder), folder


def teacher_result(ctx: RunContext, cfg, teacher, val, train_set, folder: str | None, hooks) -> dict:
    """The teacher stage's result: a trained one's result.json; for a loaded one its metrics, computed once and
    kept in teacher/result.json with the teacher's identity. `folder`: its teacher.shared_cache subfolder, where an
    earlier run may have kept them.

    Every rank calls it: the teacher is evaluated on the run's device (moved there, frozen as it is), each rank of a
    torchrun job embedding its share of the images, so no rank waits long for another; rank 0 writes the files and
    every rank gets its result."""
    stage = ctx.layout.teacher
    done = from_rank0(stage.read_result() if ctx.is_main and stage.is_done() else None)
    if done is not None:
        return done
    files = {set_name_of(p): file_sha256(p) for p in cfg.data.val} if ctx.is_main else {}
    # teacher.shared_cache: evaluated by an earlier run
    metrics = from_rank0(cached_metrics(folder, files) if folder and ctx.is_main else None)
    if metrics is None:
        metrics = evaluate_sets(teacher.to(ctx.device), val, teacher.input_size, device=ctx.device, progress=False,
                                model_name=TEACHER, split_ranks=True) if val else {}
        if folder and ctx.is_main:
            keep_metrics(folder, files, metrics)
    result = None
    if ctx.is_main:
        os.makedirs(stage.dir, exist_ok=True)
        label, arch, kwargs = teacher_model(cfg)
        params, gflops = model_cost(arch, kwargs) if arch else (None, None)
        result = {"stage": TEACHER, "generation": 0, "init_from": cfg.teacher.checkpoint or cfg.teacher.onnx,
                  "arch": label, "params": params, "gflops": gflops, "train_seconds": 0.0, "metrics": metrics,
                  IDENTITY_KEY: teacher_identity(cfg, train_set)}
        atomic_write_json(stage.result, result)
        tracker = hooks.tracker(TEACHER, 0, cfg.teacher.checkpoint)  # a W&B run for the teacher too
        tracker.log(val_scalars(metrics), 0)
        tracker.finish(result, None)
    return from_rank0(result)


def teacher_cache(ctx: RunContext, cfg, teacher, train_set, directory: str | None = None,
                  folder: str | None = None):
    """TEACHER_CACHE: the cache filled through the online teacher signal on the run's device and autocast
    (teachers/signal.py), with the thread policy's threads and workers. In `directory`, else in `folder` (the
    teacher's teacher.shared_cache subfolder), else in the run directory."""
    plan = apply_threads(plan_threads(loader_workers(cfg.data.num_workers, ctx.device.type), cfg.train.threads))
    ctx.log.info(f"teacher cache: {plan.describe()}")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=plan.workers))
    online = online_signal(teacher, cfg.train, ctx.device)  # the teacher's device and autocast (teachers/signal.py)
    if directory is not None or folder is None:
        return prepare_cache(cfg, online, train_set, ctx.run_dir, ctx.log, ctx.progress, directory=directory)
    ctx.log.info(f"teacher cache: shared, in {folder}")
    with held(folder, ctx.log):  # rank 0 holds it for a torchrun job; no rank waits for it in a collective
        return prepare_cache(cfg, online, train_set, ctx.run_dir, ctx.log, ctx.progress, directory=folder)


def shared_folder_of(ctx: RunContext, cfg, teacher, train_set) -> str | None:
    """teacher.shared_cache's subfolder for this teacher, data and autocast (distill/run/shared_teacher.py)."""
    if cfg.teacher is None or not cfg.teacher.shared_cache:
        return None
    return shared_folder(cfg.teacher.shared_cache, signal_cache_key(teacher, train_set, cfg.train, ctx.device))


def previous_student(cfg, run_dir: str, stage: PlannedStage):
    """The frozen teacher of a generation under recursive.teacher: previous: the student.pt of its teacher stage."""
    import teachers

    path = RunLayout(run_dir).stage(stage.spec.record[TEACHER_STAGE]).student
    return teachers.build_teacher({"arch": cfg.student.arch, "checkpoint": path,
                                   **cfg.student.model_kwargs(cfg.data.input_size)})
