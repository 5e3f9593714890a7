"""Distillation losses on embeddings (one registry) and the training objective: classification + alpha × distillation.

Every loss takes (student_emb, teacher_emb), both (batch, dim), and returns a scalar. The teacher is a
constant: it is detached, so no gradient ever reaches it. Half-precision inputs (a float16 teacher cache,
bfloat16 autocast outputs) are computed in float32; the teacher is cast to the student's dtype.
With ŝ = s/|s|, t̂ = t/|t| and cos(t, s) = t̂·ŝ:

    equivalent_angular    mean_i |t̂_i − ŝ_i|²     = mean_i (2 − 2 cos(t_i, s_i))   (arXiv 1910.04985)
    shrinkteanet_angular  mean_i (1 − cos(t_i, s_i))²; form: linear, mean_i (1 − cos(t_i, s_i))
    cosine                mean_i (1 − cos(t_i, s_i))
    l2                    mean over all batch × dim elements of (s − t)²          (F.mse_loss, 'mean')

`l2` averages over elements, not samples: it equals mean_i |s_i − t_i|² / dim, so its scale depends on
the embedding size and on the embeddings' norms, unlike the angular losses.

The objective's contract. A registered loss (distill/losses/registry.py) is either a function of (student,
teacher) added as `alpha × loss` to the classification loss (the four above), or a class (an nn.Module,
instantiated with its options; its buffers and parameters are training state, saved in last.pt with the
objective and resumed). Either declares what it needs with one Requirements value
(distill/losses/requirements.py), given at registration (`register_loss(..., requires=Requirements(...))`) or as
the class attribute `requires`; the objective calls it accordingly:
    labels=True                   loss(student, teacher, labels) (batch-level losses)
    feature_maps=True             loss(student_maps, teacher_maps) on intermediate feature maps at its `stages`
                                  (distill/losses/features.py); the teacher runs online
    centres=True                  set_centres(full, head) once at stage start with the teacher's class centres
                                  (distill/losses/centres.py), then called as an embedding loss or a classifier
    replaces_classification=True  loss.classify(head, student, labels, teacher) -> (loss, logs) instead of
                                  head(student, labels); no alpha × term is added (alpha > 0 turns it on)
    otherwise                     loss(student, teacher), the student projected to the teacher's size when
                                  distill.project: linear
The rest of a Requirements value (images_per_id, sizes, min_batch) is what the experiment must give; one
function checks it (distill/losses/term_checks.py: term_problems; the config checks, preflight, doctor and the
stage's objective call it). The engine knows none of this: it calls the objective, and takes the maps a term asks for.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.registry import create_distill_loss, register_loss, requirements
from distill.losses.term_checks import Setting, check_terms
from distill.losses.terms import LossTerm
from distill.utils.errors import CheckpointError, ConfigError


def prepare_pair(student: torch.Tensor, teacher: torch.Tensor):
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
    """The paper's equivalent angular loss: mean_i |t̂_i − ŝ_i|² = mean_i (2 − 2 cos(t_i, s_i)).

    Paper: VarGFaceNet (Yan et al., arXiv 1910.04985), weight alpha = 7. No options. Needs: teacher embeddings
    of the student's size (or distill.project: linear). Tested: tests/test_losses.py (hand-computed)."""
    s, t = prepare_pair(student_emb, teacher_emb)
    return (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1).mean()


ShrinkTeaNetForm = Literal["squared", "linear"]


@register_loss
def shrinkteanet_angular(student_emb, teacher_emb, *, form: ShrinkTeaNetForm = "squared"):
    """ShrinkTeaNet's angular loss: mean_i (1 − cos(t_i, s_i))² (`form` "squared", the default) or
    mean_i (1 − cos(t_i, s_i)) ("linear").

    Paper: Duong et al. 2019, "ShrinkTeaNet: Million-scale Lightweight Face Recognition via Shrinking
    Teacher-Student Networks". No official code: the squared form is VarGFaceNet's quote of the paper's loss,
    ‖1 − cos‖², so it is the default; the one public implementation linked to the paper (MarginDistillation's
    angular_distillation) computes the linear form, the `cosine` loss's value. Needs: teacher embeddings only.
    Tested: tests/test_losses.py (hand-computed, both forms)."""
    forms = get_args(ShrinkTeaNetForm)
    if form not in forms:
        raise ValueError(f"shrinkteanet_angular: form must be one of {', '.join(forms)}, got {form!r}")
    s, t = prepare_pair(student_emb, teacher_emb)
    gap = 1.0 - _cos(s, t)
    return (gap.pow(2) if form == "squared" else gap).mean()


@register_loss
def cosine(student_emb, teacher_emb):
    """Cosine distance: mean_i (1 − cos(t_i, s_i)). No options; needs teacher embeddings only."""
    s, t = prepare_pair(student_emb, teacher_emb)
    return (1.0 - _cos(s, t)).mean()


@register_loss
def l2(student_emb, teacher_emb):
    """Mean squared error of the raw embeddings, averaged over all batch × dim elements (F.mse_loss).

    Plain feature regression (FitNets-style); scale depends on the embeddings' norms. Needs teacher embeddings."""
    s, t = prepare_pair(student_emb, teacher_emb)
    return F.mse_loss(s, t, reduction="mean")


class DistillationObjective(nn.Module):
    """total = classification (the margin head's loss) + Σ alpha_i × term_i, every term by name.

    `terms` (distill/losses/terms.py: the experiment's, the short form distill.loss + distill.alpha being one
    term); `loss` + `alpha` + options build one term of that loss (a shorthand for tests and scripts).
    forward(student_emb, labels, teacher_emb=None, maps=None) returns (total, logs) with logs holding detached
    tensors: 'loss' (total), 'loss_cls', each term before its alpha as 'loss_kd/<term name>' (its log is
    train/loss_kd/<name>), and the head's logs. With every alpha 0 or no teacher embeddings it is plain training:
    no term is computed and none is in the logs (so a baseline run shows no distillation curve rather than a flat
    zero); a term at alpha 0 is left out. Under DDP, loss_cls is the global batch's loss (the head gathers all
    ranks) while the terms are this rank's; DDP's gradient averaging makes both gradients global means.

    State-dict slots: the k-th term's loss is the attribute `distill_loss` (k = 0) or `distill_loss_<k>`, in both
    forms of the config, so its state is `distill_loss.*`, `distill_loss_1.*`, ... in last.pt.
    """

    def __init__(self, head: nn.Module, loss: str = "equivalent_angular", alpha: float = 7.0,
                 project: tuple | None = None, terms: list | None = None, **loss_options):
        super().__init__()
        terms = [LossTerm(loss, loss, alpha, loss_options)] if terms is None else list(terms)
        for term in terms:
            if not (isinstance(term.alpha, (int, float)) and math.isfinite(term.alpha) and term.alpha >= 0):
                raise ConfigError(f"distillation alpha must be a finite number >= 0, got {term.alpha!r} ({term.name})")
        self.requirements = [requirements(t.loss) for t in terms]
        check_terms(terms, Setting())  # what the terms alone can tell (two owners of the classification)
        self.head = head
        self.terms = terms
        self.distill_loss = None  # (no terms); each term's loss is its slot's attribute (a module is registered)
        for k, term in enumerate(terms):
            setattr(self, self._slot(k), create_distill_loss(term.loss, **term.options))
        # distill.project: linear: (student dim, teacher dim) -> a learned map of the student's embedding to the
        # teacher's size, used only inside the distillation loss (the classifier and the saved student never see it)
        self.projection = nn.Linear(project[0], project[1], bias=False) if project else None

    @staticmethod
    def _slot(k: int) -> str:
        return "distill_loss" if k == 0 else f"distill_loss_{k}"

    @property
    def losses(self) -> list:
        """(term, loss) in order, read from the slots (so a loss put in a slot is the one that runs)."""
        return [(t, getattr(self, self._slot(k))) for k, t in enumerate(self.terms)]

    def active(self, what: str | None = None) -> list:
        """(term, loss, requirements) of the terms at alpha > 0; `what`: only those whose Requirements field of
        that name is true (e.g. 'feature_maps', 'centres')."""
        return [(t, fn, needs) for (t, fn), needs in zip(self.losses, self.requirements, strict=True)
                if t.alpha > 0 and (what is None or getattr(needs, what))]

    @property
    def alpha(self) -> float:
        """The terms' summed weights: > 0 when some term distils."""
        return float(sum(t.alpha for t in self.terms))

    @property
    def loss_name(self) -> str:
        return " + ".join(t.loss for t in self.terms) or "none"

    def extra_repr(self) -> str:
        return ", ".join(f"{t.name}: {t.loss} x {t.alpha:g}" for t in self.terms) or "no distillation"

    @staticmethod
    def log_name(term) -> str:
        return f"loss_kd/{term.name}"

    def centre_terms(self) -> list:
        """(term, loss) of the active terms that need the teacher's class centres (distill/losses/centres.py)."""
        return [(t, fn) for t, fn, _ in self.active("centres")]

    def feature_terms(self) -> list:
        """(term, loss) of the active terms on feature maps."""
        return [(t, fn) for t, fn, _ in self.active("feature_maps")]

    def forward(self, student_emb: torch.Tensor, labels: torch.Tensor, teacher_emb: torch.Tensor | None = None,
                maps: dict | tuple | None = None):
        """`maps`: {term name: (student maps, teacher maps)} at each feature term's stages (a (student, teacher)
        pair when only one term needs maps)."""
        active = self.active() if teacher_emb is not None else []
        owner = next((fn for _, fn, needs in active if needs.replaces_classification), None)
        if owner is not None:
            loss_cls, head_logs = owner.classify(self.head, student_emb, labels, teacher_emb)
        else:
            loss_cls, head_logs = self.head(student_emb, labels)
        logs = {name: value.detach() if torch.is_tensor(value) else value for name, value in head_logs.items()}
        logs["loss_cls"] = loss_cls.detach()
        total = loss_cls
        projected = None
        for term, kd, needs in active:
            if needs.replaces_classification:
                continue
            if needs.feature_maps:
                value = kd(*self._maps_of(term, maps))
            else:
                if projected is None:
                    projected = self.projection(student_emb) if self.projection is not None else student_emb
                value = kd(projected, teacher_emb, labels) if needs.labels else kd(projected, teacher_emb)
            logs[self.log_name(term)] = value.detach()
            total = total + term.alpha * value
        logs["loss"] = total.detach()
        return total, logs

    def _maps_of(self, term, maps) -> tuple:
        if isinstance(maps, dict) and term.name in maps:
            return maps[term.name]
        if isinstance(maps, tuple) and len(maps) == 2 and len(self.feature_terms()) == 1:
            return maps
        raise ConfigError(f"distillation term {term.name} ({term.loss}) needs the student's and the teacher's "
                          f"feature maps")

    def trained_modules(self) -> list:
        """What trains beside the student and the head: the projection, and the losses' own trained parameters
        (FitNet's regressors); none for the other losses, so their optimizer holds only the student and the head."""
        extra = [self.projection] + [fn for _, fn in self.losses]
        return [m for m in extra if isinstance(m, nn.Module) and any(p.requires_grad for p in m.parameters())]

    def training_state(self) -> dict:
        """What last.pt keeps of the objective besides the head: the projection and the losses' own state."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}

    def load_training_state(self, state: dict, source: str = "the checkpoint") -> None:
        expected = self.training_state()
        if set(state) != set(expected):
            raise CheckpointError(f"{source}: the objective's state holds {sorted(state) or 'nothing'}, this stage "
                                  f"needs {sorted(expected) or 'nothing'} (distill.loss, distill.terms or "
                                  f"distill.project changed?)")
        self.load_state_dict({**{k: v for k, v in self.state_dict().items() if k.startswith("head.")}, **state})
