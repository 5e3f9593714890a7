"""The experiment driver: teacher -> baseline -> gen1 .. genN, each stage in its own directory.

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

import contextlib
import dataclasses
import os
import shutil

from distill.config.schema import ExperimentConfig, dump_config
from distill.eval.far import SUMMARY_IJB_FARS, far_key
from distill.eval.ijb_stage import evaluate_ijb, ijb_scalars, needs_ijb
from distill.eval.ijb_stage import read_meta as read_ijb_meta
from distill.eval.verification import evaluate_sets, set_name_of, size_note
from distill.losses.terms import describe_terms, stage_terms
from distill.models.cost import model_cost
from distill.models.files import load_student, model_input_size
from distill.run.disk import DiskSpaceError, check_disk
from distill.run.lock import run_directory_lock
from distill.run.preflight import centres_source, check_embedding_sizes, embedding_size_problem, preflight  # noqa: F401
from distill.run.rundir import check_run_dir, default_run_dir, restart_stages
from distill.run.shared_teacher import cached_metrics, held, ijb_files, keep_metrics, shared_folder
from distill.run.summary import teacher_model, write_summary
from distill.train.engine import StageSpec, run_stage
from distill.train.tracking import stage_tracker, val_scalars
from distill.utils.atomic import atomic_write_json
from distill.utils.device import amp_settings, resolve_device
from distill.utils.dist import barrier, from_rank0, is_main, rank0_first
from distill.utils.errors import ConfigError, DistillError
from distill.utils.layout import BASELINE, TEACHER, RunLayout, generation_name
from distill.utils.threads import apply_threads, loader_workers, plan_threads
from teachers.cache_key import cache_key
from teachers.prepare import (
    IDENTITY_KEY,
    check_recorded_teacher,
    file_sha256,
    needs_cache,
    prepare_cache,
    prepare_teacher,
    teacher_identity,
    teacher_source,
)

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


def stage_ijb(cfg: ExperimentConfig, run_dir: str, result: dict, load_model, meta, progress: bool = False,
              log=print, shared: str | None = None) -> dict:
    """A finished stage evaluated once on `data.ijb` (rank 0; the others wait): the numbers go into its
    result.json (`ijb`) and its W&B run (`ijb/<target>/...`). `load_model() -> (model, input_size)`.
    `shared`: the teacher's teacher.shared_cache folder, where an earlier run may have kept its IJB result."""
    if not needs_ijb(result, cfg.data.ijb):
        return result
    name = result["stage"]
    if is_main():
        files = ijb_files(cfg.data.ijb) if shared else {}
        ijb = (cached_metrics(shared, files) or {}).get("ijb") if shared else None
        if ijb is None:
            model, input_size = load_model()
            log(f"{name}: {cfg.data.ijb.target} template verification ({len(meta.names):,} images, "
                f"{len(meta.pairs):,} pairs)")
            ijb = evaluate_ijb(model, input_size, cfg.data.ijb, meta, progress=progress,
                               workers=loader_workers(cfg.data.num_workers, resolve_device(cfg.device).type),
                               model_name=name)
            if shared:
                with held(shared):
                    keep_metrics(shared, files, {"ijb": ijb})
        result = {**result, "ijb": ijb}
        atomic_write_json(RunLayout(run_dir).stage(name).result, result)
        tracker = stage_tracker(cfg, run_dir, name, result.get("generation", 0), result.get("init_from"))
        tracker.log(ijb_scalars(ijb), int(result.get("steps") or 0))
        tracker.finish(None, None)
        tars = ", ".join(f"TAR@FAR={far_key(f)} {100 * ijb['tar_at_far'][far_key(f)]:.2f}%" for f in SUMMARY_IJB_FARS)
        log(f"{name}: {cfg.data.ijb.target} {tars}, AUC {ijb['auc']:.4f}")
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


def _teacher_result(cfg, run_dir, teacher, val, train_set, folder: str | None) -> dict:
    """Metrics of a loaded (not trained here) teacher, computed once and kept in teacher/result.json with the
    teacher's identity. `folder`: its teacher.shared_cache subfolder (_shared), where an earlier run may have kept
    them."""
    stage = RunLayout(run_dir).teacher
    if stage.is_done():
        return stage.read_result()
    os.makedirs(stage.dir, exist_ok=True)
    files = {set_name_of(p): file_sha256(p) for p in cfg.data.val}
    metrics = cached_metrics(folder, files) if folder else None  # teacher.shared_cache: evaluated by an earlier run
    if metrics is None:
        metrics = evaluate_sets(teacher, val, teacher.input_size, progress=False, model_name=TEACHER) if val else {}
        if folder:
            with held(folder):
                keep_metrics(folder, files, metrics)
    label, arch, kwargs = teacher_model(cfg)
    params, gflops = model_cost(arch, kwargs) if arch else (None, None)
    result = {"stage": TEACHER, "generation": 0, "init_from": cfg.teacher.checkpoint or cfg.teacher.onnx,
              "arch": label, "params": params, "gflops": gflops, "train_seconds": 0.0, "metrics": metrics,
              IDENTITY_KEY: teacher_identity(cfg, train_set)}
    atomic_write_json(stage.result, result)
    tracker = stage_tracker(cfg, run_dir, TEACHER, 0, cfg.teacher.checkpoint)  # a W&B run for the teacher too
    tracker.log(val_scalars(metrics), 0)
    tracker.finish(result, None)
    return result


# ------------------------------------------------------------------------------------------- run

def plan_stages(cfg: ExperimentConfig, run_dir: str) -> list:
    alpha = cfg.distill.weight if cfg.teacher is not None else 0.0
    run = RunLayout(run_dir)
    stages = []
    if cfg.baseline:
        stages.append(student_spec(cfg, BASELINE, 0, 0.0, cfg.student.init, None))
    for k in range(1, cfg.generations + 1):
        init = cfg.student.init if k == 1 else run.generation(k - 1).student
        head = run.generation(k - 1).last if (k > 1 and cfg.init_head_from_previous) else None
        previous = cfg.recursive.teacher == "previous" and k > 1 and alpha > 0
        centres = centres_source(cfg, run_dir)
        stages.append(dataclasses.replace(
            student_spec(cfg, generation_name(k), k, alpha, init, head),
            centres=run.generation(k - 1).last if previous and centres else centres,
            record={TEACHER_STAGE: generation_name(k - 1)} if previous else {}))
    return stages


TEACHER_STAGE = "teacher_stage"  # result.json: the stage whose student taught this one (recursive.teacher: previous)


def previous_student(cfg: ExperimentConfig, run_dir: str, spec: StageSpec):
    """The frozen teacher of a generation under recursive.teacher: previous: the student.pt of its teacher stage."""
    import teachers

    path = RunLayout(run_dir).stage(spec.record[TEACHER_STAGE]).student
    return teachers.build_teacher({"arch": cfg.student.arch, "checkpoint": path,
                                   **cfg.student.model_kwargs(cfg.data.input_size)})


def teacher_trainer(cfg: ExperimentConfig, run_dir: str, train_set, val, progress: bool, log):
    """How the teacher stage (stage 0) trains, for teachers.prepare.prepare_teacher: with the engine, recording
    the teacher's identity in its result.json."""
    def train(stage, identity):
        t = cfg.teacher
        spec = StageSpec(TEACHER, t.arch, dict(t.model), t.train, alpha=0.0, generation=0,
                         record={IDENTITY_KEY: identity})
        run_stage(cfg, spec, stage.dir, train_set, val, progress=progress, log=log,
                  tracker=stage_tracker(cfg, run_dir, TEACHER, 0, None))
    return train


def _before_the_lock(cfg: ExperimentConfig) -> None:
    """What the config and the machine alone refuse, before the run directory is created or locked: a GPU that is
    not there, a teacher checkpoint that is not there (and no recipe to train one)."""
    resolve_device(cfg.device)
    if cfg.teacher is not None:
        teacher_source(cfg)


def _before_any_work(cfg: ExperimentConfig, run_dir: str, restart, log):
    """What `distill run` and `distill cache build` check and prepare before any training, after _before_the_lock
    (device, teacher file): the run directory holds this experiment (and its teacher), the data opens, the disk
    has room, the IJB meta files read, the preflight checks pass; then experiment.yaml is written. Returns
    (training set, verification sets, IJB meta)."""
    check_run_dir(cfg, run_dir, restart)
    if restart:  # rank 0 moves the folders; the other ranks wait for it
        rank0_first(lambda: restart_stages(cfg, run_dir, restart, log) if is_main() else None)
    os.makedirs(run_dir, exist_ok=True)
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
    check_recorded_teacher(cfg, run_dir, train_set, log=log, record=is_main())
    _note_identity_groups(cfg, train_set, log)
    ijb_meta = read_ijb_meta(cfg.data.ijb) if cfg.data.ijb is not None else None  # a wrong root fails here, first
    preflight(cfg, run_dir, train_set, ijb_meta)  # decode, embedding sizes, teacher.head, IJB images
    if is_main():
        dump_config(cfg, RunLayout(run_dir).experiment)
    return train_set, val, ijb_meta


def _note_identity_groups(cfg: ExperimentConfig, train_set, log) -> None:
    """One note when data.images_per_id (K) is more than any identity has: no batch group then holds K images of
    one identity (each is a run of several identities' leftovers, distill/train/epoch_plan.py)."""
    k = cfg.data.images_per_id
    if not k or not is_main():
        return
    import numpy as np

    most = int(np.bincount(np.unique(np.asarray(train_set.labels()), return_inverse=True)[1].reshape(-1)).max())
    if most < k:
        log(f"note: data.images_per_id is {k}, but no identity of {cfg.data.train} has more than {most} images: no "
            f"batch group holds {k} images of one identity (groups mix identities); set data.images_per_id <= {most}")


def _cache(cfg: ExperimentConfig, teacher, train_set, run_dir: str, progress: bool, log, directory=None,
           folder: str | None = None):
    """The teacher cache on the run's device, under train.amp's autocast for the teacher's model (an online
    teacher runs under the same, so both give the students the same targets: bf16 on CUDA; on a bf16 CPU for an
    IResNet), with the thread policy's threads and workers. In `directory`, else in `folder` (the teacher's
    teacher.shared_cache subfolder, _shared), else in the run directory."""
    device = resolve_device(cfg.device)
    plan = apply_threads(plan_threads(loader_workers(cfg.data.num_workers, device.type), cfg.train.threads))
    if is_main():
        log(f"teacher cache: {plan.describe()}")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=plan.workers))
    amp_dtype = amp_settings(cfg.train, device, teacher)[0]
    if directory is not None or folder is None:
        return prepare_cache(cfg, teacher, train_set, run_dir, device, amp_dtype, progress, log, directory=directory)
    if is_main():
        log(f"teacher cache: shared, in {folder}")
    with held(folder) if is_main() else contextlib.nullcontext():  # rank 0 for a torchrun job (build_cache syncs)
        return prepare_cache(cfg, teacher, train_set, run_dir, device, amp_dtype, progress, log, directory=folder)


def _shared(cfg: ExperimentConfig, teacher, train_set) -> str | None:
    """teacher.shared_cache's subfolder for this teacher, data and autocast (distill/run/shared_teacher.py)."""
    if cfg.teacher is None or not cfg.teacher.shared_cache:
        return None
    amp_dtype = amp_settings(cfg.train, resolve_device(cfg.device), teacher)[0]
    return shared_folder(cfg.teacher.shared_cache, cache_key(teacher, train_set, amp_dtype))


def build_teacher_cache(cfg: ExperimentConfig, run_dir: str, progress: bool = False, log=print):
    """`distill cache build`: the teacher (trained as stage 0 when the experiment says so) and its cache, with
    every check `distill run` makes and its experiment.yaml, holding the run directory's lock."""
    if not is_main():
        log = lambda *_: None  # noqa: E731
    _before_the_lock(cfg)
    with _left_as_found(run_dir), run_directory_lock(run_dir):
        train_set, val, _ = _before_any_work(cfg, run_dir, (), log)
        teacher = prepare_teacher(cfg, run_dir, train_set, teacher_trainer(cfg, run_dir, train_set, val, progress,
                                                                            log), log=log)
        check_embedding_sizes(cfg, teacher.embedding_size)
        return _cache(cfg, teacher, train_set, run_dir, progress, log, folder=_shared(cfg, teacher, train_set))


def run_experiment(cfg: ExperimentConfig, run_dir: str | None = None, progress: bool = True, log=print,
                   restart=()) -> dict:
    """Every stage of the experiment in `run_dir`, holding the directory's lock (one writer at a time).
    `restart`: stage names to train again from their beginning (restart_stages)."""
    run_dir = run_dir or default_run_dir(cfg)
    _before_the_lock(cfg)
    with _left_as_found(run_dir), run_directory_lock(run_dir):
        return _run_locked(cfg, run_dir, progress, log, restart)


@contextlib.contextmanager
def _left_as_found(run_dir: str):
    """A run refused before it wrote anything leaves no run directory behind: a folder this call created that holds
    only its lock file when a DistillError ends the run is removed again (on rank 0)."""
    new = not os.path.exists(run_dir)
    try:
        yield
    except DistillError:
        left = os.listdir(run_dir) if os.path.isdir(run_dir) else []
        if new and is_main() and set(left) <= {".lock"}:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _run_locked(cfg: ExperimentConfig, run_dir: str, progress: bool, log, restart=()) -> dict:
    run = RunLayout(run_dir)
    if not is_main():  # one voice: rank 0 reports for all
        log = lambda *_: None  # noqa: E731
    train_set, val, ijb_meta = _before_any_work(cfg, run_dir, restart, log)

    def with_ijb(result, load_model, shared=None):
        if ijb_meta is None:
            return result
        return stage_ijb(cfg, run_dir, result, load_model, ijb_meta, progress, log, shared)

    results, teacher, cache = [], None, None
    if cfg.teacher is not None:
        teacher = prepare_teacher(cfg, run_dir, train_set, teacher_trainer(cfg, run_dir, train_set, val, progress,
                                                                            log), log=log)
        check_embedding_sizes(cfg, teacher.embedding_size)  # before the cache and any student
        folder = _shared(cfg, teacher, train_set)  # hashes the weights and the data: once
        results.append(with_ijb(rank0_first(lambda: _teacher_result(cfg, run_dir, teacher, val, train_set, folder)),
                                lambda: (teacher, teacher.input_size), folder))
        if needs_cache(cfg):
            cache = _cache(cfg, teacher, train_set, run_dir, progress, log, folder=folder)
    for spec in plan_stages(cfg, run_dir):
        stage = run.stage(spec.name)
        note = stage.damaged_note()
        if note:
            log(note)
        if stage.is_done():
            log(f"{spec.name}: finished earlier, skipped")
            results.append(with_ijb(stage.read_result(), _student_loader(stage.student)))
            continue
        log(f"{spec.name}: training {spec.arch}" + (f" from {spec.init_from}" if spec.init_from else " from scratch")
            + (f", distilling with {describe_terms(stage_terms(cfg.distill, spec.alpha))}" if spec.alpha
               else ", no distillation"))
        tracker = stage_tracker(cfg, run_dir, spec.name, spec.generation, spec.init_from)
        stage_teacher, stage_cache = teacher, cache
        if spec.record.get(TEACHER_STAGE):  # recursive.teacher: previous: the previous generation's student
            stage_teacher = previous_student(cfg, run_dir, spec)
            stage_cache = _cache(cfg, stage_teacher, train_set, run_dir, progress, log, run.stage(
                spec.record[TEACHER_STAGE]).teacher_cache_as_teacher) if cache is not None else None
        results.append(with_ijb(run_stage(cfg, spec, stage.dir, train_set, val, teacher=stage_teacher,
                                          cache=stage_cache, progress=progress, log=log, tracker=tracker),
                                _student_loader(stage.student)))
    if not is_main():
        return {"experiment": cfg.name, "stages": []}
    return write_summary(cfg, run_dir, results, log=log)
