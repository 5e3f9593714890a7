"""The one check of an experiment's distillation terms against what their losses need (their Requirements,
distill/losses/requirements.py).

`term_problems(terms, setting)` checks the active terms (alpha > 0) against what the run will have (`Setting`:
the teacher's kind and cache, the batches, the embedding sizes, the class centres, the models' feature stages; a
field left None is not known to the caller and not checked) and returns every problem as a RequirementError (a
ConfigError with the config key that would meet it).
The config checks (distill/config/checks.py), preflight and doctor (distill/run/preflight.py) and the objective
at stage start (distill/losses/distillation.py, distill/train/objective.py, distill/train/feature_taps.py) all
call it, each with what it knows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distill.losses.heads import HeadTraits
from distill.losses.registry import loss_options, requirements
from distill.losses.requirements import Requirements
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
    head           the margin head's traits (distill.losses.heads.HeadTraits: centres per class, whether it takes a
                   margin per sample), or a function returning them, called only when a term needs them (the config
                   check passes functools.partial(head_traits, cfg.margin): no head is built for other terms)
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
    head: HeadTraits | Callable[[], HeadTraits] | None = None


def term_label(term) -> str:
    """How messages name a term: 'distill.loss kd' (the short form), 'distill.terms[1] (fitnet)' or, for a term
    built outside a config, 'distillation term at_last (attention_transfer)'."""
    if term.key == "distill.loss":
        return f"distill.loss {term.loss}"
    return f"{term.key} ({term.loss})" if term.key else f"distillation term {term.name} ({term.loss})"


def _stages_of(term) -> tuple:
    return tuple(term.options.get("stages", loss_options(term.loss).get("stages", ())))


class RequirementError(ConfigError):
    """A requirement of a term that the run does not meet; `key`: the config key that would meet it."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def term_problems(terms, setting: Setting) -> list:
    """[RequirementError] of every requirement of the active terms that `setting` does not meet: each term's in the
    terms' order, then the embedding sizes, then two terms that both own the classification."""
    problems, owners, compared = [], [], []
    for term in terms:
        if term.alpha <= 0:
            continue
        needs, label = requirements(term.loss), term_label(term)
        if needs.replaces_classification:
            owners.append(term.key or term.name)
        checks = (_maps_problem(term, label, setting) if needs.feature_maps else None,
                  _batch_problem(needs, label, setting),
                  _centres_problem(label, setting) if needs.centres else None,
                  _identity_problem(label, setting) if needs.images_per_id else None,
                  _head_problem(needs, label, setting.head))
        problems += [p for p in checks if p is not None]
        if not (needs.feature_maps or needs.sizes == "any"):
            compared.append((needs, label))
    problems += [p for p in (_size_problem(compared, setting), _owners_problem(owners)) if p is not None]
    return problems


def check_terms(terms, setting: Setting) -> None:
    """Raise the first of term_problems."""
    problems = term_problems(terms, setting)
    if problems:
        raise problems[0]


def _maps_problem(term, label: str, setting: Setting) -> RequirementError | None:
    if setting.teacher == "onnx":
        return RequirementError(f"{label} needs the teacher's intermediate feature maps, which an ONNX file does not "
                                f"give: use a torch teacher (teacher.arch + teacher.checkpoint) or an embedding loss",
                                "teacher.onnx")
    if setting.cached:
        return RequirementError(f"{label} needs the teacher's feature maps at every step, which the teacher cache "
                                f"(embeddings only) does not hold: set teacher.cache: false (the teacher then runs "
                                f"online)", "teacher.cache")
    for role, arch, count in setting.stages or ():
        bad = [s for s in _stages_of(term) if count is not None and not -count <= int(s) < count]
        if bad:
            return RequirementError(f"{label}: stage {bad[0]} of the {role} ({arch}): it has {count} feature stages "
                                    f"(0..{count - 1}, or -1..-{count} from the last); choose the loss's stages "
                                    f"among them", term.key or "distill.terms")
    return None


def _batch_problem(needs: Requirements, label: str, setting: Setting) -> RequirementError | None:
    if setting.batch_size is None or setting.batch_size >= needs.min_batch:
        return None
    return RequirementError(f"{label} relates the images of a batch and needs at least {needs.min_batch} per batch, "
                            f"train.batch_size is {setting.batch_size}: raise it", "train.batch_size")


def _centres_problem(label: str, setting: Setting) -> RequirementError | None:
    if setting.centres is not False:
        return None
    onnx = "ONNX " if setting.teacher == "onnx" else ""
    return RequirementError(f"{label} needs the teacher's class centres (its margin-head weights), which a loaded "
                            f"{onnx}teacher does not carry: set teacher.head: FILE (see docs: a state dict, last.pt or "
                            f"arcface_torch's checkpoint_gpu_*.pt), or let the run train the teacher (teacher.train)",
                            "teacher")


def _head_problem(needs: Requirements, label: str, head) -> RequirementError | None:
    """What the margin head (margin.margin) lacks for the term: one centre per class, or a margin per sample."""
    per_class = needs.centres or needs.one_centre_per_class
    if head is None or not (per_class or needs.sample_margins):
        return None
    head = head() if callable(head) else head
    if per_class and head.centres_per_class not in (None, 1):
        return RequirementError(f"{label} reads the class centres as one row per identity, but margin.margin "
                                f"{head.name} keeps {head.centres_per_class} centres per class: use a head with one "
                                f"centre per class (arcface, cosface, adaface, curricularface, magface, ...) or "
                                f"another distillation loss", "margin.margin")
    if needs.sample_margins and head.takes_sample_margins is False:
        return RequirementError(f"{label} sets each sample's margin (the paper's m_i on ArcFace), but margin.margin "
                                f"{head.name} decides its own margins and takes none per sample: set margin.margin "
                                f"arcface (the paper's), combined or curricularface, or use another distillation "
                                f"loss", "margin.margin")
    return None


def _identity_problem(label: str, setting: Setting) -> RequirementError | None:
    k, batch = setting.images_per_id, setting.batch_size
    if k == 0:
        return RequirementError(f"{label} compares pairs of images within a batch and needs repeated identities: set "
                                f"data.images_per_id (e.g. 4: batches of batch_size/4 identities with 4 images each)",
                                "data.images_per_id")
    if k and batch is not None and batch // k < 2:
        return RequirementError(f"{label} compares each identity with others in the batch, but train.batch_size "
                                f"{batch} / data.images_per_id {k} gives one identity per batch: set "
                                f"data.images_per_id to at most {batch // 2}, or raise train.batch_size",
                                "data.images_per_id")
    return None


def _owners_problem(owners: list) -> RequirementError | None:
    if len(owners) < 2:
        return None
    return RequirementError(f"{' and '.join(owners)} both replace the classification loss (each moves the class "
                            f"centres its own way); keep one of them", "distill.terms")


def _size_problem(compared: list, setting: Setting) -> RequirementError | None:
    """Why the student's embeddings cannot be compared with the teacher's by the terms `compared` ([(requirements,
    label)] of the terms that compare embeddings), or None."""
    s, t = setting.student_dim, setting.teacher_dim
    if s is None or t is None or s == t or not compared:
        return None
    label = next((label for needs, label in compared if needs.sizes == "same"), None)
    if label is not None:
        return RequirementError(f"the teacher's embeddings are {t}-d, student.embedding_size is {s}: {label} moves "
                                f"the student's class centres toward the teacher's embeddings, so both must have one "
                                f"size (distill.project cannot map the teacher into the student's space); set "
                                f"student.embedding_size: {t} or use another distill.loss", "teacher")
    if setting.project is None or setting.project != "none":
        return None
    return RequirementError(f"the teacher's embeddings are {t}-d, student.embedding_size is {s}: the distillation "
                            f"losses compare embeddings of one size. Set distill.project: linear (a learned {s} -> "
                            f"{t} projection used only inside the distillation loss), or student.embedding_size: {t}",
                            "teacher")
