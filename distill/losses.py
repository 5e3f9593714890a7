"""Distillation losses on embeddings (one registry) and the training objective: classification + alpha × distillation.

Every loss takes (student_emb, teacher_emb), both (batch, dim), and returns a scalar. The teacher is a
constant: it is detached, so no gradient ever reaches it. Half-precision inputs (a float16 teacher cache,
bfloat16 autocast outputs) are computed in float32; the teacher is cast to the student's dtype.
With ŝ = s/|s|, t̂ = t/|t| and cos(t, s) = t̂·ŝ:

    equivalent_angular    mean_i |t̂_i − ŝ_i|²     = mean_i (2 − 2 cos(t_i, s_i))   (arXiv 1910.04985)
    shrinkteanet_angular  mean_i (1 − cos(t_i, s_i))²
    cosine                mean_i (1 − cos(t_i, s_i))
    l2                    mean over all batch × dim elements of (s − t)²          (F.mse_loss, 'mean')

`l2` averages over elements, not samples: it equals mean_i |s_i − t_i|² / dim, so its scale depends on
the embedding size and on the embeddings' norms, unlike the angular losses.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ConfigError, UnknownNameError

DISTILL_LOSSES: dict = {}


def register_loss(fn):
    """Register `fn(student_emb, teacher_emb, *, options...) -> scalar tensor` under its function name."""
    DISTILL_LOSSES[fn.__name__] = fn
    return fn


def create_distill_loss(name: str, **kwargs):
    """The registered loss `name`, with keyword options bound; unknown names or options are errors."""
    if name not in DISTILL_LOSSES:
        raise UnknownNameError(f"unknown distillation loss {name!r}; registered losses: "
                               f"{', '.join(sorted(DISTILL_LOSSES))}")
    fn = DISTILL_LOSSES[name]
    if not kwargs:
        return fn
    accepted = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"distillation loss {name!r} does not take {', '.join(unknown)}; "
                          f"it takes {', '.join(accepted) or 'no options'}")
    return functools.partial(fn, **kwargs)


def _prepare(student: torch.Tensor, teacher: torch.Tensor):
    """Check shapes, detach the teacher and bring both to one dtype of at least float32 precision."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ConfigError(f"distillation loss needs student and teacher embeddings of one shape (batch, dim), got "
                          f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}; the student's "
                          f"embedding_size must match the teacher's")
    if student.dtype in (torch.float16, torch.bfloat16):
        student = student.float()
    return student, teacher.detach().to(student.dtype)


def _cos(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(student, teacher, dim=1, eps=1e-8)


@register_loss
def equivalent_angular(student_emb, teacher_emb):
    """The paper's equivalent angular loss: mean_i |t̂_i − ŝ_i|² = mean_i (2 − 2 cos(t_i, s_i))."""
    s, t = _prepare(student_emb, teacher_emb)
    return (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1).mean()


@register_loss
def shrinkteanet_angular(student_emb, teacher_emb):
    """ShrinkTeaNet's angular loss: mean_i (1 − cos(t_i, s_i))²."""
    s, t = _prepare(student_emb, teacher_emb)
    return (1.0 - _cos(s, t)).pow(2).mean()


@register_loss
def cosine(student_emb, teacher_emb):
    """Cosine distance: mean_i (1 − cos(t_i, s_i))."""
    s, t = _prepare(student_emb, teacher_emb)
    return (1.0 - _cos(s, t)).mean()


@register_loss
def l2(student_emb, teacher_emb):
    """Mean squared error of the raw embeddings, averaged over all batch × dim elements (F.mse_loss)."""
    s, t = _prepare(student_emb, teacher_emb)
    return F.mse_loss(s, t, reduction="mean")


class DistillationObjective(nn.Module):
    """total = classification (the margin head's loss) + alpha × distillation loss, every term by name.

    forward(student_emb, labels, teacher_emb=None) returns (total, logs) with logs holding detached
    tensors: 'loss' (total), 'loss_cls', 'loss_kd' (the distillation loss before alpha) and the head's
    logs. With alpha = 0 or no teacher embeddings it is plain training: the distillation loss is not
    computed and 'loss_kd' is absent from the logs (so a baseline run shows no distillation curve
    rather than a flat zero). Under DDP, loss_cls is the global batch's loss (the head gathers all
    ranks) while loss_kd is this rank's; DDP's gradient averaging makes both gradients global means.
    """

    def __init__(self, head: nn.Module, loss: str = "equivalent_angular", alpha: float = 7.0,
                 project: tuple | None = None, **loss_options):
        super().__init__()
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ConfigError(f"distillation alpha must be a finite number >= 0, got {alpha!r}")
        self.head = head
        self.loss_name = loss
        self.distill_loss = create_distill_loss(loss, **loss_options)
        self.alpha = float(alpha)
        # distill.project: linear: (student dim, teacher dim) -> a learned map of the student's embedding to the
        # teacher's size, used only inside the distillation loss (the classifier and the saved student never see it)
        self.projection = nn.Linear(project[0], project[1], bias=False) if project else None

    def extra_repr(self) -> str:
        return f"loss={self.loss_name!r}, alpha={self.alpha}"

    def forward(self, student_emb: torch.Tensor, labels: torch.Tensor, teacher_emb: torch.Tensor | None = None):
        loss_cls, head_logs = self.head(student_emb, labels)
        logs = {name: value.detach() if torch.is_tensor(value) else value for name, value in head_logs.items()}
        logs["loss_cls"] = loss_cls.detach()
        total = loss_cls
        if self.alpha > 0 and teacher_emb is not None:
            projected = self.projection(student_emb) if self.projection is not None else student_emb
            loss_kd = self.distill_loss(projected, teacher_emb)
            logs["loss_kd"] = loss_kd.detach()
            total = loss_cls + self.alpha * loss_kd
        logs["loss"] = total.detach()
        return total, logs
