"""The generations driver: teacher -> baseline -> gen1 .. genN, each stage in its own directory.

    runs/<experiment>/
      experiment.yaml      the resolved config (a rerun with a differing config is refused)
      teacher/             trained here when the YAML gives a recipe and no checkpoint (backbone.pth)
      teacher_cache/       the frozen teacher's embeddings of every training image and its flip
      baseline/            the student without distillation, same budget
      gen1/ .. genN/       generation k starts from generation k-1's student.pt
      summary.json, summary.md

A stage with a result.json is finished and skipped on rerun; an interrupted one resumes from its
last.pt. `dry_run` checks files and shapes and runs two steps of every stage on random stand-in
data at the configured model sizes, in a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time

import teachers
from distill.atomic import atomic_write_json
from distill.checkpoint import atomic_torch_save, safe_torch_load
from distill.config import ExperimentConfig, config_from_dict, dump_config, load_saved_config, to_dict
from distill.data.standin import StandInFaces, standin_pairs
from distill.disk import DiskSpaceError, check_disk
from distill.dist import barrier, from_rank0, is_main, rank0_first
from distill.engine import StageSpec, run_stage
from distill.errors import ConfigError
from distill.evaluate import evaluate_sets, set_name_of, size_note
from distill.layout import BASELINE, TEACHER, RunLayout, generation_name
from distill.losses import loss_needs
from distill.models import load_student, model_input_size
from distill.stage_ijb import evaluate_ijb, ijb_scalars, needs_ijb
from distill.stage_ijb import read_meta as read_ijb_meta
from distill.lock import run_directory_lock
from distill.profile import model_cost
from distill.registry import did_you_mean
from distill.summary import teacher_model, write_summary
from distill.teacher_cache import build_cache
from distill.tracking import stage_tracker, val_scalars
from distill.train_setup import amp_settings, resolve_device

# Keys that may change between reruns of one run directory without invalidating anything trained.
HARMLESS = ("generations", "tracking", "data.num_workers", "data.prefetch_factor", "data.decode", "train.log_every",
            "train.compile", "train.optimizer_impl", "train.channels_last", "device", "data.ijb")


def default_run_dir(cfg: ExperimentConfig) -> str:
    return os.path.join("runs", cfg.name)


def build_run_cache(cfg: ExperimentConfig, teacher, train_set, run_dir: str, progress: bool, log):
    """The run's teacher cache (`distill run` and `distill cache build`): on the run's device, under the
    students' autocast (train.amp); under torchrun every rank embeds its own slice and rank 0 prepares the
    build and marks it finished."""
    device = resolve_device(cfg.device)
    return build_cache(teacher, train_set, RunLayout(run_dir).teacher_cache, num_workers=cfg.data.num_workers,
                       device=device, amp_dtype=amp_settings(cfg.train, device)[0], progress=progress, log=log)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_dir(cfg: ExperimentConfig, run_dir: str) -> None:
    """Refuse a run directory that holds a different experiment (nothing trained is overwritten). The saved
    config is read through the current schema, so a directory written with earlier key names still resumes."""
    path = RunLayout(run_dir).experiment
    if not os.path.exists(path):
        return
    old = _flat(to_dict(load_saved_config(path)))
    new = _flat(to_dict(cfg))
    differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                    and not any(k == h or k.startswith(h + ".") for h in HARMLESS))
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:6])
        raise ConfigError(f"{run_dir} holds a different experiment ({shown}). Choose another --out directory, "
                          f"or restore those settings to resume it.")


# --------------------------------------------------------------------------------------- pieces

def open_data(cfg: ExperimentConfig, log=print):
    """(training set, {set name: (images, issame)}); synthetic data is generated on first use."""
    from distill.data import load_verification_bin, open_training_set

    if cfg.data.synthetic is not None:
        from distill.data.synthetic import ensure_synthetic, synthetic_is_current
        params = dataclasses.asdict(cfg.data.synthetic)
        if not synthetic_is_current(cfg.data.train, **params):
            log(f"synthetic faces: generating {cfg.data.train} (first use)")
        # an existing dataset is used as it is, or refused when its settings differ: never replaced
        rank0_first(lambda: ensure_synthetic(cfg.data.train, replace=False, **params))
    if not os.path.exists(cfg.data.train):
        raise ConfigError(f"data.train: {cfg.data.train} does not exist (a RecordIO folder such as faces_emore/, "
                          f"a .rec file, or an identity-per-folder tree)")
    for path in cfg.data.val:
        if not os.path.exists(path):
            raise ConfigError(f"data.val: verification set {path} does not exist")
    train_set = open_training_set(cfg.data.train, flip=True, input_size=cfg.data.input_size)
    val = {set_name_of(p): load_verification_bin(p) for p in cfg.data.val}
    if is_main():  # resizing, a property file that disagrees: one note each, before any work
        train_set.warn_notes()
        for name, (images, _) in val.items():
            size_note(f"verification set {name}", images, cfg.data.input_size)
    return train_set, val


def embedding_size_problem(cfg: ExperimentConfig, teacher_dim: int) -> str | None:
    """Why the student's embeddings cannot be distilled against a teacher of `teacher_dim`, or None."""
    student_dim = cfg.student.embedding_size
    if cfg.distill.alpha <= 0 or cfg.generations < 1 or teacher_dim == student_dim:
        return None
    if loss_needs(cfg.distill.loss, "same_size"):
        return (f"the teacher's embeddings are {teacher_dim}-d, student.embedding_size is {student_dim}: "
                f"distill.loss {cfg.distill.loss} moves the student's class centres toward the teacher's embeddings, "
                f"so both must have one size (distill.project cannot map the teacher into the student's space); "
                f"set student.embedding_size: {teacher_dim} or use another distill.loss")
    if cfg.distill.project != "none":
        return None
    return (f"the teacher's embeddings are {teacher_dim}-d, student.embedding_size is {student_dim}: the distillation "
            f"losses compare embeddings of one size. Set distill.project: linear (a learned {student_dim} -> "
            f"{teacher_dim} projection used only inside the distillation loss), or student.embedding_size: {teacher_dim}")


def check_embedding_sizes(cfg: ExperimentConfig, teacher_dim: int) -> None:
    problem = embedding_size_problem(cfg, teacher_dim)
    if problem:
        raise ConfigError(problem)


def note_damaged_result(stage, log) -> None:
    """A result.json that does not read (truncated by a full disk, edited by hand) marks the stage unfinished: say so."""
    problem = stage.damaged_result()
    if problem:
        log(f"{stage.name}: note: {stage.result} is damaged ({problem}); treating the stage as unfinished: it "
            f"resumes from its last.pt (or starts again) and writes a new result.json")


def stage_ijb(cfg: ExperimentConfig, run_dir: str, result: dict, load_model, meta, progress: bool = False,
              log=print) -> dict:
    """A finished stage evaluated once on `data.ijb` (rank 0; the others wait): the numbers go into its
    result.json (`ijb`) and its W&B run (`ijb/<target>/...`). `load_model() -> (model, input_size)`."""
    if not needs_ijb(result, cfg.data.ijb):
        return result
    name = result["stage"]
    if is_main():
        model, input_size = load_model()
        log(f"{name}: {cfg.data.ijb.target} template verification ({len(meta.names):,} images, "
            f"{len(meta.pairs):,} pairs)")
        ijb = evaluate_ijb(model, input_size, cfg.data.ijb, meta, workers=cfg.data.num_workers, progress=progress,
                           model_name=name)
        result = {**result, "ijb": ijb}
        atomic_write_json(RunLayout(run_dir).stage(name).result, result)
        tracker = stage_tracker(cfg, run_dir, name, result.get("generation", 0), result.get("init_from"))
        tracker.log(ijb_scalars(ijb), int(result.get("steps") or 0))
        tracker.finish(None, None)
        log(f"{name}: {cfg.data.ijb.target} TAR@FAR=1e-4 {100 * ijb['tar_at_far']['0.0001']:.2f}%, "
            f"1e-5 {100 * ijb['tar_at_far']['1e-05']:.2f}%, AUC {ijb['auc']:.4f}")
    barrier()
    return from_rank0(result)


def _student_loader(path: str):
    def load():
        model, _ = load_student(path)
        return model.eval(), model_input_size(model)
    return load


def student_spec(cfg: ExperimentConfig, name: str, generation: int, alpha: float, init_from, head_from) -> StageSpec:
    return StageSpec(name=name, arch=cfg.student.arch, model_kwargs=cfg.student.model_kwargs(cfg.data.input_size),
                     train=cfg.train, alpha=alpha, generation=generation, init_from=init_from, head_from=head_from)


def prepare_teacher(cfg, run_dir, train_set, val, progress=True, log=print):
    """The frozen teacher: from its checkpoint, or trained as stage 0 when the YAML gives a recipe."""
    t = cfg.teacher
    spec = t.spec()
    if t.onnx is not None or (t.checkpoint and os.path.exists(t.checkpoint)):  # a file to load, not to train
        return teachers.build_teacher(spec)
    if t.train is None:
        what = f"teacher.checkpoint {t.checkpoint} does not exist" if t.checkpoint else "teacher.checkpoint is not set"
        raise ConfigError(f"{what}; give an existing checkpoint, or a teacher.train recipe to train the teacher first")
    if t.onnx is not None:
        raise ConfigError(f"teacher.train: an ONNX teacher ({t.onnx}) cannot be trained here; give arch: <model name>")
    stage = RunLayout(run_dir).teacher
    note_damaged_result(stage, log)
    if not stage.is_done():
        log(f"teacher: training {t.arch} ({t.model}) as stage 0")
        run_stage(cfg, StageSpec(TEACHER, t.arch, dict(t.model), t.train, alpha=0.0, generation=0), stage.dir,
                  train_set, val, progress=progress, log=log, tracker=stage_tracker(cfg, run_dir, TEACHER, 0, None))

    def export_backbone():  # a plain arcface_torch-style state dict of the trained teacher
        if not os.path.exists(stage.backbone):
            atomic_torch_save(safe_torch_load(stage.student)["state_dict"], stage.backbone)

    rank0_first(export_backbone)
    return teachers.build_teacher({**spec, "checkpoint": stage.backbone})


def _teacher_result(cfg, run_dir, teacher, val) -> dict:
    """Metrics of a loaded (not trained here) teacher, computed once and kept in teacher/result.json."""
    stage = RunLayout(run_dir).teacher
    if stage.is_done():
        return stage.read_result()
    os.makedirs(stage.dir, exist_ok=True)
    metrics = evaluate_sets(teacher, val, teacher.input_size, progress=False, model_name=TEACHER) if val else {}
    label, arch, kwargs = teacher_model(cfg)
    params, gflops = model_cost(arch, kwargs) if arch else (None, None)
    result = {"stage": TEACHER, "generation": 0, "init_from": cfg.teacher.checkpoint or cfg.teacher.onnx,
              "arch": label, "params": params, "gflops": gflops, "train_seconds": 0.0, "metrics": metrics}
    atomic_write_json(stage.result, result)
    tracker = stage_tracker(cfg, run_dir, TEACHER, 0, cfg.teacher.checkpoint)  # a W&B run for the teacher too
    tracker.log(val_scalars(metrics), 0)
    tracker.finish(result, None)
    return result


# ------------------------------------------------------------------------------------------- run

def plan_stages(cfg: ExperimentConfig, run_dir: str) -> list:
    alpha = cfg.distill.alpha if cfg.teacher is not None else 0.0
    run = RunLayout(run_dir)
    stages = []
    if cfg.baseline:
        stages.append(student_spec(cfg, BASELINE, 0, 0.0, cfg.student.init, None))
    for k in range(1, cfg.generations + 1):
        init = cfg.student.init if k == 1 else run.generation(k - 1).student
        head = run.generation(k - 1).last if (k > 1 and cfg.init_head_from_previous) else None
        stages.append(student_spec(cfg, generation_name(k), k, alpha, init, head))
    return stages


def _dependents(cfg: ExperimentConfig, name: str) -> list:
    """The stages that start from `name`'s outcome: a generation from the one before it, every generation
    from the teacher (its weights and cache); the baseline from nothing."""
    gens = [generation_name(k) for k in range(1, cfg.generations + 1)]
    if name == TEACHER:
        return gens
    return gens[gens.index(name) + 1:] if name in gens else []


def restart_stages(cfg: ExperimentConfig, run_dir: str, names, log=print) -> None:
    """`--restart-stage NAME`: move the stage's folder aside (to NAME.restarted-<time>, nothing deleted) so the
    stage trains again from its beginning. A finished stage that started from it must be restarted too."""
    names = list(dict.fromkeys(names or ()))
    planned = ([TEACHER] if cfg.teacher is not None else []) + ([BASELINE] if cfg.baseline else []) \
        + [generation_name(k) for k in range(1, cfg.generations + 1)]
    run = RunLayout(run_dir)
    for name in names:
        if name not in planned:
            raise ConfigError(f"--restart-stage {name}: this experiment's stages are {', '.join(planned)}"
                              f"{did_you_mean(name, planned)}")
        if name == TEACHER and cfg.teacher.train is None:
            raise ConfigError(f"--restart-stage teacher: the teacher is loaded from {cfg.teacher.checkpoint or cfg.teacher.onnx}, "
                              f"not trained in this run directory")
        stale = [d for d in _dependents(cfg, name) if d not in names and os.path.isdir(run.stage(d).dir)]
        if stale:
            raise ConfigError(f"--restart-stage {name}: {', '.join(stale)} started from {name}'s result; restart "
                              f"{'it' if len(stale) == 1 else 'them'} too (--restart-stage "
                              f"{' --restart-stage '.join(stale)}) or use another --out")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in names:
        stage = run.stage(name)
        if os.path.isdir(stage.dir):
            aside = f"{stage.dir}.restarted-{stamp}"
            os.replace(stage.dir, aside)
            log(f"{name}: restarting from its beginning; the previous folder is kept as {aside}")
        else:
            log(f"{name}: --restart-stage: nothing to move aside, the stage has not started")


def run_experiment(cfg: ExperimentConfig, run_dir: str | None = None, progress: bool = True, log=print,
                   restart=()) -> dict:
    """Every stage of the experiment in `run_dir`, holding the directory's lock (one writer at a time).
    `restart`: stage names to train again from their beginning (restart_stages)."""
    run_dir = run_dir or default_run_dir(cfg)
    with run_directory_lock(run_dir):
        return _run_locked(cfg, run_dir, progress, log, restart)


def _run_locked(cfg: ExperimentConfig, run_dir: str, progress: bool, log, restart=()) -> dict:
    run = RunLayout(run_dir)
    if not is_main():  # one voice: rank 0 reports for all
        log = lambda *_: None  # noqa: E731
    check_run_dir(cfg, run_dir)
    resolve_device(cfg.device)  # a GPU that is not there stops the run before any work
    if restart:  # rank 0 moves the folders; the other ranks wait for it
        rank0_first(lambda: restart_stages(cfg, run_dir, restart, log) if is_main() else None)
    os.makedirs(run_dir, exist_ok=True)
    if is_main():
        dump_config(cfg, run.experiment)
    train_set, val = open_data(cfg, log=log)
    log(f"{cfg.name}: {len(train_set)} training images of {train_set.num_classes} identities; "
        f"verification: {', '.join(f'{k} ({len(v[1])} pairs)' for k, v in val.items()) or 'none'}")
    problem = None
    if is_main():  # what the run will write against the free disk, before any work (rank 0 measures for all)
        try:
            check_disk(cfg, run_dir, len(train_set), train_set.num_classes)
        except DiskSpaceError as err:
            problem = str(err)
    problem = from_rank0(problem)
    if problem:
        raise DiskSpaceError(problem)

    ijb_meta = read_ijb_meta(cfg.data.ijb) if cfg.data.ijb is not None else None  # a wrong root fails here, first

    def with_ijb(result, load_model):
        if ijb_meta is None:
            return result
        return stage_ijb(cfg, run_dir, result, load_model, ijb_meta, progress, log)

    results, teacher, cache = [], None, None
    if cfg.teacher is not None:
        teacher = prepare_teacher(cfg, run_dir, train_set, val, progress, log)
        check_embedding_sizes(cfg, teacher.embedding_size)  # before the cache and any student
        results.append(with_ijb(rank0_first(lambda: _teacher_result(cfg, run_dir, teacher, val)),
                                lambda: (teacher, teacher.input_size)))
        if cfg.teacher.cache and cfg.distill.alpha > 0 and cfg.generations > 0:
            cache = build_run_cache(cfg, teacher, train_set, run_dir, progress, log)
    for spec in plan_stages(cfg, run_dir):
        stage = run.stage(spec.name)
        note_damaged_result(stage, log)
        if stage.is_done():
            log(f"{spec.name}: finished earlier, skipped")
            results.append(with_ijb(stage.read_result(), _student_loader(stage.student)))
            continue
        log(f"{spec.name}: training {spec.arch}" + (f" from {spec.init_from}" if spec.init_from else " from scratch")
            + (f", distilling with {cfg.distill.loss} (alpha {spec.alpha:g})" if spec.alpha else ", no distillation"))
        tracker = stage_tracker(cfg, run_dir, spec.name, spec.generation, spec.init_from)
        results.append(with_ijb(run_stage(cfg, spec, stage.dir, train_set, val, teacher=teacher, cache=cache,
                                          progress=progress, log=log, tracker=tracker),
                                _student_loader(stage.student)))
    if not is_main():
        return {"experiment": cfg.name, "stages": []}
    return write_summary(cfg, run_dir, results, log=log)


# ------------------------------------------------------------------------------------------ dry run

def dry_run(cfg: ExperimentConfig, log=print) -> None:
    """Validate files and shapes, then two steps of every stage on random stand-in data (nothing kept)."""
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
    teacher = None
    if cfg.teacher is not None:
        t = cfg.teacher
        if t.onnx is not None or (t.checkpoint and os.path.exists(t.checkpoint)):
            teacher = teachers.build_teacher(t.spec())  # strict load: checks architecture and shapes
        elif t.train is None:
            raise ConfigError(f"teacher.checkpoint {t.checkpoint} does not exist and there is no teacher.train recipe")
        else:
            spec = {k: v for k, v in t.spec().items() if k != "checkpoint"}
            teacher = teachers.build_teacher(spec)
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
            if cfg.teacher.onnx is None and not (cfg.teacher.checkpoint and os.path.exists(cfg.teacher.checkpoint)):
                # no checkpoint: the recipe's teacher stage trains two steps (the validation one is untrained);
                # not evaluated: the students' stages check the evaluation path, an IResNet-100's costs seconds
                teacher = prepare_teacher(small, tmp, data, {}, progress=False, log=lambda *_: None)
            log(f"dry run: teacher ok ({cfg.teacher.arch or cfg.teacher.onnx}, {teacher.embedding_size}-d at "
                f"{teacher.input_size}px)")
        for spec in plan_stages(small, tmp):
            if spec.init_from and not os.path.exists(spec.init_from) and spec.generation == 1:
                raise ConfigError(f"student.init: {spec.init_from} does not exist")
            run_stage(small, spec, os.path.join(tmp, spec.name), data, val, teacher=teacher, progress=False,
                      log=lambda *_: None)
            log(f"dry run: {spec.name} ok (2 steps, {spec.arch} at {cfg.data.input_size}px)")
    log("dry run passed: files exist, shapes agree, every stage trains")
