"""`distill doctor EXPERIMENT.yaml`: everything a long run depends on, checked in seconds before it starts.

Each check is a line `ok` / `note` / `FAIL` with what was found: versions (torch, CUDA, bf16, timm,
wandb, ONNX Runtime), the device, every data path (readable, image size against the config, identity
count; the IJB meta files and images of data.ijb), the teacher (loadable, its embedding size against the
student's and the terms' requirements), the bytes the run will write against the free disk
(distill/run/disk.py), the W&B mode that will be used, and the run directory (new, resumable with which stages
done, holding another experiment, or locked by a running process). It only reads: no dataset is generated, no
folder created, no lock taken. Any FAIL makes the exit status 1.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from importlib import metadata

import torch

from distill.utils.errors import DistillError

OK, NOTE, FAIL = "ok", "note", "FAIL"


@dataclass
class Check:
    status: str   # ok | note | FAIL
    what: str     # versions, device, data.train, data.val, teacher, disk, wandb, run directory
    detail: str


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def check_versions() -> list:
    cuda = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__} ({cuda})",
             f"timm {_version('timm')}", f"wandb {_version('wandb')}", f"onnxruntime {_version('onnxruntime')}",
             f"numpy {_version('numpy')}"]
    return [Check(OK, "versions", ", ".join(parts))]


def check_device(cfg) -> list:
    from distill.utils.device import amp_settings, resolve_device

    try:
        device = resolve_device(cfg.device)
    except DistillError as err:
        return [Check(FAIL, "device", str(err))]
    amp, _ = amp_settings(cfg.train, device)
    precision = f"autocast {str(amp).replace('torch.', '')}" if amp is not None else "float32 (no autocast)"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no"
        found = (f"{device} {props.name} ({props.total_memory / 2 ** 30:.0f} GiB), {torch.cuda.device_count()} "
                 f"CUDA device(s), bf16 supported: {bf16}")
    else:
        from distill.utils.device import cpu_has_bf16

        gpu = "no CUDA device" if not torch.cuda.is_available() else f"device: {cfg.device} chosen"
        found = f"cpu ({gpu}; native bf16: {'yes' if cpu_has_bf16() else 'no'})"
    from distill.utils.threads import loader_workers, plan_threads

    threads = plan_threads(loader_workers(cfg.data.num_workers, device.type), cfg.train.threads).describe()
    return [Check(OK, "device", f"{found}; training in {precision} (train.amp: {cfg.train.amp}); each stage "
                                f"plans its threads when it starts, now: {threads}")]


def _synthetic_counts(cfg) -> tuple:
    from distill.data.synthetic import synthetic_params

    p = synthetic_params(**dataclasses.asdict(cfg.data.synthetic))
    return p["ids"] * p["images_per_id"], p["ids"], p["size"]


def check_train(cfg) -> tuple:
    """(checks, (images, identities) or None)."""
    from distill.data import open_training_set

    path = cfg.data.train
    if cfg.data.synthetic is not None:
        from distill.data.synthetic import synthetic_is_current, synthetic_refusal

        params = dataclasses.asdict(cfg.data.synthetic)
        refusal = synthetic_refusal(path, params, replace=False)
        if refusal:
            return [Check(FAIL, "data.train", refusal)], None
        if not synthetic_is_current(path, **params):
            images, ids, size = _synthetic_counts(cfg)
            checks = [Check(NOTE, "data.train", f"{path}: synthetic faces generated on first use ({ids} identities x "
                                                f"{cfg.data.synthetic.images_per_id} images at {size}x{size})")]
            if size != cfg.data.input_size:
                checks.append(Check(NOTE, "data.train", f"images will be {size}x{size}, the model takes "
                                                        f"{cfg.data.input_size}x{cfg.data.input_size}: resized at "
                                                        f"load"))
            return checks, (images, ids)
    if not os.path.exists(path):
        return [Check(FAIL, "data.train", f"{path} does not exist (a RecordIO folder such as faces_emore/, a .rec "
                                          f"file, or an identity-per-folder tree)")], None
    try:
        train = open_training_set(path, flip=True, input_size=cfg.data.input_size)
        size = train.stored_size()
        checks = [Check(OK, "data.train", f"{path}: {len(train):,} images of {train.num_classes:,} identities"
                                          + (f", stored {size[0]}x{size[1]}" if size else ""))]
        checks += [Check(NOTE, "data.train", n) for n in train.notes()]
        if not len(train):
            checks.append(Check(FAIL, "data.train", f"{path} holds no images"))
        return checks, (len(train), train.num_classes)
    except (DistillError, OSError) as err:
        return [Check(FAIL, "data.train", str(err))], None


def check_val(cfg) -> list:
    from distill.data import load_verification_bin
    from distill.eval.verification import resize_note

    synthetic_dir = os.path.abspath(cfg.data.train) + os.sep if cfg.data.synthetic is not None else None
    checks = []
    for path in cfg.data.val:
        if not os.path.exists(path):
            if synthetic_dir and os.path.abspath(path).startswith(synthetic_dir):
                checks.append(Check(NOTE, "data.val", f"{path}: written with the synthetic faces on first use"))
            else:
                checks.append(Check(FAIL, "data.val", f"verification set {path} does not exist"))
            continue
        try:
            images, issame = load_verification_bin(path)
        except (DistillError, OSError) as err:
            checks.append(Check(FAIL, "data.val", str(err)))
            continue
        h, w = images[0].shape[:2] if len(images) else (0, 0)
        checks.append(Check(OK, "data.val", f"{path}: {len(issame):,} pairs ({int(issame.sum()):,} same), "
                                            f"images {h}x{w}"))
        note = resize_note(path, images, cfg.data.input_size)  # the note distill run and eval give
        if note:
            checks.append(Check(NOTE, "data.val", note))
    if not cfg.data.val:
        checks.append(Check(NOTE, "data.val", "no verification sets: stages are trained but not evaluated"))
    return checks


def check_ijb(cfg) -> list:
    if cfg.data.ijb is None:
        return []
    from distill.data.ijb import missing_images
    from distill.eval.ijb_stage import read_meta

    try:
        meta = read_meta(cfg.data.ijb)
    except (DistillError, OSError) as err:
        return [Check(FAIL, "data.ijb", str(err))]
    missing = missing_images(meta)
    found = (f"{cfg.data.ijb.root}: {cfg.data.ijb.target}, {len(meta.names):,} images, {len(meta.pairs):,} template "
             f"pairs; evaluated after each stage")
    if missing.any():
        first = meta.names[int(missing.argmax())]
        return [Check(FAIL, "data.ijb", f"{found}; {int(missing.sum()):,} images are missing (first: {first})")]
    return [Check(OK, "data.ijb", found)]


def check_teacher(cfg, run_dir: str, identities: int | None = None) -> list:
    """The teacher: built as the run would, its embedding size against the terms', teacher.head (against the
    training set's `identities` when known) and the identity a teacher stage or cache in `run_dir` records."""
    import teachers
    from distill.run.preflight import embedding_size_problem
    from distill.utils.layout import RunLayout
    from teachers.prepare import check_recorded_teacher, teacher_source, teacher_spec

    t = cfg.teacher
    if t is None:
        return [Check(OK, "teacher", "none: every stage trains without distillation")]
    done = RunLayout(run_dir).teacher
    try:
        source = teacher_source(cfg)
        if not source.trained_here:
            spec, how = t.spec(), f"loaded from {source.file}"
        elif done.is_done() and os.path.exists(done.backbone):
            spec, how = teacher_spec(cfg, run_dir), f"trained earlier in this run directory ({done.backbone})"
        else:
            spec = {k: v for k, v in t.spec().items() if k != "checkpoint"}
            epochs = f"{t.train.epochs:g} epoch{'' if t.train.epochs == 1 else 's'}"
            how = f"trained here as stage 0 ({epochs}) before the students"
        teacher = teachers.build_teacher(spec)
    except (DistillError, OSError) as err:
        return [Check(FAIL, "teacher", str(err))] + _check_centres(cfg, run_dir, t.embedding_size, identities)
    name = t.arch or os.path.basename(t.onnx)
    checks = [Check(OK, "teacher", f"{name}, {teacher.embedding_size}-d embeddings at {teacher.input_size}px, {how}")]
    problem = embedding_size_problem(cfg, teacher.embedding_size)
    if problem:
        checks.append(Check(FAIL, "teacher", problem))
    checks += _check_centres(cfg, run_dir, teacher.embedding_size, identities)
    notes = []
    try:  # a teacher stage or cache of another teacher: refused by distill run before any work
        notes += filter(None, [check_recorded_teacher(cfg, run_dir, record=False)])
    except DistillError as err:
        checks.append(Check(FAIL, "teacher", str(err)))
    return checks + [Check(NOTE, "teacher", n.removeprefix("teacher: note: ")) for n in notes]


def _check_centres(cfg, run_dir: str, embedding_size: int, identities: int | None) -> list:
    """teacher.head for the terms that need the teacher's class centres: what they will use, or why not: the
    checks `distill run` makes (preflight's, left out of diagnose: the file is read once), its rows against the
    training set's `identities` included."""
    from distill.run.preflight import centres_source
    from teachers.head_file import load_centres

    try:
        source = centres_source(cfg, run_dir)
        if source is None:
            return []
        if not cfg.teacher.head:
            return [Check(OK, "teacher.head", f"the class centres of the teacher trained here ({source})")]
        centres = load_centres(source, identities, embedding_size)
    except (DistillError, OSError) as err:
        return [Check(FAIL, "teacher.head", str(err))]
    return [Check(OK, "teacher.head", f"{source}: class centres of {centres.shape[0]:,} identities, "
                                      f"{centres.shape[1]}-d")]


def check_disk(cfg, run_dir: str, counts) -> list:
    from distill.run.disk import describe, estimate, human

    if counts is None:
        return [Check(NOTE, "disk", "not estimated: the training set could not be read")]
    try:
        est = estimate(cfg, run_dir, *counts)
    except (DistillError, OSError) as err:
        return [Check(FAIL, "disk", str(err))]
    status = OK if est["needed"] <= est["free"] else FAIL
    return [Check(status, "disk", f"the run will write {describe(est)}; {est['path']} has {human(est['free'])} free")]


def check_wandb(cfg) -> list:
    from distill.train.tracking import resolve_mode

    try:
        mode = resolve_mode(cfg.tracking.wandb)
    except DistillError as err:
        return [Check(FAIL, "wandb", str(err))]
    why = {"online": "credentials found: runs go to W&B as they train",
           "offline": "no upload: runs are kept under the run directory's wandb/ (`wandb sync` uploads them later)",
           "disabled": "no W&B at all; metrics.jsonl keeps the local log"}[mode]
    source = "WANDB_MODE" if os.environ.get("WANDB_MODE") else f"tracking.wandb: {cfg.tracking.wandb}"
    return [Check(OK, "wandb", f"{mode} ({source}); {why}")]


def check_run_dir(cfg, run_dir: str) -> list:
    from distill.run.lock import lock_holder
    from distill.run.rundir import check_run_dir as same_experiment
    from distill.utils.layout import RunLayout

    holder = lock_holder(run_dir)
    if holder:
        return [Check(FAIL, "run directory", f"another distill run (pid {holder.get('pid')}, host "
                                             f"{holder.get('host')}) is using {run_dir}; wait for it, or give "
                                             f"another --out")]
    run = RunLayout(run_dir)
    if not run.is_run_dir():
        parent = run_dir
        while not os.path.exists(parent):
            parent = os.path.dirname(os.path.abspath(parent))
        if not os.access(parent, os.W_OK):
            return [Check(FAIL, "run directory", f"{parent} is not writable; give another --out")]
        return [Check(OK, "run directory", f"{run_dir}: new, free")]
    try:
        same_experiment(cfg, run_dir)
    except DistillError as err:
        return [Check(FAIL, "run directory", str(err))]
    done = [n for n in run.stage_names() if run.stage(n).is_done()]
    started = [n for n in run.stage_names() if n not in done]
    finished = ", ".join(done) or "none"
    return [Check(OK, "run directory", f"{run_dir}: free; resumes this experiment (finished: {finished}"
                                       + (f"; unfinished: {', '.join(started)}" if started else "") + ")")]


def diagnose(cfg, run_dir: str) -> list:
    checks = check_versions() + check_device(cfg)
    train_checks, counts = check_train(cfg)
    checks += train_checks + check_val(cfg) + check_ijb(cfg) + check_teacher(cfg, run_dir, counts and counts[1]) \
        + check_disk(cfg, run_dir, counts)
    from distill.run.preflight import preflight_problems
    failed = {c.detail for c in checks if c.status == FAIL}  # the checks `distill run` makes before any work
    # (teacher.head and the IJB images: check_teacher and check_ijb read those files already)
    for key, err in preflight_problems(cfg, run_dir, skip=("teacher.head", "data.ijb")):
        if str(err) not in failed:
            failed.add(str(err))
            checks.append(Check(FAIL, key, str(err)))
    return checks + check_wandb(cfg) + check_run_dir(cfg, run_dir)


def format_report(checks: list, title: str) -> str:
    width = max(len(c.what) for c in checks)
    lines = [title] + [f"  {c.status:<4}  {c.what:<{width}}  {c.detail}" for c in checks]
    failed = [c for c in checks if c.status == FAIL]
    lines.append(f"{len(failed)} problem{'s' if len(failed) != 1 else ''} would stop this run" if failed
                 else "ready: nothing found that would stop this run")
    return "\n".join(lines)


def main_report(cfg, run_dir: str, config_path: str) -> tuple[str, int]:
    checks = diagnose(cfg, run_dir)
    report = format_report(checks, f"distill doctor: {config_path} (experiment {cfg.name}, run directory {run_dir})")
    return report, int(any(c.status == FAIL for c in checks))
