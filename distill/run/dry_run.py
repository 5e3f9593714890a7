"""`distill run --dry-run`: the checks `distill run` makes before its work, on the same files (distill/run/
inputs.py: the whole .rec/.idx and .bin files, teacher.head against the real training set, the IJB meta, the disk,
the run directory), the run plan printed (distill/run/plan.py: the stages `distill run` would execute, with their
hooks), then two steps of every stage of the same plan (the teacher stage too when it is trained here) on random
stand-in data at the configured model sizes, in a temporary directory that is removed afterwards, whatever fails.
The teacher is decided as a real run decides it (teachers/prepare.py). The stand-in data is used for those steps
only: its few identities are not the training set's, so the stages get teacher.head's centres cut to their count
(the real file was checked against the real set before).

Under torchrun every rank trains every stage, as in a real run: on stand-in data enough for one step at the world
size, in one temporary directory rank 0 makes and shares (the stages read what rank 0 wrote: the teacher's and the
previous generation's student.pt), removed by rank 0 once every rank is done, or by any rank that fails (SIGTERM,
which torchrun sends the others then, included); rank 0 prints the lines. A folder a killed dry run could not
remove (SIGKILL) is removed by the next dry run on the same machine."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import os
import shutil
import signal
import socket
import tempfile

import torch

import teachers
from distill.config.schema import ExperimentConfig, config_from_dict, to_dict
from distill.data.standin import standin_for_step, standin_pairs
from distill.run.context import run_context, run_logger, silent_logger
from distill.run.inputs import check_before_work, open_inputs
from distill.run.plan import LOAD_TEACHER, STUDENT, TRAIN_TEACHER, describe_plan, plan_run
from distill.run.preflight import centres_source, check_embedding_sizes
from distill.run.rundir import check_run_dir, default_run_dir
from distill.run.teacher_stage import train_teacher
from distill.train.engine import run_stage
from distill.utils.dist import barrier, from_rank0, is_main, rank, rank0_first, world_size
from distill.utils.errors import ConfigError, DistillError
from teachers.head_file import load_centres
from teachers.prepare import load_teacher, teacher_source

PREFIX = "distill-dry-run-"  # the temporary folders' names
OWNER = "owner"  # in each: "<machine> <pid>" of the rank 0 that made it (_machine)


def dry_run(cfg: ExperimentConfig, run_dir: str | None = None, logger=None) -> None:
    """The checks `distill run` makes before its work in `run_dir` (default: the experiment's runs/<name>), on the
    same files; the run plan printed; then two steps of every stage on random stand-in data (nothing kept).
    `logger`: where the lines go (default: standard output; none on ranks other than 0)."""
    log = (logger or run_logger()) if is_main() else silent_logger()
    run_dir = run_dir or default_run_dir(cfg)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"--out {run_dir}: is a file, not a folder; give the run directory (new or existing)")
    check_run_dir(cfg, run_dir)  # it holds this experiment, or nothing yet
    train_set, _ = _open_data(cfg)
    ijb_meta, notes = check_before_work(cfg, run_dir, train_set)
    for note in notes:
        log.info(note)
    if train_set is not None:
        log.info(f"dry run: {cfg.data.train} ok ({len(train_set):,} images of {train_set.num_classes:,} identities, "
                 f"read whole)")
    if ijb_meta is not None:
        log.info(f"dry run: {cfg.data.ijb.target} ok ({len(ijb_meta.names):,} images, {len(ijb_meta.pairs):,} "
                 f"template pairs; evaluated after each stage)")
    teacher, source = None, teacher_source(cfg)
    if source is not None:
        if source.trained_here:  # the architecture at its configured sizes (trained below, two steps)
            teacher = teachers.build_teacher({k: v for k, v in cfg.teacher.spec().items() if k != "checkpoint"})
        else:
            teacher = load_teacher(cfg, "")  # strict load: checks architecture and shapes
        check_embedding_sizes(cfg, teacher.embedding_size)
    log.info(f"dry run: the plan of {run_dir}:\n" + "\n".join(
        "  " + line for line in describe_plan(cfg, plan_run(cfg, run_dir))))
    data = standin_for_step(min(cfg.train.batch_size, 4), world_size(), per_class=2, size=cfg.data.input_size)
    val = {"standin": standin_pairs(pairs=10, size=cfg.data.input_size)}
    with _sigterm_raises():
        tmp = _shared_temporary_folder(log)
        try:
            small = _small_config(cfg, tmp, data.num_classes)
            _train_stages(cfg, small, source, teacher, tmp, data, val, log)
            barrier()  # every rank is done with the folder
        except BaseException:
            # whichever rank fails removes the folder: the others fail too (torchrun stops them), none needs it
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("dry run passed: the checks of `distill run` pass, every stage trains")


def _open_data(cfg: ExperimentConfig) -> tuple:
    """The training and verification sets `distill run` would open, opened and checked whole (open_inputs);
    (None, {}) for synthetic faces not generated yet (the run generates them first: nothing to read now, and a dry
    run writes nothing), after the checks the run makes before generating them."""
    if cfg.data.synthetic is not None:
        from distill.data.synthetic import synthetic_is_current, synthetic_refusal

        params = dataclasses.asdict(cfg.data.synthetic)
        refusal = synthetic_refusal(cfg.data.train, params, replace=False)
        if refusal:
            raise ConfigError(refusal)
        if not synthetic_is_current(cfg.data.train, **params):
            synthetic_dir = os.path.abspath(cfg.data.train) + os.sep
            for path in cfg.data.val:  # the sets the generator writes are not there before the first run
                if not os.path.exists(path) and not os.path.abspath(path).startswith(synthetic_dir):
                    raise ConfigError(f"data.val: verification set {path} does not exist")
            return None, {}
    return open_inputs(cfg, notes=is_main())


def _small_config(cfg: ExperimentConfig, tmp: str, classes: int) -> ExperimentConfig:
    """`cfg` for two steps of every stage on the stand-in data of `classes` identities: batches of 4 at most, no
    evaluation, no teacher cache; teacher.head (checked against data.train already) cut or repeated to `classes`
    rows in `tmp`, so that the stages' centres fit the stand-in identities."""
    small = copy.deepcopy(cfg)
    small.train = dataclasses.replace(cfg.train, batch_size=min(cfg.train.batch_size, 4), max_steps=2,
                                      eval_every=0, checkpoint_every=2, accumulate=1)
    # P×K batches (data.images_per_id) run as groups of 2: the stand-in data holds 2 images per identity
    small.data = dataclasses.replace(cfg.data, num_workers=0, images_per_id=cfg.data.images_per_id and 2)
    small.teacher = dataclasses.replace(cfg.teacher, cache=False, checkpoint=None) if cfg.teacher else None
    if small.teacher is not None and small.teacher.train is not None:
        small.teacher.train = small.train
    if small.teacher is not None and small.teacher.head:  # (not read when no term needs the centres)
        small.teacher.head = _standin_head(cfg.teacher.head, tmp, classes) if centres_source(cfg, tmp) else None
    return config_from_dict(to_dict(small))


def _standin_head(head: str, tmp: str, classes: int) -> str:
    """A file in `tmp` of the centres in `head` cut (or repeated) to `classes` rows, written by rank 0."""
    path = os.path.join(tmp, "standin_head.pt")

    def write() -> None:
        if is_main():
            centres = load_centres(head, None)
            torch.save(centres[torch.arange(classes) % len(centres)].clone(), path)

    rank0_first(write)
    return path


def _shared_temporary_folder(log) -> str:
    """A new temporary folder made by rank 0, its path given to every rank (the system's temporary folder, or
    TMPDIR's; across nodes TMPDIR must be a folder every node sees). Rank 0 first removes what killed dry runs
    of this machine left there."""
    tmp = None
    if is_main():
        for note in _remove_left_behind():
            log.info(note)
        tmp = tempfile.mkdtemp(prefix=PREFIX)
        with open(os.path.join(tmp, OWNER), "w") as f:
            f.write(f"{_machine()} {os.getpid()}")
    try:
        tmp = from_rank0(tmp)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.isdir(tmp):
        raise DistillError(f"dry run: rank {rank()} does not see rank 0's temporary folder {tmp} (another node?); "
                           f"set TMPDIR to a folder every node shares")
    return tmp


def _remove_left_behind() -> list:
    """Remove the temporary folders of dry runs of this machine whose process is gone (killed with SIGKILL, as the
    kernel does when memory runs out: no code ran to remove them); a note for each."""
    machine, notes = _machine(), []
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")):
        try:
            with open(os.path.join(folder, OWNER)) as f:
                owner, pid = f.read().split()
            pid = int(pid)
        except (OSError, ValueError):
            continue  # not ours to judge: written by another version, or being made right now
        if owner == machine and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            notes.append(f"dry run: note: removed {folder}, left by a dry run (pid {pid}) that was killed")
    return notes


def _machine() -> str:
    """This host and its process-id namespace: a pid means the same process only within both (containers that
    share a host name and a temporary folder have namespaces of their own)."""
    try:
        space = os.readlink("/proc/self/ns/pid").replace(":[", "-").rstrip("]")  # pid:[4026531836]
    except OSError:
        space = "-"
    return f"{socket.gethostname()}/{space}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM (torchrun's to the other ranks when one fails) ends this process with its usual exit status 143
    through SystemExit, so that the temporary folder is removed on the way; in a stage it stops the stage at its
    next step (distill/train/setup.py: preemption_signals). Left as it is outside the main thread."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
