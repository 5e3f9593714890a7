"""`distill run --dry-run`: files and shapes checked, the run plan printed (distill/run/plan.py: the stages `distill
run` would execute, with their hooks), then two steps of every stage of the same plan (the teacher stage too when
it is trained here) on random stand-in data at the configured model sizes, in a temporary directory that is
removed afterwards. The teacher is decided as a real run decides it (teachers/prepare.py).

Under torchrun every rank trains every stage, as in a real run: on stand-in data enough for one step at the world
size, in one temporary directory rank 0 makes and shares (the stages read what rank 0 wrote: the teacher's and the
previous generation's student.pt), removed by rank 0 once every rank is done; rank 0 prints the lines."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile

import teachers
from distill.config.schema import ExperimentConfig, config_from_dict, to_dict
from distill.data.standin import standin_for_step, standin_pairs
from distill.eval.ijb_stage import read_meta as read_ijb_meta
from distill.run.context import run_context, run_logger, silent_logger
from distill.run.plan import LOAD_TEACHER, STUDENT, TRAIN_TEACHER, describe_plan, plan_run
from distill.run.preflight import check_embedding_sizes, preflight
from distill.run.rundir import default_run_dir
from distill.run.teacher_stage import train_teacher
from distill.train.engine import run_stage
from distill.utils.dist import barrier, from_rank0, is_main, rank, world_size
from distill.utils.errors import ConfigError, DistillError
from teachers.prepare import load_teacher, teacher_source


def dry_run(cfg: ExperimentConfig, run_dir: str | None = None, logger=None) -> None:
    """Validate files and shapes, print the run plan, then two steps of every stage on random stand-in data
    (nothing kept). With `run_dir` (the run's --out), also what `distill run` checks before its work there
    (distill/run/preflight.py). `logger`: where the lines go (default: standard output; none on ranks other than 0)."""
    log = (logger or run_logger()) if is_main() else silent_logger()
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
        log.info(f"dry run: {cfg.data.ijb.target} ok ({len(meta.names):,} images, {len(meta.pairs):,} template "
                 f"pairs; evaluated after each stage)")
    teacher, source = None, teacher_source(cfg)
    if source is not None:
        if source.trained_here:  # the architecture at its configured sizes (trained below, two steps)
            teacher = teachers.build_teacher({k: v for k, v in cfg.teacher.spec().items() if k != "checkpoint"})
        else:
            teacher = load_teacher(cfg, "")  # strict load: checks architecture and shapes
        check_embedding_sizes(cfg, teacher.embedding_size)
    plan_dir = run_dir or default_run_dir(cfg)
    log.info(f"dry run: the plan of {plan_dir}:\n" + "\n".join(
        "  " + line for line in describe_plan(cfg, plan_run(cfg, plan_dir))))
    small = copy.deepcopy(cfg)
    small.train = dataclasses.replace(cfg.train, batch_size=min(cfg.train.batch_size, 4), max_steps=2,
                                      eval_every=0, checkpoint_every=2, accumulate=1)
    # P×K batches (data.images_per_id) run as groups of 2: the stand-in data holds 2 images per identity
    small.data = dataclasses.replace(cfg.data, num_workers=0, images_per_id=cfg.data.images_per_id and 2)
    small.teacher = dataclasses.replace(cfg.teacher, cache=False, checkpoint=None) if cfg.teacher else None
    if small.teacher is not None and small.teacher.train is not None:
        small.teacher.train = small.train
    small = config_from_dict(to_dict(small))
    data = standin_for_step(small.train.batch_size, world_size(), per_class=2, size=cfg.data.input_size)
    val = {"standin": standin_pairs(pairs=10, size=cfg.data.input_size)}
    tmp = _shared_temporary_folder()
    try:
        _train_stages(cfg, small, source, teacher, tmp, data, val, log)
    except BaseException:
        if is_main():  # the other ranks fail too (torchrun ends them): nothing waits for this folder
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()  # every rank is done with the folder
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("dry run passed: files exist, shapes agree, every stage trains")


def _shared_temporary_folder() -> str:
    """A new temporary folder made by rank 0, its path given to every rank (the system's temporary folder, or
    TMPDIR's; across nodes TMPDIR must be a folder every node sees)."""
    tmp = from_rank0(tempfile.mkdtemp(prefix="distill-dry-run-") if is_main() else None)
    if not os.path.isdir(tmp):
        raise DistillError(f"dry run: rank {rank()} does not see rank 0's temporary folder {tmp} (another node?); "
                           f"set TMPDIR to a folder every node shares")
    return tmp


def _train_stages(cfg, small, source, teacher, tmp: str, data, val: dict, log) -> None:
    """Two steps of every stage of the plan of `small` in `tmp` (the teacher's too when trained here)."""
    ctx = run_context(small, tmp, progress=False, logger=silent_logger())  # the stages' own lines: not shown
    for stage in plan_run(small, tmp, source):  # teacher.cache off: the students run the teacher online
        if stage.kind == TRAIN_TEACHER:
            # no checkpoint: the recipe's teacher stage trains two steps (the validation one is untrained);
            # not evaluated: the students' stages check the evaluation path, an IResNet-100's costs seconds
            train_teacher(ctx, small, stage, data, {})
            teacher = load_teacher(small, tmp)
        if stage.kind in (TRAIN_TEACHER, LOAD_TEACHER):
            log.info(f"dry run: teacher ok ({cfg.teacher.arch or cfg.teacher.onnx}, {teacher.embedding_size}-d "
                     f"at {teacher.input_size}px)")
        if stage.kind != STUDENT:
            continue
        spec = stage.spec
        if spec.init_from and not os.path.exists(spec.init_from) and spec.generation == 1:
            raise ConfigError(f"student.init: {spec.init_from} does not exist")
        run_stage(small, spec, os.path.join(tmp, spec.name), data, val, teacher=teacher, progress=False,
                  logger=ctx.log)
        log.info(f"dry run: {spec.name} ok (2 steps, {spec.arch} at {cfg.data.input_size}px)")
