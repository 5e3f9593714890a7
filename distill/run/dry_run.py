"""`distill run --dry-run`: files and shapes checked, then two steps of every stage (the teacher stage too when
it is trained here) on random stand-in data at the configured model sizes, in a temporary directory that is
removed afterwards. The teacher is decided as a real run decides it (teachers/prepare.py)."""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile

import teachers
from distill.config.schema import ExperimentConfig, config_from_dict, to_dict
from distill.data.standin import StandInFaces, standin_pairs
from distill.eval.ijb_stage import read_meta as read_ijb_meta
from distill.run.experiment import check_embedding_sizes, plan_stages, teacher_trainer
from distill.run.preflight import preflight
from distill.train.engine import run_stage
from distill.utils.errors import ConfigError
from teachers.prepare import prepare_teacher, teacher_source


def quiet(*_):
    pass


def dry_run(cfg: ExperimentConfig, log=print, run_dir: str | None = None) -> None:
    """Validate files and shapes, then two steps of every stage on random stand-in data (nothing kept). With
    `run_dir` (the run's --out), also what `distill run` checks before its work there (distill/run/preflight.py)."""
    if run_dir is not None:
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise ConfigError(f"--out {run_dir}: is a file, not a folder; give the run directory (new or existing)")
        preflight(cfg, run_dir)
    synthetic_dir = os.path.abspath(cfg.data.train) + os.sep if cfg.data.synthetic is not None else None
    for path in cfg.data.val:  # sets the synthetic generator will write are not there before the first run
        if not os.path.exists(path) and not (synthetic_dir and os.path.abspath(path).startswith(synthetic_dir)):
            raise ConfigError(f"data.val: verification set {path} does not exist")
    if cfg.data.synthetic is None and not os.path.exists(cfg.data.train):
        raise ConfigError(f"data.train: {cfg.data.train} does not exist")
    if cfg.data.ijb is not None:
        meta = read_ijb_meta(cfg.data.ijb)  # the meta files: names, landmarks, templates, pairs all read
        log(f"dry run: {cfg.data.ijb.target} ok ({len(meta.names):,} images, {len(meta.pairs):,} template pairs; "
            f"evaluated after each stage)")
    teacher, source = None, teacher_source(cfg)
    if source is not None:
        if source.trained_here:  # the architecture at its configured sizes (trained below, two steps)
            teacher = teachers.build_teacher({k: v for k, v in cfg.teacher.spec().items() if k != "checkpoint"})
        else:
            teacher = prepare_teacher(cfg, "", None)  # strict load: checks architecture and shapes
        check_embedding_sizes(cfg, teacher.embedding_size)
    small = copy.deepcopy(cfg)
    small.train = dataclasses.replace(cfg.train, batch_size=min(cfg.train.batch_size, 4), max_steps=2,
                                      eval_every=0, checkpoint_every=2, accumulate=1)
    # P×K batches (data.images_per_id) run as 2 groups of 2: the stand-in data holds 2 images per identity
    small.data = dataclasses.replace(cfg.data, num_workers=0, images_per_id=cfg.data.images_per_id and 2)
    small.teacher = dataclasses.replace(cfg.teacher, cache=False, checkpoint=None) if cfg.teacher else None
    if small.teacher is not None and small.teacher.train is not None:
        small.teacher.train = small.train
    small = config_from_dict(to_dict(small))
    data = StandInFaces(classes=4, per_class=2, size=cfg.data.input_size)
    val = {"standin": standin_pairs(pairs=10, size=cfg.data.input_size)}
    with tempfile.TemporaryDirectory(prefix="distill-dry-run-") as tmp:
        if small.teacher is not None:
            if source.trained_here:
                # no checkpoint: the recipe's teacher stage trains two steps (the validation one is untrained);
                # not evaluated: the students' stages check the evaluation path, an IResNet-100's costs seconds
                teacher = prepare_teacher(small, tmp, data, teacher_trainer(small, tmp, data, {}, False, quiet),
                                          log=quiet)
            log(f"dry run: teacher ok ({cfg.teacher.arch or cfg.teacher.onnx}, {teacher.embedding_size}-d at "
                f"{teacher.input_size}px)")
        for spec in plan_stages(small, tmp):
            if spec.init_from and not os.path.exists(spec.init_from) and spec.generation == 1:
                raise ConfigError(f"student.init: {spec.init_from} does not exist")
            run_stage(small, spec, os.path.join(tmp, spec.name), data, val, teacher=teacher, progress=False,
                      log=quiet)
            log(f"dry run: {spec.name} ok (2 steps, {spec.arch} at {cfg.data.input_size}px)")
    log("dry run passed: files exist, shapes agree, every stage trains")
