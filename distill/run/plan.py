"""The run plan: `plan_run(cfg, run_dir) -> [PlannedStage]`, every stage of an experiment in the order `distill run`
executes them (distill/run/experiment.py) and `distill run --dry-run` prints them (distill/run/dry_run.py).

    teacher         TRAIN_TEACHER: trained here from teacher.train (stage 0), then frozen
                    LOAD_TEACHER: loaded from teacher.checkpoint / teacher.onnx, frozen, evaluated once
    teacher_cache   TEACHER_CACHE: the frozen teacher's embeddings of every training image and its flip
                    (teacher.cache with some distillation)
    baseline        STUDENT: the student without distillation, same budget (baseline: true)
    gen1 .. genN    STUDENT: generation k starts from generation k-1's student.pt and distils from the teacher,
                    or from generation k-1's student under recursive.teacher: previous

After each stage with a result its hooks run (distill/run/hooks.py): `tracking` (the stage's metrics.jsonl,
mirrored to W&B) and `ijb` (the finished stage evaluated on data.ijb). The plan reads only the config and the
run directory's path: it loads nothing and trains nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from distill.losses.terms import describe_terms, stage_terms
from distill.run.preflight import centres_source
from distill.train.engine import StageSpec
from distill.utils import layout
from distill.utils.layout import BASELINE, TEACHER, RunLayout, generation_name
from teachers.prepare import needs_cache, teacher_source

TRAIN_TEACHER, LOAD_TEACHER, TEACHER_CACHE, STUDENT = "train teacher", "load teacher", "teacher cache", "student"
TRACKING, IJB = "tracking", "ijb"  # the hooks (distill/run/hooks.py)
TEACHER_STAGE = "teacher_stage"  # result.json: the stage whose student taught this one (recursive.teacher: previous)
CACHE_NAME = layout.TEACHER_CACHE


@dataclass(frozen=True)
class PlannedStage:
    name: str                         # its folder in the run directory (teacher, teacher_cache, baseline, gen1 ...)
    kind: str                         # TRAIN_TEACHER | LOAD_TEACHER | TEACHER_CACHE | STUDENT
    spec: StageSpec | None = None     # what the engine trains (TRAIN_TEACHER, STUDENT)
    teacher: str | None = None        # a student's teacher: TEACHER, or the stage whose student teaches it
    cached: bool = False              # a student's teacher targets come from a teacher cache
    hooks: tuple = ()                 # run after the stage: TRACKING, IJB

    def describe(self, cfg) -> str:
        """One line: what the stage does and what runs after it."""
        t = cfg.teacher
        if self.kind == TRAIN_TEACHER:
            what = (f"train {t.arch} ({t.embedding_size}-d at {t.input_size}px) as stage 0 from teacher.train, "
                    f"then frozen")
        elif self.kind == LOAD_TEACHER:
            source = teacher_source(cfg)
            what = f"load {source.file} ({source.kind}), frozen; evaluated once"
        elif self.kind == TEACHER_CACHE:
            where = f" in teacher.shared_cache {t.shared_cache}" if t.shared_cache else ""
            what = f"the teacher's embeddings of every training image and its flip{where}"
        else:
            spec = self.spec
            what = f"train {spec.arch} " + (f"from {spec.init_from}" if spec.init_from else "from scratch")
            if spec.alpha:
                teacher = "the teacher" if self.teacher == TEACHER else f"{self.teacher}'s student"
                what += (f", distilling from {teacher} ({'cached' if self.cached else 'online'}) with "
                         f"{describe_terms(stage_terms(cfg.distill, spec.alpha))}")
            else:
                what += ", no distillation"
        hooks = [f"{IJB} ({cfg.data.ijb.target})" if h == IJB else f"{TRACKING} (W&B {cfg.tracking.wandb})"
                 for h in self.hooks]
        return f"{self.name}: {what}" + (f"; then {', '.join(hooks)}" if hooks else "")


def student_spec(cfg, name: str, generation: int, alpha: float, init_from, head_from) -> StageSpec:
    return StageSpec(name=name, arch=cfg.student.arch, model_kwargs=cfg.student.model_kwargs(cfg.data.input_size),
                     train=cfg.train, alpha=alpha, generation=generation, init_from=init_from, head_from=head_from)


def teacher_spec(cfg) -> StageSpec:
    """The teacher stage (stage 0) as the engine trains it; the run adds the teacher's identity to its record."""
    t = cfg.teacher
    return StageSpec(TEACHER, t.arch, dict(t.model), t.train, alpha=0.0, generation=0)


def plan_stages(cfg, run_dir: str) -> list:
    """The students' StageSpecs: the baseline (when configured), then gen1 .. genN."""
    alpha = cfg.distill.weight if cfg.teacher is not None else 0.0
    run = RunLayout(run_dir)
    centres = centres_source(cfg, run_dir)
    stages = []
    if cfg.baseline:
        stages.append(student_spec(cfg, BASELINE, 0, 0.0, cfg.student.init, None))
    for k in range(1, cfg.generations + 1):
        init = cfg.student.init if k == 1 else run.generation(k - 1).student
        head = run.generation(k - 1).last if (k > 1 and cfg.init_head_from_previous) else None
        previous = cfg.recursive.teacher == "previous" and k > 1 and alpha > 0
        stages.append(dataclasses.replace(
            student_spec(cfg, generation_name(k), k, alpha, init, head),
            centres=run.generation(k - 1).last if previous and centres else centres,
            record={TEACHER_STAGE: generation_name(k - 1)} if previous else {}))
    return stages


def plan_run(cfg, run_dir: str, source=None) -> list:
    """Every stage of the experiment in execution order (see the module docstring). `source`: where the teacher
    comes from (teachers.prepare.teacher_source; default: the config's)."""
    hooks = (TRACKING, IJB) if cfg.data.ijb is not None else (TRACKING,)
    stages = []
    source = source or teacher_source(cfg)
    cached = needs_cache(cfg)
    if source is not None:
        if source.trained_here:
            stages.append(PlannedStage(TEACHER, TRAIN_TEACHER, teacher_spec(cfg), hooks=hooks))
        else:
            stages.append(PlannedStage(TEACHER, LOAD_TEACHER, hooks=hooks))
        if cached:
            stages.append(PlannedStage(CACHE_NAME, TEACHER_CACHE))
    for spec in plan_stages(cfg, run_dir):
        teacher = (spec.record.get(TEACHER_STAGE) or TEACHER) if spec.alpha and source is not None else None
        stages.append(PlannedStage(spec.name, STUDENT, spec, teacher, cached and teacher is not None, hooks))
    return stages


def describe_plan(cfg, stages: list) -> list:
    """The plan as numbered lines."""
    return [f"{i}. {stage.describe(cfg)}" for i, stage in enumerate(stages, 1)]
