"""The layout of a run directory: every file name of a run, and the questions asked of it, in one place.

    runs/<experiment>/                 RunLayout(root)
      .lock                            held (flock) by the one process writing here (distill/run/lock.py)
      experiment.yaml                  the resolved config (a rerun with a differing config is refused)
      summary.json, summary.md         one row per stage, written when the experiment ends
      wandb_group.txt, wandb/          the W&B group id of this directory, W&B's own files
      teacher_cache/                   CacheLayout: the frozen teacher's embeddings (teachers/cache.py)
        embeddings.f16                 the rows: float16, (num_samples, 2, dim)
        manifest.json                  what the rows are a function of, the build's settings, rows_done
        progress.rank<R>.json          during a build only: rank R's rows on disk
      teacher/  baseline/  gen1/ ..    StageLayout(run.stage(name))
        last.pt                        the training state (exact resume)
        best.pt, student.pt            the student (weights + constructor arguments) at its best / last
        backbone.pth                   teacher stage only: a plain arcface_torch-style state dict
        metrics.jsonl                  the local metrics log
        result.json                    written last: its presence means the stage is finished
        wandb_run_id.txt, wandb_artifact.txt
        as_teacher_cache/              a CacheLayout: gen<k> under recursive.teacher: previous: its embeddings,
                                       gen<k+1>'s cache
    <sweep out>/<point>/ ...           one run directory per point; comparison.md/.json beside them

Nothing else in the toolkit spells these names.
"""

from __future__ import annotations

import json
import os
import re

RESULT = "result.json"  # a stage folder's result file: written last, its presence means the stage is finished

EXPERIMENT = "experiment.yaml"
TEACHER = "teacher"
BASELINE = "baseline"
TEACHER_CACHE = "teacher_cache"  # the run's teacher cache folder (a CacheLayout); the run plan's name for its step


def generation_name(k: int) -> str:
    return f"gen{k}"


def stage_order(name: str) -> tuple:
    """teacher, baseline, gen1, gen2, ... (gen10 after gen9), anything else last."""
    m = re.fullmatch(r"gen(\d+)", name)
    if m:
        return (2, int(m.group(1)), name)
    return ({TEACHER: 0, BASELINE: 1}.get(name, 3), 0, name)


def is_stage_name(name: str) -> bool:
    return name in (TEACHER, BASELINE) or re.fullmatch(r"gen\d+", name) is not None


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class StageLayout:
    """The files of one stage directory (teacher, baseline, gen<k>)."""

    # what a finished teacher stage hands to another run directory that trains the same teacher (sweep)
    SHARED_TEACHER_FILES = ("result.json", "backbone.pth", "student.pt", "metrics.jsonl", "wandb_artifact.txt")

    def __init__(self, directory: str, name: str | None = None):
        self.dir = directory
        self.name = name or os.path.basename(os.path.normpath(directory))

    def _path(self, file: str) -> str:
        return os.path.join(self.dir, file)

    last = property(lambda self: self._path("last.pt"))
    best = property(lambda self: self._path("best.pt"))
    student = property(lambda self: self._path("student.pt"))
    backbone = property(lambda self: self._path("backbone.pth"))
    metrics = property(lambda self: self._path("metrics.jsonl"))
    result = property(lambda self: self._path(RESULT))
    wandb_run_id = property(lambda self: self._path("wandb_run_id.txt"))
    wandb_artifact = property(lambda self: self._path("wandb_artifact.txt"))
    # this stage's student as the next generation's teacher (recursive.teacher: previous): its embeddings
    teacher_cache_as_teacher = property(lambda self: self._path("as_teacher_cache"))

    def is_done(self) -> bool:
        """A stage is finished once its result.json exists (written last, atomically) and reads as a JSON object;
        a damaged one (see `damaged_result`) leaves the stage unfinished."""
        return os.path.exists(self.result) and self.damaged_result() is None

    def damaged_result(self) -> str | None:
        """Why an existing result.json cannot be read (truncated, not JSON, not an object), or None."""
        try:
            data = read_json(self.result)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
            return str(err).splitlines()[0]
        return None if isinstance(data, dict) else f"holds a {type(data).__name__}, not an object"

    def damaged_note(self) -> str | None:
        """The one-line note for a result.json that does not read (truncated by a full disk, edited by hand): the
        stage counts as unfinished."""
        problem = self.damaged_result()
        if not problem:
            return None
        return (f"{self.name}: note: {self.result} is damaged ({problem}); treating the stage as unfinished: it "
                f"resumes from its last.pt (or starts again) and writes a new result.json")

    def read_result(self) -> dict:
        return read_json(self.result)

    def shared_teacher_files(self) -> list:
        return [self._path(f) for f in self.SHARED_TEACHER_FILES]


class RunLayout:
    """The files of one run directory (what `distill run --out` writes)."""

    def __init__(self, root: str):
        self.root = root

    def _path(self, file: str) -> str:
        return os.path.join(self.root, file)

    experiment = property(lambda self: self._path(EXPERIMENT))
    summary_json = property(lambda self: self._path("summary.json"))
    summary_md = property(lambda self: self._path("summary.md"))
    wandb_group = property(lambda self: self._path("wandb_group.txt"))
    wandb_dir = property(lambda self: self._path("wandb"))
    teacher_cache = property(lambda self: self._path(TEACHER_CACHE))
    lock = property(lambda self: self._path(".lock"))  # distill/run/lock.py: one writer per run directory

    def stage(self, name: str) -> StageLayout:
        return StageLayout(self._path(name), name)

    @property
    def teacher(self) -> StageLayout:
        return self.stage(TEACHER)

    def generation(self, k: int) -> StageLayout:
        return self.stage(generation_name(k))

    def stage_names(self) -> list:
        """The stage directories present, in stage order."""
        if not os.path.isdir(self.root):
            return []
        names = [d for d in os.listdir(self.root) if is_stage_name(d) and os.path.isdir(self._path(d))]
        return sorted(names, key=stage_order)

    def is_run_dir(self) -> bool:
        return os.path.exists(self.experiment)


def is_run_dir(path: str) -> bool:
    return RunLayout(path).is_run_dir()


class CacheLayout:
    """The files of one teacher cache directory (a run's teacher_cache/, a stage's as_teacher_cache/, a
    teacher.shared_cache subfolder)."""

    ROWS, MANIFEST = "embeddings.f16", "manifest.json"

    def __init__(self, directory: str):
        self.dir = directory

    rows = property(lambda self: os.path.join(self.dir, self.ROWS))
    manifest = property(lambda self: os.path.join(self.dir, self.MANIFEST))

    def progress(self, rank: int) -> str:
        """Process `rank`'s progress file of a build under way."""
        return os.path.join(self.dir, f"progress.rank{rank}.json")

    def progress_files(self) -> list:
        return [os.path.join(self.dir, f) for f in os.listdir(self.dir) if re.fullmatch(r"progress\.rank\d+\.json", f)]


def comparison_files(out: str) -> tuple[str, str]:
    """A sweep's comparison table (markdown) and JSON, beside its points' run directories."""
    return os.path.join(out, "comparison.md"), os.path.join(out, "comparison.json")
