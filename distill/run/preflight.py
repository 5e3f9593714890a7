"""The checks a run makes before any work beyond the config's own (distill/config/checks.py), in one place:
`distill run`, `cache build` and `run --dry-run` raise the first problem (distill/run/inputs.py: check_before_work,
on the files it opened whole), `distill doctor` lists each as a FAIL line, and `distill sweep` runs them for every
point before the first one trains, so doctor's "ready", a dry run's "passed" and a sweep's start mean the run will
not stop on any of these later:

    teacher.checkpoint  the teacher's file is there (or a teacher.train recipe trains one)
    device        the GPU `device` names is there
    data.decode   cuda decoding on a machine (and a training set) that can do it
    teacher       the teacher's embedding size against the student's and the loss (before a teacher trains)
    teacher.head  the class centres the terms need: present, readable, of the teacher's size and (with the
                  training set) of its identity count
    teacher.shared_cache  the folder is one (not a file) and writable
    data.ijb      every image the IJB set lists is there (evaluated after each stage)

Each needs only the config, the files it names and the machine; `train_set`, when given, adds what only the
opened training set can tell (its identity count, whether it hands out encoded images)."""

from __future__ import annotations

from distill.losses.registry import requirements
from distill.losses.term_checks import Setting, term_problems
from distill.losses.terms import config_terms, describe_terms
from distill.utils.atomic import ensure_writable
from distill.utils.errors import ConfigError, DataFormatError, DistillError
from distill.utils.layout import RunLayout
from teachers.prepare import teacher_source


def embedding_size_problem(cfg, teacher_dim: int) -> str | None:
    """Why the student's embeddings cannot be distilled against a teacher of `teacher_dim`, or None (the terms'
    Requirements.sizes against the two sizes and distill.project: distill/losses/requirements.py)."""
    if cfg.distill.weight <= 0 or cfg.generations < 1:
        return None
    setting = Setting(student_dim=cfg.student.embedding_size, teacher_dim=teacher_dim, project=cfg.distill.project)
    return next((str(problem) for problem in term_problems(config_terms(cfg.distill), setting)), None)


def check_embedding_sizes(cfg, teacher_dim: int) -> None:
    problem = embedding_size_problem(cfg, teacher_dim)
    if problem:
        raise ConfigError(problem)


def centres_source(cfg, run_dir: str) -> str | None:
    """Where the students' terms take the teacher's class centres from (teacher.head, else the last.pt of the teacher
    trained here), or None when no term needs them; a loaded teacher without teacher.head is a ConfigError."""
    if cfg.teacher is None or cfg.generations < 1 or not any(
            t.alpha > 0 and requirements(t.loss).centres for t in config_terms(cfg.distill)):
        return None
    if cfg.teacher.head:
        return cfg.teacher.head
    if not teacher_source(cfg).trained_here:
        raise ConfigError(f"teacher.head is not set: {describe_terms(config_terms(cfg.distill))} needs the class "
                          f"centres of the loaded teacher {cfg.teacher.checkpoint or cfg.teacher.onnx}; give its "
                          f"margin-head weights (teacher.head: FILE)")
    return RunLayout(run_dir).teacher.last


_IJB_MISSING: dict = {}  # (root, target) -> (missing, listed, folder, first missing): a sweep's points share one set


def _ijb_images(cfg, meta=None) -> None:
    if cfg.data.ijb is None:
        return
    from distill.data.ijb import missing_images
    from distill.eval.ijb_stage import read_meta

    key = (cfg.data.ijb.root, cfg.data.ijb.target)
    if key not in _IJB_MISSING or meta is not None:
        meta = meta or read_meta(cfg.data.ijb)
        missing = missing_images(meta)
        _IJB_MISSING[key] = (int(missing.sum()), len(meta.names), meta.image_dir, meta.names[int(missing.argmax())])
    count, total, image_dir, first = _IJB_MISSING[key]
    if count:
        raise DataFormatError(f"data.ijb: {count:,} of the {total:,} images {cfg.data.ijb.target} lists are missing "
                              f"under {image_dir} (first: {first}); restore them (insightface's IJB release: "
                              f"loose_crop/) or remove data.ijb")


def _centres(cfg, run_dir: str, train_set) -> None:
    from teachers.head_file import load_centres

    source = centres_source(cfg, run_dir)
    if source and cfg.teacher.head:
        load_centres(source, train_set.num_classes if train_set is not None else None, cfg.teacher.embedding_size)


def preflight_problems(cfg, run_dir: str, train_set=None, ijb_meta=None, skip=()) -> list:
    """[(key, DistillError)] of every check above that fails, in that order; `skip`: keys a caller checks itself."""
    from distill.data.gpu_decode import check_decode
    from distill.utils.device import resolve_device

    problems = []

    def attempt(key, check) -> None:
        if key in skip:
            return
        try:
            check()
        except DistillError as err:
            problems.append((key, err))

    if cfg.teacher is not None:  # a checkpoint that is not there, without a recipe to train one instead
        attempt("teacher.checkpoint", lambda: teacher_source(cfg))
    attempt("device", lambda: resolve_device(cfg.device))
    if not problems:
        attempt("data.decode", lambda: check_decode(cfg.data.decode, resolve_device(cfg.device), train_set))
    if cfg.teacher is not None and cfg.teacher.embedding_size is not None:  # (ONNX: its file tells, at load)
        attempt("teacher", lambda: check_embedding_sizes(cfg, cfg.teacher.embedding_size))
    attempt("teacher.head", lambda: _centres(cfg, run_dir, train_set))
    if cfg.teacher is not None and cfg.teacher.shared_cache:
        attempt("teacher.shared_cache", lambda: ensure_writable(cfg.teacher.shared_cache, "teacher.shared_cache"))
    attempt("data.ijb", lambda: _ijb_images(cfg, ijb_meta))
    return problems


def preflight(cfg, run_dir: str, train_set=None, ijb_meta=None) -> None:
    """Raise the first problem preflight_problems finds."""
    problems = preflight_problems(cfg, run_dir, train_set, ijb_meta)
    if problems:
        raise problems[0][1]

