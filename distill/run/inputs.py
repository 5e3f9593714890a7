"""The run's inputs opened whole and checked before any work, the part `distill run`, `distill cache build` and
`distill run --dry-run` share, so a dry run's "passed" holds for the run: the training set and verification sets
as the run opens them (open_inputs: the whole .rec/.idx structure, every .bin decoded), then the checks against them
(check_before_work: disk, the teacher recorded in the run directory, the IJB meta, distill/run/preflight.py).
`distill doctor` makes the same checks one by one, each a line of its report (distill/run/doctor.py)."""

from __future__ import annotations

import os

from distill.eval.ijb_stage import read_meta
from distill.run.disk import DiskSpaceError, check_disk
from distill.run.preflight import preflight
from distill.utils.dist import from_rank0, is_main
from distill.utils.errors import ConfigError
from teachers.prepare import check_recorded_teacher


def open_inputs(cfg, notes: bool = True) -> tuple:
    """(training set, {set name: (images, issame)}) as `distill run` trains and evaluates on them, every file read
    whole: the .rec/.idx structure (distill/data/recordio.py: a truncated or cut train.rec is refused here, not
    at the record a step first reads), each verification .bin decoded. `notes`: issue the notes on them (a resized
    set, a property file that disagrees) as UserNote warnings, printed once by the command line."""
    from distill.data import load_verification_bin, open_training_set
    from distill.eval.verification import set_name_of, size_note

    if not os.path.exists(cfg.data.train):
        raise ConfigError(f"data.train: {cfg.data.train} does not exist (a RecordIO folder such as faces_emore/, "
                          f"a .rec file, or an identity-per-folder tree)")
    for path in cfg.data.val:
        if not os.path.exists(path):
            raise ConfigError(f"data.val: verification set {path} does not exist")
    train_set = open_training_set(cfg.data.train, flip=True, input_size=cfg.data.input_size)
    val = {set_name_of(p): load_verification_bin(p) for p in cfg.data.val}
    if notes:
        train_set.warn_notes()
        for name, (images, _) in val.items():
            size_note(f"verification set {name}", images, cfg.data.input_size)
    return train_set, val


def check_before_work(cfg, run_dir: str, train_set, record: bool = False) -> tuple:
    """What `distill run`, `cache build` and `run --dry-run` check once the data is open (open_inputs), in this
    order: the disk has room for what the run will write (rank 0 measures for all), a teacher stage or cache in
    `run_dir` was made by this teacher (its identity recorded there when `record` and none is), the IJB meta files
    read, then preflight's checks against the opened training set. `train_set` None (synthetic faces not generated
    yet): what needs it is left out. Returns (IJB meta or None, [notes to print])."""
    if train_set is not None:
        problem = None
        if is_main():
            try:
                check_disk(cfg, run_dir, len(train_set), train_set.num_classes)
            except DiskSpaceError as err:
                problem = str(err)
        problem = from_rank0(problem)
        if problem:
            raise DiskSpaceError(problem)
    notes = [check_recorded_teacher(cfg, run_dir, train_set, record=record)]
    ijb_meta = read_meta(cfg.data.ijb) if cfg.data.ijb is not None else None  # a wrong root fails here, first
    preflight(cfg, run_dir, train_set, ijb_meta)  # decode, embedding sizes, teacher.head, IJB images
    return ijb_meta, [note for note in notes if note]
