"""The experiment driver: executes the run plan (distill/run/plan.py) teacher -> teacher cache -> baseline ->
gen1 .. genN, each stage in its own directory, with each stage's hooks (distill/run/hooks.py: tracking, IJB).

    runs/<experiment>/
      experiment.yaml      the resolved config (a rerun with a differing config is refused)
      teacher/             trained here when the YAML gives a recipe and no checkpoint (backbone.pth)
      teacher_cache/       the frozen teacher's embeddings of every training image and its flip
      baseline/            the student without distillation, same budget
      gen1/ .. genN/       generation k starts from generation k-1's student.pt
      summary.json, summary.md

A stage with a result.json is finished and skipped on rerun; an interrupted one resumes from its last.pt.
Everything a step needs to know about where and how it runs (rank, device, run directory, logger) is the run
context (distill/run/context.py). `distill run --dry-run` is distill/run/dry_run.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil

from distill.config.schema import ExperimentConfig, dump_config
from distill.losses.terms import describe_terms, stage_terms
from distill.models.files import load_student, model_input_size
from distill.run.context import RunContext, run_context
from distill.run.hooks import StageHooks
from distill.run.inputs import check_before_work, open_inputs
from distill.run.lock import run_directory_lock
from distill.run.plan import LOAD_TEACHER, STUDENT, TEACHER_CACHE, TEACHER_STAGE, TRAIN_TEACHER, PlannedStage, plan_run
from distill.run.rundir import check_run_dir, default_run_dir, restart_stages
from distill.run.summary import summary_text, write_summary
from distill.run.teacher_stage import frozen_teacher, previous_student, run_teacher, teacher_cache
from distill.train.engine import run_stage
from distill.utils.dist import rank0_first
from distill.utils.errors import DistillError
from teachers.prepare import teacher_source

# --------------------------------------------------------------------------------------- before any work

def open_data(cfg: ExperimentConfig, ctx: RunContext):
    """(training set, {set name: (images, issame)}), each file read whole (distill/run/inputs.py: open_inputs);
    synthetic data is generated on first use."""
    if cfg.data.synthetic is not None:
        from distill.data.synthetic import ensure_synthetic, synthetic_is_current
        params = dataclasses.asdict(cfg.data.synthetic)
        if not synthetic_is_current(cfg.data.train, **params):
            ctx.log.info(f"synthetic faces: generating {cfg.data.train} (first use)")
        # an existing dataset is used as it is, or refused when its settings differ: never replaced
        rank0_first(lambda: ensure_synthetic(cfg.data.train, replace=False, **params))
    return open_inputs(cfg, notes=ctx.is_main)  # resizing, a property file that disagrees: one note each


def _before_the_lock(cfg: ExperimentConfig) -> None:
    """What the config and the machine alone refuse, before the run directory is created or locked: a GPU that is
    not there, a teacher checkpoint that is not there (and no recipe to train one)."""
    from distill.utils.device import resolve_device

    resolve_device(cfg.device)
    if cfg.teacher is not None:
        teacher_source(cfg)


def _before_any_work(ctx: RunContext, cfg: ExperimentConfig, restart):
    """What `distill run` and `distill cache build` check and prepare before any training, after _before_the_lock
    (device, teacher file): the run directory holds this experiment, the data opens, then check_before_work (the
    disk has room, the teacher recorded here is this one, the IJB meta files read, the preflight checks pass: the
    checks `--dry-run` makes); then experiment.yaml is written. Returns (training set, verification sets, IJB
    meta)."""
    run_dir = ctx.run_dir
    check_run_dir(cfg, run_dir, restart)
    if restart:  # rank 0 moves the folders; the other ranks wait for it
        rank0_first(lambda: restart_stages(cfg, run_dir, restart, ctx.log) if ctx.is_main else None)
    os.makedirs(run_dir, exist_ok=True)
    train_set, val = open_data(cfg, ctx)
    ctx.log.info(f"{cfg.name}: {len(train_set)} training images of {train_set.num_classes} identities; "
                 f"verification: {', '.join(f'{k} ({len(v[1])} pairs)' for k, v in val.items()) or 'none'}")
    # disk, the teacher recorded here, IJB meta, preflight: what `--dry-run` checks too (distill/run/inputs.py)
    ijb_meta, notes = check_before_work(cfg, run_dir, train_set, record=ctx.is_main)
    for note in notes + [_note_identity_groups(cfg, train_set)]:
        if note:
            ctx.log.info(note)
    if ctx.is_main:
        dump_config(cfg, ctx.layout.experiment)
    return train_set, val, ijb_meta


def _note_identity_groups(cfg: ExperimentConfig, train_set) -> str | None:
    """A note when data.images_per_id (K) is more than any identity has: no batch group then holds K images of
    one identity (each is a run of several identities' leftovers, distill/train/epoch_plan.py)."""
    k = cfg.data.images_per_id
    if not k:
        return None
    import numpy as np

    most = int(np.bincount(np.unique(np.asarray(train_set.labels()), return_inverse=True)[1].reshape(-1)).max())
    if most >= k:
        return None
    return (f"note: data.images_per_id is {k}, but no identity of {cfg.data.train} has more than {most} images: no "
            f"batch group holds {k} images of one identity (groups mix identities); set data.images_per_id <= {most}")


@contextlib.contextmanager
def _left_as_found(ctx: RunContext):
    """A run refused before it wrote anything leaves no run directory behind: a folder this call created that holds
    only its lock file when a DistillError ends the run is removed again (on rank 0)."""
    run_dir = ctx.run_dir
    new = not os.path.exists(run_dir)
    try:
        yield
    except DistillError:
        left = os.listdir(run_dir) if os.path.isdir(run_dir) else []
        if new and ctx.is_main and set(left) <= {".lock"}:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------- run

def _student_loader(path: str):
    def load():
        model, _ = load_student(path)
        return model.eval(), model_input_size(model)
    return load


def run_student(ctx: RunContext, cfg: ExperimentConfig, stage: PlannedStage, train_set, val, teacher, cache,
                hooks: StageHooks) -> dict:
    """A STUDENT stage (baseline, gen<k>): skipped when finished, else trained (resumed from its last.pt) from
    the run's teacher and cache, or under recursive.teacher: previous from its teacher stage's student and that
    student's cache; then its hooks."""
    spec = stage.spec
    layout = ctx.layout.stage(spec.name)
    note = layout.damaged_note()
    if note:
        ctx.log.info(note)
    if layout.is_done():
        ctx.log.info(f"{spec.name}: finished earlier, skipped")
        return hooks.after(stage, layout.read_result(), _student_loader(layout.student))
    ctx.log.info(f"{spec.name}: training {spec.arch}" + (f" from {spec.init_from}" if spec.init_from else " from "
                 "scratch") + (f", distilling with {describe_terms(stage_terms(cfg.distill, spec.alpha))}"
                               if spec.alpha else ", no distillation"))
    tracker = hooks.tracker(spec.name, spec.generation, spec.init_from)
    if spec.record.get(TEACHER_STAGE):  # recursive.teacher: previous: the previous generation's student
        teacher = previous_student(cfg, ctx.run_dir, stage)
        cache = teacher_cache(ctx, cfg, teacher, train_set, ctx.layout.stage(
            spec.record[TEACHER_STAGE]).teacher_cache_as_teacher) if cache is not None else None
    result = run_stage(cfg, spec, layout.dir, train_set, val, teacher=teacher, cache=cache, progress=ctx.progress,
                       logger=ctx.log, tracker=tracker)
    return hooks.after(stage, result, _student_loader(layout.student))


def execute_plan(ctx: RunContext, cfg: ExperimentConfig, stages: list, train_set, val, hooks: StageHooks) -> list:
    """Every planned stage in order; returns the results of the stages that have one (teacher, students)."""
    results, teacher, cache, folder = [], None, None, None
    for stage in stages:
        if stage.kind in (TRAIN_TEACHER, LOAD_TEACHER):
            teacher, result, folder = run_teacher(ctx, cfg, stage, train_set, val, hooks)
            results.append(result)
        elif stage.kind == TEACHER_CACHE:
            cache = teacher_cache(ctx, cfg, teacher, train_set, folder=folder)
        elif stage.kind == STUDENT:
            results.append(run_student(ctx, cfg, stage, train_set, val, teacher, cache, hooks))
        else:
            raise ValueError(f"{stage.name}: unknown stage kind {stage.kind!r}")
    return results


def run_experiment(cfg: ExperimentConfig, run_dir: str | None = None, progress: bool = True, restart=(),
                   logger=None) -> dict:
    """Every stage of the experiment's plan in `run_dir`, holding the directory's lock (one writer at a time).
    `restart`: stage names to train again from their beginning (restart_stages). `logger`: where rank 0's lines
    go (a logging.Logger; default: standard output, distill/run/context.py)."""
    run_dir = run_dir or default_run_dir(cfg)
    _before_the_lock(cfg)
    ctx = run_context(cfg, run_dir, progress, logger)
    with _left_as_found(ctx), run_directory_lock(run_dir):
        train_set, val, ijb_meta = _before_any_work(ctx, cfg, restart)
        results = execute_plan(ctx, cfg, plan_run(cfg, run_dir), train_set, val, StageHooks(cfg, ctx, ijb_meta))
        if not ctx.is_main:
            return {"experiment": cfg.name, "stages": []}
        summary = write_summary(cfg, run_dir, results)
        ctx.log.info(summary_text(cfg, run_dir, summary))
        return summary


def build_teacher_cache(cfg: ExperimentConfig, run_dir: str, progress: bool = False, logger=None):
    """`distill cache build`: the teacher stage of the plan (trained as stage 0 when the experiment says so) and
    its cache, with every check `distill run` makes and its experiment.yaml, holding the run directory's lock.
    Under torchrun every rank builds its slice; rank 0 reports for all."""
    _before_the_lock(cfg)
    ctx = run_context(cfg, run_dir, progress, logger)
    with _left_as_found(ctx), run_directory_lock(run_dir):
        train_set, val, _ = _before_any_work(ctx, cfg, ())
        stage = next(s for s in plan_run(cfg, run_dir) if s.kind in (TRAIN_TEACHER, LOAD_TEACHER))
        teacher, folder = frozen_teacher(ctx, cfg, stage, train_set, val, StageHooks(cfg, ctx))
        cache = teacher_cache(ctx, cfg, teacher, train_set, folder=folder)
        ctx.log.info(f"teacher cache: {len(cache)} images x 2 views in {cache.directory}")
        return cache
