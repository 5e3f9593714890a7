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

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses.registry import create_distill_loss, register_loss, requirements
from distill.losses.requirements import Requirements
from distill.losses.term_checks import Setting, check_terms
from distill.losses.terms import LossTerm
from distill.utils.errors import CheckpointError, ConfigError


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
    """The paper's equivalent angular loss: mean_i |t̂_i − ŝ_i|² = mean_i (2 − 2 cos(t_i, s_i)).

    Paper: VarGFaceNet (Yan et al., arXiv 1910.04985), weight alpha = 7. No options. Needs: teacher embeddings
    of the student's size (or distill.project: linear). Tested: tests/test_losses.py (hand-computed)."""
    s, t = _prepare(student_emb, teacher_emb)
    return (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1).mean()


@register_loss
def shrinkteanet_angular(student_emb, teacher_emb):
    """ShrinkTeaNet's angular loss: mean_i (1 − cos(t_i, s_i))².

    Paper: Duong et al. 2019, "ShrinkTeaNet: Million-scale Lightweight Face Recognition via Shrinking
    Teacher-Student Networks"; the squared form is VarGFaceNet's quote of it. No official code: the public
    implementation linked to the paper (MarginDistillation's angular_distillation) computes mean_i (1 − cos), the
    `cosine` loss. No options. Needs: teacher embeddings only."""
    s, t = _prepare(student_emb, teacher_emb)
    return (1.0 - _cos(s, t)).pow(2).mean()


@register_loss
def cosine(student_emb, teacher_emb):
    """Cosine distance: mean_i (1 − cos(t_i, s_i)). No options; needs teacher embeddings only."""
    s, t = _prepare(student_emb, teacher_emb)
    return (1.0 - _cos(s, t)).mean()


@register_loss
def l2(student_emb, teacher_emb):
    """Mean squared error of the raw embeddings, averaged over all batch × dim elements (F.mse_loss).

    Plain feature regression (FitNets-style); scale depends on the embeddings' norms. Needs teacher embeddings."""
    s, t = _prepare(student_emb, teacher_emb)
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


@register_loss("adadistill", requires=Requirements(sizes="same", replaces_classification=True))
class AdaDistill(nn.Module):
    """AdaDistill (Boutros et al., ECCV 2024): the teacher's knowledge goes into the student's class centres.

    For each sample i of identity y_i, with ŝ_i, t̂_i the normalised student and teacher embeddings and Ŵ_y the
    normalised class centre, computed without gradient:
        α_i = clip(cos(ŝ_i, t̂_i) · clip(cos(Ŵ_{y_i}, t̂_i), 1e-6, 1), 1e-6, 1)
        W_{y_i} ← α_i Ŵ_{y_i} + (1 − α_i) t̂_i
    then the head's usual margin loss (the paper: ArcFace s = 64, m = 0.45; here margin.*) on the updated
    centres, which replaces the classification term (no alpha × term is added; alpha > 0 turns it on).
    Early in training (student far from teacher) α is small and the centres follow the teacher; as the
    student aligns, α grows and the centres move less. Samples of one identity in a batch: their updated
    centres are averaged (a choice: the paper does not say; the authors' indexed write keeps one). Sharded
    heads: embeddings, labels and teacher embeddings are gathered, and each rank updates the centres it holds.
    The centres are the head's weight, so they are in last.pt already, and they also train by SGD. The
    authors' code (fdbtrs/AdaDistill) blends the raw centre, α W + (1 − α) t̂, and its optimizer holds only
    the backbone (docs/methods.md). Needs teacher and student embeddings of one size (the centres live in the
    student's space).
    """

    @torch.no_grad()
    def update_centres(self, head, student_emb, labels, teacher_emb) -> torch.Tensor:
        """Move the centres of this batch's identities (those this rank holds) toward the teacher; returns the α
        of every sample of the global batch whose centre is on this rank."""
        s, t = _prepare(student_emb, teacher_emb)
        shard = head.centre_shard()
        comm = shard.comm
        labels = labels.reshape(-1).long()
        sizes = comm.batch_sizes(labels.shape[0], labels.device)
        s_hat = comm.gather_rows(F.normalize(s, dim=1), sizes)
        t_hat = comm.gather_rows(F.normalize(t, dim=1), sizes)
        local, mine = shard.local(comm.gather_rows(labels, sizes))
        rows, s_hat, t_hat = local[mine], s_hat[mine], t_hat[mine]
        w_hat = F.normalize(head.local_centres()[rows].to(t_hat.dtype), dim=1)
        alpha = ((s_hat * t_hat).sum(1) * (w_hat * t_hat).sum(1).clamp(1e-6, 1.0)).clamp(1e-6, 1.0)
        updated = alpha[:, None] * w_hat + (1.0 - alpha[:, None]) * t_hat
        classes, inverse = rows.unique(return_inverse=True)
        summed = updated.new_zeros(len(classes), updated.shape[1]).index_add_(0, inverse, updated)
        counts = torch.bincount(inverse, minlength=len(classes)).to(summed.dtype)
        head.update_local_centres(classes, summed / counts[:, None])
        return alpha

    def classify(self, head, student_emb, labels, teacher_emb):
        alpha = self.update_centres(head, student_emb, labels, teacher_emb)
        loss, logs = head(student_emb, labels)
        return loss, {**logs, "ada_alpha": alpha.mean() if alpha.numel() else alpha.new_zeros(())}


@register_loss("ekd", requires=Requirements(labels=True, images_per_id=True))
class EKD(nn.Module):
    """EKD, evaluation-oriented knowledge distillation (Huang et al., CVPR 2022): match where pairs fall relative
    to the verification thresholds, for student and teacher, instead of matching embeddings.

    In a batch (which needs repeated identities: data.images_per_id), S = the pairwise cosine similarities
    (pairs i < j), once for the student and once for the teacher. Positives: pairs of one identity;
    negatives: the `hard_negatives` pairs of different identities with the highest student similarity (all
    of them when fewer). For each FAR r in `fars` the threshold a_r is the ceil(r·N)-th highest of the batch's
    N negative similarities (the highest when r·N < 1), so when r·N is whole r·N − 1 negatives exceed it;
    TFace's code takes sorted_neg[int(r·N)], which r·N exceed (docs/methods.md). It is tracked by an EMA with
    `momentum` (the first batch sets it; TFace's starts at zero), separately for student and teacher, without
    gradient. The soft
    count of thresholds a similarity passes is c(x) = Σ_r σ((x − a_r) / `temperature`), and

        loss = `positive_weight` · MSE(c_s(S⁺_s), c_t(S⁺_t)) + `negative_weight` · MSE(c_s(S⁻_s), c_t(S⁻_t)),

    added to the classification loss as alpha × loss: distill.alpha: 1 gives the paper's
    ArcFace + 0.02·MSE⁺ + 0.01·MSE⁻. The thresholds are buffers: saved in last.pt, resumed.
    """

    def __init__(self, fars=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6), hard_negatives: int = 2000, momentum: float = 0.01,
                 temperature: float = 0.01, positive_weight: float = 0.02, negative_weight: float = 0.01):
        super().__init__()
        self.fars = tuple(float(r) for r in fars)
        self.hard_negatives, self.momentum, self.temperature = int(hard_negatives), float(momentum), float(temperature)
        self.positive_weight, self.negative_weight = float(positive_weight), float(negative_weight)
        self.register_buffer("thresholds", torch.zeros(2, len(self.fars)))  # [student, teacher] x FAR
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))     # batches folded into the EMA

    def batch_thresholds(self, negatives: torch.Tensor) -> torch.Tensor:
        """a_r of one batch: the ceil(r·N)-th highest negative similarity (the highest when r·N < 1)."""
        ordered = negatives.detach().sort(descending=True).values
        n = ordered.numel()
        index = torch.tensor([max(math.ceil(r * n) - 1, 0) for r in self.fars], device=ordered.device)
        return ordered[index]

    def soft_count(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((x[:, None] - thresholds[None, :]) / self.temperature).sum(1)

    def forward(self, student_emb, teacher_emb, labels):
        s, t = _prepare(student_emb, teacher_emb)
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        i, j = torch.triu_indices(len(s), len(s), offset=1, device=s.device)
        labels = labels.reshape(-1)
        same = labels[i] == labels[j]
        if not bool(same.any()):
            raise ConfigError("distill.loss ekd: this batch holds no two images of one identity; set "
                              "data.images_per_id (e.g. 4) so every batch repeats identities")
        sim_s, sim_t = (s[i] * s[j]).sum(1), (t[i] * t[j]).sum(1)
        neg_s, neg_t = sim_s[~same], sim_t[~same]
        if neg_s.numel() == 0:
            raise ConfigError("distill.loss ekd: this batch holds only one identity; lower data.images_per_id so a "
                              "batch holds several identities")
        with torch.no_grad():
            batch = torch.stack([self.batch_thresholds(neg_s), self.batch_thresholds(neg_t)])
            if self.training:
                if int(self.seen) == 0:
                    self.thresholds.copy_(batch)
                else:
                    self.thresholds.mul_(1 - self.momentum).add_(self.momentum * batch)
                self.seen += 1
            thresholds = self.thresholds.to(sim_s.dtype) if int(self.seen) else batch
        hard = neg_s.detach().topk(min(self.hard_negatives, neg_s.numel())).indices
        pos_term = F.mse_loss(self.soft_count(sim_s[same], thresholds[0]), self.soft_count(sim_t[same], thresholds[1]))
        neg_term = F.mse_loss(self.soft_count(neg_s[hard], thresholds[0]), self.soft_count(neg_t[hard], thresholds[1]))
        return self.positive_weight * pos_term + self.negative_weight * neg_term
