"""A run's teacher, decided in one place: where it comes from, what identifies it, and its embedding cache.

Every command that needs an experiment's teacher asks here: `distill run`, `distill cache build`,
`distill run --dry-run`, `distill doctor`, the disk estimate, `distill sweep` (which points may share a
trained teacher) and `distill compare --export` (what the teacher row exports).

Where it comes from (`teacher_source`):
    onnx        teacher.onnx: an insightface ONNX file, loaded
    checkpoint  teacher.checkpoint names an existing file: the arch's weights, loaded
    train       otherwise teacher.train: trained in the run directory as stage 0 (teacher/; distill/run/ plans
                and trains it like every stage), then loaded from its backbone.pth (`load_teacher`); neither
                file nor recipe is a ConfigError

Its identity (`teacher_identity`) is a flat {config key: value} of everything the teacher's weights are a
function of: for a trained teacher the arch and its arguments, the recipe (teacher.train.*), data.* (the
path, input size, P×K sampling, synthetic settings; not the loader's settings), margin.*, seed,
deterministic, plus the training set's contents (`data.train (contents)`, its fingerprint); for a loaded
teacher the arch and its arguments and the file's SHA-256 (`teacher.checkpoint (contents)` or
`teacher.onnx (contents)`). The teacher stage records it in teacher/result.json and the cache in its
manifest.json (key `teacher_identity`); `check_recorded_teacher` refuses, before any work, a run directory
whose teacher stage or cache was made by another identity, naming the keys that differ and the ways out.
A directory written before identities were recorded has none: it is used as it is, with one note, and
the current identity is recorded from then on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import teachers
from distill.utils.atomic import atomic_write_json
from distill.utils.checkpoint import atomic_torch_save, safe_torch_load
from distill.utils.digest import RECORD_KEY, check_recorded_file, file_sha256, files_sha256
from distill.utils.dist import rank0_first
from distill.utils.errors import ConfigError
from distill.utils.layout import CacheLayout, RunLayout
from teachers.cache import build_cache, record_identity, recorded_identity
from teachers.cache_key import dataset_fingerprint

ONNX, CHECKPOINT, TRAINED = "onnx", "checkpoint", "train"
IDENTITY_KEY = "teacher_identity"
SOURCE_KEY = "teacher (source)"


@dataclass(frozen=True)
class TeacherSource:
    kind: str               # ONNX | CHECKPOINT | TRAINED
    file: str | None        # the file a loaded teacher is read from (None: trained here)

    @property
    def trained_here(self) -> bool:
        return self.kind == TRAINED


def teacher_source(cfg) -> TeacherSource | None:
    """Where the experiment's teacher comes from (None: no teacher). Neither a file nor a recipe: ConfigError."""
    t = cfg.teacher
    if t is None:
        return None
    if t.onnx is not None:
        return TeacherSource(ONNX, t.onnx)
    if t.checkpoint and os.path.exists(t.checkpoint):
        return TeacherSource(CHECKPOINT, t.checkpoint)
    if t.train is None:
        what = f"teacher.checkpoint {t.checkpoint} does not exist" if t.checkpoint else "teacher.checkpoint is not set"
        raise ConfigError(f"{what}; give an existing checkpoint, or a teacher.train recipe to train the teacher first")
    return TeacherSource(TRAINED, None)


def teacher_spec(cfg, run_dir: str) -> dict:
    """The `teachers.build_teacher` spec of the experiment's teacher; a trained one is read from its stage's
    backbone.pth (which exists once the stage has finished)."""
    source = teacher_source(cfg)
    spec = cfg.teacher.spec()
    return {**spec, "checkpoint": RunLayout(run_dir).teacher.backbone} if source.trained_here else spec


def teacher_identity(cfg, dataset=None) -> dict:
    """What the teacher's weights are a function of, as {config key: value} (see the module docstring); with
    `dataset` (the opened training set) a trained teacher's identity includes the data's contents too."""
    source = teacher_source(cfg)
    identity = cfg.teacher_identity_keys(source.trained_here)  # the keys the schema declares to affect it
    if source.trained_here:
        if dataset is not None and callable(getattr(dataset, "fingerprint", None)):
            identity["data.train (contents)"] = dataset_fingerprint(dataset)
    else:
        identity[f"teacher.{source.kind} (contents)"] = f"sha256 {file_sha256(source.file)}"
    identity[SOURCE_KEY] = source.kind
    return identity


def identity_changes(recorded: dict, current: dict) -> list:
    """'key: recorded -> current' for each key whose value differs; a `(contents)` key one side lacks (not
    measured there) is not a difference."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        if key.endswith("(contents)") and (key not in recorded or key not in current):
            continue
        if recorded.get(key) != current.get(key):
            out.append(f"{key}: {_short(recorded.get(key))} -> {_short(current.get(key))}")
    return out


def _short(value) -> str:
    text = repr(value)
    return text[:22] + "...'" if isinstance(value, str) and value.startswith("sha256 ") else text


def check_recorded_teacher(cfg, run_dir: str, dataset=None, record: bool = True) -> str | None:
    """Refuse a run directory whose finished teacher stage or teacher cache was made by another teacher than
    the experiment's (ConfigError naming the keys and the ways out). One with no identity recorded is accepted,
    and the current identity is recorded (`record`); the note returned says so (None: nothing to say)."""
    if cfg.teacher is None:
        return None
    run = RunLayout(run_dir)
    stage = run.teacher
    found = []
    if stage.is_done():
        found.append((stage.result, stage.read_result().get(IDENTITY_KEY)))
    if os.path.exists(CacheLayout(run.teacher_cache).manifest):
        found.append((run.teacher_cache, recorded_identity(run.teacher_cache)))
    if not found:
        return None
    current = teacher_identity(cfg, dataset)
    for where, recorded in found:
        if recorded is None:
            continue
        changes = identity_changes(recorded, current)
        if changes:
            raise ConfigError(
                f"{where} was made by another teacher than this experiment's ({'; '.join(changes)}). Nothing is "
                f"reused silently: train the teacher again here with --restart-stage teacher (its folder and cache are "
                f"kept aside; the generations distilled from it must be restarted too), or go back to the values it "
                f"was made with, or use another --out")
    old = [where for where, recorded in found if recorded is None]
    if not old:
        return None
    if record:
        for where in old:
            if where == stage.result:
                atomic_write_json(stage.result, {**stage.read_result(), IDENTITY_KEY: current})
            else:
                record_identity(where, current)
    return (f"teacher: note: {' and '.join(old)} record no teacher identity (written by an earlier facedistill); "
            f"used as they are, made by this experiment's teacher as far as the run directory's experiment.yaml "
            f"says. The identity is recorded from now on")


def load_teacher(cfg, run_dir: str):
    """The experiment's frozen teacher: loaded from its file; a teacher trained in the run directory (stage 0, which
    distill/run/ plans and trains like every stage) from its finished stage, whose weights are exported once as
    backbone.pth (rank 0 first) and loaded. An unfinished teacher stage is a ConfigError.

    The trained teacher's student.pt must be the file its stage recorded (result.json's digests,
    distill.utils.digest), and so must backbone.pth: exported from that student.pt, its digest is recorded beside
    it; one its stage recorded no digest of while student.pt has one is exported again."""
    source = teacher_source(cfg)
    if not source.trained_here:
        return teachers.build_teacher(cfg.teacher.spec())
    stage = RunLayout(run_dir).teacher
    if not stage.is_done():
        raise ConfigError(f"{stage.dir}: the teacher is trained in the run directory and has not finished; "
                          f"run `distill run` (or `distill cache build`) to train it")

    def export_backbone():  # a plain arcface_torch-style state dict of the trained teacher
        check_recorded_file(stage.student)
        result = stage.read_result()
        record = result.get(RECORD_KEY) if isinstance(result.get(RECORD_KEY), dict) else {}
        name = os.path.basename(stage.backbone)
        if not os.path.exists(stage.backbone) or (name not in record and os.path.basename(stage.student) in record):
            atomic_torch_save(safe_torch_load(stage.student)["state_dict"], stage.backbone)
            atomic_write_json(stage.result, {**result, RECORD_KEY: {**record, **files_sha256([stage.backbone])}})

    rank0_first(export_backbone)
    return teachers.build_teacher(teacher_spec(cfg, run_dir))  # checks backbone.pth against its record


def needs_cache(cfg) -> bool:
    """Whether the experiment distils from cached teacher embeddings (teacher.cache, some distillation)."""
    return cfg.teacher is not None and cfg.teacher.cache and cfg.distill.weight > 0 and cfg.generations > 0


def prepare_cache(cfg, teacher, dataset, run_dir: str, logger: logging.Logger, progress: bool = False,
                  directory: str | None = None):
    """The run's teacher cache (built, resumed or reused; under torchrun every rank embeds its slice), filled by
    `teacher`, the online teacher signal (teachers/signal.py: its device and autocast), recording the teacher's
    identity in its manifest.
    `directory`: the cache of another teacher than the experiment's (a previous generation's student, under
    recursive.teacher: previous), in that folder; its manifest's key (the teacher's weights) is its identity.
    What the build reports goes to `logger`."""
    return build_cache(teacher, dataset, directory or RunLayout(run_dir).teacher_cache,
                       num_workers=cfg.data.num_workers, progress=progress, logger=logger,
                       identity=None if directory else teacher_identity(cfg, dataset))
