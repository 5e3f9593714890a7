"""The one check of an experiment's distillation terms against what their losses need (their Requirements,
distill/losses/requirements.py).

`term_problems(terms, setting)` checks the active terms (alpha > 0) against what the run will have (`Setting`:
the teacher's kind and cache, the batches, the embedding sizes, the class centres, the models' feature stages; a
field left None is not known to the caller and not checked) and returns every problem as (config key, message).
The config checks (distill/config/checks.py), preflight and doctor (distill/run/preflight.py) and the objective
at stage start (distill/losses/distillation.py, distill/train/objective.py, distill/train/feature_taps.py) all
call it, each with what it knows.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.losses.registry import loss_options, requirements
from distill.utils.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """What a run will have, as far as the caller knows (None: not known here, not checked).

    teacher        'torch' or 'onnx' (the kind of model the teacher is)
    cached         whether the teacher's embeddings come from the cache (no online teacher)
    centres        whether the teacher's class centres will be there (teacher.head, or a teacher trained here)
    images_per_id  data.images_per_id (0: batches do not repeat identities)
    batch_size     images per batch (train.batch_size)
    student_dim, teacher_dim  the embedding sizes
    project        distill.project ('none' or 'linear')
    stages         [(role, arch, number of feature stages or None)] of the student and the teacher
    """
    teacher: str | None = None
    cached: bool | None = None
    centres: bool | None = None
    images_per_id: int | None = None
    batch_size: int | None = None
    student_dim: int | None = None
    teacher_dim: int | None = None
    project: str | None = None
    stages: tuple | None = None


def term_label(term) -> str:
    """How messages name a term: 'distill.loss kd' (the short form), 'distill.terms[1] (fitnet)' or, for a term
    built outside a config, 'distillation term at_last (attention_transfer)'."""
    if term.key == "distill.loss":
        return f"distill.loss {term.loss}"
    return f"{term.key} ({term.loss})" if term.key else f"distillation term {term.name} ({term.loss})"


def _stages_of(term) -> tuple:
    return tuple(term.options.get("stages", loss_options(term.loss).get("stages", ())))


def term_problems(terms, setting: Setting) -> list:
    """[(config key, message)] of every requirement of the active terms that `setting` does not meet: each term's in
    the terms' order, then the embedding sizes, then two terms that both own the classification."""
    problems, owners, compared = [], [], []
    for term in terms:
        if term.alpha <= 0:
            continue
        needs, label = requirements(term.loss), term_label(term)
        if needs.replaces_classification:
            owners.append(term.key or term.name)
        if needs.feature_maps:
            problems += _feature_problems(term, label, setting)
        if setting.batch_size is not None and setting.batch_size < needs.min_batch:
            problems.append(("train.batch_size", f"{label} relates the images of a batch and needs at least "
                                                 f"{needs.min_batch} per batch, train.batch_size is "
                                                 f"{setting.batch_size}: raise it"))
        if needs.centres and setting.centres is False:
            onnx = "ONNX " if setting.teacher == "onnx" else ""
            problems.append(("teacher", f"{label} needs the teacher's class centres (its margin-head weights), which "
                                        f"a loaded {onnx}teacher does not carry: set teacher.head: FILE (see docs: a "
                                        f"state dict, last.pt or arcface_torch's checkpoint_gpu_*.pt), or let the "
                                        f"run train the teacher (teacher.train)"))
        if needs.images_per_id:
            problems += _identity_problems(label, setting)
        if not (needs.feature_maps or needs.sizes == "any"):
            compared.append((needs, label))
    size = _size_problem(compared, setting)
    if size:
        problems.append(("teacher", size))
    if len(owners) > 1:
        problems.append(("distill.terms", f"{' and '.join(owners)} both replace the classification loss (each moves "
                                          f"the class centres its own way); keep one of them"))
    return problems


def check_terms(terms, setting: Setting) -> None:
    """Raise the first of term_problems as a ConfigError."""
    problems = term_problems(terms, setting)
    if problems:
        raise ConfigError(problems[0][1])


def _feature_problems(term, label: str, setting: Setting) -> list:
    if setting.teacher == "onnx":
        return [("teacher.onnx", f"{label} needs the teacher's intermediate feature maps, which an ONNX file does not "
                                 f"give: use a torch teacher (teacher.arch + teacher.checkpoint) or an embedding loss")]
    if setting.cached:
        return [("teacher.cache", f"{label} needs the teacher's feature maps at every step, which the teacher cache "
                                  f"(embeddings only) does not hold: set teacher.cache: false (the teacher then runs "
                                  f"online)")]
    for role, arch, count in setting.stages or ():
        bad = [s for s in _stages_of(term) if count is not None and not -count <= int(s) < count]
        if bad:
            return [(term.key or "distill.terms", f"{label}: stage {bad[0]} of the {role} ({arch}): it has {count} "
                                                  f"feature stages (0..{count - 1}, or -1..-{count} from the last); "
                                                  f"choose the loss's stages among them")]
    return []


def _identity_problems(label: str, setting: Setting) -> list:
    k, batch = setting.images_per_id, setting.batch_size
    if k == 0:
        return [("data.images_per_id", f"{label} compares pairs of images within a batch and needs repeated "
                                       f"identities: set data.images_per_id (e.g. 4: batches of batch_size/4 "
                                       f"identities with 4 images each)")]
    if k and batch is not None and batch // k < 2:
        return [("data.images_per_id", f"{label} compares each identity with others in the batch, but "
                                       f"train.batch_size {batch} / data.images_per_id {k} gives one identity per "
                                       f"batch: set data.images_per_id to at most {batch // 2}, or raise "
                                       f"train.batch_size")]
    return []


def _size_problem(compared: list, setting: Setting) -> str | None:
    """Why the student's embeddings cannot be compared with the teacher's by the terms `compared` ([(requirements,
    label)] of the terms that compare embeddings), or None."""
    s, t = setting.student_dim, setting.teacher_dim
    if s is None or t is None or s == t or not compared:
        return None
    label = next((label for needs, label in compared if needs.sizes == "same"), None)
    if label is not None:
        return (f"the teacher's embeddings are {t}-d, student.embedding_size is {s}: {label} moves the student's "
                f"class centres toward the teacher's embeddings, so both must have one size (distill.project cannot "
                f"map the teacher into the student's space); set student.embedding_size: {t} or use another "
                f"distill.loss")
    if setting.project is None or setting.project != "none":
        return None
    return (f"the teacher's embeddings are {t}-d, student.embedding_size is {s}: the distillation losses compare "
            f"embeddings of one size. Set distill.project: linear (a learned {s} -> {t} projection used only inside "
            f"the distillation loss), or student.embedding_size: {t}")
